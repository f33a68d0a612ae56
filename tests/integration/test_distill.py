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


def test_an_8bit_teacher_keeps_stories260ks_distributions_within_quantisation_error(tmp_path):
    """The teacher loaded with bitsandbytes 8-bit weights (task.teacher.quant=8bit) gives next-token
    distributions close to the float teacher's, and not identical (the weights really are int8)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soup.tasks.distill import DistillTask

    teacher = require_shared("models/stories260k")
    task = DistillTask(OmegaConf.create({"teacher": {"path": str(teacher), "quant": "8bit", "top_k": None}}))
    cfg = OmegaConf.create({"model": {"trust_remote_code": False, "dtype": "float32", "tokenizer_path": str(teacher),
                                      "path": None, "attn_implementation": "sdpa"}})
    task.tokenizer = AutoTokenizer.from_pretrained(teacher)
    lines = task.setup(None, cfg, None, torch.device("cpu"))
    assert "8bit bitsandbytes weights" in lines[0]
    assert any("Linear8bit" in type(m).__name__ for m in task.teacher.modules())
    ids = task.tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt")["input_ids"]
    full = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        exact = full(input_ids=ids).logits.log_softmax(-1)
        quantised = task.teacher(input_ids=ids).logits.float().log_softmax(-1)
    kl = (exact.exp() * (exact - quantised)).sum(-1).mean()
    assert 0 < float(kl) < 0.05, float(kl)


def test_on_policy_distillation_of_stories260k_lowers_the_held_out_kl_too(tmp_path):
    """GKD's mixture (task.lmbda=0.5, generalised JSD at beta 0.5): about half the steps train on the
    student's own samples. The held-out JSD per token falls from 0.563 to 0.415 in 30 steps (15 of
    them on-policy) when written."""
    teacher = require_shared("models/stories260k")
    data = require_shared("data/sft/self_instruct_seed_tasks.alpaca.jsonl")
    run_in_process(tmp_path, [
        "task=distill", f"task.teacher.path={teacher}", "task.alpha=1.0", "task.lmbda=0.5",
        "task.divergence=generalized_jsd", "task.max_new_tokens=32", "model=tiny", f"model.tokenizer_path={teacher}",
        "model.tiny.hidden_size=64", "model.tiny.intermediate_size=172", "model.tiny.num_hidden_layers=2", "data=file",
        f"data.train_file={data}", "data.chat_template=chatml", "data.max_length=256", "data.overlong=drop",
        "data.val_split=0.2", "train.max_steps=30", "train.micro_batch_size=8", "train.grad_accum_steps=1",
        "train.eval_every_steps=30", "train.eval_at_start=true", "train.save_every_steps=0", "optim.lr=3e-3",
        "train.progress_bar=false"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], round(r["divergence"], 3)) for r in rows if r["split"] == "eval"]
    on_policy = [r["on_policy"] for r in rows if r["split"] == "train"]
    assert 0 < sum(on_policy) < len(on_policy), on_policy  # both kinds of step ran
    assert evals[-1][1] < 0.8 * evals[0][1], evals
    print(f"held-out generalised JSD per token: {evals}; on-policy steps {sum(on_policy):.0f} of {len(on_policy)}")
