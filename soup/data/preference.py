"""Preference data: {prompt, chosen, rejected} pairs and KTO-style {prompt, completion, label} rows.

Each field is a string or a list of chat messages:
- strings are plain text: the completion follows the prompt directly and ends with
  EOS (hh-rlhf's "\\n\\nHuman: ... \\n\\nAssistant:" prompts are already formatted);
- message lists go through the chat template: the prompt is rendered with the
  generation prompt, the completion is what the full conversation adds to it
  (reply and end-of-turn text).

Truncation, with counts in the report: a completion keeps its start (at most
data.max_completion_length tokens), a prompt keeps its end (at most
data.max_prompt_length tokens), and if prompt + longest completion still exceeds
data.max_length the prompt loses more of its start. With data.max_completion_length
unset, a completion may use what the prompt leaves, but the prompt always keeps up
to half of data.max_length (or data.max_prompt_length), so a long answer never
pushes the question out entirely. data.overlong=drop drops such rows instead;
data.overlong=truncate_or_drop drops only a row whose completion leaves no room for the prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from soup.data.dataset import DEMO_FILES, resolve_data_path, split_rows
from soup.data.readers import Row, read_rows, row_error
from soup.data.templates import resolve_template
from soup.data.tokenize import render_chat
from soup.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class PreferenceReport:
    """What happened to the rows of one split."""

    split: str
    source: str
    shape: str  # "paired" or "unpaired"
    rows_read: int = 0
    rows_held_out: int = 0
    rows_used: int = 0
    prompts_truncated: int = 0
    # Rows with at least one completion cut (a pair counts once).
    completions_truncated: int = 0
    rows_dropped: int = 0
    max_prompt_tokens: int = 0
    max_completion_tokens: int = 0

    def summary(self) -> str:
        held = f", {self.rows_held_out} held out for val" if self.rows_held_out else ""
        return (f"data {self.split}: {self.rows_read} {self.shape} rows of {self.source}{held} -> "
                f"{self.rows_used} used, {self.rows_dropped} dropped as too long; truncated: "
                f"{self.prompts_truncated} prompts (start cut), {self.completions_truncated} rows' completions (end cut); "
                f"longest prompt {self.max_prompt_tokens}, completion {self.max_completion_tokens} tokens")


@dataclass
class PreferenceSplits:
    train: list[dict]
    val: Optional[list[dict]]
    report: PreferenceReport
    val_report: Optional[PreferenceReport] = None
    chat_template: Optional[str] = None
    files: list[str] = field(default_factory=list)


def build_preference_datasets(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, shape: str, seed: int,
                              margin: bool = False) -> PreferenceSplits:
    """Read and tokenize preference rows. shape: "paired" (prompt/chosen/rejected) or
    "unpaired" (prompt/completion/label; paired rows are also accepted and split into
    one desirable and one undesirable row).

    Paired examples: {"prompt_ids", "chosen_ids", "rejected_ids"}; unpaired:
    {"prompt_ids", "completion_ids", "desirable", "kl_completion_ids"} where the last is
    another row's completion, the mismatched pair KTO's KL baseline is estimated from.
    margin: paired examples keep each row's `margin` (a number; a reward model's target
    margin, Llama 2), which every row of a file then has or none has.
    """
    train_value = data_cfg.train_file or DEMO_FILES.get("preference")
    if train_value is None:
        raise ConfigError("data.train_file is not set.\n  fix: set data=file data.train_file=pairs.jsonl.")
    train_path = resolve_data_path(train_value, "data.train_file")
    files = [str(train_path)]
    train_rows = read_rows(train_path, max_rows=data_cfg.max_rows)
    if data_cfg.val_file:
        val_path = resolve_data_path(data_cfg.val_file, "data.val_file")
        files.append(str(val_path))
        val_rows, held = read_rows(val_path), 0
    elif data_cfg.val_split > 0:
        train_rows, val_rows = split_rows(train_rows, data_cfg.val_split, seed)
        held = len(val_rows)
    else:
        val_rows, held = None, 0

    uses_messages = any(_is_messages(row.record.get("prompt")) for row in train_rows[:50])
    template = resolve_template(data_cfg.chat_template, tokenizer.chat_template) if uses_messages else None
    encoder = _Encoder(tokenizer, template, data_cfg, margin)
    train, report = encoder.build(train_rows, shape, "train", str(train_value), seed)
    if data_cfg.chat_template is not None and not uses_messages:
        # A template renders message lists; plain-string prompts are used as they are.
        raise ConfigError(f"data.chat_template is set, but the prompts of {train_value} are plain strings, which "
                          "are used as written and never rendered with a template.\n"
                          "  fix: drop data.chat_template, or give each prompt as a list of chat messages.")
    report.rows_read += held
    report.rows_held_out = held
    val = val_report = None
    if val_rows is not None:
        val, val_report = encoder.build(val_rows, shape, "val", str(data_cfg.val_file or train_value), seed + 1)
    return PreferenceSplits(train, val, report, val_report, template, files)


# Fields that mark a row as SFT data (soup/data/formats.py): alpaca, sharegpt, chatml messages, plain text.
_SFT_FIELDS = {"instruction": "an alpaca row", "conversations": "a sharegpt row", "messages": "a chat (messages) row",
               "text": "a plain-text row"}


def _what_it_is(record: dict) -> str:
    kind = next((name for key, name in _SFT_FIELDS.items() if key in record), None)
    if kind:
        return f": it is {kind}, which SFT reads, not a preference row"
    if {"prompt", "completion", "label"} <= record.keys():
        return ": it is an unpaired {prompt, completion, label} row"
    return f" (its fields: {', '.join(sorted(record)) or 'none'})"


def _fix_for(record: dict, shape: str) -> str:
    """The task that reads this row, or the row format the chosen task needs."""
    needs = ("this task needs {prompt, chosen, rejected} rows" if shape == "paired" else
             "this task needs {prompt, completion, label} or {prompt, chosen, rejected} rows")
    if "text" in record and not any(key in record for key in ("instruction", "conversations", "messages")):
        return f"train plain text with task=pretrain (or task=sft), or {needs}."
    if any(key in record for key in _SFT_FIELDS):
        return f"train these rows with task=sft; for preference training, {needs}."
    if shape == "paired" and {"prompt", "completion", "label"} <= record.keys():
        return "use task=kto or task=bco, which read {prompt, completion, label} rows; or give {prompt, chosen, rejected} rows."
    return f"{needs}."


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


class _Encoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: Optional[str], data_cfg: Any,
                 margin: bool = False):
        self.tokenizer, self.template, self.cfg, self.margin = tokenizer, template, data_cfg, margin
        self.max_prompt = data_cfg.max_prompt_length or data_cfg.max_length
        # The prompt's guaranteed share when the completion has no cap of its own.
        self.prompt_floor = min(self.max_prompt, data_cfg.max_length // 2)

    def build(self, rows: list[Row], shape: str, split: str, source: str, seed: int):
        report = PreferenceReport(split=split, source=source, shape=shape, rows_read=len(rows))
        examples: list[dict] = []
        first_has_margin = None
        for row in rows:
            record = row.record
            if "chosen" in record or "rejected" in record:
                prompt, chosen, rejected = (self._field(row, k) for k in ("prompt", "chosen", "rejected"))
                if chosen == rejected:
                    raise row_error(row, "chosen is identical to rejected, so the pair carries no preference",
                                    fix="remove the row or fix its rejected answer.")
                prompt_ids, (chosen_ids, rejected_ids) = self._encode(row, prompt, [chosen, rejected], report)
                if prompt_ids is None:
                    continue
                if shape == "paired":
                    example = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
                    if self.margin:
                        first_has_margin = "margin" in record if first_has_margin is None else first_has_margin
                        example.update(self._margin(row, first_has_margin))
                    examples.append(example)
                else:
                    examples.append({"prompt_ids": prompt_ids, "completion_ids": chosen_ids, "desirable": True})
                    examples.append({"prompt_ids": prompt_ids, "completion_ids": rejected_ids, "desirable": False})
            else:
                if shape == "paired" or any(key in record for key in _SFT_FIELDS):
                    raise row_error(row, f"the row has no 'chosen'/'rejected' fields{_what_it_is(record)}",
                                    fix=_fix_for(record, shape))
                prompt, completion = self._field(row, "prompt"), self._field(row, "completion")
                label = self._label(row)
                prompt_ids, (completion_ids,) = self._encode(row, prompt, [completion], report)
                if prompt_ids is None:
                    continue
                examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "desirable": label})
        if not examples:
            raise DataError("no usable rows", path=source,
                            fix="check the file, or raise data.max_length / use data.overlong=truncate.")
        if shape == "unpaired":
            _attach_mismatched_completions(examples, seed)
        report.rows_used = len(examples)
        return examples, report

    def _field(self, row: Row, key: str) -> Any:
        if key not in row.record:
            raise row_error(row, f"the row has no field '{key}'",
                            fix="preference rows need prompt, chosen, rejected (or prompt, completion, label).")
        value = row.record[key]
        if isinstance(value, str):
            if key != "prompt" and not value.strip():
                raise row_error(row, f"'{key}' is empty", fix=f"give every row a non-empty {key}.")
            return value
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            for i, message in enumerate(value):
                if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                    raise row_error(row, f"{key}[{i}] needs a role ({', '.join(ROLES)}) and a string content",
                                    fix='write messages as {"role": "user", "content": "..."}.')
            if key != "prompt" and not any(m["content"].strip() for m in value):
                raise row_error(row, f"'{key}' is empty", fix=f"give every row a non-empty {key}.")
            return value
        raise row_error(row, f"'{key}' is a {type(value).__name__}; it must be a string or a list of messages",
                        fix=f"write {key} as a string or as [{{\"role\": ..., \"content\": ...}}].")

    def _margin(self, row: Row, expected: bool) -> dict:
        """{"margin": the row's number}, or {} for a row without one; every row alike."""
        if ("margin" in row.record) != expected:
            raise row_error(row, "this row " + ("lacks" if expected else "has") + " a 'margin', unlike the file's "
                            "first row: a margin is the chosen reward's target lead, for every pair or for none",
                            fix="give every row a margin (0 for no lead), or remove the column.")
        if not expected:
            return {}
        value = row.record["margin"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise row_error(row, f"margin is {value!r}, not a finite number",
                            fix='write "margin": 1.5 (how far the chosen reward should lead).')
        return {"margin": float(value)}

    def _label(self, row: Row) -> bool:
        # Not through _field: a label is a JSON bool, never text or messages.
        if "label" not in row.record:
            raise row_error(row, "the row has no field 'label'",
                            fix="unpaired rows need prompt, completion and label (true = desirable).")
        label = row.record["label"]
        if not isinstance(label, bool):
            raise row_error(row, f"label is {label!r} ({type(label).__name__}), not a bool",
                            fix='write "label": true for a desirable completion, false otherwise.')
        return label

    def _encode(self, row: Row, prompt, completions: list, report: PreferenceReport):
        """Token ids of the prompt and of each completion, truncated by the policy above."""
        conversational = isinstance(prompt, list)
        if any(isinstance(c, list) != conversational for c in completions):
            raise row_error(row, "prompt and completions mix strings and message lists",
                            fix="write all of them as strings, or all as message lists.")
        tok = self.tokenizer
        if conversational:
            prompt_text = render_chat(prompt, tok, self.template, add_generation_prompt=True)
            completion_texts = []
            for completion in completions:
                full = render_chat(prompt + completion, tok, self.template)
                if not full.startswith(prompt_text):
                    raise ConfigError("data.chat_template renders the prompt differently once a reply follows, "
                                      "so the completion cannot be separated.\n  fix: use a preset template "
                                      "(data.chat_template=chatml or llama3).")
                completion_texts.append(full[len(prompt_text):])
            add_special = not (tok.bos_token and prompt_text.startswith(tok.bos_token))
            prompt_ids = tok(prompt_text, add_special_tokens=add_special)["input_ids"]
            completion_ids = [tok(text, add_special_tokens=False)["input_ids"] for text in completion_texts]
        else:
            # Plain text starts with one BOS whether or not the tokenizer adds it itself
            # (the byte tokenizer does not), as pretraining documents do (tokenize_text).
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None and prompt_ids[:1] != [tok.bos_token_id]:
                prompt_ids = [tok.bos_token_id] + prompt_ids
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            completion_ids = [tok(text, add_special_tokens=False)["input_ids"] + eos for text in completions]

        report.max_prompt_tokens = max(report.max_prompt_tokens, len(prompt_ids))
        report.max_completion_tokens = max(report.max_completion_tokens, *(len(c) for c in completion_ids))
        longest = max(len(c) for c in completion_ids)
        max_completion = self.cfg.max_completion_length or (
            self.cfg.max_length - min(len(prompt_ids), self.prompt_floor))
        needs_cut = (len(prompt_ids) > self.max_prompt or longest > max_completion
                     or len(prompt_ids) + longest > self.cfg.max_length)
        if needs_cut and self.cfg.overlong == "drop":
            report.rows_dropped += 1
            return None, [None] * len(completions)
        completions_cut = any(len(c) > max_completion for c in completion_ids)
        completion_ids = [c[:max_completion] for c in completion_ids]
        longest = max(len(c) for c in completion_ids)
        prompt_budget = min(self.max_prompt, self.cfg.max_length - longest)
        if prompt_budget < 1 and prompt_ids:
            if self.cfg.overlong == "truncate_or_drop":
                report.rows_dropped += 1
                return None, [None] * len(completions)
            raise row_error(row, f"the completion alone takes {longest} of data.max_length={self.cfg.max_length} "
                                 "tokens, leaving none for the prompt",
                            fix="raise data.max_length, lower data.max_completion_length, or set data.overlong="
                                "truncate_or_drop (drops only such rows) or drop.")
        report.completions_truncated += completions_cut
        if len(prompt_ids) > prompt_budget:
            report.prompts_truncated += 1
            prompt_ids = prompt_ids[len(prompt_ids) - prompt_budget:]
        return prompt_ids, completion_ids


def _attach_mismatched_completions(examples: list[dict], seed: int) -> None:
    """Give each unpaired example another example's completion (a fixed derangement).

    KTO's reference point z0 is estimated from completions scored under prompts they
    do not answer. Pairing at the data level, rather than inside each batch, keeps the
    estimate independent of batching so reference log-probs can be precomputed.
    """
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for position, index in enumerate(order):
        partner = order[(position + 1) % n] if n > 1 else index
        examples[index]["kl_completion_ids"] = examples[partner]["completion_ids"]
