"""Loop invariants: gradient accumulation equals one big batch; bf16 autocast trains."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import SoupConfig
from soup.data import collate_padded
from soup.loop import train_loop
from soup.losses.sft import IGNORE_INDEX, next_token_loss_sum
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks import SFTTask
from soup.tracking import open_tracker


def uneven_examples(n=8, seed=0):
    """Rows of different lengths with different numbers of trained tokens."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + 5 * i
        ids = torch.randint(5, 200, (length,), generator=gen).tolist()
        prompt = 2 + (i % 3) * 2
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def config(micro_batch_size, grad_accum_steps, precision="fp32"):
    cfg = OmegaConf.structured(SoupConfig)
    cfg.merge_with({
        "task": {"name": "sft"}, "model": {"name": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                                    "num_key_value_heads": 1}},
        "optim": {"name": "sgd", "lr": 0.5}, "sched": {"name": "constant"}, "tracker": {"name": "jsonl"},
        "peft": {"name": "none"}, "parallelism": {"name": "single"},
        "train": {"micro_batch_size": micro_batch_size, "grad_accum_steps": grad_accum_steps, "max_steps": 1,
                  "max_grad_norm": 0.0, "precision": precision, "progress_bar": False},
    })
    return cfg


def train_one_step(tmp_path, micro_batch_size, grad_accum_steps, precision="fp32"):
    cfg = config(micro_batch_size, grad_accum_steps, precision)
    tokenizer = build_byte_tokenizer()
    model = build_model(cfg.model, tokenizer, seed=0)
    run_dir = tmp_path / f"{micro_batch_size}x{grad_accum_steps}"
    tracker = open_tracker(cfg.tracker, run_dir, {})
    before = copy.deepcopy(model.state_dict())
    result = train_loop(cfg, model, SFTTask(cfg.task), uneven_examples(), None,
                        lambda ex: collate_padded(ex, tokenizer.pad_token_id), run_dir, tracker, torch.device("cpu"))
    tracker.close()
    return before, model, result


def test_eight_micro_batches_of_one_equal_one_batch_of_eight(tmp_path):
    _, big, big_result = train_one_step(tmp_path, 8, 1)
    _, accumulated, acc_result = train_one_step(tmp_path, 1, 8)
    assert big_result.trained_units == acc_result.trained_units
    assert big_result.last_train_loss == pytest.approx(acc_result.last_train_loss, abs=1e-6)
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)


def test_token_weighted_loss_differs_from_a_mean_of_micro_batch_means():
    # Guards the invariant above: with uneven rows the two reductions really differ,
    # so the equivalence test would catch a loop that averaged per micro-batch.
    tokenizer = build_byte_tokenizer()
    model = build_model(config(1, 1).model, tokenizer, seed=0)
    sums = []
    with torch.no_grad():
        for ex in uneven_examples():
            batch = collate_padded([ex], tokenizer.pad_token_id)
            sums.append(next_token_loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"]))
    token_weighted = sum(s for s, _ in sums) / sum(n for _, n in sums)
    mean_of_means = sum(s / n for s, n in sums) / len(sums)
    assert abs(float(token_weighted) - float(mean_of_means)) > 1e-3


def test_bf16_autocast_step_changes_the_weights_and_keeps_fp32_masters(tmp_path):
    before, model, result = train_one_step(tmp_path, 4, 2, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert result.last_train_loss > 0


def test_eval_batch_size_sets_the_rows_of_each_eval_forward():
    from soup.loop import evaluate

    tokenizer = build_byte_tokenizer()
    model = build_model(config(1, 1).model, tokenizer, seed=0)
    rows_seen = []

    def collate(examples):
        rows_seen.append(len(examples))
        return collate_padded(examples, tokenizer.pad_token_id)

    losses = {}
    for batch_size in (3, 8):
        rows_seen.clear()
        losses[batch_size] = evaluate(model, SFTTask(config(1, 1).task), uneven_examples(), collate, batch_size,
                                      torch.device("cpu"), "fp32")["loss"]
        assert rows_seen == ([3, 3, 2] if batch_size == 3 else [8])
    # The batch size is a memory/speed knob only: the loss per token is the same.
    assert losses[3] == pytest.approx(losses[8], abs=1e-5)


@pytest.mark.parametrize("progress_bar", [True, False])
def test_progress_bar_can_be_turned_off(tmp_path, capsys, progress_bar):
    cfg = config(4, 1)
    cfg.train.progress_bar = progress_bar
    tokenizer = build_byte_tokenizer()
    model = build_model(cfg.model, tokenizer, seed=0)
    tracker = open_tracker(cfg.tracker, tmp_path, {})
    train_loop(cfg, model, SFTTask(cfg.task), uneven_examples(), None,
               lambda ex: collate_padded(ex, tokenizer.pad_token_id), tmp_path, tracker, torch.device("cpu"))
    tracker.close()
    assert ("1/1 [" in capsys.readouterr().err) is progress_bar  # tqdm's "1/1 [elapsed<remaining" on stderr
