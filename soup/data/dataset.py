"""Build the train/val examples a task trains on, from the `data` config group.

    config -> resolve paths -> read rows -> detect format -> split -> tokenize
           -> truncate/drop -> DatasetSplits (examples + a DataReport per split)

Paths: `pkg://demo/sft.jsonl` names a file under soup/assets/ explicitly. Any other
relative path is looked up in the launch directory first (Hydra's original cwd if
a Hydra job runs), then under soup/assets/, so `data.train_file=demo/sft.jsonl`
also finds the bundled demo. `data.name=demo` with no train_file uses the demo
file of the task (DEMO_FILES).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypedDict

import jinja2
from transformers import PreTrainedTokenizerBase

from soup.data.formats import (CHAT_FORMATS, FORMATS, detect_format, prompt_and_completion, to_messages, to_text,
                                tools_of)
from soup.data.readers import Row, read_rows, row_error
from soup.data.templates import resolve_template
from soup.data.tokenize import IGNORE_INDEX, tokenize_chat, tokenize_prompt_completion, tokenize_text
from soup.errors import ConfigError, DataError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
PKG_PREFIX = "pkg://"
DEMO_FILES = {"sft": "pkg://demo/sft.jsonl", "distill": "pkg://demo/sft.jsonl", "pretrain": "pkg://demo/pretrain.jsonl",
              "preference": "pkg://demo/preference.jsonl", "grpo": "pkg://demo/grpo.jsonl", "prm": "pkg://demo/prm.jsonl",
              "classifier": "pkg://demo/classifier.jsonl",
              "embedding": "pkg://demo/embedding.jsonl"}
TASK_FORMATS = {"sft": (*CHAT_FORMATS, "prompt_completion"), "pretrain": ("plaintext",)}
TASK_FORMATS["distill"] = TASK_FORMATS["sft"]  # the student learns on SFT rows
OVERLONG_POLICIES = ("truncate", "drop", "truncate_or_drop")


class Example(TypedDict):
    """One training sequence: input_ids [seq] and labels [seq] (IGNORE_INDEX = not trained).

    Labels are unshifted: labels[t] belongs to input_ids[t]; the task shifts them.
    """

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What happened to the rows of one split, for the run log."""

    split: str
    source: str
    format: str
    rows_read: int = 0
    # Rows of the training file moved to the validation split (val_split).
    rows_held_out: int = 0
    rows_used: int = 0
    rows_truncated: int = 0
    rows_dropped: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    # Next-token targets (labels[1:] that are not IGNORE_INDEX), as the loss counts them.
    trained_tokens: int = 0
    max_example_tokens: int = 0
    mean_example_tokens: float = 0.0

    def summary(self) -> str:
        """One line, e.g. `train: 400 rows of sft.jsonl (chatml) -> 398 used, 2 truncated, ...`."""
        held = f", {self.rows_held_out} held out for val" if self.rows_held_out else ""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped_reasons.items()))
        dropped = f"{self.rows_dropped} dropped" + (f" ({reasons})" if reasons else "")
        return (
            f"{self.split}: {self.rows_read} rows of {self.source} ({self.format}){held} -> "
            f"{self.rows_used} used, {self.rows_truncated} truncated, {dropped}; "
            f"{self.tokens:,} tokens, {self.trained_tokens:,} trained; "
            f"length max {self.max_example_tokens} mean {self.mean_example_tokens:.1f}"
        )


@dataclass
class DatasetSplits:
    """The examples of each split; `chat_template` is the resolved Jinja text (chat tasks)."""

    train: list[Example]
    val: Optional[list[Example]]
    report: DataReport
    val_report: Optional[DataReport] = None
    chat_template: Optional[str] = None


def build_datasets(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, task_name: str, seed: int) -> DatasetSplits:
    """Read, check, split and tokenize the data of `data_cfg` (a DataConfig) for `task_name`.

    seed fixes the val_split selection. Raises ConfigError for impossible flags and
    DataError (naming file and line) for bad rows; never returns an empty train split.
    """
    _check_flags(data_cfg, task_name)
    train_value = data_cfg.train_file
    if train_value is None:
        if data_cfg.name != "demo":
            raise ConfigError("data.train_file is not set.\n"
                              "  fix: set data.train_file=path/to/train.jsonl (or use data=demo).")
        train_value = DEMO_FILES[task_name]
    train_path = resolve_data_path(train_value, "data.train_file")
    train_rows = read_rows(train_path, max_rows=data_cfg.max_rows, text_field=data_cfg.text_field)
    fmt = _task_format(train_rows, data_cfg, task_name)
    templated = task_name in ("sft", "distill") and fmt in CHAT_FORMATS
    template = resolve_template(data_cfg.chat_template, tokenizer.chat_template) if templated else None

    held_out = 0
    if data_cfg.val_file is not None:
        val_rows: Optional[list[Row]] = read_rows(resolve_data_path(data_cfg.val_file, "data.val_file"),
                                                  text_field=data_cfg.text_field)
        val_fmt = _task_format(val_rows, data_cfg, task_name)
        val_source = data_cfg.val_file
    elif data_cfg.val_split > 0:
        train_rows, val_rows = split_rows(train_rows, data_cfg.val_split, seed)
        held_out, val_fmt, val_source = len(val_rows), fmt, train_value
    else:
        val_rows, val_fmt, val_source = None, fmt, None

    build = dict(tokenizer=tokenizer, template=template, data_cfg=data_cfg)
    train, report = _tokenize_rows(train_rows, fmt, "train", str(train_value), **build)
    report.rows_read += held_out
    report.rows_held_out = held_out
    val, val_report = None, None
    if val_rows is not None:
        val, val_report = _tokenize_rows(val_rows, val_fmt, "val", str(val_source), **build)
    return DatasetSplits(train=train, val=val, report=report, val_report=val_report, chat_template=template)


def resolve_data_path(value: str, flag: str) -> Path:
    """A data file path: `pkg://x` under soup/assets/, else launch dir first, then soup/assets/."""
    if value.startswith(PKG_PREFIX):
        path = assets_path(value[len(PKG_PREFIX):])
        if not path.is_file():
            raise DataError(f"{flag}={value!r}: no such bundled file", path=str(path),
                            fix=f"bundled files live under {ASSETS_DIR}.")
        return path
    path = Path(value).expanduser()
    if path.is_absolute():
        return path  # read_rows reports a missing file with its path
    local = _launch_dir() / path
    if local.exists():
        return local
    bundled = assets_path(value)
    if bundled.exists():
        return bundled
    raise DataError(f"{flag}={value!r}: file not found (also looked in {bundled})", path=str(local),
                    fix=f"give a path relative to the launch directory, an absolute path, "
                        f"or {PKG_PREFIX}<file under soup/assets>.")


def assets_path(relative: str) -> Path:
    """The path of a file bundled under soup/assets/ (e.g. `demo/sft.jsonl`)."""
    return ASSETS_DIR / relative


def split_rows(rows: list[Row], val_split: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out round(len(rows) * val_split) rows (at least 1), chosen by `seed`.

    Both halves keep file order, so the same seed and file always give the same split.
    """
    n_val = max(1, round(len(rows) * val_split))
    if n_val >= len(rows):
        raise DataError(f"data.val_split={val_split} leaves no training rows out of {len(rows)}",
                        path=rows[0].path, fix="lower data.val_split or add rows.")
    val_indices = set(random.Random(seed).sample(range(len(rows)), n_val))
    train = [row for i, row in enumerate(rows) if i not in val_indices]
    val = [row for i, row in enumerate(rows) if i in val_indices]
    return train, val


def check_val_flags(data_cfg: Any) -> None:
    """data.val_split is a fraction, and only one of it and data.val_file is set."""
    if not 0.0 <= data_cfg.val_split < 1.0:
        raise ConfigError(f"data.val_split={data_cfg.val_split} is outside [0, 1).\n"
                          "  fix: use e.g. 0.05, or 0 for none.")
    if data_cfg.val_file is not None and data_cfg.val_split > 0:
        raise ConfigError(f"data.val_file and data.val_split={data_cfg.val_split} are both set; "
                          "only one can supply the validation rows.\n"
                          "  fix: set data.val_split=0 to use the val file, or data.val_file=null to split the train file.")


def _check_flags(data_cfg: Any, task_name: str) -> None:
    if task_name not in TASK_FORMATS:
        raise ConfigError(f"task={task_name} has no data builder in soup.data (it knows {', '.join(TASK_FORMATS)}).")
    if data_cfg.format != "auto" and data_cfg.format not in FORMATS:
        raise ConfigError(f"data.format={data_cfg.format!r} is not a known format.\n"
                          f"  fix: use auto or one of {', '.join(FORMATS)}.")
    if data_cfg.overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"data.overlong={data_cfg.overlong!r}.\n  fix: use one of {', '.join(OVERLONG_POLICIES)}.")
    if data_cfg.max_length < 1:
        raise ConfigError(f"data.max_length={data_cfg.max_length}.\n  fix: use a positive number of tokens.")
    check_val_flags(data_cfg)
    if data_cfg.max_rows is not None and data_cfg.max_rows < 1:
        raise ConfigError(f"data.max_rows={data_cfg.max_rows}.\n  fix: use a positive number, or null for all rows.")


def _task_format(rows: list[Row], data_cfg: Any, task_name: str) -> str:
    """The format of `rows` (data.format, or detected), checked against what the task trains on."""
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(rows, data_cfg.text_field)
    allowed = TASK_FORMATS[task_name]
    if fmt in allowed:
        return fmt
    other = "pretrain" if fmt == "plaintext" else "sft"
    if data_cfg.format != "auto":
        raise ConfigError(f"data.format={fmt} does not fit task={task_name}, which trains on {', '.join(allowed)}.\n"
                          f"  fix: use task={other} for {fmt} data, or set data.format to one of {', '.join(allowed)}.")
    raise DataError(f"the rows look like {fmt}, but task={task_name} trains on {', '.join(allowed)}",
                    path=rows[0].path, fix=f"use task={other} for this file, or convert it.")


def _tokenize_rows(
    rows: list[Row], fmt: str, split: str, source: str, *,
    tokenizer: PreTrainedTokenizerBase, template: Optional[str], data_cfg: Any,
) -> tuple[list[Example], DataReport]:
    """Tokenize rows, apply data.max_length / data.overlong, and count what happened."""
    report = DataReport(split=split, source=source, format=fmt, rows_read=len(rows))
    dropped: Counter[str] = Counter()
    examples: list[Example] = []
    max_length, drop = data_cfg.max_length, data_cfg.overlong == "drop"
    drop_emptied = data_cfg.overlong == "truncate_or_drop"
    for row in rows:
        input_ids, labels = _tokenize_row(row, fmt, tokenizer, template, data_cfg)
        full_length = len(input_ids)
        if full_length > max_length:
            if drop:
                dropped["overlong"] += 1
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        # labels[0] is never a target: position t predicts labels[t + 1].
        if all(label == IGNORE_INDEX for label in labels[1:]):
            if drop:
                dropped["no_trained_tokens"] += 1
                continue
            if drop_emptied and full_length > max_length:
                # The cut removed every trained token (a prompt that fills max_length).
                dropped["nothing_to_train_after_truncation"] += 1
                continue
            raise _no_trained_tokens(row, full_length, max_length)
        report.rows_truncated += full_length > max_length
        examples.append(Example(input_ids=input_ids, labels=labels))

    report.rows_dropped = sum(dropped.values())
    report.dropped_reasons = dict(dropped)
    report.rows_used = len(examples)
    if not examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items())
        raise DataError(f"no {split} rows left out of {len(rows)} (dropped: {reasons})", path=rows[0].path,
                        fix="raise data.max_length, or check the rows and data.chat_template.")
    lengths = [len(e["input_ids"]) for e in examples]
    report.tokens = sum(lengths)
    report.trained_tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    report.max_example_tokens = max(lengths)
    report.mean_example_tokens = report.tokens / len(examples)
    return examples, report


def _tokenize_row(
    row: Row, fmt: str, tokenizer: PreTrainedTokenizerBase, template: Optional[str], data_cfg: Any,
) -> tuple[list[int], list[int]]:
    if fmt == "plaintext":
        return tokenize_text(to_text(row, data_cfg.text_field), tokenizer)
    if fmt == "prompt_completion":
        return tokenize_prompt_completion(*prompt_and_completion(row), tokenizer, data_cfg.train_on_responses_only)
    messages = to_messages(row, fmt)
    try:
        return tokenize_chat(messages, tokenizer, template, data_cfg.train_on_responses_only, tools=tools_of(row, fmt))
    except jinja2.TemplateError as exc:
        # Templates raise on conversations they refuse (e.g. roles out of order); say which row.
        raise row_error(row, f"the chat template refused this conversation: {exc}",
                        fix="fix the row's roles/order, or choose another data.chat_template.") from exc


def _no_trained_tokens(row: Row, full_length: int, max_length: int) -> DataError:
    if full_length > max_length:
        return row_error(row, f"no trainable tokens left after truncating {full_length} tokens to "
                              f"data.max_length={max_length} (the assistant turns were cut off)",
                         fix=f"raise data.max_length to at least {full_length}, or set data.overlong=truncate_or_drop "
                             "(drops only such rows) or drop (drops every overlong row).")
    return row_error(row, "no trainable tokens: the chat template rendered no assistant text",
                     fix="check data.chat_template, or set data.overlong=drop to skip such rows.")


def _launch_dir() -> Path:
    # A Hydra job with hydra.job.chdir=true runs inside its output dir; relative data
    # paths still mean the directory the user launched from.
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()
