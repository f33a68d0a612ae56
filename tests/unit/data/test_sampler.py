import pytest

from soup.data.sampler import ResumableBatchSampler


def drain(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_every_example_once_per_epoch_including_a_short_last_batch():
    sampler = ResumableBatchSampler(10, 4, seed=1)
    epoch = drain(sampler, sampler.batches_per_epoch)
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(i for b in epoch for i in b) == list(range(10))
    assert sampler.position.epoch == 1 and sampler.position.batch_index == 0


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableBatchSampler(50, 5, seed=3), ResumableBatchSampler(50, 5, seed=3)
    assert drain(a, 25) == drain(b, 25)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert ResumableBatchSampler(50, 5, seed=4).epoch_order(0) != a.epoch_order(0)


def test_resume_from_state_continues_the_same_stream():
    full = ResumableBatchSampler(23, 4, seed=7)
    expected = drain(full, 20)
    first = ResumableBatchSampler(23, 4, seed=7)
    head = drain(first, 9)
    resumed = ResumableBatchSampler(23, 4, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert head + drain(resumed, 11) == expected


def test_resume_with_another_batch_size_is_refused():
    state = ResumableBatchSampler(23, 4, seed=7).state_dict()
    with pytest.raises(ValueError, match="micro_batch_size"):
        ResumableBatchSampler(23, 8, seed=7).load_state_dict(state)


@pytest.mark.parametrize("num_examples, micro_batch_size, world_size", [(20, 4, 2), (21, 4, 2), (10, 3, 4), (3, 2, 4)])
def test_ranks_share_each_epoch_once_with_equal_counts(num_examples, micro_batch_size, world_size):
    samplers = [ResumableBatchSampler(num_examples, micro_batch_size, seed=5, rank=r, world_size=world_size)
                for r in range(world_size)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == -(-num_examples // (micro_batch_size * world_size))
    seen = [i for s in samplers for _ in range(per_epoch) for i in s.next_batch()]
    assert set(seen) == set(range(num_examples))  # every example in the epoch
    left = num_examples % (micro_batch_size * world_size)  # what the epoch's last micro-step shares
    assert len(seen) - num_examples == (world_size - left if 0 < left < world_size else 0)  # repeats, only then
    first_step = {i for r in range(world_size) for i in ResumableBatchSampler(
        num_examples, micro_batch_size, seed=5, rank=r, world_size=world_size).next_batch()}
    assert first_step == set(ResumableBatchSampler(num_examples, micro_batch_size * world_size, seed=5).next_batch())


def test_a_checkpoint_of_another_world_size_is_refused():
    state = ResumableBatchSampler(20, 4, seed=1, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        ResumableBatchSampler(20, 4, seed=1).load_state_dict(state)
