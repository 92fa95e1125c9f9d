"""Which kernels the backward runs (``backward_path``) and forcing one (``attention_backward(path=...)``)."""

import pytest
import torch

from flash_dist.kernels.backward import attention_backward, backward_path
from flash_dist.kernels.forward import attention_forward

from .helpers import GRAD_TOL, assert_close


def _inputs(s=40, d=16, dtype=torch.float32):
    torch.manual_seed(s)
    q, k, v, dout = (torch.randn(1, 2, s, d, dtype=dtype) for _ in range(4))
    out, lse = attention_forward(q, k, v, softmax_scale=d ** -0.5, window=(-1, 0))
    return q, k, v, dout, out, lse


def _path(q, k, v, dout, lse, **kw):
    return backward_path(q, k, v, dout, lse, torch.empty_like(k), torch.empty_like(v), seqlen_k=k.shape[2],
                         window=(-1, 0), **kw)[0]


@pytest.mark.parametrize("deterministic, varlen, expected", [(True, False, "deterministic"), (False, False, "fused"),
                                                             (False, True, "deterministic")])
def test_automatic_choice_on_the_cpu(deterministic, varlen, expected):
    """Under the interpreter every dense non-deterministic backward takes the tl fused kernel
    (so the CPU tests run it); the Gluon kernel never runs there."""
    q, k, v, dout, _, lse = _inputs()
    assert _path(q, k, v, dout, lse, deterministic=deterministic, varlen=varlen) == expected


@pytest.mark.parametrize("path", ["deterministic", "fused"])
def test_forced_paths_agree(path):
    q, k, v, dout, out, lse = _inputs(s=100)
    kw = dict(softmax_scale=0.25, window=(-1, 0))
    ref = attention_backward(dout, q, k, v, out, lse, deterministic=True, **kw)
    got = attention_backward(dout, q, k, v, out, lse, deterministic=True, path=path, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_close(name, g, r, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("path, words", [("hopper", "path='hopper' needs an sm_90 GPU"),
                                         ("tl", "path: expected None or one of 'deterministic', 'fused', 'hopper'")])
def test_refused_paths_name_the_argument(path, words):
    q, k, v, dout, out, lse = _inputs()
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        attention_backward(dout, q, k, v, out, lse, softmax_scale=0.25, window=(-1, 0), path=path)

