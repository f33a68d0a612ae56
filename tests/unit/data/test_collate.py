import pytest
import torch

from soup.data import collate_padded


def test_pads_right_to_the_longest_with_ignored_labels_and_a_zero_mask():
    batch = collate_padded(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())


def test_labels_are_not_shifted():
    batch = collate_padded([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], pad_token_id=0)
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        collate_padded([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_token_id=0)
