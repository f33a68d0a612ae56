"""Preference rows -> token ids (soup/data/preference.py) and pairs -> batches (soup/data/collate.py).

The byte tokenizer makes expected ids computable by hand: ids 0-4 are
<pad> <s> </s> <|im_start|> <|im_end|>, and byte b is id b + 5.
"""

from __future__ import annotations

from collections import Counter

import pytest

from soup.data.collate import collate_pairs, collate_unpaired
from soup.data.preference import build_preference_datasets
from soup.errors import DataError
from soup.losses.sft import IGNORE_INDEX
from tests.conftest import require_shared

PAD, BOS, EOS, IM_START, IM_END = 0, 1, 2, 3, 4


def ids(text: str) -> list[int]:
    """Byte-tokenizer ids of `text`, computed without the tokenizer."""
    return [b + 5 for b in text.encode("utf-8")]


def pair(prompt="Q", chosen="good", rejected="bad") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def build(write_jsonl, data_config, byte_tokenizer):
    """build(rows, shape="paired", seed=0, **data overrides) -> PreferenceSplits on a tmp .jsonl."""

    def run(rows, shape="paired", seed=0, **overrides):
        path = write_jsonl(rows)
        return build_preference_datasets(data_config(train_file=str(path), **overrides), byte_tokenizer, shape, seed)

    return run


# ----------------------------------------------------------------------------- string rows


def test_string_pair_is_bos_prompt_then_completion_plus_eos(build):
    # The byte tokenizer adds no BOS itself; plain-text prompts still start with one.
    splits = build([pair("Hi ", "yes", "no")])
    (example,) = splits.train
    assert example == {"prompt_ids": [BOS] + ids("Hi "), "chosen_ids": ids("yes") + [EOS],
                       "rejected_ids": ids("no") + [EOS]}
    assert splits.chat_template is None and splits.val is None


def test_empty_string_prompt_is_a_lone_bos_so_the_first_completion_token_is_scored(build):
    (example,) = build([pair("", "yes", "no")]).train
    assert example["prompt_ids"] == [BOS]


def test_prompt_that_already_starts_with_bos_text_gets_no_second_bos(build):
    (example,) = build([pair("<s>Hi", "yes", "no")]).train
    assert example["prompt_ids"] == [BOS] + ids("Hi")


def test_stories260k_tokenizer_adding_bos_itself_gives_exactly_one_bos(write_jsonl, data_config):
    from soup.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(require_shared("models/stories260k")))
    assert tok("Once")["input_ids"][0] == tok.bos_token_id  # the premise: it adds BOS on its own
    path = write_jsonl([pair("Once upon a time", "there was a cat.", "the end")])
    (example,) = build_preference_datasets(data_config(train_file=str(path)), tok, "paired", 0).train
    prompt_ids = example["prompt_ids"]
    assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1
    assert tok.decode(prompt_ids[1:]) == "Once upon a time"
    assert example["chosen_ids"][-1] == tok.eos_token_id and tok.bos_token_id not in example["chosen_ids"]
    assert tok.decode(example["chosen_ids"][:-1]) == "there was a cat."


# ----------------------------------------------------------------------------- message rows


def test_message_prompt_renders_with_generation_prompt_and_completion_is_reply_plus_im_end(build, byte_tokenizer):
    splits = build([{"prompt": user("Hi"), "chosen": assistant("Yo"), "rejected": assistant("No")}])
    (example,) = splits.train
    assert example["prompt_ids"] == ([IM_START] + ids("user\nHi") + [IM_END] + ids("\n")
                                     + [IM_START] + ids("assistant\n"))
    assert example["chosen_ids"] == ids("Yo") + [IM_END] + ids("\n")
    assert example["rejected_ids"] == ids("No") + [IM_END] + ids("\n")
    assert byte_tokenizer.decode(example["prompt_ids"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert byte_tokenizer.decode(example["chosen_ids"]) == "Yo<|im_end|>\n"
    assert splits.chat_template is not None and "im_start" in splits.chat_template


def test_message_prompt_keeps_the_system_turn(build, byte_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}] + user("Hi")
    (example,) = build([{"prompt": prompt, "chosen": assistant("Yo"), "rejected": assistant("No")}]).train
    assert byte_tokenizer.decode(example["prompt_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_demo_pairs_load_as_message_rows(data_config, byte_tokenizer):
    splits = build_preference_datasets(data_config(), byte_tokenizer, "paired", 0)
    assert splits.report.rows_used == 200 and splits.files[0].endswith("demo/preference.jsonl")
    first = splits.train[0]
    assert byte_tokenizer.decode(first["chosen_ids"]) == "ragus<|im_end|>\n"
    assert byte_tokenizer.decode(first["rejected_ids"]) == "ugars<|im_end|>\n"


# ----------------------------------------------------------------------------- errors


def assert_row_error(excinfo, path, line, *words):
    message = str(excinfo.value)
    assert f"{path}:{line}:" in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("missing", ["prompt", "chosen", "rejected"])
def test_pair_missing_a_field_names_file_line_and_field(write_jsonl, data_config, byte_tokenizer, missing):
    row = pair()
    del row[missing]
    path = write_jsonl([pair(), row])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 2, f"'{missing}'")


@pytest.mark.parametrize("missing", ["prompt", "completion", "label"])
def test_unpaired_row_missing_a_field_names_file_line_and_field(write_jsonl, data_config, byte_tokenizer, missing):
    row = {"prompt": "Q", "completion": "A", "label": True}
    del row[missing]
    path = write_jsonl([{"prompt": "Q", "completion": "B", "label": False}, row])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "unpaired", 0)
    assert_row_error(info, path, 2, f"'{missing}'")


def test_chosen_identical_to_rejected_is_refused_with_file_line(write_jsonl, data_config, byte_tokenizer):
    path = write_jsonl([pair(), pair(), pair("Q", "same", "same")])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 3, "identical")


@pytest.mark.parametrize("label", ["yes", 1, 0, None, "true"])
def test_label_that_is_not_a_json_bool_is_refused_with_file_line(write_jsonl, data_config, byte_tokenizer, label):
    path = write_jsonl([{"prompt": "Q", "completion": "A", "label": True},
                        {"prompt": "Q", "completion": "B", "label": label}])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "unpaired", 0)
    assert_row_error(info, path, 2, "label", "not a bool")


def test_bool_labels_are_read_as_desirable_flags(build):
    splits = build([{"prompt": "Q", "completion": "A", "label": True},
                    {"prompt": "R", "completion": "B", "label": False}], shape="unpaired")
    assert [(e["prompt_ids"], e["completion_ids"], e["desirable"]) for e in splits.train] == [
        ([BOS] + ids("Q"), ids("A") + [EOS], True), ([BOS] + ids("R"), ids("B") + [EOS], False)]


@pytest.mark.parametrize("bad", [
    pair("Q", "", "bad"),
    pair("Q", "good", "  \n"),
    {"prompt": user("Q"), "chosen": assistant(""), "rejected": assistant("bad")},
    {"prompt": user("Q"), "chosen": assistant("good"), "rejected": assistant("   ")},
])
def test_empty_completion_is_refused_with_file_line(write_jsonl, data_config, byte_tokenizer, bad):
    path = write_jsonl([pair(), bad])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 2, "empty")


def test_empty_unpaired_completion_is_refused_with_file_line(write_jsonl, data_config, byte_tokenizer):
    path = write_jsonl([{"prompt": "Q", "completion": "A", "label": True},
                        {"prompt": "Q", "completion": " ", "label": False}])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "unpaired", 0)
    assert_row_error(info, path, 2, "'completion' is empty")


@pytest.mark.parametrize("bad", [
    {"prompt": "Q", "chosen": assistant("good"), "rejected": assistant("bad")},
    {"prompt": user("Q"), "chosen": "good", "rejected": "bad"},
    {"prompt": user("Q"), "chosen": assistant("good"), "rejected": "bad"},
])
def test_mixing_strings_and_messages_in_a_row_is_refused_with_file_line(write_jsonl, data_config, byte_tokenizer, bad):
    first = {"prompt": user("Q"), "chosen": assistant("a"), "rejected": assistant("b")} if isinstance(
        bad["prompt"], list) else pair()
    path = write_jsonl([first, bad])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 2, "mix strings and message lists")


def test_message_without_a_role_is_refused_with_file_line(write_jsonl, data_config, byte_tokenizer):
    path = write_jsonl([{"prompt": [{"content": "Q"}], "chosen": assistant("a"), "rejected": assistant("b")}])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 1, "prompt[0]", "role")


def test_paired_task_given_unpaired_rows_says_which_tasks_read_them(write_jsonl, data_config, byte_tokenizer):
    path = write_jsonl([{"prompt": "Q", "completion": "A", "label": True}])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 1, "'chosen'/'rejected'", "task=kto")


# ----------------------------------------------------------------------------- truncation


def test_completion_keeps_its_start_and_prompt_keeps_its_end_with_counts(build):
    # prompt: BOS + 10 bytes = 11 tokens; chosen: 10 bytes + EOS = 11; rejected 2 + EOS = 3.
    splits = build([pair("abcdefghij", "0123456789", "xy"), pair("k", "m", "n")],
                   max_prompt_length=4, max_completion_length=5)
    first, second = splits.train
    assert first["prompt_ids"] == ids("ghij")
    assert first["chosen_ids"] == ids("01234")
    assert first["rejected_ids"] == ids("xy") + [EOS]
    assert second == {"prompt_ids": [BOS] + ids("k"), "chosen_ids": ids("m") + [EOS], "rejected_ids": ids("n") + [EOS]}
    report = splits.report
    assert (report.prompts_truncated, report.completions_truncated, report.rows_dropped) == (1, 1, 0)
    assert (report.max_prompt_tokens, report.max_completion_tokens) == (11, 11)  # lengths before the cut
    assert "1 prompts (start cut), 1 rows' completions (end cut)" in report.summary()


def test_prompt_gives_up_its_start_when_prompt_plus_longest_completion_exceeds_max_length(build):
    # 11-token prompt + 11-token chosen > 16 with a completion cap of 11: the prompt keeps its last 5.
    (example,) = build([pair("abcdefghij", "0123456789", "xy")], max_length=16, max_completion_length=11).train
    assert example["prompt_ids"] == ids("fghij")
    assert example["chosen_ids"] == ids("0123456789") + [EOS]
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) == 16


def test_without_a_completion_cap_the_prompt_keeps_half_of_max_length(build):
    # 11 + 11 > 16 and no caps: the prompt keeps min(11, 16 // 2) = 8 tokens, the completion the other 8.
    (example,) = build([pair("abcdefghij", "0123456789", "xy")], max_length=16).train
    assert example["prompt_ids"] == ids("cdefghij")
    assert example["chosen_ids"] == ids("01234567")
    assert example["rejected_ids"] == ids("xy") + [EOS]


def test_completion_filling_max_length_alone_is_refused_with_the_fix(write_jsonl, data_config, byte_tokenizer):
    path = write_jsonl([pair("Q", "0123456789", "x")])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path), max_length=8, max_completion_length=8),
                                  byte_tokenizer, "paired", 0)
    assert_row_error(info, path, 1, "data.max_completion_length", "data.overlong=truncate_or_drop")


def test_overlong_drop_drops_rows_and_counts_them(build):
    rows = [pair("a", "b", "c"), pair("abcdefghij", "0123456789", "x"), pair("d", "e", "f"), pair("Q", "01234567", "z")]
    splits = build(rows, max_length=10, overlong="drop")
    assert [e["prompt_ids"] for e in splits.train] == [[BOS] + ids("a"), [BOS] + ids("d")]
    report = splits.report
    assert (report.rows_read, report.rows_used, report.rows_dropped) == (4, 2, 2)
    assert (report.prompts_truncated, report.completions_truncated) == (0, 0)


def test_overlong_drop_of_every_row_is_an_error(write_jsonl, data_config, byte_tokenizer):
    path = write_jsonl([pair("abcdefghij", "0123456789", "x")])
    with pytest.raises(DataError, match="no usable rows"):
        build_preference_datasets(data_config(train_file=str(path), max_length=8, overlong="drop"),
                                  byte_tokenizer, "paired", 0)


def test_real_pairs_fit_the_caps(data_config, byte_tokenizer):
    path = require_shared("data/preference/hh_rlhf_harmless_base.jsonl")
    cfg = data_config(train_file=str(path), max_rows=200, max_length=512, max_prompt_length=256,
                      max_completion_length=256)
    splits = build_preference_datasets(cfg, byte_tokenizer, "paired", 0)
    assert splits.report.rows_used == 200
    for example in splits.train:
        longest = max(len(example["chosen_ids"]), len(example["rejected_ids"]))
        assert len(example["prompt_ids"]) <= 256 and longest <= 256
        assert len(example["prompt_ids"]) + longest <= 512
    # hh-rlhf prompts are long multi-turn transcripts: the cap must have cut some.
    assert splits.report.prompts_truncated > 0


# ----------------------------------------------------------------------------- unpaired shape, splits


def test_paired_rows_become_one_desirable_and_one_undesirable_row_for_an_unpaired_task(build):
    splits = build([pair("P", "good", "bad"), pair("R", "yes", "no")], shape="unpaired")
    rows = [(e["prompt_ids"], e["completion_ids"], e["desirable"]) for e in splits.train]
    assert rows == [([BOS] + ids("P"), ids("good") + [EOS], True), ([BOS] + ids("P"), ids("bad") + [EOS], False),
                    ([BOS] + ids("R"), ids("yes") + [EOS], True), ([BOS] + ids("R"), ids("no") + [EOS], False)]
    assert splits.report.rows_used == 4 and splits.report.shape == "unpaired"


def unpaired_rows(n):
    return [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(n)]


def test_every_unpaired_row_gets_another_rows_completion_for_the_kl_term(build):
    examples = build(unpaired_rows(7), shape="unpaired").train
    own = [tuple(e["completion_ids"]) for e in examples]
    borrowed = [tuple(e["kl_completion_ids"]) for e in examples]
    assert all(b != o for b, o in zip(borrowed, own))  # completions are distinct, so no row keeps its own
    assert Counter(borrowed) == Counter(own)  # each completion lent exactly once: a derangement


def test_kl_completions_are_fixed_by_the_seed(build):
    def borrowed(seed):
        return [e["kl_completion_ids"] for e in build(unpaired_rows(7), shape="unpaired", seed=seed).train]

    assert borrowed(3) == borrowed(3)
    assert any(borrowed(s) != borrowed(3) for s in (4, 5, 6))


def test_single_unpaired_row_falls_back_to_its_own_completion(build):
    (example,) = build(unpaired_rows(1), shape="unpaired").train
    assert example["kl_completion_ids"] == example["completion_ids"]


def test_val_split_holds_rows_out_of_training(build):
    rows = [pair(f"prompt {i}", f"good {i}", f"bad {i}") for i in range(10)]
    splits = build(rows, val_split=0.2)
    assert (len(splits.train), len(splits.val)) == (8, 2)
    train_prompts = {tuple(e["prompt_ids"]) for e in splits.train}
    val_prompts = {tuple(e["prompt_ids"]) for e in splits.val}
    assert not train_prompts & val_prompts and len(train_prompts | val_prompts) == 10
    assert (splits.report.rows_read, splits.report.rows_held_out, splits.report.rows_used) == (10, 2, 8)
    assert splits.val_report.rows_used == 2 and "2 held out for val" in splits.report.summary()


# ----------------------------------------------------------------------------- collate


PAIRS = [
    {"prompt_ids": [11, 12], "chosen_ids": [13, 14, 15], "rejected_ids": [16]},
    {"prompt_ids": [21], "chosen_ids": [22], "rejected_ids": [23, 24]},
]
X = IGNORE_INDEX


def test_collate_pairs_stacks_chosen_then_rejected_with_labels_on_completions_only():
    batch = collate_pairs(PAIRS, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 22, 0, 0, 0],
                                           [11, 12, 16, 0, 0], [21, 23, 24, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 13, 14, 15], [X, 22, X, X, X],
                                        [X, X, 16, X, X], [X, 23, 24, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert "ref_logps" not in batch


def test_collate_pairs_adds_ref_logps_chosen_then_rejected_only_when_every_example_has_them():
    with_ref = [dict(PAIRS[0], ref_chosen=-1.5, ref_rejected=-2.5), dict(PAIRS[1], ref_chosen=-3.0, ref_rejected=-4.0)]
    assert collate_pairs(with_ref, PAD)["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    assert "ref_logps" not in collate_pairs([with_ref[0], PAIRS[1]], PAD)


def test_collate_unpaired_stacks_matched_then_mismatched_rows_with_labels():
    rows = [{"prompt_ids": [11], "completion_ids": [12, 13], "kl_completion_ids": [22], "desirable": True},
            {"prompt_ids": [21, 20], "completion_ids": [22], "kl_completion_ids": [12, 13], "desirable": False}]
    batch = collate_unpaired(rows, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 0], [21, 20, 22, 0], [11, 22, 0, 0], [21, 20, 12, 13]]
    assert batch["labels"].tolist() == [[X, 12, 13, X], [X, X, 22, X], [X, 22, X, X], [X, X, 12, 13]]
    assert batch["desirable"].tolist() == [True, False]
    assert "ref_logps" not in batch
    rows = [dict(rows[0], ref_logp=-1.0, ref_kl_logp=-5.0), dict(rows[1], ref_logp=-2.0, ref_kl_logp=-6.0)]
    assert collate_unpaired(rows, PAD)["ref_logps"].tolist() == [-1.0, -2.0, -5.0, -6.0]


def test_truncate_or_drop_drops_only_a_pair_whose_completion_leaves_no_room(build):
    rows = [pair("a", "b", "c"), pair("Q", "0123456789", "x"), pair("abcdefghij", "0", "1")]
    splits = build(rows, max_length=8, max_completion_length=8, overlong="truncate_or_drop")
    report = splits.report
    assert (report.rows_read, report.rows_used, report.rows_dropped) == (3, 2, 1)
    assert (report.prompts_truncated, report.completions_truncated) == (1, 0)  # the dropped pair is not counted


def test_a_chat_template_for_plain_string_prompts_is_refused_naming_the_flag(build):
    from soup.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.chat_template is set, but the prompts of .* are plain strings"):
        build([pair("Hi ", "yes", "no")], chat_template="chatml")
    assert build([{"prompt": user("Hi"), "chosen": assistant("yes"), "rejected": assistant("no")}],
                 chat_template="chatml").chat_template is not None


@pytest.mark.parametrize("max_length, max_completion_length", [(8, None), (8, 1), (12, 3), (64, None)])
def test_every_built_completion_keeps_at_least_one_token(build, max_length, max_completion_length):
    # Length-normalised losses (SimPO, ORPO, sigmoid_norm) divide by the completion's token
    # count: however rows are cut, each completion the data builds has >= 1 token.
    rows = [pair("a long prompt " * 4, "a long chosen answer " * 3, "no"), pair("Q", "y", "a rejected one " * 5)]
    splits = build(rows, max_length=max_length, max_completion_length=max_completion_length,
                   overlong="truncate_or_drop")
    for example in splits.train:
        assert len(example["chosen_ids"]) >= 1 and len(example["rejected_ids"]) >= 1
    unpaired = build(rows, shape="unpaired", max_length=max_length, max_completion_length=max_completion_length,
                     overlong="truncate_or_drop")
    assert all(len(example["completion_ids"]) >= 1 for example in unpaired.train)


def test_a_completion_cap_below_one_token_is_refused_at_config_load():
    from tests.unit.config.test_compose import make
    from soup.config import validate
    from soup.errors import ConfigError

    overrides = ["task=dpo", "data.max_completion_length=0"]
    with pytest.raises(ConfigError, match=r"data\.max_completion_length must be at least 1"):
        validate(make(*overrides), overrides)


@pytest.mark.parametrize("row, shape, kind, fix", [
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "paired", "an alpaca row", "task=sft"),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "unpaired", "an alpaca row", "task=sft"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "paired", "a chat (messages) row", "task=sft"),
    ({"text": "a document"}, "paired", "a plain-text row", "task=pretrain"),
    ({"text": "a document"}, "unpaired", "a plain-text row", "task=pretrain"),
    ({"question": "Q", "answer": "A"}, "paired", "its fields: answer, question", "{prompt, chosen, rejected}"),
])
def test_sft_rows_given_to_a_preference_task_point_at_the_task_that_reads_them(
        write_jsonl, data_config, byte_tokenizer, row, shape, kind, fix):
    """Not kto/bco, which do not read these rows either (issue 10, item 12)."""
    path = write_jsonl([row])
    with pytest.raises(DataError) as info:
        build_preference_datasets(data_config(train_file=str(path)), byte_tokenizer, shape, 0)
    assert_row_error(info, path, 1, kind, fix)
    assert "kto" not in str(info.value)
