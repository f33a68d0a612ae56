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
    assert merged.config.num_labels == 3 and merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    with_adapter = PeftModel.from_pretrained(load_base(adapter, None), adapter).eval()
    ids = torch.tensor([[72, 105, 33, 101, 108]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_a_listwise_reranker_learns_to_put_the_matching_candidate_first(tmp_path):
    import random

    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket"]
    groups = []
    for i in range(120):
        target, *others = rng.sample(words, 4)
        candidates = [f"a note about {target}", *(f"a note about {w}" for w in others)]
        order = rng.sample(range(4), 4)
        groups.append({"query": f"find {target}", "candidates": [candidates[j] for j in order],
                       "labels": [int(j == 0) for j in order]})
    (tmp_path / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    run_in_process(tmp_path / "run", ["task=classifier", "data=file", f"data.train_file={tmp_path / 'groups.jsonl'}",
                                      "task.text_column=query", "task.pair_column=candidates",
                                      "task.label_column=labels", "data.val_split=0.2", "train.max_steps=30",
                                      "train.micro_batch_size=8", "train.grad_accum_steps=1", "optim.lr=3e-3",
                                      "train.eval_every_steps=30", "train.eval_at_start=true",
                                      "train.save_every_steps=0", "train.progress_bar=false"])
    history = evals(tmp_path / "run")
    figures = [(e["step"], round(e["mrr"], 3), round(e["ndcg@10"], 3)) for e in history]
    # 24 held-out groups of 4: chance MRR is about 0.52
    assert history[-1]["mrr"] > history[0]["mrr"] + 0.2 and history[-1]["ndcg@10"] > history[0]["ndcg@10"], figures
