"""task=reward_model through the CLI: a score-head model whose final/ transformers loads as a
sequence classifier, that the GRPO reward option takes as is, and that learns real preferences."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow


def evals(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"]


def test_final_loads_as_a_sequence_classifier_and_serves_as_a_grpo_reward(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from soup.rewards.reward_model import load_reward_model

    run_in_process(tmp_path, ["task=reward_model", "debug=tiny", "train.max_steps=6"])
    last = evals(tmp_path)[-1]
    assert {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= last.keys()
    final = tmp_path / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained(final)
    texts = ["Q: hi\nA: hello there", "Q: hi\nA: go away"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits[:, 0]
        single = [float(model(**tokenizer([t], return_tensors="pt")).logits[0, 0]) for t in texts]
    assert batched.tolist() == pytest.approx(single, abs=1e-5)  # padding does not move a score
    # task.reward=[<this final dir>] loads it and scores prompt + completion with the same numbers.
    assert load_reward_model(final).score(texts) == pytest.approx(single, abs=1e-5)


def test_a_lora_reward_model_saves_its_head_with_the_adapter_and_merges(tmp_path):
    """peft trains the new score head fully beside the adapters and saves it with them; soup.merge
    builds the base with a score head, so the merged model scores as base + adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from soup.merge import load_base

    run_cli("task=reward_model", "debug=tiny", "peft=lora", "train.max_steps=4", "optim.lr=1e-2",
            f"hydra.run.dir={tmp_path / 'run'}")
    adapter = tmp_path / "run" / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    run_cli("--adapter", str(adapter), "--out", str(tmp_path / "merged"), module="soup.merge")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    untrained = load_base(adapter, None)
    assert not torch.equal(merged.score.weight, untrained.score.weight)  # the trained head came with the adapter
    with_adapter = PeftModel.from_pretrained(load_base(adapter, None), adapter)
    ids = torch.tensor([[1, 72, 105, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
