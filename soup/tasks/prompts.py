"""Prompt data for online RL: rows -> prompt token ids plus the columns the rewards read.

A prompt longer than data.max_length - task.max_completion_length loses its start
(data.overlong=truncate or truncate_or_drop: the question and the generation prompt stay)
or its row (data.overlong=drop).

A row's prompt is a `prompt` string (used as written), a `prompt` list of chat messages
(rendered with the chat template and its generation prompt), or a GSM8K-style
`question` string. Every other column goes to the rewards. Each reward's columns are
checked on every row before any generation, so a missing one is an error naming the
file and line, not a failure mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass

from soup.data.dataset import DEMO_FILES, resolve_data_path
from soup.data.readers import read_rows, row_error
from soup.data.templates import resolve_template
from soup.errors import DataError
from soup.data.tokenize import render_chat
from soup.tasks.base import TaskData

PROMPT_KEYS = ("prompt", "question")
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
    source = cfg.data.train_file or DEMO_FILES["grpo"]
    path = resolve_data_path(source, "data.train_file")
    rows = read_rows(path, cfg.data.max_rows)
    needs_template = any(isinstance(row.record.get("prompt"), list) for row in rows)
    template = resolve_template(cfg.data.chat_template, tokenizer.chat_template) if needs_template else None
    budget = cfg.data.max_length - cfg.task.max_completion_length
    report = PromptReport("train", str(source), rows_read=len(rows))
    items, lengths = [], []
    for row in rows:
        record = row.record
        key = next((k for k in PROMPT_KEYS if k in record), None)
        if key is None:
            raise row_error(row, "the row has no prompt", fix="give each row a `prompt` (a string or a list of chat "
                                                              "messages) or a GSM8K-style `question`.")
        for spec, _ in rewards:
            missing = [column for column in spec.columns if column not in record]
            if missing:
                raise row_error(row, f"reward {spec.name!r} needs the column(s) {', '.join(missing)}, which the row "
                                     "lacks", fix="add them to every row, or drop that reward from task.reward.")
        prompt = record[key]
        if isinstance(prompt, list):
            ids = tokenizer(render_chat(prompt, tokenizer, template, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str) and prompt.strip():
            ids = tokenizer(prompt)["input_ids"]
        else:
            raise row_error(row, f"'{key}' is empty or not text", fix="give a non-empty string or a message list.")
        if len(ids) > budget:
            if cfg.data.overlong == "drop":
                report.prompts_dropped += 1
                continue
            ids = ids[-budget:]  # keep the end: the question and the generation prompt
            report.prompts_truncated += 1
        lengths.append(len(ids))
        items.append({"prompt_ids": ids, **{k: v for k, v in record.items() if k != key}})
    if not items:
        raise DataError(f"every prompt is longer than data.max_length - task.max_completion_length = {budget} "
                        "tokens, so data.overlong=drop dropped them all", path=str(path),
                        fix="raise data.max_length, or set data.overlong=truncate (keeps each prompt's end).")
    report.rows_used = len(items)
    report.max_prompt_tokens = max(lengths)
    report.mean_prompt_tokens = sum(lengths) / len(lengths)
    return TaskData(train=items, val=None, collate=list, files=[str(path)], report=report, chat_template=template,
                    lines=[report.summary()])
