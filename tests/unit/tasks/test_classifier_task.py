"""task=classifier's rows and labels (soup/data/classification.py) and its loss (soup/tasks/classifier.py);
the loss formulas are pinned in tests/unit/losses/test_classification.py."""

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
