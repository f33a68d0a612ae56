"""Process reward model data (soup/data/prm.py): reading, step labels on token positions, padding.

The byte tokenizer makes expected ids computable by hand: ids 0-4 are
<pad> <s> </s> <|im_start|> <|im_end|>, and byte b is id b + 5. It adds no BOS itself.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from soup.data.prm import PRMRow, collate_prm, read_prm_rows, tokenize_prm_row
from soup.errors import DataError
from soup.models.tokenizer import build_byte_tokenizer

PAD, BOS = 0, 1
IGNORE = -100


def ids(text: str) -> list[int]:
    """Byte-tokenizer ids of `text`, computed without the tokenizer."""
    return [b + 5 for b in text.encode("utf-8")]


def prm_row(prompt="Q:", completions=("a", "bc"), labels=(True, False)) -> PRMRow:
    return PRMRow(prompt=prompt, completions=list(completions), labels=list(labels), path="mem", line=1)


def good(**overrides) -> dict:
    row = {"prompt": "2+3*4?", "completions": ["3*4=12", "2+12=15"], "labels": [True, False]}
    row.update(overrides)
    return row


# ----------------------------------------------------------------------------- reading


def test_valid_rows_are_read_with_their_line_numbers(write_jsonl):
    path = write_jsonl([good(), "", good(prompt="other", completions=["x"], labels=[True], extra=1)])
    rows = read_prm_rows(path)
    assert [(r.prompt, r.completions, r.labels, r.line) for r in rows] == [
        ("2+3*4?", ["3*4=12", "2+12=15"], [True, False], 1),
        ("other", ["x"], [True], 3),  # the blank line 2 is skipped but still counted
    ]
    assert rows[0].path == str(path)


@pytest.mark.parametrize("bad, message, fix", [
    ('{"prompt": "q", "completions": [', "malformed JSON", "one complete JSON object"),
    ({"prompt": "q", "completions": ["a"]}, "no 'labels'", "PRM rows look like"),
    ({"completions": ["a"], "labels": [True]}, "no 'prompt'", "PRM rows look like"),
    (good(prompt=[{"role": "user", "content": "q"}]), "'prompt' is of type list", "render chat messages"),
    (good(completions="3*4=12\n2+12=15"), "'completions' is of type str, not a list", "PRM rows look like"),
    (good(labels=True), "'labels' is of type bool, not a list", "PRM rows look like"),
    (good(completions=[], labels=[]), "no steps", "at least one step"),
    (good(labels=[True]), "2 completions but 1 labels", "one label per step"),
    (good(completions=["3*4=12", "   \n"]), "completions[1] is empty", "remove the empty step"),
    (good(completions=["3*4=12", ""]), "completions[1] is empty", "remove the empty step"),
    (good(completions=["3*4=12", 15]), "completions[1] is of type int", "every step as text"),
    (good(labels=[True, 1]), "labels[1] is 1 (int), not a bool", "write true for a good step"),
    (good(labels=["+", "-"]), "labels[0] is '+' (str), not a bool", "write true for a good step"),
    (good(labels=[True, None]), "labels[1] is None", "write true for a good step"),
])
def test_each_bad_row_is_an_error_naming_the_file_line_and_fix(write_jsonl, bad, message, fix):
    path = write_jsonl([good(), good(), bad])
    with pytest.raises(DataError) as info:
        read_prm_rows(path)
    text = str(info.value)
    where, _, rest = text.partition(" ")
    problem, _, fix_text = rest.partition("\n  fix: ")
    assert where == f"{path}:3:" and message in problem and fix in fix_text
    assert info.value.line == 3


# ----------------------------------------------------------------------------- tokenizing


def test_labels_sit_on_the_separator_after_each_step(byte_tokenizer):
    out = tokenize_prm_row(prm_row(), byte_tokenizer)
    assert out["input_ids"] == ids("Q:") + ids("a") + ids("\n") + ids("bc") + ids("\n")
    assert out["labels"] == [IGNORE, IGNORE] + [IGNORE, 1] + [IGNORE, IGNORE, 0]


def test_each_labelled_token_is_the_separators_last_token_right_after_its_step(byte_tokenizer):
    steps, labels = ["x = 3 * 4", "x = 12", "so 2 + x = 15"], [True, True, False]
    out = tokenize_prm_row(prm_row("Solve 2 + 3 * 4.\n", steps, labels), byte_tokenizer, step_separator=" ки\n")
    positions = [t for t, label in enumerate(out["labels"]) if label != IGNORE]
    assert [out["labels"][t] for t in positions] == [1, 1, 0]
    separator = ids(" ки\n")
    for t, step in zip(positions, steps):
        assert byte_tokenizer.decode(out["input_ids"][t]) == "\n"  # the separator's last token
        # ... preceded by the rest of the separator and, before it, the step itself
        assert out["input_ids"][t + 1 - len(separator):t + 1] == separator
        before = out["input_ids"][:t + 1 - len(separator)]
        assert byte_tokenizer.decode(before).endswith(step)


def test_a_multi_token_separator_labels_only_its_last_token(byte_tokenizer):
    out = tokenize_prm_row(prm_row("", ["a"], [False]), byte_tokenizer, step_separator="\n\n")
    assert out["input_ids"] == ids("a\n\n") and out["labels"] == [IGNORE, IGNORE, 0]


def test_a_special_token_separator_is_one_labelled_token(byte_tokenizer):
    out = tokenize_prm_row(prm_row("q", ["a", "b"], [True, True]), byte_tokenizer, step_separator="<|im_end|>")
    assert out["input_ids"] == ids("q") + ids("a") + [4] + ids("b") + [4]
    assert out["labels"] == [IGNORE, IGNORE, 1, IGNORE, 1]


def test_train_on_last_step_only_keeps_only_the_last_label(byte_tokenizer):
    full = tokenize_prm_row(prm_row(), byte_tokenizer)
    last = tokenize_prm_row(prm_row(), byte_tokenizer, train_on_last_step_only=True)
    assert last["input_ids"] == full["input_ids"]
    assert last["labels"] == [IGNORE] * 6 + [0]


def test_steps_are_tokenised_apart_from_the_separator():
    """A BPE merge of "a\\n" into one token must not swallow the step boundary."""
    vocab = dict(build_byte_tokenizer().backend_tokenizer.get_vocab())
    vocab["aĊ"] = merged = len(vocab)  # "a\n" as one token (Ċ is the byte-level form of "\n")
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "Ċ")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    assert tokenizer("a\n")["input_ids"] == [merged]  # the joined text would merge step and separator
    out = tokenize_prm_row(prm_row("", ["a"], [True]), tokenizer)
    assert out["input_ids"] == ids("a\n") and out["labels"] == [IGNORE, 1]


def test_a_tokenizer_that_adds_bos_gets_exactly_one_at_the_start():
    tokenizer = build_byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", BOS)])
    assert tokenizer("a")["input_ids"] == [BOS] + ids("a")  # the tokenizer now adds BOS itself
    out = tokenize_prm_row(prm_row(), tokenizer)
    assert out["input_ids"] == [BOS] + ids("Q:a\nbc\n")
    assert out["labels"] == [IGNORE] * 4 + [1] + [IGNORE] * 2 + [0]
    # A prompt already starting with BOS keeps just that one.
    out = tokenize_prm_row(prm_row(prompt="<s>Q:"), tokenizer)
    assert out["input_ids"] == [BOS] + ids("Q:a\nbc\n")


def test_a_tokenizer_without_its_own_bos_gets_none(byte_tokenizer):
    out = tokenize_prm_row(prm_row(), byte_tokenizer)
    assert BOS not in out["input_ids"]


def test_max_length_cuts_the_end_and_drops_the_labels_cut_off(byte_tokenizer):
    # ids: Q : a \n b c \n  (labels on positions 3 and 6)
    out = tokenize_prm_row(prm_row(), byte_tokenizer, max_length=6)
    assert out["input_ids"] == ids("Q:a\nbc") and out["labels"] == [IGNORE] * 3 + [1, IGNORE, IGNORE]
    assert tokenize_prm_row(prm_row(), byte_tokenizer, max_length=7)["labels"][-1] == 0
    cut_in_prompt = tokenize_prm_row(prm_row(), byte_tokenizer, max_length=1)
    assert cut_in_prompt == {"input_ids": ids("Q"), "labels": [IGNORE]}


def test_max_length_must_be_positive(byte_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_prm_row(prm_row(), byte_tokenizer, max_length=0)


def test_a_separator_with_no_tokens_is_refused(byte_tokenizer):
    with pytest.raises(ValueError, match="step_separator"):
        tokenize_prm_row(prm_row(), byte_tokenizer, step_separator="")


def test_rows_read_from_a_file_tokenize(write_jsonl, byte_tokenizer):
    (row,) = read_prm_rows(write_jsonl([good(prompt="P", completions=["s1", "s2"], labels=[False, True])]))
    out = tokenize_prm_row(row, byte_tokenizer)
    assert out["input_ids"] == ids("Ps1\ns2\n")
    assert out["labels"] == [IGNORE] * 3 + [0] + [IGNORE] * 2 + [1]


# ----------------------------------------------------------------------------- collating


def test_collate_right_pads_with_pad_id_and_ignored_labels(byte_tokenizer):
    long = tokenize_prm_row(prm_row(), byte_tokenizer)  # 7 tokens: Q : a \n b c \n
    short = tokenize_prm_row(prm_row("", ["a"], [False]), byte_tokenizer)  # 2 tokens
    batch = collate_prm([short, long], pad_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 7) for t in batch.values())
    assert batch["input_ids"][0].tolist() == ids("a\n") + [PAD] * 5
    assert batch["attention_mask"][0].tolist() == [1, 1] + [0] * 5
    assert batch["labels"][0].tolist() == [IGNORE, 0] + [IGNORE] * 5
    assert batch["input_ids"][1].tolist() == long["input_ids"]
    assert batch["labels"][1].tolist() == long["labels"] and batch["attention_mask"][1].tolist() == [1] * 7


def test_collate_refuses_an_empty_batch():
    with pytest.raises(ValueError):
        collate_prm([], pad_id=PAD)
