"""Prompt data for online RL: rows -> prompt token ids plus the columns the rewards read.

Validation prompts come from data.val_file or data.val_split, as for the offline tasks.
A prompt longer than data.max_length - task.max_completion_length loses its start
(data.overlong=truncate or truncate_or_drop: the question and the generation prompt stay)
or its row (data.overlong=drop).

A row's prompt is a `prompt` string (used as written), a `prompt` list of chat messages
(rendered with the chat template and its generation prompt), or a GSM8K-style
`question` string; task.prompt_template wraps a text prompt (r1_zero: DeepSeek-R1-Zero's
template). Every other column goes to the rewards, and so does `prompt`: the
prompt text as the policy sees it (chat template applied, start cut when truncated).
Each reward's columns are checked on every row before any generation, so a missing one
is an error naming the file and line, not a failure mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass

from soup.data.dataset import DEMO_FILES, check_val_flags, resolve_data_path, split_rows
from soup.data.readers import read_rows, row_error
from soup.data.templates import resolve_template
from soup.errors import DataError
from soup.data.tokenize import render_chat
from soup.tasks.base import TaskData

PROMPT_KEYS = ("prompt", "question")
# task.prompt_template by name. r1_zero: the template DeepSeek-R1-Zero was trained with
# (arXiv 2501.12948, Table 1): reasoning in <think>, the answer in <answer>.
PROMPT_TEMPLATES = {
    "r1_zero": "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
               "it. The assistant first thinks about the reasoning process in the mind and then provides the "
               "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
               "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
               "answer here </answer>. User: {prompt}. Assistant:",
}


def prompt_template(value: str | None) -> str | None:
    """task.prompt_template: a name in PROMPT_TEMPLATES or a text holding {prompt}; None: none."""
    if value is None:
        return None
    return PROMPT_TEMPLATES.get(value, value)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>")


@dataclass
class PromptReport:
    split: str
    source: str
    rows_read: int = 0
    rows_used: int = 0
    prompts_truncated: int = 0
    prompts_dropped: int = 0
    max_prompt_tokens: int = 0
    mean_prompt_tokens: float = 0.0

    def summary(self) -> str:
        return (f"{self.split}: {self.rows_read} prompts of {self.source}, {self.prompts_truncated} truncated "
                f"(start cut), {self.prompts_dropped} dropped; prompt length max {self.max_prompt_tokens} "
                f"mean {self.mean_prompt_tokens:.1f}")


def stop_token_ids(tokenizer) -> set[int]:
    """EOS and the chat templates' end-of-turn tokens that this vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return ids | {vocab[token] for token in END_OF_TURN if token in vocab}


def build_prompt_data(cfg, tokenizer, rewards) -> TaskData:
    """Training prompts, and validation prompts from data.val_file or data.val_split."""
    check_val_flags(cfg.data)
    source = cfg.data.train_file or DEMO_FILES["grpo"]
    path = resolve_data_path(source, "data.train_file")
    rows = read_rows(path, cfg.data.max_rows)
    val_rows, val_source, files = None, None, [str(path)]
    if cfg.data.val_file:
        val_path = resolve_data_path(cfg.data.val_file, "data.val_file")
        val_rows, val_source = read_rows(val_path), cfg.data.val_file
        files.append(str(val_path))
    elif cfg.data.val_split > 0:
        rows, val_rows = split_rows(rows, cfg.data.val_split, cfg.seed)
        val_source = source
    needs_template = any(isinstance(row.record.get("prompt"), list) for row in [*rows, *(val_rows or [])])
    template = resolve_template(cfg.data.chat_template, tokenizer.chat_template) if needs_template else None
    build = dict(cfg=cfg, tokenizer=tokenizer, template=template, rewards=rewards)
    items, report = _prompt_items(rows, "train", str(source), **build)
    data = TaskData(train=items, val=None, collate=list, files=files, report=report, chat_template=template,
                    lines=[report.summary()])
    if val_rows is not None:
        data.val, data.val_report = _prompt_items(val_rows, "val", str(val_source), **build)
        data.lines.append(data.val_report.summary())
    return data


def _prompt_items(rows: list, split: str, source: str, *, cfg, tokenizer, template, rewards):
    budget = cfg.data.max_length - cfg.task.max_completion_length
    report = PromptReport(split, source, rows_read=len(rows))
    items, lengths = [], []
    for row in rows:
        record = row.record
        key = next((k for k in PROMPT_KEYS if k in record), None)
        if key is None:
            raise row_error(row, "the row has no prompt", fix="give each row a `prompt` (a string or a list of chat "
                                                              "messages) or a GSM8K-style `question`.")
        for spec, _ in rewards:
            missing = [column for column in spec.columns if column not in record and column != "prompt"]
            if missing:
                raise row_error(row, f"reward {spec.name!r} needs the column(s) {', '.join(missing)}, which the row "
                                     "lacks", fix="add them to every row, or drop that reward from task.reward.")
        prompt = record[key]
        wrap = prompt_template(cfg.task.prompt_template)
        if wrap is not None and isinstance(prompt, list):
            raise row_error(row, "task.prompt_template wraps text prompts, and this row's prompt is a list of chat "
                                 "messages", fix="let the chat template format message lists (task.prompt_template"
                                                 "=null), or give text prompts.")
        if isinstance(prompt, str) and wrap is not None:
            prompt = wrap.replace("{prompt}", prompt.strip())
        if isinstance(prompt, list):
            text = render_chat(prompt, tokenizer, template, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str) and prompt.strip():
            text, ids = prompt, tokenizer(prompt)["input_ids"]
        else:
            raise row_error(row, f"'{key}' is empty or not text", fix="give a non-empty string or a message list.")
        if len(ids) > budget:
            if cfg.data.overlong == "drop":
                report.prompts_dropped += 1
                continue
            ids = ids[-budget:]  # keep the end: the question and the generation prompt
            text = tokenizer.decode(ids, skip_special_tokens=True)
            report.prompts_truncated += 1
        lengths.append(len(ids))
        items.append({"prompt_ids": ids, **{k: v for k, v in record.items() if k != key}, "prompt": text})
    if not items:
        raise DataError(f"every {split} prompt is longer than data.max_length - task.max_completion_length = "
                        f"{budget} tokens, so data.overlong=drop dropped them all", path=source,
                        fix="raise data.max_length, or set data.overlong=truncate (keeps each prompt's end).")
    report.rows_used = len(items)
    report.max_prompt_tokens = max(lengths)
    report.mean_prompt_tokens = sum(lengths) / len(lengths)
    return items, report
