"""Ulysses attention on 2 and 4 gloo ranks equals attention over the full sequence (float64 reference)."""

import pytest

from .cases import attention_case
from .checks import assert_ratios

CASES_2 = {
    "causal-zigzag-gqa-d40-lse": dict(causal=True, heads_q=4, heads_kv=2, head_dim=40, return_lse=True),
    "full-contiguous-batch2": dict(causal=False, layout="contiguous", batch=2, head_dim=16),
    # options ring attention cannot take work here: the kernel sees the whole sequence
    "causal-zigzag-alibi-window": dict(causal=True, heads_q=4, heads_kv=2, head_dim=16,
                                       options=dict(window_size=(20, 0), alibi="heads")),
    "causal-contiguous-fp16": dict(causal=True, layout="contiguous", dtype="float16"),
}

CASES_4 = {
    "causal-zigzag": dict(causal=True, heads_q=4, heads_kv=4, seq=128, head_dim=16),
}


@pytest.mark.parametrize("case", list(CASES_2))
def test_ulysses_two_ranks(ranks2, case):
    assert_ratios(ranks2.run(attention_case, "ulysses", **CASES_2[case]))


@pytest.mark.parametrize("case", list(CASES_4))
def test_ulysses_four_ranks(ranks4, case):
    assert_ratios(ranks4.run(attention_case, "ulysses", **CASES_4[case]))
