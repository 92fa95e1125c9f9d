"""Resumable distributed sampler: same order as DistributedSampler, exact resume mid-epoch."""

import itertools

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from flash_dist.data.sampler import ResumableDistributedSampler

N = 103  # samples; odd so drop_last and padding matter


def batches(sampler, epochs, batch_size=4, start_epoch=0):
    """Batches of indices through a DataLoader over a dataset of indices, epoch after epoch."""
    loader = DataLoader(list(range(N)), batch_size=batch_size, sampler=sampler, drop_last=True)
    out = []
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        out += [b.tolist() for b in loader]
    return out


@pytest.mark.parametrize("shuffle,drop_last", [(True, True), (False, False)])
def test_order_equals_distributed_sampler(shuffle, drop_last):
    for rank in range(3):
        ours = ResumableDistributedSampler(range(N), num_replicas=3, rank=rank, shuffle=shuffle, seed=7,
                                           drop_last=drop_last)
        ref = DistributedSampler(range(N), num_replicas=3, rank=rank, shuffle=shuffle, seed=7, drop_last=drop_last)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref)
            assert len(ours) == len(ref)


def test_ranks_partition_and_epochs_reshuffle():
    samplers = [ResumableDistributedSampler(range(N), num_replicas=2, rank=r, seed=1) for r in range(2)]
    seen = [list(s) for s in samplers]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == N // 2
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != seen[0]


@pytest.mark.parametrize("k", [0, 3, 25, 26, 40])
def test_resume_continues_with_the_next_unseen_batch(k):
    """Consume k batches (25 per epoch), save, restore into a fresh sampler: the rest is unchanged."""
    full = batches(ResumableDistributedSampler(range(N), seed=5), epochs=3)
    sampler = ResumableDistributedSampler(range(N), seed=5)
    loader = DataLoader(list(range(N)), batch_size=4, sampler=sampler, drop_last=True)
    done, epoch = [], 0
    while len(done) < k:
        sampler.set_epoch(epoch)
        for batch in itertools.islice(loader, k - len(done)):
            done.append(batch.tolist())
        if len(done) < k:
            epoch += 1
    state = sampler.state_dict()
    assert state["epoch"] == epoch

    fresh = ResumableDistributedSampler(range(N), seed=5)
    fresh.load_state_dict(state)
    rest = batches(fresh, epochs=3, start_epoch=state["epoch"])
    assert done + rest == full


def test_explicit_consumed_count_overrides_read_ahead():
    sampler = ResumableDistributedSampler(range(N), seed=2)
    it = iter(sampler)
    ahead = [next(it) for _ in range(20)]  # e.g. prefetched by workers, only 12 were trained on
    fresh = ResumableDistributedSampler(range(N), seed=2)
    fresh.load_state_dict(sampler.state_dict(consumed=12))
    assert list(fresh)[:8] == ahead[12:]
    with pytest.raises(ValueError, match="consumed must be in"):
        sampler.state_dict(consumed=N + 1)


def test_resume_with_fewer_replicas():
    """Two ranks used 10 samples each; one rank then continues with global samples 20 onwards."""
    two = [ResumableDistributedSampler(range(N), num_replicas=2, rank=r, seed=3) for r in range(2)]
    state = two[0].state_dict(consumed=10)
    one = ResumableDistributedSampler(range(N), seed=3)
    order = list(one)
    one.load_state_dict(state)
    assert list(one) == order[20:]
    three = ResumableDistributedSampler(range(N), num_replicas=3, rank=0, seed=3)
    with pytest.raises(ValueError, match="does not divide among num_replicas=3"):
        three.load_state_dict(state)


def test_restored_position_only_applies_to_its_epoch():
    sampler = ResumableDistributedSampler(range(N), seed=4)
    sampler.load_state_dict({**ResumableDistributedSampler(range(N), seed=4).state_dict(consumed=50), "epoch": 2})
    sampler.set_epoch(2)  # what Lightning calls on resume: keeps the position
    assert len(list(sampler)) == N - 50
    sampler.set_epoch(3)
    assert len(list(sampler)) == N


def test_mismatched_state_is_refused():
    state = ResumableDistributedSampler(range(N), seed=1).state_dict(consumed=4)
    with pytest.raises(ValueError, match="saved seed=1 differs"):
        ResumableDistributedSampler(range(N), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved for a dataset of 103 samples"):
        ResumableDistributedSampler(range(N + 1), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ResumableDistributedSampler(range(N), num_replicas=2, rank=2)
