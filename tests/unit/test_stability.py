"""Loss-spike recovery (soup/stability.py and its place in soup/loop.py), triggered by an injected spike."""

import json
import math

import pytest
import torch

from soup.data import collate_padded
from soup.data.sampler import ResumableBatchSampler
from soup.errors import SoupError
from soup.loop import train_loop
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer
from soup.stability import SpikeGuard
from soup.tasks import SFTTask
from soup.tracking import open_tracker
from tests.unit.test_loop import config, uneven_examples

POISON = 3  # the first token of the poisoned example; the others draw theirs from 5..199


def test_a_spike_is_a_loss_above_factor_times_the_recent_median_or_not_finite():
    guard = SpikeGuard(factor=3.0, window=4, max_recoveries=2, lr_factor=1.0)
    assert guard.spike(1e6) is None  # no history yet: nothing to compare with
    assert "the loss is nan" in guard.spike(math.nan)
    for loss in (1.0, 2.0, 1.5, 1.2, 100.0, 1.1):  # the window keeps the last 4: 1.5, 1.2, 100, 1.1
        guard.record(loss)
    assert guard.spike(4.0) is None  # median 1.35 x 3 = 4.05
    assert "above 3 x 1.35" in guard.spike(4.1)
    state = guard.state_dict()
    again = SpikeGuard(3.0, 4, 2, 1.0)
    again.load_state_dict(state)
    assert list(again.history) == [1.5, 1.2, 100.0, 1.1]


class PoisonedSFT(SFTTask):
    """SFT whose loss is 1000x (gradient included) on a micro-batch holding the poisoned example."""

    def forward(self, model, batch):
        out = super().forward(model, batch)
        if bool((batch["input_ids"][:, 0] == POISON).any()):
            out.loss_sum = out.loss_sum * 1000.0
        return out


def run(tmp_path, **train):
    cfg = config(micro_batch_size=2, grad_accum_steps=1)
    cfg.optim.lr = 0.05
    cfg.train.merge_with({"max_steps": 15, "save_every_steps": 2, "max_grad_norm": 0.0, **train})
    tokenizer = build_byte_tokenizer()
    model = build_model(cfg.model, tokenizer, seed=0)
    examples = uneven_examples(40)
    examples[16]["input_ids"][0] = POISON  # micro-batch 9 of the unshuffled order: step 9
    tracker = open_tracker(cfg.tracker, tmp_path, {})
    try:
        result = train_loop(cfg, model, PoisonedSFT(cfg.task), examples, None,
                            lambda ex: collate_padded(ex, tokenizer.pad_token_id), tmp_path, tracker,
                            torch.device("cpu"), sampler=ResumableBatchSampler(40, 2, seed=0, shuffle=False))
    finally:
        tracker.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, lines


def test_a_spike_rolls_back_to_the_newest_checkpoint_skips_its_data_and_lowers_the_lr(tmp_path):
    unguarded, plain_lines = run(tmp_path / "plain")
    guarded, lines = run(tmp_path / "guarded", spike_factor=3.0, spike_window=5, spike_lr_factor=0.5)
    recoveries = [line for line in lines if line["split"] == "recovery"]
    assert len(recoveries) == 1
    event = recoveries[0]
    assert (event["step"], event["rolled_back_to"], event["skipped_micro_batches"]) == (9, 8, 1)
    assert event["lr"] == pytest.approx(0.025)
    train_steps = [line["step"] for line in lines if line["split"] == "train"]
    assert train_steps == list(range(1, 16))  # steps 9.. logged once, after the rollback
    assert guarded.step == 15
    # The poisoned update was never applied: the guarded run ends near its start (ln 261 = 5.56 for the
    # byte vocabulary: 5.57 when written), the unguarded one well above it (7.24).
    assert guarded.last_train_loss + 1.0 < unguarded.last_train_loss, (guarded.last_train_loss,
                                                                         unguarded.last_train_loss)
    assert max(line["loss"] for line in plain_lines if line["split"] == "train") > 100


def test_the_run_stops_after_its_last_recovery_or_without_a_checkpoint(tmp_path):
    with pytest.raises(SoupError, match=r"step 9: the loss .* after 0 recoveries"):
        run(tmp_path / "zero", spike_factor=3.0, spike_window=5, spike_max_recoveries=0)
    with pytest.raises(SoupError, match=r"holds no checkpoint to roll back to"):
        run(tmp_path / "late", spike_factor=3.0, spike_window=5, save_every_steps=100)


def test_auto_micro_batch_picks_the_largest_divisor_that_fits_after_simulated_out_of_memory():
    from soup.stability import choose_micro_batch, probe_fits

    tried = []

    def try_step(size):  # a device that holds at most 6 rows
        tried.append(size)
        if size > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    assert choose_micro_batch(32, probe_fits(try_step)) == 4  # 32, 16, 8 fail; 4 divides 32 and fits
    assert tried == [32, 16, 8, 4]
    with pytest.raises(SoupError, match="not even one row"):
        choose_micro_batch(8, lambda size: False)


def test_auto_micro_batch_is_refused_on_a_cpu_naming_the_reason():
    from soup.config import validate
    from soup.errors import ConfigError
    from tests.conftest import compose_config

    overrides = ["debug=tiny", "train.device=cpu", "train.auto_micro_batch_size=true"]
    with pytest.raises(ConfigError, match="no out-of-memory error to catch"):
        validate(compose_config(overrides), overrides)
