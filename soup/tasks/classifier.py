"""task=classifier: sequence classification, regression and cross-encoder scoring.

A score head on the model (transformers' *ForSequenceClassification, as task=reward_model
uses) with one output per class, read at the sequence's last real token for decoders and at
[CLS] for encoders. Rows and labels: soup/data/classification.py. The loss per row is
soup/losses/classification.py's: cross-entropy, each row weighted by its class's
task.class_weights (null: 1; balanced: rows / (classes x rows of the class)), or the squared
error of the single output for a regression. The loop averages over the step's rows.

Evaluation over the val split: loss, accuracy and macro-F1 (classes absent from both the
predictions and the gold labels are left out of the mean), or for a regression the mean
squared error and the Spearman correlation of predictions and targets. Pairs whose labels are
relevance grades (scores or class indices) are also ranked per query: MRR and nDCG@10 over the
val pairs that share a first text. final/ loads with AutoModelForSequenceClassification and
names its classes (config.id2label).

Listwise reranking: rows {query, [candidates], [graded labels]} (task.pair_column holding a list)
are groups; the head has one output, the relevance score of each (query, candidate) pair, and
each group's loss is the listwise softmax cross-entropy (ListNet's top-one loss with the labels
normalised into the target). Every group of a file has the same number of candidates. Val
groups give the loss, MRR (of the best-ranked relevant candidate) and nDCG@10.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soup.data.classification import (Labels, collate_classification, collate_listwise, is_listwise, label_space,
                                      listwise_group, tokenize_row)
from soup.data.dataset import DEMO_FILES, check_val_flags, resolve_data_path, split_rows
from soup.data.readers import read_rows
from soup.errors import ConfigError, DataError
from soup.losses.classification import listwise_softmax_ce, sequence_classification_loss
from soup.metrics import accuracy, macro_f1, mrr_any_relevant, ndcg_at_k, spearman
from soup.tasks.base import Task, TaskData, TaskOutput

NDCG_AT = 10
# Beside a classifier's adapters in final/: the head's config (num_labels, id2label, ...), for soup.merge.
HEAD_CONFIG_FILE = "head_config.json"


@dataclass
class ClassifierReport:
    split: str
    source: str
    rows: int
    truncated: int
    dropped: int
    unit: str = "rows"

    def summary(self) -> str:
        cut = "pairs" if self.unit == "groups" else "rows"
        return (f"data {self.split}: {self.rows} {self.unit} of {self.source}, {self.truncated} {cut} cut to "
                f"data.max_length, {self.dropped} {self.unit} dropped as too long")


class ClassifierTask(Task):
    unit_name = "rows"

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        self.model_head = "sequence_score"
        self.labels = Labels()
        self.class_weights: torch.Tensor | None = None
        self.pad_id = 0
        self.listwise = False

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
        self.pad_id = tokenizer.pad_token_id
        self.listwise = is_listwise(rows[0], t.pair_column)
        if self.listwise:
            return self._listwise_data(rows, val_rows, tokenizer, data_cfg, str(source), val_source, files)
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
        if t.pair_column and self._graded():
            kind += f"; val pairs grouped by '{t.text_column}' also give MRR and nDCG@{NDCG_AT}"
        weights = ("" if self.class_weights is None
                   else ", class weights " + " ".join(f"{w:.3g}" for w in self.class_weights.tolist()))
        lines.append(f"classifier: {kind}{weights}")
        pad, regression = self.pad_id, self.labels.regression
        return TaskData(train=train, val=val, collate=lambda examples: collate_classification(examples, pad, regression),
                        files=files, report=report, val_report=val_report, lines=lines)

    def finish_final(self, final_dir, model, full_model: bool) -> list[str]:
        if full_model:  # its config.json already names the classes
            return []
        import json
        from pathlib import Path

        (Path(final_dir) / HEAD_CONFIG_FILE).write_text(json.dumps(self.model_head[1], indent=2))
        return [f"final/{HEAD_CONFIG_FILE}: the score head's config (class names), which soup.merge gives the merged "
                "model"]

    def _listwise_data(self, rows, val_rows, tokenizer, data_cfg, source: str, val_source, files) -> TaskData:
        """Groups {query, [candidates], [graded labels]}: one relevance score per (query, candidate)
        pair, trained with the listwise softmax cross-entropy of each group."""
        t = self.cfg
        if t.class_weights is not None or t.num_labels not in (None, 1):
            raise ConfigError("task=classifier with listwise groups (a list of candidates in task.pair_column) "
                              "scores each candidate with one output: task.num_labels and task.class_weights do "
                              "not apply.\n  fix: drop them.")
        self.labels = Labels(regression=True)
        self.model_head = ("sequence_score", {"num_labels": 1})
        train, report = self._groups(rows, tokenizer, data_cfg, source)
        lines = [report.summary()]
        val = val_report = None
        if val_rows is not None:
            if not is_listwise(val_rows[0], t.pair_column):
                raise DataError(f"the train rows are listwise groups and the val rows are not (their "
                                f"'{t.pair_column}' is not a list)", path=val_source,
                                fix="give the val file groups of the same form.")
            val, val_report = self._groups(val_rows, tokenizer, data_cfg, val_source, "val")
            lines.append(val_report.summary())
        size = len(train[0]["label"])
        lines.append(f"classifier: listwise reranking, groups of {size} candidates, one score each (softmax "
                     f"cross-entropy over the group); val MRR and nDCG@{NDCG_AT}")
        pad = self.pad_id
        return TaskData(train=train, val=val, collate=lambda examples: collate_listwise(examples, pad),
                        files=files, report=report, val_report=val_report, lines=lines)

    def _groups(self, rows, tokenizer, data_cfg, source: str, split: str = "train"):
        t = self.cfg
        size = len(rows[0].record[t.pair_column])
        examples, truncated, dropped = [], 0, 0
        for row in rows:
            ids, labels, too_long = listwise_group(row, tokenizer, t.text_column, t.pair_column, t.label_column,
                                                   size, None if data_cfg.overlong == "drop" else data_cfg.max_length)
            if data_cfg.overlong == "drop" and any(len(x) > data_cfg.max_length for x in ids):
                dropped += 1
                continue
            truncated += too_long
            examples.append({"input_ids": ids, "label": labels})
        if not examples:
            raise DataError(f"every {split} group has a pair longer than data.max_length={data_cfg.max_length}, "
                            "and data.overlong=drop left none", path=source,
                            fix="raise data.max_length, or set data.overlong=truncate.")
        return examples, ClassifierReport(split, source, len(examples), truncated, dropped, unit="groups")

    def _graded(self) -> bool:
        """Whether the labels are relevance grades (scores or class indices), so pairs can be ranked."""
        return self.labels.regression or all(name.isdigit() for name in self.labels.names)

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
            examples.append({"input_ids": full, "label": label, "group": row.record[t.text_column]})
        if not examples:
            raise DataError(f"every {split} row is longer than data.max_length={data_cfg.max_length}, and "
                            "data.overlong=drop left none", path=source, fix="raise data.max_length, or set "
                                                                              "data.overlong=truncate.")
        return examples, ClassifierReport(split, source, len(examples), truncated, dropped)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].shape[0]

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if self.listwise:
            scores = logits.view(batch["labels"].shape)
            losses = listwise_softmax_ce(scores, batch["labels"])
            top = scores.argmax(-1, keepdim=True)
            return TaskOutput(loss_sum=losses.sum(),
                              metric_sums={"top1_relevant": float((batch["labels"].gather(1, top) > 0).sum())})
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        losses = sequence_classification_loss(logits, batch["labels"], weights)
        sums = {}
        if not self.labels.regression:
            sums["accuracy"] = float((logits.argmax(-1) == batch["labels"]).sum())
        return TaskOutput(loss_sum=losses.sum(), metric_sums=sums)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device) -> dict:
        if self.listwise:
            return self._evaluate_groups(model, examples, batch_size, device)
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
        if self.cfg.pair_column and self._graded():
            metrics.update(self._ranking_by_query(logits, gold, [e["group"] for e in examples]))
        return metrics

    def _ranking_by_query(self, logits: torch.Tensor, gold: torch.Tensor, queries: list[str]) -> dict:
        """MRR and nDCG@10 of the val pairs grouped by their query (the first text), each pair scored by
        the regression output or, for class indices taken as grades, the expected grade sum_c c p_c.
        Queries with one pair, or none relevant (grade > 0), have nothing to rank and are left out."""
        if self.labels.regression:
            scores = logits[:, 0]
        else:
            scores = (logits.softmax(-1) * torch.arange(logits.shape[-1], dtype=logits.dtype)).sum(-1)
        gains = gold.double()
        by_query: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            by_query.setdefault(query, []).append(i)
        reciprocal, ndcg = [], []
        for rows in by_query.values():
            if len(rows) < 2 or not bool((gains[rows] > 0).any()) or bool((gains[rows] < 0).any()):
                continue
            group_scores, group_gains = scores[rows][None], gains[rows][None]
            reciprocal.append(mrr_any_relevant(group_scores, group_gains > 0))
            ndcg.append(ndcg_at_k(group_scores, group_gains, min(NDCG_AT, len(rows))))
        if not reciprocal:
            return {}
        return {"mrr": sum(reciprocal) / len(reciprocal), f"ndcg@{NDCG_AT}": sum(ndcg) / len(ndcg),
                "ranked_queries": float(len(reciprocal))}

    @torch.no_grad()
    def _evaluate_groups(self, model: torch.nn.Module, examples: list, batch_size: int, device) -> dict:
        """Listwise groups: loss, MRR (best-ranked relevant candidate) and nDCG@10 with the labels as gains."""
        was_training = model.training
        model.eval()
        scores, golds, loss_sum = [], [], 0.0
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_listwise(examples[start:start + batch_size],
                                                                   self.pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            group_scores = logits.view(batch["labels"].shape)
            loss_sum += float(listwise_softmax_ce(group_scores, batch["labels"]).sum())
            scores.append(group_scores.cpu())
            golds.append(batch["labels"].cpu())
        model.train(was_training)
        score, gold = torch.cat(scores), torch.cat(golds)
        return {"loss": loss_sum / len(examples), "mrr": mrr_any_relevant(score, gold > 0),
                f"ndcg@{NDCG_AT}": ndcg_at_k(score, gold, min(NDCG_AT, gold.shape[1]))}
