"""The data-parallel x context-parallel mesh on 4 gloo ranks: CP groups are adjacent ranks."""

from .cases import mesh_layout


def test_mesh_groups(ranks4):
    per_rank = ranks4.run(mesh_layout)
    for rank, found in enumerate(per_rank):
        assert found[1] == dict(cp_ranks=[rank], dp_ranks=[0, 1, 2, 3], cp_rank=0, cp_size=1, dp_rank=rank,
                                dp_size=4)
        assert found[2] == dict(cp_ranks=[rank - rank % 2, rank - rank % 2 + 1], dp_ranks=[rank % 2, rank % 2 + 2],
                                cp_rank=rank % 2, cp_size=2, dp_rank=rank // 2, dp_size=2)
        assert found[4] == dict(cp_ranks=[0, 1, 2, 3], dp_ranks=[rank], cp_rank=rank, cp_size=4, dp_rank=0,
                                dp_size=1)
