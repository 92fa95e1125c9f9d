"""Ring attention on 2 and 4 gloo ranks equals attention over the full sequence (float64 reference)."""

import pytest

from .cases import attention_case, ring_group_of_one, ring_overlap_off
from .checks import assert_ratios

CASES_2 = {
    "causal-zigzag": dict(causal=True),
    "causal-zigzag-gqa-d40-lse": dict(causal=True, heads_q=4, heads_kv=2, head_dim=40, return_lse=True),
    "full-mqa-d40-batch2": dict(causal=False, batch=2, heads_q=4, heads_kv=1, head_dim=40),
    "causal-contiguous-d16": dict(causal=True, layout="contiguous", head_dim=16),
    "causal-zigzag-fp16-scale": dict(causal=True, dtype="float16", options=dict(softmax_scale=0.3)),
    "causal-zigzag-dropout-gqa-lse": dict(causal=True, heads_q=4, heads_kv=2, return_lse=True, dropout_p=0.1),
    "full-contiguous-dropout-fp16": dict(causal=False, layout="contiguous", dtype="float16", dropout_p=0.2),
}

CASES_4 = {
    "causal-zigzag-gqa": dict(causal=True, heads_q=4, heads_kv=2, seq=128, head_dim=16),
    "causal-contiguous-lse": dict(causal=True, layout="contiguous", seq=64, head_dim=16, return_lse=True),
    "causal-zigzag-dropout": dict(causal=True, seq=128, head_dim=16, dropout_p=0.15),
}


@pytest.mark.parametrize("case", list(CASES_2))
def test_ring_two_ranks(ranks2, case):
    assert_ratios(ranks2.run(attention_case, "ring", **CASES_2[case]))


@pytest.mark.parametrize("case", list(CASES_4))
def test_ring_four_ranks(ranks4, case):
    assert_ratios(ranks4.run(attention_case, "ring", **CASES_4[case]))


def test_ring_without_overlap_is_identical(ranks2):
    for equal in ranks2.run(ring_overlap_off):
        assert equal == {"out": True, "dq": True, "dk": True, "dv": True}


def test_ring_group_of_one(ranks2):
    assert_ratios(ranks2.run(ring_group_of_one))
