"""Zigzag/contiguous sharding, the ring's chunk-pair schedule, and the full-sequence loss."""

import pytest
import torch

from flash_dist.kernels.reference import visible_mask
from flash_dist.parallel import ring_schedule, shard_indices, split_sequence, unsplit_sequence

from .cases import loss_and_batch


def test_zigzag_indices():
    assert shard_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert shard_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert shard_indices(16, 1, 4).tolist() == [2, 3, 12, 13]
    assert shard_indices(8, 1, 2, layout="contiguous").tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_split_unsplit_roundtrip(layout, world_size):
    seq = 24
    x = torch.randn(2, 3, seq, 5)
    shards = [split_sequence(x, r, world_size, dim=2, layout=layout) for r in range(world_size)]
    for r, s in enumerate(shards):
        assert torch.equal(s, x[:, :, shard_indices(seq, r, world_size, layout=layout)])
    assert torch.equal(unsplit_sequence(shards, dim=2, layout=layout), x)
    positions = torch.cat([shard_indices(seq, r, world_size, layout=layout) for r in range(world_size)])
    assert sorted(positions.tolist()) == list(range(seq))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_schedule_covers_exactly_the_visible_pairs(world_size, causal, layout):
    """Brute force over every (rank, K/V source): the kernel calls of the schedule, with their
    bottom-right-aligned masks, see each visible (query, key) pair once and no masked pair; a call
    is either unmasked or causal on a diagonal pair; under zigzag every rank computes as many pairs."""
    chunk = 3
    seq = chunk * 2 * world_size
    work = []
    for rank in range(world_size):
        pos_q = shard_indices(seq, rank, world_size, layout=layout)
        computed = 0
        for source in range(world_size):
            pos_k = shard_indices(seq, source, world_size, layout=layout)
            wanted = (pos_k[None, :] <= pos_q[:, None]) if causal else torch.ones(len(pos_q), len(pos_k), dtype=bool)
            seen = torch.zeros(len(pos_q), len(pos_k), dtype=torch.int64)
            for block in ring_schedule(rank, source, len(pos_q), causal=causal, layout=layout):
                rows, cols = range(len(pos_q))[block.q], range(len(pos_k))[block.k]
                mask = visible_mask(len(rows), len(cols), (-1, 0) if block.causal else (-1, -1))
                seen[block.q, block.k] += mask.long()
                if not block.causal:
                    assert wanted[block.q, block.k].all(), f"unmasked call over masked pairs: {block}"
                computed += int(mask.sum())
            assert seen.max() <= 1, f"rank {rank}, source {source}: a pair computed twice"
            assert torch.equal(seen.bool(), wanted), f"rank {rank}, source {source}: schedule misses or adds pairs"
        work.append(computed)
    if layout == "zigzag" or not causal:
        assert len(set(work)) == 1, f"unbalanced work per rank: {work}"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_sequence_loss_and_shard_batch(ranks2, layout):
    for result in ranks2.run(loss_and_batch, layout):
        assert result["other_untouched"] and result["ids_gathered"] and result["positions_gathered"]
        for mode in ("sum", "mean"):
            assert result[f"{mode}_value_err"] < 1e-6, result
            assert result[f"{mode}_grad_err"] < 1e-6, result
