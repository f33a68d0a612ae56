"""Packing: rows, boundary labels, masks; a packed row with the cross-document mask
gives each document the logits and loss it has alone."""

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import SoupConfig
from soup.data import collate_padded
from soup.data.packing import (block_causal_mask, collate_packed, first_fit_decreasing, pack_examples,
                               packing_efficiency)
from soup.losses.sft import IGNORE_INDEX, next_token_loss_sum
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer

X = IGNORE_INDEX


def example(ids, labels=None):
    return {"input_ids": list(ids), "labels": list(labels if labels is not None else ids)}


def random_documents(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 200, (n,), generator=gen).tolist()
        prompt = min(1 + i % 3, n)
        docs.append(example(ids, [X] * prompt + ids[prompt:]))
    return docs


def tiny_model(attn_implementation):
    cfg = OmegaConf.structured(SoupConfig)
    cfg.merge_with({"model": {"name": "tiny", "attn_implementation": attn_implementation,
                              "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "num_key_value_heads": 1}}})
    tokenizer = build_byte_tokenizer()
    return build_model(cfg.model, tokenizer, seed=0).eval(), tokenizer.pad_token_id


# -- rows ------------------------------------------------------------------------


def test_first_fit_decreasing_puts_each_item_in_the_first_bin_with_room():
    # By hand, capacity 8: 5->A(3 left) 4->B(4) 3->A(0) 3->B(1) 2->C(6) 2->C(4) 1->B(0).
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]


def test_position_ids_restart_at_every_document():
    rows = pack_examples([example([7, 8, 9]), example([10, 11])], max_length=8)
    assert len(rows) == 1
    assert rows[0]["input_ids"] == [7, 8, 9, 10, 11]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[0]["doc_lengths"] == [3, 2]
    assert rows[0]["example_indices"] == [0, 1]


def test_first_token_of_every_document_is_never_a_target():
    rows = pack_examples([example([7, 8, 9], [X, 8, 9]), example([10, 11, 12], [10, 11, 12])], max_length=8)
    # 10 would be predicted from 9, the previous document's last token: masked.
    assert rows[0]["labels"] == [X, 8, 9, X, 11, 12]


def test_every_example_lands_in_exactly_one_row_within_max_length():
    lengths = [3, 9, 1, 7, 5, 5, 2, 8, 4, 6, 10, 2]
    rows = pack_examples(random_documents(lengths), max_length=10, seed=3)
    assert sorted(i for r in rows for i in r["example_indices"]) == list(range(len(lengths)))
    assert all(len(r["input_ids"]) == sum(r["doc_lengths"]) <= 10 for r in rows)
    assert len(rows) == 7  # 62 tokens: 7 rows, the optimum
    assert packing_efficiency(rows, 10) == pytest.approx(62 / 70)


def test_seed_shuffles_the_rows_but_keeps_them_valid():
    docs = random_documents([3, 9, 1, 7, 5, 5, 2, 8, 4, 6, 10, 2] * 4)
    a, b = pack_examples(docs, 10, seed=1), pack_examples(docs, 10, seed=1)
    assert a == b
    assert [r["example_indices"] for r in a] != [r["example_indices"] for r in pack_examples(docs, 10, seed=2)]


def test_an_example_longer_than_max_length_raises_naming_it():
    with pytest.raises(ValueError, match=r"example 1 has 5 tokens > max_length=4.*truncate"):
        pack_examples([example([1, 2]), example([1, 2, 3, 4, 5])], max_length=4)


# -- collation ----------------------------------------------------------------------


def test_collate_pads_labels_and_gives_a_plain_mask_without_cross_doc_masking():
    rows = pack_examples([example([7, 8, 9]), example([10, 11]), example([12, 13, 14, 15])], max_length=5)
    batch = collate_packed(rows, pad_token_id=0, cross_doc_mask=False, attn_implementation="sdpa")
    # FFD: [12..15] opens row 0, [7, 8, 9] opens row 1, [10, 11] joins row 1.
    assert batch["input_ids"].tolist() == [[12, 13, 14, 15, 0], [7, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[X, 13, 14, 15, X], [X, 8, 9, X, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_block_causal_mask_keeps_attention_inside_each_document():
    # Documents of 2 and 1 tokens, then one pad.
    mask = block_causal_mask(torch.tensor([[0, 0, 1, -1]]))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0],
                                         [1, 1, 0, 0],
                                         [0, 0, 1, 0],
                                         [0, 0, 0, 1]]


def test_eager_gets_an_additive_float_mask_and_sdpa_a_bool_one():
    rows = pack_examples([example([7, 8]), example([9])], max_length=4)
    sdpa = collate_packed(rows, 0, True, "sdpa")["attention_mask"]
    eager = collate_packed(rows, 0, True, "eager")["attention_mask"]
    assert sdpa.dtype == torch.bool and eager.dtype == torch.float32
    assert torch.equal(eager == 0, sdpa)
    assert eager.min() == torch.finfo(torch.float32).min


def test_flash_attention_gets_flattened_rows_and_varlen_lengths_instead_of_a_mask():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [X, 6, X, 8], "position_ids": [0, 1, 0, 1], "doc_lengths": [2, 2]},
            {"input_ids": [9, 10, 11], "labels": [X, 10, 11], "position_ids": [0, 1, 2], "doc_lengths": [3]}]
    batch = collate_packed(rows, 0, True, "flash_attention_2")
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[X, 6, X, 8, X, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 4, 7] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"].tolist() == [0, 2, 4, 7]
    assert int(batch["max_length_q"]) == int(batch["max_length_k"]) == 3


def test_cross_doc_mask_with_an_unsupported_attention_raises_naming_the_flags():
    rows = pack_examples([example([7, 8])], max_length=4)
    with pytest.raises(ValueError, match="model.attn_implementation"):
        collate_packed(rows, 0, True, "flex_attention")


# -- equivalence with the documents run alone ------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone_only_with_the_cross_doc_mask(attn_implementation):
    model, pad = tiny_model(attn_implementation)
    docs = random_documents([9, 5, 7, 4, 12])
    rows = pack_examples(docs, max_length=20)
    assert max(len(r["doc_lengths"]) for r in rows) >= 2 and len({len(r["input_ids"]) for r in rows}) > 1

    def packed_logits(cross_doc_mask):
        batch = collate_packed(rows, pad, cross_doc_mask, attn_implementation)
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch["attention_mask"]).logits

    masked, leaky = packed_logits(True), packed_logits(False)
    later_doc_gaps = []
    for b, row in enumerate(rows):
        start = 0
        for k, (i, n) in enumerate(zip(row["example_indices"], row["doc_lengths"])):
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([docs[i]["input_ids"]])).logits[0]
            torch.testing.assert_close(masked[b, start : start + n], alone, atol=1e-5, rtol=0,
                                       msg=f"row {b}, document {k}")
            if k > 0:
                later_doc_gaps.append(float((leaky[b, start : start + n] - alone).abs().max()))
            start += n
    # Without the mask the later documents see the earlier ones: the check above can fail.
    assert min(later_doc_gaps) > 1e-3


def test_packed_loss_equals_the_documents_padded_one_by_one():
    model, pad = tiny_model("sdpa")
    docs = random_documents([9, 5, 7, 4, 12, 3])
    rows = pack_examples(docs, max_length=16)
    batch = collate_packed(rows, pad, True, "sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits
        packed_sum, packed_tokens = next_token_loss_sum(logits, batch["labels"])
        alone_sum, alone_tokens = torch.tensor(0.0), 0
        for doc in docs:
            single = collate_padded([doc], pad)
            s, n = next_token_loss_sum(model(input_ids=single["input_ids"]).logits, single["labels"])
            alone_sum, alone_tokens = alone_sum + s, alone_tokens + n
    # Trained tokens by hand: each document's labels after its prompt (1 + i % 3 tokens).
    assert packed_tokens == alone_tokens == sum(n - (1 + i % 3) for i, n in enumerate([9, 5, 7, 4, 12, 3]))
    torch.testing.assert_close(packed_sum, alone_sum, atol=1e-4, rtol=1e-6)
