"""PRMTask (soup/tasks/prm.py) on a tiny token-classification model: the loss is the
cross-entropy at the labelled separator positions only, and the accuracies count what they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig, PRMTaskConfig
from soup.data.prm import collate_prm
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.prm import PRMTask

X = -100
EXAMPLES = [
    {"input_ids": [1, 40, 41, 10, 42, 10], "labels": [X, X, X, 1, X, 0]},  # two steps: good, then bad
    {"input_ids": [1, 43, 44, 45, 10], "labels": [X, X, X, X, 1]},  # one good step
]


def classifier(seed: int = 0):
    cfg = OmegaConf.structured(ModelConfig(name="tiny"))
    cfg.tiny.merge_with({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1})
    return build_model(cfg, build_byte_tokenizer(), seed, head="token_classes")


def test_the_loss_is_the_cross_entropy_at_the_labelled_positions_only():
    # eval: transformers' token-classification head applies dropout (0.1) in training
    model, task = classifier().eval(), PRMTask(OmegaConf.structured(PRMTaskConfig(name="prm")))
    batch = collate_prm(EXAMPLES, pad_id=0)
    assert task.units(batch) == 3
    out = task.forward(model, batch)
    with torch.no_grad():
        first = model(input_ids=torch.tensor([EXAMPLES[0]["input_ids"]])).logits[0]
        second = model(input_ids=torch.tensor([EXAMPLES[1]["input_ids"]])).logits[0]
    picked = torch.stack([first[3], first[5], second[4]])
    expected = F.cross_entropy(picked, torch.tensor([1, 0, 1]), reduction="sum")
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-5, atol=1e-6)
    predicted = picked.argmax(-1).tolist()
    assert out.metric_sums["step_accuracy"] == sum(p == t for p, t in zip(predicted, [1, 0, 1]))
    # The last labelled step of each row: position 5 of the first (label 0), 4 of the second (label 1).
    assert out.metric_sums["last_step_accuracy"] == (predicted[1] == 0) + (predicted[2] == 1)
    assert out.metric_counts["last_step_accuracy"] == 2


def test_a_trained_step_moves_only_through_labelled_positions():
    """Changing an unlabelled position's target cannot matter: only labelled logits get gradient."""
    model, task = classifier(), PRMTask(OmegaConf.structured(PRMTaskConfig(name="prm")))
    batch = collate_prm(EXAMPLES, pad_id=0)
    logits_grad = {}

    def keep(module, inputs, output):
        output.logits.retain_grad()
        logits_grad["logits"] = output.logits

    handle = model.register_forward_hook(keep)
    task.forward(model, batch).loss_sum.backward()
    handle.remove()
    grad = logits_grad["logits"].grad
    labelled = batch["labels"] != X
    assert grad[~labelled].abs().max() == 0 and grad[labelled].abs().min() > 0


@pytest.mark.parametrize("last_only, labelled", [(False, 2), (True, 1)])
def test_the_demo_rows_label_every_step_or_the_last(last_only, labelled):
    from soup.data.prm import read_prm_rows, tokenize_prm_row
    from soup.data.dataset import assets_path

    rows = read_prm_rows(assets_path("demo/prm.jsonl"))
    assert len(rows) == 160 and all(len(r.completions) == 2 for r in rows)
    example = tokenize_prm_row(rows[0], build_byte_tokenizer(), "\n", last_only)
    assert sum(label != X for label in example["labels"]) == labelled


@pytest.mark.parametrize("policy, kept, labels_of_first", [("truncate", 2, 1), ("truncate_or_drop", 1, 2),
                                                            ("drop", 1, 2)])
def test_long_rows_follow_data_overlong(tmp_path, policy, kept, labels_of_first):
    """A row too long for data.max_length: truncate keeps its first tokens (the step cut off
    loses its label), truncate_or_drop and drop drop it (it would lose a labelled step)."""
    import json

    from soup.config.schema import DataConfig

    rows = [{"prompt": "Q\n", "completions": ["a" * 20, "b" * 20], "labels": [True, False]},
            {"prompt": "Q\n", "completions": ["c", "d"], "labels": [True, True]}]
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = OmegaConf.structured(DataConfig(name="file", train_file=str(path), val_split=0.0, max_length=30,
                                           overlong=policy))
    cfg = OmegaConf.create({"data": data, "seed": 0})
    task = PRMTask(OmegaConf.structured(PRMTaskConfig(name="prm")))
    built = task.build_data(cfg, build_byte_tokenizer())
    assert len(built.train) == kept
    assert sum(label != X for label in built.train[0]["labels"]) == labels_of_first
    assert built.report.rows_truncated == (1 if policy == "truncate" else 0)
