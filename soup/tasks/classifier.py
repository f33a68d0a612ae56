"""task=classifier: sequence classification, regression and cross-encoder scoring.

A score head on the model (transformers' *ForSequenceClassification, as task=reward_model
uses) with one output per class, read at the sequence's last real token for decoders and at
[CLS] for encoders. Rows and labels: soup/data/classification.py. The loss per row is
soup/losses/classification.py's: cross-entropy, each row weighted by its class's
task.class_weights (null: 1; balanced: rows / (classes x rows of the class)), or the squared
error of the single output for a regression. The loop averages over the step's rows.

Evaluation over the val split: loss, accuracy and macro-F1 (classes absent from both the
predictions and the gold labels are left out of the mean), or for a regression the mean
squared error and the Spearman correlation of predictions and targets. final/ loads with
AutoModelForSequenceClassification and names its classes (config.id2label).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soup.data.classification import Labels, collate_classification, label_space, tokenize_row
from soup.data.dataset import DEMO_FILES, check_val_flags, resolve_data_path, split_rows
from soup.data.readers import read_rows
from soup.errors import ConfigError, DataError
from soup.losses.classification import sequence_classification_loss
from soup.metrics import accuracy, macro_f1, spearman
from soup.tasks.base import Task, TaskData, TaskOutput


@dataclass
class ClassifierReport:
    split: str
    source: str
    rows: int
    truncated: int
    dropped: int

    def summary(self) -> str:
        return (f"data {self.split}: {self.rows} rows of {self.source}, {self.truncated} cut to data.max_length, "
                f"{self.dropped} dropped as too long")


class ClassifierTask(Task):
    unit_name = "rows"

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        self.model_head = "sequence_score"
        self.labels = Labels()
        self.class_weights: torch.Tensor | None = None
        self.pad_id = 0

    def build_data(self, cfg, tokenizer) -> TaskData:
        t, data_cfg = self.cfg, cfg.data
        check_val_flags(data_cfg)
        if tokenizer.pad_token_id is None:
            raise ConfigError("task=classifier batches rows of different lengths, and the tokenizer has no pad "
                              "token.\n  fix: use a tokenizer with a pad token (soup sets pad = eos when it loads "
                              "one that has an EOS).")
        source = data_cfg.train_file or DEMO_FILES["classifier"]
        path = resolve_data_path(source, "data.train_file")
        rows, files = read_rows(path, data_cfg.max_rows), [str(path)]
        if data_cfg.val_file:
            val_path = resolve_data_path(data_cfg.val_file, "data.val_file")
            val_rows, val_source = read_rows(val_path), str(data_cfg.val_file)
            files.append(str(val_path))
        elif data_cfg.val_split > 0:
            rows, val_rows = split_rows(rows, data_cfg.val_split, cfg.seed)
            val_source = str(source)
        else:
            val_rows, val_source = None, None
        self.labels = label_space(rows, t.label_column, t.num_labels)
        self.model_head = ("sequence_score", self._head_config())
        self.class_weights = self._weights(rows)
        train, report = self._examples(rows, tokenizer, data_cfg, str(source))
        lines = [report.summary()]
        val = val_report = None
        if val_rows is not None:
            val, val_report = self._examples(val_rows, tokenizer, data_cfg, val_source, "val")
            lines.append(val_report.summary())
        kind = ("regression (one output, squared error)" if self.labels.regression
                else f"{self.labels.num_labels} classes: {', '.join(self.labels.names)}")
        weights = ("" if self.class_weights is None
                   else ", class weights " + " ".join(f"{w:.3g}" for w in self.class_weights.tolist()))
        lines.append(f"classifier: {kind}{weights}")
        self.pad_id = tokenizer.pad_token_id
        pad, regression = self.pad_id, self.labels.regression
        return TaskData(train=train, val=val, collate=lambda examples: collate_classification(examples, pad, regression),
                        files=files, report=report, val_report=val_report, lines=lines)

    def _head_config(self) -> dict:
        if self.labels.regression:
            return {"num_labels": 1, "problem_type": "regression"}
        names = self.labels.names
        return {"num_labels": len(names), "problem_type": "single_label_classification",
                "id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}

    def _weights(self, rows) -> torch.Tensor | None:
        setting = self.cfg.class_weights
        if setting is None:
            return None
        if self.labels.regression:
            raise ConfigError("task.class_weights weigh classes, and these labels are scores (a regression).\n"
                              "  fix: drop task.class_weights.")
        counts = torch.zeros(self.labels.num_labels)
        for row in rows:
            counts[self.labels.id_of(row, row.record[self.cfg.label_column], self.cfg.label_column)] += 1
        if setting == "balanced":
            return counts.sum() / (len(counts) * counts.clamp(min=1))
        weights = [float(w) for w in setting]
        if len(weights) != self.labels.num_labels:
            raise ConfigError(f"task.class_weights has {len(weights)} weights for {self.labels.num_labels} classes "
                              f"({', '.join(self.labels.names)}).\n  fix: one weight per class, in that order.")
        return torch.tensor(weights)

    def _examples(self, rows, tokenizer, data_cfg, source: str, split: str = "train"):
        """Tokenised rows; a row longer than data.max_length is cut (truncate, truncate_or_drop: a
        classifier's label survives any cut) or, with data.overlong=drop, left out."""
        t = self.cfg
        examples, truncated, dropped = [], 0, 0
        for row in rows:
            full = tokenize_row(row, tokenizer, t.text_column, t.pair_column, None)
            label = self.labels.id_of(row, row.record.get(t.label_column), t.label_column)
            if len(full) > data_cfg.max_length:
                if data_cfg.overlong == "drop":
                    dropped += 1
                    continue
                truncated += 1
                full = tokenize_row(row, tokenizer, t.text_column, t.pair_column, data_cfg.max_length)
            examples.append({"input_ids": full, "label": label})
        if not examples:
            raise DataError(f"every {split} row is longer than data.max_length={data_cfg.max_length}, and "
                            "data.overlong=drop left none", path=source, fix="raise data.max_length, or set "
                                                                              "data.overlong=truncate.")
        return examples, ClassifierReport(split, source, len(examples), truncated, dropped)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        losses = sequence_classification_loss(logits, batch["labels"], weights)
        sums = {}
        if not self.labels.regression:
            sums["accuracy"] = float((logits.argmax(-1) == batch["labels"]).sum())
        return TaskOutput(loss_sum=losses.sum(), metric_sums=sums)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device) -> dict:
        was_training = model.training
        model.eval()
        weights = None if self.class_weights is None else self.class_weights.to(device)
        outputs, golds, loss_sum = [], [], 0.0
        for start in range(0, len(examples), batch_size):
            batch = collate_classification(examples[start:start + batch_size], self.pad_id, self.labels.regression)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += float(sequence_classification_loss(logits, batch["labels"], weights).sum())
            outputs.append(logits.cpu())
            golds.append(batch["labels"].cpu())
        model.train(was_training)
        logits, gold = torch.cat(outputs), torch.cat(golds)
        metrics = {"loss": loss_sum / len(examples)}
        if self.labels.regression:
            predictions = logits[:, 0]
            metrics.update(mse=float(((predictions - gold) ** 2).mean()), spearman=spearman(predictions, gold))
        else:
            predictions = logits.argmax(-1)
            metrics.update(accuracy=accuracy(predictions, gold),
                           macro_f1=macro_f1(predictions, gold, self.labels.num_labels))
        return metrics
