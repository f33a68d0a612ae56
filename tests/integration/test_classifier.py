"""task=classifier end to end on the tiny model: the demo sentiment, a regression, a pair."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_in_process

pytestmark = pytest.mark.slow


def evals(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"]


def test_the_demo_sentiment_classifier_learns_and_its_final_names_the_classes(tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_in_process(tmp_path, ["task=classifier", "train.max_steps=60", "train.micro_batch_size=16",
                              "train.grad_accum_steps=1", "optim.lr=3e-3", "train.eval_every_steps=60",
                              "train.eval_at_start=true", "train.save_every_steps=0", "train.progress_bar=false"])
    history = evals(tmp_path)
    accuracies = [(e["step"], round(e["accuracy"], 3), round(e["macro_f1"], 3)) for e in history]
    assert history[-1]["accuracy"] > 0.6 and history[-1]["accuracy"] > history[0]["accuracy"], accuracies
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_scored_pairs_train_a_regression_with_mse_and_spearman(tmp_path):
    rows = [{"query": f"how many {i}", "document": "x" * (i % 7 + 1), "score": (i % 7) / 6} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_in_process(tmp_path / "run", ["task=classifier", "debug=tiny", "data=file",
                                      f"data.train_file={tmp_path / 'pairs.jsonl'}", "task.text_column=query",
                                      "task.pair_column=document", "task.label_column=score", "data.val_split=0.25",
                                      "train.max_steps=4"])
    last = evals(tmp_path / "run")[-1]
    assert {"loss", "mse", "spearman"} <= last.keys()


def test_a_lora_classifier_of_three_classes_merges_to_the_same_logits(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from soup.merge import load_base
    from tests.conftest import run_cli

    run_cli("task=classifier", "debug=tiny", "peft=lora", "train.max_steps=2", "optim.lr=1e-2",
            f"hydra.run.dir={tmp_path / 'run'}")
    adapter = tmp_path / "run" / "final"
    run_cli("--adapter", str(adapter), "--out", str(tmp_path / "merged"), module="soup.merge")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_labels == 3
    with_adapter = PeftModel.from_pretrained(load_base(adapter, None), adapter).eval()
    ids = torch.tensor([[72, 105, 33, 101, 108]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
