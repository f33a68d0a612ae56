"""task=prm: a process reward model, a two-class token classifier over reasoning steps.

Rows are `{prompt, completions: [step, ...], labels: [bool, ...]}` (Math-Shepherd, PRM800K);
soup/data/prm.py lays each out as prompt | step_1 sep | step_2 sep | ... with the step's
label (1 good, 0 bad) on the last token of the separator after it (`task.step_separator`,
a newline by default), or on the last step's alone (`task.train_on_last_step_only`). The
decoder gets a token-classification head (transformers' *ForTokenClassification,
num_labels=2): the loss is the cross-entropy at the labelled positions, one unit each, and
final/ loads with AutoModelForTokenClassification. A step's score at inference is the
softmax's class-1 probability at the same position.

Logged: `step_accuracy` over every labelled step, `last_step_accuracy` over each row's last
labelled step (the solution's outcome), and `trained_steps` (labelled positions). Rows longer than
data.max_length follow data.overlong (PRMTask._examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soup.data.dataset import DEMO_FILES, resolve_data_path, split_rows
from soup.data.prm import collate_prm, read_prm_rows, tokenize_prm_row
from soup.data.tokenize import IGNORE_INDEX
from soup.errors import DataError
from soup.tasks.base import Task, TaskData, TaskOutput


@dataclass
class PRMReport:
    """What the data build did with the rows of one split (run.json and the run log)."""

    split: str
    source: str
    rows_read: int
    rows_used: int
    rows_truncated: int
    labelled_steps: int

    def summary(self) -> str:
        dropped = self.rows_read - self.rows_used
        return (f"data {self.split}: {self.rows_read} step-labelled rows of {self.source} -> {self.rows_used} used "
                f"({self.rows_truncated} cut to data.max_length), {dropped} dropped as too long; "
                f"{self.labelled_steps} labelled steps")


def labelled(example: dict) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"])


class PRMTask(Task):
    unit_name = "steps"
    model_head = "token_classes"

    def build_data(self, cfg, tokenizer) -> TaskData:
        data_cfg = cfg.data
        train_value = data_cfg.train_file or DEMO_FILES["prm"]
        train_path = resolve_data_path(train_value, "data.train_file")
        files = [str(train_path)]
        rows = read_prm_rows(train_path)
        if data_cfg.max_rows:
            rows = rows[: data_cfg.max_rows]
        if data_cfg.val_file:
            val_path = resolve_data_path(data_cfg.val_file, "data.val_file")
            files.append(str(val_path))
            val_rows, val_source = read_prm_rows(val_path), str(data_cfg.val_file)
        elif data_cfg.val_split > 0:
            rows, val_rows = split_rows(rows, data_cfg.val_split, cfg.seed)
            val_source = str(train_value)
        else:
            val_rows, val_source = None, None
        train, report = self._examples(rows, tokenizer, data_cfg, "train", str(train_value))
        lines = [report.summary()]
        val = val_report = None
        if val_rows is not None:
            val, val_report = self._examples(val_rows, tokenizer, data_cfg, "val", val_source)
            lines.append(val_report.summary())
        separator = repr(self.cfg.step_separator)
        lines.append(f"labels: on the last token of the separator {separator} after "
                     + ("the last step only" if self.cfg.train_on_last_step_only else "every step"))

        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            return collate_prm(examples, tokenizer.pad_token_id)

        return TaskData(train=train, val=val, collate=collate, files=files, report=report, val_report=val_report,
                        lines=lines)

    def _examples(self, rows, tokenizer, data_cfg, split: str, source: str):
        """Tokenised rows under data.overlong: truncate keeps a long row's first data.max_length
        tokens (the steps cut off lose their labels), truncate_or_drop keeps it cut only when
        every labelled step survives, drop drops it; a row left with no labelled step goes."""
        examples, truncated = [], 0
        max_length, policy = data_cfg.max_length, data_cfg.overlong
        for row in rows:
            example = tokenize_prm_row(row, tokenizer, self.cfg.step_separator, self.cfg.train_on_last_step_only)
            if len(example["input_ids"]) > max_length:
                cut = {key: ids[:max_length] for key, ids in example.items()}
                if policy == "drop" or (policy == "truncate_or_drop" and labelled(cut) < labelled(example)):
                    continue
                example, truncated = cut, truncated + 1
            if labelled(example):
                examples.append(example)
        if not examples:
            raise DataError(f"no {split} row keeps a labelled step within data.max_length={max_length} "
                            f"(data.overlong={policy})", path=source,
                            fix="raise data.max_length, shorten the prompts, or use data.overlong=truncate.")
        report = PRMReport(split, source, len(rows), len(examples), truncated, sum(map(labelled, examples)))
        return examples, report

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        labelled = labels != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits[labelled], labels[labelled], reduction="sum")
        with torch.no_grad():
            right = (logits.argmax(-1) == labels) & labelled
            # Each row's last labelled position: the step that decides the solution's outcome.
            positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
            last = torch.where(labelled, positions, -1).max(dim=1).values
            rows = torch.arange(labels.shape[0], device=labels.device)
            last_right = right[rows, last.clamp(min=0)] & (last >= 0)
        return TaskOutput(loss_sum=loss_sum,
                          metric_sums={"step_accuracy": float(right.sum()),
                                       "last_step_accuracy": float(last_right.sum())},
                          metric_counts={"last_step_accuracy": float((last >= 0).sum())})
