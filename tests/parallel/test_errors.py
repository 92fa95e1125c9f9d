"""Arguments context parallelism cannot handle are refused with a message naming them."""

import pytest

from flash_dist.parallel import context_parallel, split_sequence

from .cases import argument_errors


def test_attention_argument_errors(ranks2):
    per_rank = ranks2.run(argument_errors)
    assert per_rank[0] == per_rank[1]
    assert all(m.startswith(("ring_attention: ", "ulysses_attention: ")) for m in per_rank[0])


def test_split_errors():
    import torch

    x = torch.zeros(1, 10)
    with pytest.raises(ValueError, match=r"sequence length 10 must be a positive multiple of 4 \(2 \* 2 ranks\)"):
        split_sequence(x, 0, 2)
    with pytest.raises(ValueError, match=r"sequence length 10 must be a positive multiple of 4 \(4 ranks\)"):
        split_sequence(x, 0, 4, layout="contiguous")
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        split_sequence(torch.zeros(1, 8), 2, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        split_sequence(torch.zeros(1, 8), 0, 2, layout="ring")


def test_context_parallel_errors():
    import torch

    with pytest.raises(ValueError, match="has no submodule with an `attend"):
        context_parallel(torch.nn.Linear(2, 2), group=object(), mode="ring")
    with pytest.raises(ValueError, match="mode must be one of"):
        context_parallel(torch.nn.Linear(2, 2), group=object(), mode="tree")
