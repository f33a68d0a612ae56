"""task=classifier's rows and labels (soup/data/classification.py) and its loss (soup/tasks/classifier.py);
the loss formulas are pinned in tests/unit/losses/test_classification.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from soup.data.classification import label_space, tokenize_row
from soup.data.readers import Row
from soup.errors import DataError
from soup.tasks.classifier import ClassifierTask


def rows_of(*labels, column="label"):
    return [Row(record={"text": f"row {i}", column: label}, path="d.jsonl", line=i + 1) for i, label in enumerate(labels)]


def test_class_names_are_sorted_into_ids_and_a_row_of_an_unseen_class_is_named():
    labels = label_space(rows_of("pos", "neg", "neutral", "pos"), "label", None)
    assert labels.names == ["neg", "neutral", "pos"] and not labels.regression
    with pytest.raises(DataError, match=r"d.jsonl:1: label 'meh' is not one of the training labels"):
        labels.id_of(rows_of("meh")[0], "meh", "label")


def test_indices_fill_num_labels_and_scores_make_a_regression():
    assert label_space(rows_of(0, 2, 1), "label", None).names == ["0", "1", "2"]
    assert label_space(rows_of(0, 1), "label", 4).num_labels == 4
    assert label_space(rows_of(0.25, 1.0), "label", None).regression
    assert label_space(rows_of(0, 1), "label", 1).regression


@pytest.mark.parametrize("labels, num_labels, says", [
    (("a", 1), None, "d.jsonl:2: 'label' mixes class names and numbers"),
    (("a", "a"), None, "nothing to tell apart"),
    ((0, 5), 3, "do not fit task.num_labels=3"),
    (("a", "b", "c"), 2, "3 classes in 'label'"),
    (("a", "b"), 3, "2 classes in 'label'"),
    ((0.5, "x"), None, "d.jsonl:2: 'label' is text in a regression"),
    ((True, False), None, "d.jsonl:1: 'label' is True"),
])
def test_bad_labels_are_refused_naming_the_file(labels, num_labels, says):
    with pytest.raises(DataError, match=says):
        label_space(rows_of(*labels), "label", num_labels)


def test_a_missing_label_column_names_the_line_and_the_option():
    with pytest.raises(DataError, match=r"(?s)d.jsonl:1: the row has no 'label'.*task.label_column"):
        label_space(rows_of("a", column="class"), "label", None)


def test_a_pair_is_joined_as_the_tokenizer_joins_two_texts():
    from soup.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    row = Row(record={"q": "abc", "d": "defgh"}, path="d.jsonl", line=1)
    assert tokenize_row(row, tokenizer, "q", "d", None) == tokenizer("abc", "defgh")["input_ids"]
    assert len(tokenize_row(row, tokenizer, "q", "d", 5)) == 5


def test_balanced_class_weights_scale_each_rows_cross_entropy(model_and_tokenizer, tmp_path):
    import json

    from transformers import LlamaForSequenceClassification

    from tests.conftest import compose_config

    _, tokenizer = model_and_tokenizer
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": "a" if i < 3 else "b"}) + "\n"
                                              for i in range(4)))
    cfg = compose_config(["task=classifier", "debug=tiny", "data=file", f"data.train_file={tmp_path / 'd.jsonl'}",
                          "data.val_split=0", "task.class_weights=balanced"])
    task = ClassifierTask(cfg.task)
    data = task.build_data(cfg, tokenizer)
    torch.testing.assert_close(task.class_weights, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    assert task.model_head[1]["id2label"] == {0: "a", 1: "b"}
    config = OmegaConf.to_container(cfg.model.tiny)
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], num_labels=2, pad_token_id=tokenizer.pad_token_id))
    batch = data.collate(data.train)
    out = task.forward(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = (task.class_weights[batch["labels"]] * F.cross_entropy(logits, batch["labels"], reduction="none")).sum()
    torch.testing.assert_close(out.loss_sum, expected)
    assert task.units(batch) == 4


def _score_model(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)).eval()


def test_listwise_groups_train_the_softmax_cross_entropy_of_each_groups_scores(model_and_tokenizer, tmp_path):
    import json

    from soup.losses.classification import listwise_softmax_ce
    from soup.metrics import mrr_any_relevant, ndcg_at_k
    from tests.conftest import compose_config

    _, tokenizer = model_and_tokenizer
    groups = [{"query": f"q{i}", "docs": [f"doc {i}", f"other {i}", "x"], "rel": [2, 0, 1] if i % 2 else [0, 1, 0]}
              for i in range(6)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    cfg = compose_config(["task=classifier", "debug=tiny", "data=file", f"data.train_file={tmp_path / 'g.jsonl'}",
                          "data.val_split=0", "task.text_column=query", "task.pair_column=docs",
                          "task.label_column=rel"])
    task = ClassifierTask(cfg.task)
    data = task.build_data(cfg, tokenizer)
    assert task.listwise and task.model_head == ("sequence_score", {"num_labels": 1})
    model = _score_model(tokenizer)
    batch = data.collate(data.train[:4])
    assert batch["input_ids"].shape[0] == 12 and batch["labels"].shape == (4, 3) and task.units(batch) == 4
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.view(4, 3)
    torch.testing.assert_close(task.forward(model, batch).loss_sum, listwise_softmax_ce(scores, batch["labels"]).sum())
    assert batch["input_ids"][1].tolist()[:int(batch["attention_mask"][1].sum())] == tokenizer("q0", "other 0")["input_ids"]
    metrics = task.evaluate(model, data.train, batch_size=4, device=torch.device("cpu"))
    full = data.collate(data.train)
    all_scores = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits.view(6, 3)
    assert metrics["mrr"] == pytest.approx(mrr_any_relevant(all_scores, full["labels"] > 0))
    assert metrics["ndcg@10"] == pytest.approx(ndcg_at_k(all_scores, full["labels"], 3))


@pytest.mark.parametrize("group, says", [
    ({"query": "q", "docs": ["a", "b"], "rel": [1, 0, 0]}, "one label per candidate"),
    ({"query": "q", "docs": ["a", "b", "c"], "rel": [0, 0, 0]}, "at least one above 0"),
    ({"query": "q", "docs": ["a", "b"], "rel": [1, 0]}, "the group has 2 candidates, the file's first group 3"),
])
def test_a_bad_group_is_refused_naming_its_line(group, says, tmp_path):
    import json

    from tests.conftest import compose_config

    first = {"query": "q0", "docs": ["a", "b", "c"], "rel": [1, 0, 0]}
    (tmp_path / "g.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(group) + "\n")
    cfg = compose_config(["task=classifier", "debug=tiny", "data=file", f"data.train_file={tmp_path / 'g.jsonl'}",
                          "data.val_split=0", "task.text_column=query", "task.pair_column=docs",
                          "task.label_column=rel"])
    from soup.models.tokenizer import build_byte_tokenizer

    with pytest.raises(DataError, match="g.jsonl:2: .*" + says):
        ClassifierTask(cfg.task).build_data(cfg, build_byte_tokenizer())


def test_pointwise_pairs_with_graded_labels_are_ranked_per_query():
    task = ClassifierTask(OmegaConf.create({"pair_column": "document"}))
    from soup.data.classification import Labels

    task.labels = Labels(names=["0", "1"])
    # query a: the relevant pair (label 1) has the 2nd highest expected grade of 3 -> RR 1/2; query b: 1st -> RR 1
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0], [9.0, 9.0]])
    gold = torch.tensor([0, 1, 0, 0, 1, 0])
    metrics = task._ranking_by_query(logits, gold, ["a", "a", "a", "b", "b", "c"])
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1) / 2) and metrics["ranked_queries"] == 2  # c: one pair, left out
    assert metrics["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
