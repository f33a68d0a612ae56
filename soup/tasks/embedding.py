"""task=embedding: sentence embeddings trained contrastively from the model's hidden states.

The model is the bare backbone (transformers' AutoModel: BertModel for an encoder, LlamaModel for a
decoder LM); its last hidden states are pooled over the real tokens (task.pooling: mean, cls, last;
auto is mean for an encoder and last for a decoder LM, whose last token alone has seen the whole text).
Rows and batches: soup/data/embedding.py. Losses (soup/losses/embedding.py), all on cosines:

- info_nce: each anchor picks its positive among the micro-batch's positives and every hard
  negative of the micro-batch. The negatives are the micro-batch's, so train.micro_batch_size
  sets how many there are: gradient accumulation adds steps, not negatives (and under
  parallelism=ddp each rank's micro-batch is its own). A micro-batch of one row without hard
  negatives has one candidate, and its loss is 0 (log-softmax over one logit).
- cosent: one log-sum-exp over every ordered pair of the micro-batch's scored pairs, weighted by
  the micro-batch's rows so that gradient accumulation averages micro-batches by their size.
- cosine: (cos - score / task.score_scale)^2 per pair.
task.matryoshka_dims adds the same loss over each prefix of the embedding (weights
task.matryoshka_weights).

Evaluation over the val rows: scored pairs give the Spearman correlation of the two texts' cosine
with the gold score; pairs give recall@1, recall@10 and MRR of each anchor retrieving its positive
among every positive and hard negative of the val set. With matryoshka dims, each figure also per
dim. The val loss is the training loss over eval batches, when the val rows have the training format.

final/ is the backbone (AutoModel.from_pretrained) with the files that make it a
sentence-transformers directory: the backbone, this pooling, then a Normalize module (every loss
here is a cosine, so unit vectors make a dot product the similarity the model was trained on).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from soup.data.dataset import DEMO_FILES, check_val_flags, resolve_data_path, split_rows
from soup.data.embedding import COLUMNS, EmbeddingFormat, collate_embedding, file_format, tokenize_rows
from soup.data.readers import read_rows
from soup.errors import ConfigError, DataError
from soup.losses.embedding import (EmbeddingLossOutput, cosent, cosine_regression, info_nce, matryoshka,
                                   normalise, pair_cosine, pool)
from soup.metrics import mrr, recall_at_k, spearman
from soup.tasks.base import Task, TaskData, TaskOutput

SCORED_LOSSES = ("cosent", "cosine")
RECALL_AT = (1, 10)


def resolve_pooling(setting: str, model_type: str) -> str:
    """task.pooling with auto decided: mean for an encoder (a model type transformers builds a masked-LM
    head for: BERT, RoBERTa, ModernBERT, ...), last for a decoder LM."""
    if setting != "auto":
        return setting
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "mean" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def write_sentence_transformers_files(directory: Path, pooling: str, hidden_size: int, max_length: int) -> None:
    """The files that make a saved backbone a sentence-transformers directory: modules.json (the
    backbone in the directory itself, pooling, normalisation) and each module's config."""
    directory = Path(directory)
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling"),
               ("2_Normalize", "sentence_transformers.models.Normalize")]
    (directory / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)], indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                     "do_lower_case": False}, indent=2))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "last",
        "include_prompt": True,
    }, indent=2))
    (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"},
                                                                            indent=2))


class EmbeddingTask(Task):
    unit_name = "rows"
    model_head = "encoder"

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        self.pooling = task_cfg.pooling
        self.pad_id = 0
        self.max_length = 0
        self.dims = [int(d) for d in task_cfg.matryoshka_dims or []]

    # --- data ----------------------------------------------------------------------------------
    def build_data(self, cfg, tokenizer) -> TaskData:
        t, data_cfg = self.cfg, cfg.data
        check_val_flags(data_cfg)
        if tokenizer.pad_token_id is None:
            raise ConfigError("task=embedding batches texts of different lengths, and the tokenizer has no pad "
                              "token.\n  fix: use a tokenizer with a pad token (soup sets pad = eos when it loads "
                              "one that has an EOS).")
        self.pad_id, self.max_length = tokenizer.pad_token_id, data_cfg.max_length
        source = data_cfg.train_file or DEMO_FILES["embedding"]
        path = resolve_data_path(source, "data.train_file")
        rows, files = read_rows(path, data_cfg.max_rows), [str(path)]
        train_fmt = self._format(rows)
        self._check_train_format(train_fmt, str(source))
        if data_cfg.val_file:
            val_path = resolve_data_path(data_cfg.val_file, "data.val_file")
            val_rows, val_source = read_rows(val_path), str(data_cfg.val_file)
            files.append(str(val_path))
        elif data_cfg.val_split > 0:
            rows, val_rows = split_rows(rows, data_cfg.val_split, cfg.seed)
            val_source = str(source)
        else:
            val_rows, val_source = None, None
        if t.loss == "info_nce" and not train_fmt.negative_columns and cfg.train.micro_batch_size < 2:
            raise ConfigError("task.loss=info_nce takes its negatives from the micro-batch, and "
                              "train.micro_batch_size=1 leaves none (the loss would be 0).\n"
                              "  fix: train.micro_batch_size=16 or more (more rows, more negatives), or add "
                              "hard-negative columns to the rows.")
        train, report = tokenize_rows(rows, train_fmt, tokenizer, data_cfg.max_length, data_cfg.overlong,
                                      "train", str(source))
        self._check_scores(train, str(source))
        lines = [report.summary()]
        val = val_report = None
        if val_rows is not None:
            val_fmt = self._format(val_rows)
            val, val_report = tokenize_rows(val_rows, val_fmt, tokenizer, data_cfg.max_length, data_cfg.overlong,
                                            "val", val_source)
            lines.append(val_report.summary() + (" (Spearman)" if val_fmt.scored else " (recall@k, MRR)"))
        dims = f", matryoshka dims {self.dims}" if self.dims else ""
        lines.append(f"embedding: loss {t.loss}, pooling {t.pooling}{dims}")
        pad = self.pad_id
        return TaskData(train=train, val=val, collate=lambda examples: collate_embedding(examples, pad),
                        files=files, report=report, val_report=val_report, lines=lines)

    def _format(self, rows) -> EmbeddingFormat:
        return file_format(rows, self.cfg.text_columns, self.cfg.score_column, self.cfg.negative_columns)

    def _check_train_format(self, fmt: EmbeddingFormat, source: str) -> None:
        if self.cfg.loss in SCORED_LOSSES and not fmt.scored:
            raise DataError(f"task.loss={self.cfg.loss} trains on scored pairs, and these rows are {fmt.describe()} "
                            f"without a '{self.cfg.score_column}' column", path=source,
                            fix="task.loss=info_nce for pairs, or a file of {sentence1, sentence2, score} rows "
                                "(task.score_column names the score).")
        if self.cfg.loss == "info_nce" and fmt.scored:
            raise DataError(f"task.loss=info_nce trains on pairs that match, and these rows are {fmt.describe()}",
                            path=source, fix="task.loss=cosent (or cosine) for scored pairs, or keep the pairs "
                                             "that match (a high score) as {anchor, positive} rows.")

    def _check_scores(self, examples: list[dict], source: str) -> None:
        if self.cfg.loss != "cosine":
            return
        worst = max(abs(e["score"]) for e in examples) / self.cfg.score_scale
        if worst > 1:
            raise DataError(f"task.loss=cosine regresses the cosine on score / task.score_scale, and a score reaches "
                            f"{worst * self.cfg.score_scale:g} / {self.cfg.score_scale:g} = {worst:.3g}, outside "
                            "the cosine's [-1, 1]", path=source,
                            fix="set task.score_scale to the scores' maximum (STS-B: 5), or task.loss=cosent, "
                                "which reads only their order.")

    # --- model ---------------------------------------------------------------------------------
    def setup(self, model, cfg, data, device, autocast) -> list[str]:
        config = model.config
        self.pooling = resolve_pooling(self.cfg.pooling, config.model_type)
        hidden = config.hidden_size
        if self.dims and max(self.dims) > hidden:
            raise ConfigError(f"task.matryoshka_dims={self.dims} reach past the model's embedding size {hidden}.\n"
                              f"  fix: dims of at most {hidden}, e.g. [{hidden},{max(1, hidden // 4)}].")
        how = " (auto)" if self.cfg.pooling == "auto" else ""
        return [f"embedding: {self.pooling} pooling{how} of {type(model).__name__}'s {hidden}-dim hidden states"]

    def embed(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def embed_batch(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B * (2 + K), H): the first texts, the second texts, then the negatives, one forward per column."""
        return torch.cat([self.embed(model, batch[ids], batch[mask]) for ids, mask in COLUMNS if ids in batch])

    def _loss(self, embeddings: torch.Tensor, scores: torch.Tensor) -> EmbeddingLossOutput:
        t = self.cfg
        rows = scores.shape[0]
        first, second, negatives = embeddings[:rows], embeddings[rows:2 * rows], embeddings[2 * rows:]
        if t.loss == "info_nce":
            negatives = negatives.view(rows, -1, embeddings.shape[-1]) if negatives.numel() else None
            if negatives is None and rows == 1:  # one candidate: log-softmax over one logit is 0
                return EmbeddingLossOutput(embeddings.sum() * 0.0)
            fn, args = (lambda a, p, n: info_nce(a, p, n, scale=t.scale, symmetric=t.symmetric)), (first, second,
                                                                                                 negatives)
        elif t.loss == "cosent":
            fn, args = (lambda a, b, s: cosent(a, b, s, scale=t.scale)), (first, second, scores)
        else:
            fn, args = cosine_regression, (first, second, scores / t.score_scale)
        if self.dims:
            fn = matryoshka(fn, self.dims, t.matryoshka_weights)
        return fn(*args)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["scores"].shape[0]

    def forward(self, model, batch: dict[str, torch.Tensor]) -> TaskOutput:
        rows = batch["scores"].shape[0]
        out = self._loss(self.embed_batch(model, batch), batch["scores"])
        # A batch-level loss (CoSENT's one log-sum-exp) counts once per row, as its metrics do.
        loss_sum = out.losses.sum() if out.losses.ndim else out.losses * rows
        sums = {name: float(value) * rows for name, value in out.metrics.items()}
        return TaskOutput(loss_sum=loss_sum, metric_sums=sums)

    # --- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, examples: list, batch_size: int, device) -> dict:
        was_training = model.training
        model.eval()
        texts_per_row = len(examples[0]["texts"])
        firsts, seconds, negatives = [], [], []
        loss_sum, loss_rows = 0.0, 0
        scored = examples[0]["score"] is not None
        same_format = scored == (self.cfg.loss in SCORED_LOSSES)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_embedding(chunk, self.pad_id).items()}
            embeddings = self.embed_batch(model, batch).float()
            rows = len(chunk)
            firsts.append(embeddings[:rows].cpu())
            seconds.append(embeddings[rows:2 * rows].cpu())
            negatives.append(embeddings[2 * rows:].cpu())
            if same_format and not (self.cfg.loss == "info_nce" and rows == 1 and texts_per_row == 2):
                out = self._loss(embeddings, batch["scores"])
                loss_sum += float(out.losses.sum() if out.losses.ndim else out.losses * rows)
                loss_rows += rows
        model.train(was_training)
        first, second = torch.cat(firsts), torch.cat(seconds)
        metrics = {"loss": loss_sum / loss_rows} if loss_rows else {}
        dims = [None, *self.dims]
        if scored:
            gold = torch.tensor([e["score"] for e in examples], dtype=torch.float64)
            for dim in dims:
                cos = pair_cosine(first[:, :dim], second[:, :dim]).double()
                metrics["spearman" + (f"/dim{dim}" if dim else "")] = spearman(cos, gold)
            return metrics
        documents = torch.cat([second, *negatives])  # hard negatives are distractors for every query
        for dim in dims:
            suffix = f"/dim{dim}" if dim else ""
            queries, docs = first[:, :dim], documents[:, :dim]
            for k in RECALL_AT:
                if k <= docs.shape[0]:
                    metrics[f"recall@{k}{suffix}"] = recall_at_k(queries, docs, k)
            scores = normalise(queries) @ normalise(docs).T
            metrics["mrr" + suffix] = mrr(scores, torch.arange(queries.shape[0]))
        return metrics

    # --- final/ --------------------------------------------------------------------------------
    def finish_final(self, final_dir: Path, model, full_model: bool) -> list[str]:
        if not full_model:  # adapters: soup.merge writes these files beside the merged model
            return []
        write_sentence_transformers_files(final_dir, self.pooling, model.config.hidden_size, self.max_length)
        return [f"final/ is also a sentence-transformers directory ({self.pooling} pooling, normalised)"]
