"""The warp-specialised Hopper backward (Gluon): compiled offline on any machine, and on an H100
against the float64 reference (skipped elsewhere)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flash_dist.kernels import attention_reference, backward, hopper_backward, tuning

from .helpers import assert_matches_reference, leaf64, poison_allocations, qkv_in_layout

needs_gluon = pytest.mark.skipif(not hopper_backward.HAVE_GLUON, reason="this Triton has no Gluon")


_COMPILE = """
import json, sys
from flash_dist.kernels import _compat, hopper_backward
tile = json.loads(sys.argv[1])
ptx = hopper_backward.compile_offline(arch=90, **tile).asm["ptx"]
print(json.dumps(dict(advisories=_compat.ptxas_advisories(ptx, 90), **_compat.ptxas_usage(ptx, 90),
                      reduction="cp.reduce.async.bulk.tensor" in ptx, setmaxnreg="setmaxnreg" in ptx)))
"""


@needs_gluon
@pytest.mark.parametrize("tile, causal", [({}, True), ({"block_n": 128, "num_warps": 8, "maxnreg": 168}, False)],
                         ids=["shipped-causal", "128-keys-full"])
def test_compiles_for_sm90_without_serialised_products(tile, causal):
    """ptxas serialises every product of a kernel (advisory C7514) when one is in flight across
    the loop's back edge; the kernel must also fit its register budget without spilling, and
    add dQ with TMA bulk reductions. Compiled in a fresh process without ``TRITON_INTERPRET``:
    the interpreter, once it has run a kernel, leaves Triton's tensor class unfit for compiling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps({**tile, "causal": causal})], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["advisories"] == []
    assert report["spill_bytes"] == 0 and report["registers"] <= tile.get("maxnreg", hopper_backward.MAXNREG)
    assert report["reduction"] and report["setmaxnreg"]


on_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                               reason="needs an sm_90 GPU")


def _run(monkeypatch, b, h, s, causal, dtype, layout, hkv=None, window=None):
    """Backward through the fused path (forced at any length), recording whether the Hopper kernel
    ran; fresh allocations start as NaN, so anything it should have written and did not shows."""
    monkeypatch.setattr(backward, "fused_kv_config", lambda dt, d, *a: tuning.FUSED_KV.get(d))
    taken = []
    real = hopper_backward.backward_dk_dv_dq
    monkeypatch.setattr(hopper_backward, "backward_dk_dv_dq", lambda *a, **k: taken.append(1) or real(*a, **k))
    torch.manual_seed(s + b)
    _, views = qkv_in_layout(layout, b, h, s, 64, dtype, "cuda")
    q, k, v = (t.detach().requires_grad_() for t in views)
    if hkv is not None:
        k, v = (t[:, :hkv].detach().requires_grad_() for t in (k, v))
    opts = {"causal": causal} if window is None else {"window_size": window}
    from flash_dist import flash_attention

    out = flash_attention(q, k, v, deterministic=False, **opts)
    dout = torch.randn_like(out)
    poison_allocations(monkeypatch, "empty", "empty_like")
    out.backward(dout)
    monkeypatch.undo()
    q64, k64, v64 = leaf64(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, **opts)
    ref.backward(dout.double())
    assert_matches_reference(out, None, (q.grad, k.grad, v.grad), ref, None, (q64.grad, k64.grad, v64.grad), dtype)
    return bool(taken)


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("layout", ["bhsd", "qkv", "bshd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b, h, s, causal", [(1, 2, 8192, True), (2, 3, 100, True), (2, 3, 100, False),
                                             (1, 1, 4, True), (3, 2, 1028, False), (1, 3, 4100, True)])
def test_matches_reference(monkeypatch, b, h, s, causal, dtype, layout):
    assert _run(monkeypatch, b, h, s, causal, dtype, layout), "the Hopper kernel was not taken"


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("s, hkv, window", [(17, None, None), (1, None, None), (256, 1, None), (256, None, (31, 0))],
                         ids=["ragged-lse-rows", "one-row", "gqa", "window"])
def test_other_cases_keep_the_tl_kernel(monkeypatch, s, hkv, window):
    """Lengths whose lse rows TMA cannot address, grouped heads and windows take the tl kernel,
    and are still exact."""
    assert not _run(monkeypatch, 1, 2, s, True, torch.bfloat16, "bhsd", hkv=hkv, window=window)
