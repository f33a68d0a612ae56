"""task=embedding's rows (soup/data/embedding.py) and how the task wires model, pooling, loss and
evaluation (soup/tasks/embedding.py); the loss formulas are pinned in tests/unit/losses/test_embedding.py."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from soup.data.embedding import collate_embedding, file_format, tokenize_rows
from soup.data.readers import Row
from soup.errors import ConfigError, DataError
from soup.losses.embedding import cosent, info_nce, pool
from soup.metrics import spearman
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.embedding import EmbeddingTask, resolve_pooling, write_sentence_transformers_files


def rows_of(*records):
    return [Row(record=r, path="d.jsonl", line=i + 1) for i, r in enumerate(records)]


def task_cfg(**overrides):
    base = dict(name="embedding", loss="info_nce", scale=20.0, symmetric=False, pooling="mean",
                matryoshka_dims=None, matryoshka_weights=None, text_columns=None, score_column="score",
                negative_columns=None, score_scale=1.0)
    return OmegaConf.create({**base, **overrides})


class TinyBackbone(torch.nn.Module):
    """An embedding table as the model: hidden state = the token's vector (enough to check the wiring)."""

    def __init__(self, vocab=300, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.config = OmegaConf.create({"hidden_size": hidden, "model_type": "llama"})

    def forward(self, input_ids, attention_mask):
        class Out:
            last_hidden_state = self.embed(input_ids)
        return Out()


def test_the_format_is_read_from_the_first_row_and_the_task_columns():
    pairs = file_format(rows_of({"anchor": "a", "positive": "b", "negative_2": "x", "negative": "y"}), None,
                        "score", None)
    assert pairs.text_columns == ("anchor", "positive") and pairs.negative_columns == ("negative", "negative_2")
    assert not pairs.scored
    scored = file_format(rows_of({"sentence1": "a", "sentence2": "b", "score": 3.0}), None, "score", None)
    assert scored.scored and scored.text_columns == ("sentence1", "sentence2")
    named = file_format(rows_of({"q": "a", "p": "b", "neg": "c"}), ["q", "p"], "score", ["neg"])
    assert named.text_columns == ("q", "p") and named.negative_columns == ("neg",)
    with pytest.raises(DataError, match=r"(?s)d.jsonl:1: no pair of text columns.*task.text_columns"):
        file_format(rows_of({"query": "a", "doc": "b"}), None, "score", None)


def test_rows_tokenise_each_text_and_a_missing_or_empty_text_names_its_line():
    tokenizer = build_byte_tokenizer()
    rows = rows_of({"anchor": "cat", "positive": "a cat", "negative": "dog"},
                   {"anchor": "x" * 50, "positive": "y", "negative": "z"})
    fmt = file_format(rows, None, "score", None)
    examples, report = tokenize_rows(rows, fmt, tokenizer, 16, "truncate", "train", "d.jsonl")
    assert [len(t) for t in examples[0]["texts"]] == [len(tokenizer("cat")["input_ids"]),
                                                      len(tokenizer("a cat")["input_ids"]),
                                                      len(tokenizer("dog")["input_ids"])]
    assert len(examples[1]["texts"][0]) == 16 and report.truncated_texts == 1
    kept, report = tokenize_rows(rows, fmt, tokenizer, 16, "drop", "train", "d.jsonl")
    assert len(kept) == 1 and report.dropped == 1
    broken = rows_of({"anchor": "cat", "positive": "a cat", "negative": "dog"}, {"anchor": "cat", "positive": ""})
    with pytest.raises(DataError, match=r"d.jsonl:2: 'positive' is '', not a non-empty string"):
        tokenize_rows(broken, fmt, tokenizer, 16, "truncate", "train", "d.jsonl")
    scored = rows_of({"sentence1": "a", "sentence2": "b", "score": "high"})
    with pytest.raises(DataError, match=r"d.jsonl:1: 'score' is 'high', not a number"):
        tokenize_rows(scored, file_format(scored, None, "score", None), tokenizer, 16, "truncate", "val", "d.jsonl")


def test_a_batch_pads_each_column_of_texts_to_its_own_longest():
    examples = [{"texts": [[1], [2, 2], [3], [4]], "score": None}, {"texts": [[5], [6], [7, 7, 7], [8]], "score": None}]
    batch = collate_embedding(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1], [5]]
    assert batch["second_ids"].tolist() == [[2, 2], [6, 0]] and batch["second_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["negative_ids"].tolist() == [[3, 0, 0], [4, 0, 0], [7, 7, 7], [8, 0, 0]]  # row i's at iK + k
    assert torch.isnan(batch["scores"]).all() and batch["scores"].shape == (2,)
    assert "negative_ids" not in collate_embedding([{"texts": [[1], [2]], "score": 3.0}], pad_id=0)


def pooled(model, batch, pooling):
    """Every text's pooled hidden state, first texts then second then negatives (the task's order)."""
    columns = [("input_ids", "attention_mask"), ("second_ids", "second_mask"), ("negative_ids", "negative_mask")]
    return torch.cat([pool(model.embed(batch[ids]), batch[mask], pooling) for ids, mask in columns if ids in batch])


def test_auto_pooling_is_mean_for_an_encoder_and_last_for_a_decoder():
    assert resolve_pooling("auto", "bert") == "mean"
    assert resolve_pooling("auto", "modernbert") == "mean"
    assert resolve_pooling("auto", "llama") == "last"
    assert resolve_pooling("auto", "qwen2") == "last"
    assert resolve_pooling("cls", "llama") == "cls"


def _batch(n=4, negatives=0, scored=False):
    tokenizer = build_byte_tokenizer()
    texts = [[f"text number {i} {j}" for j in range(2 + negatives)] for i in range(n)]
    examples = [{"texts": [tokenizer(t)["input_ids"] for t in row], "score": float(i) if scored else None}
                for i, row in enumerate(texts)]
    return collate_embedding(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
@pytest.mark.parametrize("negatives", [0, 2])
def test_the_loss_is_info_nce_over_the_pooled_texts(pooling, negatives):
    model, task = TinyBackbone(), EmbeddingTask(task_cfg(pooling=pooling, symmetric=True, scale=7.0))
    task.pooling = pooling
    batch = _batch(4, negatives)
    emb = pooled(model, batch, pooling)
    negs = emb[8:].view(4, negatives, -1) if negatives else None
    expected = info_nce(emb[:4], emb[4:8], negs, scale=7.0, symmetric=True).losses.sum()
    out = task.forward(model, batch)
    torch.testing.assert_close(out.loss_sum, expected)
    assert task.units(batch) == 4 and 0 <= out.metric_sums["accuracy"] <= 4


def test_cosent_counts_once_per_row_and_cosine_regresses_on_the_scaled_score():
    model = TinyBackbone()
    batch = _batch(5, scored=True)
    emb = pooled(model, batch, "mean")
    task = EmbeddingTask(task_cfg(loss="cosent", scale=11.0))
    torch.testing.assert_close(task.forward(model, batch).loss_sum,
                               cosent(emb[:5], emb[5:], batch["scores"], scale=11.0).losses * 5)
    task = EmbeddingTask(task_cfg(loss="cosine", score_scale=4.0))
    cos = torch.nn.functional.cosine_similarity(emb[:5], emb[5:])
    torch.testing.assert_close(task.forward(model, batch).loss_sum, ((cos - batch["scores"] / 4) ** 2).sum())


def test_matryoshka_adds_the_loss_of_each_prefix_with_its_weight():
    model = TinyBackbone()
    batch = _batch(4)
    emb = pooled(model, batch, "mean")
    task = EmbeddingTask(task_cfg(matryoshka_dims=[8, 3], matryoshka_weights=[1.0, 0.5]))
    expected = info_nce(emb[:4], emb[4:]).losses.sum() + 0.5 * info_nce(emb[:4, :3], emb[4:, :3]).losses.sum()
    out = task.forward(model, batch)
    torch.testing.assert_close(out.loss_sum, expected)
    assert {"dim8/accuracy", "dim3/loss"} <= out.metric_sums.keys()


def test_one_row_without_negatives_has_one_candidate_and_a_zero_loss_that_backpropagates():
    model, task = TinyBackbone(), EmbeddingTask(task_cfg())
    out = task.forward(model, _batch(1))
    assert float(out.loss_sum.detach()) == 0.0
    out.loss_sum.backward()


def test_evaluation_gives_spearman_on_scored_rows_and_recall_on_pairs():
    tokenizer = build_byte_tokenizer()
    model = TinyBackbone()
    task = EmbeddingTask(task_cfg(loss="cosent", matryoshka_dims=[4]))
    task.pad_id = tokenizer.pad_token_id
    texts = [("a red cat", "a red cat", 5.0), ("a dog", "the dog", 3.0), ("sky", "an old boat", 0.5),
             ("tea", "a cup of tea", 4.0), ("one", "two", 1.0)]
    scored = [{"texts": [tokenizer(a)["input_ids"], tokenizer(b)["input_ids"]], "score": s} for a, b, s in texts]
    metrics = task.evaluate(model, scored, batch_size=2, device=torch.device("cpu"))
    emb1 = torch.stack([model.embed(torch.tensor(e["texts"][0])).mean(0) for e in scored])
    emb2 = torch.stack([model.embed(torch.tensor(e["texts"][1])).mean(0) for e in scored])
    cos = torch.nn.functional.cosine_similarity(emb1, emb2).double()
    gold = torch.tensor([s for *_, s in texts], dtype=torch.float64)
    assert metrics["spearman"] == pytest.approx(spearman(cos, gold))
    assert metrics["spearman/dim4"] == pytest.approx(spearman(torch.nn.functional.cosine_similarity(
        emb1[:, :4], emb2[:, :4]).double(), gold))
    assert "loss" in metrics  # the val rows have the training format (scored pairs for cosent)
    pairs = [{"texts": e["texts"], "score": None} for e in scored]
    metrics = task.evaluate(model, pairs, batch_size=2, device=torch.device("cpu"))
    assert metrics["recall@1"] == 1.0 / 5 * sum(  # identical texts retrieve each other; count by hand
        int(torch.argmax(torch.nn.functional.cosine_similarity(emb1[i:i + 1], emb2)) == i) for i in range(5))
    assert "recall@10" not in metrics and "loss" not in metrics and 0 < metrics["mrr"] <= 1


def test_a_loss_refuses_rows_of_the_other_format_and_cosine_refuses_scores_outside_its_range(tmp_path):
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"sentence1": f"s {i}", "sentence2": f"t {i}", "score": i}) + "\n"
                              for i in range(6)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": f"s {i}", "positive": f"t {i}"}) + "\n" for i in range(6)))

    def build(path, micro=4, **task):
        cfg = OmegaConf.create({"task": task_cfg(**task), "seed": 0, "train": {"micro_batch_size": micro},
                                "data": {"train_file": str(path), "val_file": None, "val_split": 0.0, "max_rows": None,
                                         "max_length": 64, "overlong": "truncate"}})
        return EmbeddingTask(cfg.task).build_data(cfg, build_byte_tokenizer())

    with pytest.raises(DataError, match=r"scored.jsonl: task.loss=info_nce trains on pairs that match"):
        build(scored)
    with pytest.raises(DataError, match=r"pairs.jsonl: task.loss=cosent trains on scored pairs"):
        build(pairs, loss="cosent")
    with pytest.raises(DataError, match=r"(?s)a score reaches 5 / 1 = 5.*task.score_scale"):
        build(scored, loss="cosine")
    assert len(build(scored, loss="cosine", score_scale=5.0).train) == 6
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=1 leaves none"):
        build(pairs, micro=1)


def test_the_sentence_transformers_files_name_the_pooling(tmp_path):
    write_sentence_transformers_files(tmp_path, "cls", 32, 128)
    pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    assert pooling["word_embedding_dimension"] == 32
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
