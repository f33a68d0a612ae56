"""task=distill on real weights: stories260K distilled into a fresh tiny Llama on its tokenizer."""

from __future__ import annotations

import json

import pytest

from tests.conftest import require_shared, run_in_process

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def test_distilling_stories260k_into_a_tiny_student_lowers_its_held_out_kl(tmp_path):
    """Observed on the held-out 20% of the self-instruct rows: forward KL(teacher || student) per
    token falls from 3.72 at step 0 to 2.27 after 30 steps of pure distillation (task.alpha=1)."""
    teacher = require_shared("models/stories260k")
    data = require_shared("data/sft/self_instruct_seed_tasks.alpaca.jsonl")
    run_in_process(tmp_path, [
        "task=distill", f"task.teacher.path={teacher}", "task.alpha=1.0", "model=tiny",
        f"model.tokenizer_path={teacher}", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=172",
        "model.tiny.num_hidden_layers=2", "data=file", f"data.train_file={data}", "data.chat_template=chatml",
        "data.max_length=256", "data.overlong=drop", "data.val_split=0.2", "train.max_steps=30",
        "train.micro_batch_size=8", "train.grad_accum_steps=1", "train.eval_every_steps=30", "train.eval_at_start=true",
        "train.save_every_steps=0", "optim.lr=3e-3", "train.progress_bar=false"])
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    kl = [(e["step"], round(e["divergence"], 3)) for e in evals]
    assert [step for step, _ in kl] == [0, 30]
    assert kl[-1][1] < 0.8 * kl[0][1], kl
    print(f"held-out forward KL per token: {kl}")
