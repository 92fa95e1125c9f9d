"""The cross-entropy kernel (loss per row, gradient in place) and the chunked loss's kernel path.

Without a GPU the real kernel runs in Triton's interpreter (see tests/conftest.py); everything is
compared with a float64 reference computed from the same (rounded) inputs.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from flash_dist import losses
from flash_dist.kernels.cross_entropy import (ce_loss_grad_, cross_entropy_loss_grad_,
                                              launch_ce_loss_grad)
from flash_dist.losses import linear_cross_entropy

from ..test_losses import reference as lce_reference

# ||grad - ref|| / ||ref||: the gradient is rounded to the logits' dtype (bf16: 2^-9 relative on
# average, fp16: 2^-12), fp32 only reorders sums and rounds exp2
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the loss is fp32 math on the stored logits, whatever their dtype
LOSS_TOL = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def reference(logits, labels, scale, vocab, ignore_index=-100):
    """float64 loss per row and (softmax - onehot) * scale over the padded width, on the CPU."""
    logits, labels, scale = logits.cpu(), labels.cpu(), scale.cpu()
    x = logits.double()[:, :vocab]
    ok = labels != ignore_index
    y = torch.where(ok, labels, 0).long()
    loss = torch.where(ok, x.logsumexp(1) - x.gather(1, y[:, None])[:, 0], 0.0)
    grad = (x.softmax(1) - F.one_hot(y, vocab).double()) * torch.where(ok, scale.double(), 0.0)[:, None]
    grad = torch.where(ok[:, None], grad, 0.0)
    pad = torch.zeros(logits.shape[0], logits.shape[1] - vocab, dtype=torch.float64)
    return loss, torch.cat([grad, pad], 1)


def make(rows, vocab, n_cols, dtype, seed, ignore_frac=0.2, slack=0, device="cpu"):
    """Logits in a buffer of row stride ``n_cols + slack``: NaN in padding, 7 in the slack."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((rows, n_cols + slack), 7.0, dtype=dtype, device=device)
    logits = buf[:, :n_cols]
    logits.fill_(float("nan"))  # padding columns must be ignored, then zeroed
    logits[:, :vocab] = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    if rows > 2:
        logits[0, :vocab] += 100  # exp would overflow fp32 without the max shift
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < ignore_frac] = -100
    labels[rows // 2] = 0
    labels[-1] = vocab - 1
    return buf, logits, labels.to(device)


# (rows, vocab, n_cols)
CASES = [(1, 1, 1), (1, 1, 64), (17, 17, 17), (17, 17, 64), (100, 100, 100), (100, 100, 128), (17, 257, 257),
         (17, 257, 320), (1, 257, 320)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_float64_reference(case, dtype, device):
    rows, vocab, n_cols = case
    seed = rows * 1000 + vocab + n_cols
    buf, logits, labels = make(rows, vocab, n_cols, dtype, seed, slack=3, device=device)
    ok = labels != -100
    # mean (1 / count) for some cases, sum (1) for others
    scale = (1.0 / ok.sum(dtype=torch.float32)) if seed % 2 else torch.ones((), device=device)
    ref_loss, ref_grad = reference(logits.clone(), labels, scale, vocab)
    loss = torch.full((rows,), float("nan"), device=device)  # every entry must be written
    launch_ce_loss_grad(logits, labels, scale, loss, vocab, -100)
    assert (loss.cpu().double() - ref_loss).abs().max().item() <= LOSS_TOL * max(1.0, ref_loss.abs().max().item())
    assert torch.isfinite(logits).all()
    if ok.any():
        # relative to the gradient's norm, or to its scale where that norm is 0 (one column: the
        # softmax is 1, and exp2 of a rounding error leaves ~1e-7 * scale)
        err = (logits.cpu().double() - ref_grad).norm().item()
        assert err < GRAD_TOL[dtype] * max(ref_grad.norm().item(), float(scale))
    assert torch.all(logits[:, vocab:] == 0), "padding columns must get a zero gradient"
    assert torch.all(logits[~ok] == 0) and not torch.signbit(logits[~ok]).any()
    assert torch.all(buf[:, n_cols:] == 7), "the kernel wrote past n_cols"


def test_public_function_sum_and_mean(device):
    _, logits, labels = make(17, 100, 128, torch.float32, seed=1, device=device)
    count = (labels != -100).sum().item()
    ref_loss, ref_grad = reference(logits, labels, torch.ones(()), 100)
    x = logits.clone()
    loss = cross_entropy_loss_grad_(x, labels, vocab=100)  # scale 1: the gradient of the sum
    assert (loss.cpu().double() - ref_loss).abs().max() < 1e-4
    assert rel_err(x.cpu(), ref_grad) < GRAD_TOL[torch.float32]
    x = logits[:, :100].clone()
    cross_entropy_loss_grad_(x, labels.int(), 1.0 / count)  # vocab = n_cols, int32 labels, float scale
    assert rel_err(x.cpu(), ref_grad[:, :100] / count) < GRAD_TOL[torch.float32]


def test_all_ignored_gives_zeros_even_with_infinite_scale(device):
    _, logits, labels = make(5, 33, 64, torch.bfloat16, seed=2, ignore_frac=0.0, device=device)
    labels[:] = -100
    scale = 1.0 / (labels != -100).sum(dtype=torch.float32)  # inf, as for a mean over nothing
    loss = cross_entropy_loss_grad_(logits, labels, scale, vocab=33)
    assert torch.all(loss == 0) and torch.all(logits == 0)


def test_ignore_index_that_is_a_column(device):
    _, logits, labels = make(9, 20, 20, torch.float32, seed=3, ignore_frac=0.0, device=device)
    labels[::2] = 0
    ref_loss, ref_grad = reference(logits, labels, torch.ones(()), 20, ignore_index=0)
    loss = cross_entropy_loss_grad_(logits, labels, ignore_index=0)
    assert (loss.cpu().double() - ref_loss).abs().max() < 1e-4
    assert rel_err(logits.cpu(), ref_grad) < GRAD_TOL[torch.float32]
    assert torch.all(logits[::2] == 0) and not torch.signbit(logits[::2]).any()


def test_label_out_of_range_gives_nan_loss(device):
    _, logits, labels = make(4, 10, 64, torch.float32, seed=4, ignore_frac=0.0, device=device)
    labels[1], labels[2] = 10, -5
    loss = cross_entropy_loss_grad_(logits, labels, vocab=10)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()


def test_opcheck(device):
    _, logits, labels = make(6, 30, 64, torch.float32, seed=5, device=device)
    torch.library.opcheck(ce_loss_grad_, (logits, labels, torch.ones((), device=device), 30, -100))


def test_empty_rows(device):
    loss = cross_entropy_loss_grad_(torch.empty(0, 8, device=device), torch.empty(0, dtype=torch.long, device=device))
    assert loss.shape == (0,) and loss.dtype == torch.float32


def _args(logits, labels=(4,), scale=None, *, labels_dtype=torch.long):
    """Arguments on the test's device: shapes (or a ready tensor / non-tensor) in, tensors out."""
    def build(device):
        out = [torch.randn(*logits, device=device) if isinstance(logits, tuple) else logits,
               torch.zeros(*labels, dtype=labels_dtype, device=device) if isinstance(labels, tuple) else labels]
        if scale is not None:
            out.append(torch.ones(scale[0], dtype=scale[1], device=device))
        return out
    return build


@pytest.mark.parametrize("make_args,kwargs,exc,match", [
    (_args((4,)), {}, ValueError, "logits must be 2-D"),
    (lambda d: [torch.randn(4, 8, dtype=torch.float64, device=d), torch.zeros(4, dtype=torch.long, device=d)], {}, TypeError, "logits has dtype torch.float64"),
    (lambda d: [torch.randn(8, 4, device=d).T, torch.zeros(4, dtype=torch.long, device=d)], {}, ValueError, "logits must have unit column stride"),
    (lambda d: [torch.randn(1, 8, device=d).expand(4, 8), torch.zeros(4, dtype=torch.long, device=d)], {}, ValueError, "logits rows must not overlap"),
    (_args((4, 8), (3,)), {}, ValueError, "labels must be 1-D with one entry per row of logits"),
    (_args((4, 8), (4, 1)), {}, ValueError, "labels must be 1-D"),
    (_args((4, 8), labels_dtype=torch.float32), {}, TypeError, "labels must be int64 or int32"),
    (_args((4, 8), [0, 1, 2, 3]), {}, TypeError, "labels must be a torch.Tensor"),
    (_args((4, 8), scale=((1,), torch.float32)), {}, TypeError, "scale must be a 0-dim float32"),
    (_args((4, 8), scale=((), torch.float64)), {}, TypeError, "scale must be a 0-dim float32"),
    (_args((4, 8)), {"vocab": 9}, ValueError, r"vocab must be an int with 1 <= vocab <= logits.shape\[1\] \(8\), got 9"),
    (_args((4, 8)), {"vocab": 0}, ValueError, "vocab must be an int"),
    (_args((4, 8)), {"vocab": 4.0}, ValueError, "vocab must be an int"),
    (_args((4, 8)), {"ignore_index": None}, TypeError, "ignore_index must be an int"),
    (_args("logits"), {}, TypeError, "logits must be a torch.Tensor"),
])
def test_argument_errors(make_args, kwargs, exc, match, device):
    with pytest.raises(exc, match=match):
        cross_entropy_loss_grad_(*make_args(device), **kwargs)


def test_device_errors():
    logits, labels = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on one device"):
            cross_entropy_loss_grad_(logits.cuda(), labels)
    with pytest.raises(ValueError, match="must be on one device"):
        cross_entropy_loss_grad_(logits, labels, torch.ones((), device="meta"))


# --- linear_cross_entropy through the kernel ------------------------------------------------


@pytest.fixture
def kernel_path(monkeypatch):
    """Send linear_cross_entropy's CPU tensors through the kernel (the interpreter) as on CUDA."""
    monkeypatch.setattr(losses, "_kernel_path", lambda hidden: True)


def lce_inputs(n, d, v, dtype, seed, device, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, y.to(device)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,d,v,chunk", [(37, 24, 101, 16), (20, 16, 64, 64)])
def test_linear_cross_entropy_kernel_path(kernel_path, n, d, v, chunk, reduction, dtype, tol, device):
    h, w, y = lce_inputs(n, d, v, dtype, seed=n + v, device=device)
    assert (y == -100).any()
    loss = linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=chunk)
    loss.backward()
    ref_loss, ref_dh, ref_dw = lce_reference(h, w, y, reduction)
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert rel_err(h.grad, ref_dh) < tol
    assert rel_err(w.grad, ref_dw) < tol
    assert torch.all(h.grad[y == -100] == 0)


def test_linear_cross_entropy_kernel_path_all_ignored_and_no_grad(kernel_path, device):
    h, w, _ = lce_inputs(6, 8, 11, torch.float32, seed=7, device=device)
    y = torch.full((6,), -100, device=device)
    loss = linear_cross_entropy(h, w, y, chunk_size=4)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)
    h, w, y = lce_inputs(13, 8, 70, torch.float32, seed=8, device=device)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk_size=5)
    assert abs(loss.item() - lce_reference(h, w, y, "mean")[0].item()) < 1e-5 * abs(loss.item())


def test_linear_cross_entropy_kernel_path_autocast(kernel_path, device):
    h, w, y = lce_inputs(40, 32, 90, torch.float32, seed=9, device=device)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_size=16)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_loss, ref_dh, ref_dw = lce_reference(h, w, y, "mean")
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    assert rel_err(h.grad, ref_dh) < 2e-2 and rel_err(w.grad, ref_dw) < 2e-2


def test_compiled_kernel_path_is_one_graph_and_reinplaced(kernel_path, device):
    """Inductor keeps the op in the graph and runs it on the matmul's own output buffer (no copy)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    h, w, y = lce_inputs(37, 16, 101, torch.float32, seed=10, device=device)

    def f(h, w, y):
        return linear_cross_entropy(h, w, y, chunk_size=16)

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    loss, codes = run_and_get_code(lambda: compiled(h, w, y))
    loss.backward()
    ref_loss, ref_dh, ref_dw = lce_reference(h, w, y, "mean")
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel_err(h.grad, ref_dh) < 1e-5 and rel_err(w.grad, ref_dw) < 1e-5
    code = "\n".join(codes)
    mm_outputs = set(re.findall(r"extern_kernels\.mm\(.*out=(buf\d+)\)", code))
    op_inputs = re.findall(r"ce_loss_grad_\.default\((buf\d+),", code)
    assert len(op_inputs) == 3, "one kernel call per chunk"
    assert set(op_inputs) <= mm_outputs, "the op should mutate the logits matmul's output in place"


def test_compiled_kernel_path_aot_eager(kernel_path, device):
    torch._dynamo.reset()
    h, w, y = lce_inputs(30, 8, 70, torch.bfloat16, seed=11, device=device)
    loss = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=8, reduction="sum"),
                         backend="aot_eager", fullgraph=True)(h, w, y)
    loss.backward()
    ref_loss, ref_dh, ref_dw = lce_reference(h, w, y, "sum")
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    assert rel_err(h.grad, ref_dh) < 2e-2 and rel_err(w.grad, ref_dw) < 2e-2


# --- on the GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_kernel_gpt2_vocab_bf16():
    torch.manual_seed(12)
    rows, vocab, n_cols = 1024, 50257, 50304
    logits = torch.zeros(rows, n_cols, dtype=torch.bfloat16, device="cuda")
    logits[:, :vocab] = torch.randn(rows, vocab, device="cuda") * 3
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = -100
    labels[1], labels[2] = 0, vocab - 1
    scale = 1.0 / (labels != -100).sum(dtype=torch.float32)
    ref_loss, ref_grad = reference(logits.cpu(), labels.cpu(), scale.cpu(), vocab)
    loss = cross_entropy_loss_grad_(logits, labels, scale, vocab=vocab)
    assert (loss.cpu().double() - ref_loss).abs().max() <= LOSS_TOL * ref_loss.abs().max()
    assert rel_err(logits.cpu(), ref_grad) < GRAD_TOL[torch.bfloat16]
    assert torch.all(logits[:, vocab:] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "autocast"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_linear_cross_entropy_bf16(mode, compiled):
    """GPT-2's head at its real vocabulary, eager and under torch.compile (Inductor), vs float64."""
    torch.manual_seed(13)
    torch._dynamo.reset()
    n, d, v = 4096, 256, 50257
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    h = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda") * 0.05).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    y[::10] = -100

    def f(h, w, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "autocast"):
            return linear_cross_entropy(h, w, y, chunk_size=1024)

    fn = torch.compile(f, fullgraph=True) if compiled else f
    loss = fn(h, w, y)
    loss.backward()
    # the reference sees the inputs as the matmuls do: rounded to bf16
    h64 = h.detach().bfloat16().double().requires_grad_()
    w64 = w.detach().bfloat16().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, y, ignore_index=-100)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())
    assert rel_err(h.grad, h64.grad) < 2e-2
    assert rel_err(w.grad, w64.grad) < 2e-2
    assert torch.all(h.grad[y == -100] == 0)
