"""Multipack: every example once per epoch, bins within budget, ranks balanced,
exact resume, and far less padding than random micro-batches."""

import math

import pytest
import torch

from soup.config.schema import DataConfig
from soup.data import build_datasets
from soup.data.multipack import MultipackBatchSampler, naive_padding_efficiency
from soup.data.sampler import ResumableBatchSampler
from soup.errors import ConfigError
from soup.models.tokenizer import load_tokenizer
from tests.conftest import require_shared


def sft_like_lengths(n=2000, low=20, high=512, seed=0):
    """Log-normal lengths (median ~120 tokens, long tail) clipped to [low, high], like chat SFT data."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(120) + 0.9 * torch.randn(n, generator=gen))
    return lengths.round().clamp(low, high).long().tolist()


def drain(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def one_epoch_per_rank(lengths, world_size, **kwargs):
    samplers = [MultipackBatchSampler(lengths, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    return [drain(s, s.batches_per_epoch) for s in samplers]


def literal_first_fit(lengths, order, fits):
    """First-Fit-Decreasing the slow way: scan every open bin for the first one with room."""
    bins = []
    for i in sorted(order, key=lambda i: -lengths[i]):
        for b in bins:
            if fits(b + [i]):
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def test_the_one_pass_packer_is_first_fit_decreasing():
    lengths = sft_like_lengths(300, seed=4)
    sampler = MultipackBatchSampler(lengths, micro_batch_size=4, max_length=512, seed=0, max_items_per_bin=12,
                                    max_mask_cells=6_000_000)

    def fits(b):
        longest = max(lengths[i] for i in b)
        return len(b) * longest <= 4 * 512 and len(b) <= 12 and len(b) * longest**2 <= 6_000_000

    order = torch.randperm(300, generator=torch.Generator().manual_seed(1)).tolist()
    assert sampler.pack(order) == literal_first_fit(lengths, order, fits)


def test_same_seed_same_stream_other_seed_other_stream():
    lengths = sft_like_lengths(200)
    a, b = (MultipackBatchSampler(lengths, 4, 512, seed=3) for _ in range(2))
    n = 2 * a.batches_per_epoch + 3
    stream = drain(a, n)
    assert stream == drain(b, n)
    assert stream != drain(MultipackBatchSampler(lengths, 4, 512, seed=4), n)
    assert stream[: a.batches_per_epoch] != stream[a.batches_per_epoch : 2 * a.batches_per_epoch]


@pytest.mark.parametrize("world_size", [1, 4])
def test_every_example_exactly_once_per_epoch_across_disjoint_ranks(world_size):
    lengths = sft_like_lengths(501, seed=1)
    per_rank = one_epoch_per_rank(lengths, world_size, micro_batch_size=4, max_length=512, seed=0)
    assert len({len(bins) for bins in per_rank}) == 1
    seen = [i for bins in per_rank for b in bins for i in b]
    assert sorted(seen) == list(range(501))
    rank_sets = [{i for b in bins for i in b} for bins in per_rank]
    assert sum(len(s) for s in rank_sets) == len(set().union(*rank_sets))


def test_bins_respect_the_padded_budget_and_both_caps():
    lengths = sft_like_lengths(800, seed=2)
    sampler = MultipackBatchSampler(lengths, 8, 512, seed=0, max_items_per_bin=16, max_mask_cells=400_000)
    bins = drain(sampler, sampler.batches_per_epoch)
    for b in bins:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= 8 * 512
        assert len(b) <= 16
        assert len(b) * longest**2 <= 400_000
    # The caps bind: short examples would otherwise fill bins of up to 4096 // 20 = 204.
    assert max(len(b) for b in bins) == 16


def test_ranks_get_balanced_token_counts():
    lengths = sft_like_lengths(2000, seed=3)
    per_rank = one_epoch_per_rank(lengths, 4, micro_batch_size=8, max_length=512, seed=0)
    tokens = [sum(lengths[i] for b in bins for i in b) for bins in per_rank]
    assert max(tokens) / min(tokens) < 1.02, tokens
    # And within each optimizer step the four micro-batches cost about the same.
    step_ratios = [max(sum(lengths[i] for i in bins[s]) for bins in per_rank)
                   / min(sum(lengths[i] for i in bins[s]) for bins in per_rank) for s in range(len(per_rank[0]))]
    assert sorted(step_ratios)[len(step_ratios) // 2] < 1.05


def test_leftover_bins_are_split_never_dropped_or_duplicated():
    # Capacity 2 x 512 = 1024 cells: [500, 300] (limit 1024 // 500 = 2), then [300, 300, 300]
    # (limit 3): 2 bins for 3 ranks, so the 3-item bin is split in two.
    lengths = [300, 300, 300, 300, 500]
    sampler = MultipackBatchSampler(lengths, 2, 512, seed=0, world_size=3)
    bins = sampler.epoch_bins(0)
    assert sorted(len(b) for b in bins) == [1, 2, 2] and sampler.duplicated_bins == 0
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]


def test_duplicates_only_when_no_bin_can_be_split():
    # Capacity 1 x 512: every example fills a bin alone, 5 bins for 2 ranks.
    sampler = MultipackBatchSampler([500] * 5, 1, 512, seed=0, world_size=2)
    bins = sampler.epoch_bins(0)
    assert len(bins) == 6 and sampler.duplicated_bins == 1
    assert set(i for b in bins for i in b) == set(range(5))
    single = MultipackBatchSampler([500] * 5, 1, 512, seed=0)
    assert single.batches_per_epoch == 5 and single.duplicated_bins == 0


def test_resume_mid_epoch_continues_the_uninterrupted_stream():
    lengths = sft_like_lengths(300, seed=5)
    make = lambda: MultipackBatchSampler(lengths, 4, 512, seed=7, rank=1, world_size=2)  # noqa: E731
    full = make()
    expected = drain(full, 2 * full.batches_per_epoch + 5)
    first = make()
    head = drain(first, full.batches_per_epoch + 4)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + drain(resumed, len(expected) - len(head)) == expected


def test_resume_refuses_a_different_stream():
    lengths = sft_like_lengths(100)
    state = MultipackBatchSampler(lengths, 4, 512, seed=0).state_dict()
    with pytest.raises(ConfigError, match="max_length=512"):
        MultipackBatchSampler(lengths, 4, 1024, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="lengths_sha256"):
        MultipackBatchSampler(lengths[:-1] + [lengths[-1] + 1], 4, 512, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a multipack sampler"):
        MultipackBatchSampler(lengths, 4, 512, seed=0).load_state_dict(ResumableBatchSampler(100, 4, 0).state_dict())


def test_a_zero_cap_raises_instead_of_meaning_no_cap():
    with pytest.raises(ValueError, match="max_items_per_bin must be >= 1"):
        MultipackBatchSampler([10], 4, 512, seed=0, max_items_per_bin=0)


def test_an_example_longer_than_max_length_raises_with_the_fix():
    with pytest.raises(ConfigError, match=r"(?s)example 2 has 600 tokens > data.max_length=512.*truncate"):
        MultipackBatchSampler([10, 20, 600], 4, 512, seed=0)


def test_an_example_whose_mask_alone_exceeds_the_cap_raises():
    with pytest.raises(ConfigError, match=r"example 1 has 400 tokens.*160,000 cells.*multipack_max_mask_cells"):
        MultipackBatchSampler([10, 400], 4, 512, seed=0, max_mask_cells=100_000)


def test_efficiency_on_sft_like_lengths_beats_random_batches():
    lengths = sft_like_lengths(2000)
    sampler = MultipackBatchSampler(lengths, micro_batch_size=8, max_length=512, seed=0)
    naive = naive_padding_efficiency(lengths, 8, seed=0)
    report = (f"multipack efficiency {sampler.efficiency:.3f} of capacity, {sampler.padded_efficiency:.3f} "
              f"of padded cells, {sampler.batches_per_epoch} bins; random batches padded: {naive:.3f}")
    print(report)
    assert sampler.efficiency >= 0.95, report
    assert sampler.padded_efficiency >= 0.95, report
    assert naive < 0.6, report


def test_efficiency_on_the_real_alpaca_demo_lengths():
    data = require_shared("data/sft/llamafactory_alpaca_en_demo.alpaca.jsonl")
    tokenizer = load_tokenizer(str(require_shared("models/stories260k")))
    # overlong=truncate fails on this file at 512 (some prompts alone are longer),
    # so the rows that do not fit are dropped.
    cfg = DataConfig(name="file", train_file=str(data), chat_template="chatml", max_length=512, overlong="drop")
    lengths = [len(e["input_ids"]) for e in build_datasets(cfg, tokenizer, "sft", seed=0).train]
    sampler = MultipackBatchSampler(lengths, micro_batch_size=8, max_length=512, seed=0)
    naive = naive_padding_efficiency(lengths, 8, seed=0)
    report = (f"alpaca demo, {len(lengths)} rows: multipack efficiency {sampler.efficiency:.3f} of capacity, "
              f"{sampler.padded_efficiency:.3f} of padded cells; random batches padded: {naive:.3f}")
    print(report)
    assert sampler.padded_efficiency > naive + 0.2, report
    assert sampler.efficiency >= 0.9, report


def test_the_packed_layout_fills_bins_on_the_real_alpaca_demo_lengths():
    # data.multipack_layout=packed (the default): examples are packed end to end into rows of
    # max_length first, and the sampler bins those rows; the goal is >= 95% of capacity.
    from soup.data.packing import pack_examples

    data = require_shared("data/sft/llamafactory_alpaca_en_demo.alpaca.jsonl")
    tokenizer = load_tokenizer(str(require_shared("models/stories260k")))
    cfg = DataConfig(name="file", train_file=str(data), chat_template="chatml", max_length=512, overlong="drop")
    examples = build_datasets(cfg, tokenizer, "sft", seed=0).train
    rows = pack_examples(examples, 512, seed=0)
    sampler = MultipackBatchSampler([len(r["input_ids"]) for r in rows], micro_batch_size=8, max_length=512, seed=0)
    padded = MultipackBatchSampler([len(e["input_ids"]) for e in examples], micro_batch_size=8, max_length=512, seed=0)
    report = (f"alpaca demo, {len(examples)} rows -> {len(rows)} packed rows: efficiency {sampler.efficiency:.3f} "
              f"of capacity (padded layout: {padded.efficiency:.3f})")
    print(report)
    assert sampler.efficiency >= 0.95, report
    assert sampler.efficiency > padded.efficiency, report
    seen = sorted(i for b in sampler.epoch_bins(0) for r in b for i in rows[r]["example_indices"])
    assert seen == list(range(len(examples)))
