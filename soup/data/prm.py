"""Process reward model (PRM) data: step-labelled reasoning -> token-classification examples.

A PRM scores every step of a solution, not only the final answer (Lightman et al., "Let's
Verify Step by Step", arXiv 2305.20050, whose PRM800K labels steps by hand; Wang et al.,
"Math-Shepherd", arXiv 2312.08935, which labels them by rollouts). Rows come in their
stepwise shape, one label per step:

    {"prompt": "What is 2 + 3 * 4?", "completions": ["3 * 4 = 12.", "2 + 12 = 14."], "labels": [true, true]}

label true = the step is correct so far (class 1), false = it is wrong (class 0).

One example is the prompt, then each step followed by the separator:

    ids     = prompt | step_1 sep | step_2 sep | ... | step_n sep
    labels  = -100 everywhere except the LAST token of each sep, which holds that step's class

so a token-classification head reads a step's score at the position right after the step, as
a PRM is queried at inference (score the token that closes each step). Labels are NOT
next-token targets: position t's label is the class of position t itself, so they must not be
shifted the way SFT labels are (soup/data/collate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from soup.data.collate import collate_padded
from soup.data.readers import Row, read_rows, row_error
from soup.data.tokenize import IGNORE_INDEX

_FORMAT = '{"prompt": "...", "completions": ["step 1", "step 2"], "labels": [true, false]}'


@dataclass(frozen=True)
class PRMRow:
    """One validated row and where it came from.

    completions: the reasoning steps, each non-empty; labels: one bool per step (True = good).
    line: 1-based physical line of a .jsonl file (the 1-based item / row index for .json / .parquet).
    """

    prompt: str
    completions: list[str]
    labels: list[bool]
    path: str
    line: int


def read_prm_rows(path: str | Path) -> list[PRMRow]:
    """Read and validate every row of a PRM file (.jsonl, or any format soup.data.readers reads).

    Raises DataError naming `path:line` and the fix for: invalid JSON, a missing key, a prompt
    that is not a string, completions or labels that are not lists, no steps, a length mismatch
    between completions and labels, an empty (or whitespace-only) or non-string step, a non-bool label.
    """
    return [_validate(row) for row in read_rows(path)]


def _validate(row: Row) -> PRMRow:
    record = row.record
    missing = [key for key in ("prompt", "completions", "labels") if key not in record]
    if missing:
        raise row_error(row, f"the row has no {', '.join(repr(k) for k in missing)} "
                             f"(its fields: {', '.join(sorted(record)) or 'none'})",
                        fix=f"PRM rows look like {_FORMAT}.")
    prompt, steps, labels = record["prompt"], record["completions"], record["labels"]
    if not isinstance(prompt, str):
        raise row_error(row, f"'prompt' is of type {type(prompt).__name__}, not a string",
                        fix="write the prompt as text; render chat messages with the model's template first.")
    for key, value in (("completions", steps), ("labels", labels)):
        if not isinstance(value, list):
            raise row_error(row, f"'{key}' is of type {type(value).__name__}, not a list (one entry per step)",
                            fix=f"PRM rows look like {_FORMAT}.")
    if not steps:
        raise row_error(row, "the row has no steps: 'completions' is empty",
                        fix="remove the row, or give it at least one step with its label.")
    if len(steps) != len(labels):
        raise row_error(row, f"{len(steps)} completions but {len(labels)} labels; each step needs one label",
                        fix="give exactly one label per step, in order.")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise row_error(row, f"completions[{i}] is of type {type(step).__name__}, not a string",
                            fix="write every step as text.")
        if not step.strip():
            # An empty step would put its label on a separator that follows nothing.
            raise row_error(row, f"completions[{i}] is empty",
                            fix="remove the empty step together with its label.")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise row_error(row, f"labels[{i}] is {label!r} ({type(label).__name__}), not a bool",
                            fix='write true for a good step and false for a bad one (convert 1/0 or "+"/"-" first).')
    return PRMRow(prompt=prompt, completions=list(steps), labels=list(labels), path=row.path, line=row.line)


def tokenize_prm_row(row: PRMRow, tokenizer: PreTrainedTokenizerBase, step_separator: str = "\n",
                     train_on_last_step_only: bool = False, max_length: int | None = None) -> dict[str, list[int]]:
    """input_ids and token-classification labels of one row (module docstring for the layout).

    The prompt, each step and the separator are tokenised separately and their ids
    concatenated, so every step boundary falls exactly between two tokens; tokenising the
    joined text could merge a step's last characters with the separator into one token and
    blur which step a label belongs to. The price: the ids can differ from those of the joined
    text (a SentencePiece tokenizer, for one, may add a word-start piece to each part), so score
    new solutions with ids built the same way (this function; its labels show where to read).
    Nothing is inserted between the prompt and the first step: end the prompt with the text
    the model should see there.

    Special tokens: pieces are tokenised without them; if the tokenizer adds a BOS token on its
    own, one BOS starts the prompt (none is added if the prompt's text already begins with it).
    No EOS is appended: the last label sits on the last separator.

    Args:
        step_separator: text after every step, the last included; its last token carries the
            step's label. It must tokenise to at least one token (ValueError otherwise).
        train_on_last_step_only: label only the last step (an outcome label on the final answer);
            the other separators get -100.
        max_length: keep the first max_length tokens. A step whose separator's last token falls
            beyond the cut loses its label (a partly kept step stays as unlabelled context), so a
            cut inside the prompt, or before the last step with train_on_last_step_only, leaves a
            row with no label at all: the caller should check for that and drop the row.
    Returns {"input_ids": [seq], "labels": [seq]}, labels in {-100, 0, 1}.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1 (or None for no limit)")
    separator_ids = _ids(tokenizer, step_separator)
    if not separator_ids:
        raise ValueError(f"step_separator={step_separator!r} tokenises to no tokens, so no position could carry a "
                         "step's label; use a separator with visible text, e.g. '\\n'")

    input_ids = _ids(tokenizer, row.prompt)
    bos = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and input_ids[:1] != [bos]:
        input_ids = [bos] + input_ids
    labels = [IGNORE_INDEX] * len(input_ids)
    last = len(row.completions) - 1
    for i, (step, good) in enumerate(zip(row.completions, row.labels)):
        step_ids = _ids(tokenizer, step)
        input_ids += step_ids + separator_ids
        labels += [IGNORE_INDEX] * (len(step_ids) + len(separator_ids) - 1)
        labels.append(int(good) if (i == last or not train_on_last_step_only) else IGNORE_INDEX)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself starts encoded text with its BOS token (Llama's do, GPT-2's
    and soup's byte tokenizer do not): a model trained that way expects one."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def collate_prm(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenize_prm_row outputs into one batch.

    Returns input_ids [batch, seq] long (pad_id on pads), attention_mask [batch, seq] long
    (1 = real token) and labels [batch, seq] long (-100 on pads). The labels are per-position
    classes, not next-token targets: the loss compares logits[b, t] with labels[b, t], unshifted.
    """
    return collate_padded(rows, pad_id)
