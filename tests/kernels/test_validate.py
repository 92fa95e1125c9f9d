"""Bad input gets a clear error naming the argument and what is allowed."""

import pytest
import torch

from flash_dist import flash_attention, flash_attention_varlen


def _qkv(device, dtype=torch.float32, b=1, hq=2, hkv=2, sq=8, sk=8, d=16):
    return (torch.randn(b, hq, sq, d, dtype=dtype, device=device),
            torch.randn(b, hkv, sk, d, dtype=dtype, device=device),
            torch.randn(b, hkv, sk, d, dtype=dtype, device=device))


def _cu(vals, device, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype, device=device)


DENSE_CASES = {
    "rank": (lambda q, k, v: ((q[0], k, v), {}), ValueError, r"q must be a 4-D tensor \(batch, heads, seq, head_dim\)"),
    "not_tensor": (lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, "q must be a torch.Tensor"),
    "int_dtype": (lambda q, k, v: ((q.long(), k, v), {}), TypeError, "q has dtype torch.int64; allowed dtypes are float16, bfloat16, float32"),
    "mixed_dtypes": (lambda q, k, v: ((q.half(), k, v), {}), TypeError, "must share one dtype"),
    "head_dim_not_multiple_of_8": (lambda q, k, v: ((q[..., :12], k[..., :12], v[..., :12]), {}), ValueError, "head_dim must be a multiple of 8 between 8 and 256, got 12"),
    "head_dim_too_big": (lambda q, k, v: ((q.new_zeros(1, 2, 8, 264).normal_(), k.new_zeros(1, 2, 8, 264).normal_(), v.new_zeros(1, 2, 8, 264).normal_()), {}), ValueError, "got 264"),
    "k_v_shapes": (lambda q, k, v: ((q, k, v[:, :, :4]), {}), ValueError, "k and v must have the same shape"),
    "qk_head_dim": (lambda q, k, v: ((q, k[..., :8], v[..., :8]), {}), ValueError, "q and k must have the same head_dim"),
    "gqa_ratio": (lambda q, k, v: ((q.new_zeros(1, 3, 8, 16).normal_(), k, v), {}), ValueError, r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
    "batch": (lambda q, k, v: ((q.expand(2, -1, -1, -1), k, v), {}), ValueError, "same batch size"),
    "empty_seq": (lambda q, k, v: ((q[:, :, :0], k, v), {}), ValueError, "q sequence length must be at least 1"),
    "dropout_high": (lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
    "dropout_negative": (lambda q, k, v: ((q, k, v), {"dropout_p": -0.1}), ValueError, "dropout_p"),
    "window_len": (lambda q, k, v: ((q, k, v), {"window_size": (4,)}), ValueError, r"window_size must be a pair of ints \(left, right\)"),
    "window_value": (lambda q, k, v: ((q, k, v), {"window_size": (-2, 0)}), ValueError, "window_size"),
    "window_float": (lambda q, k, v: ((q, k, v), {"window_size": (1.5, 0)}), ValueError, "window_size"),
    "alibi_shape": (lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(3, device=q.device)}), ValueError, r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    "alibi_dtype": (lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(2, dtype=torch.long, device=q.device)}), TypeError, "alibi_slopes must be a floating-point tensor"),
    "scale": (lambda q, k, v: ((q, k, v), {"softmax_scale": float("nan")}), ValueError, "softmax_scale must be a finite number"),
    "causal_type": (lambda q, k, v: ((q, k, v), {"causal": "yes"}), TypeError, "causal must be a bool"),
}


@pytest.mark.parametrize("case", DENSE_CASES.values(), ids=DENSE_CASES.keys())
def test_dense_errors(case, device):
    make, exc, pattern = case
    args, kwargs = make(*_qkv(device))
    with pytest.raises(exc, match=pattern):
        flash_attention(*args, **kwargs)


VARLEN_CASES = {
    "rank": (lambda q, cq, ck, mq, mk: (q[None], cq, ck, mq, mk), ValueError, r"q must be a 3-D tensor \(total_tokens, heads, head_dim\)"),
    "int64": (lambda q, cq, ck, mq, mk: (q, cq.long(), ck, mq, mk), TypeError, "cu_seqlens_q must have dtype int32"),
    "not_start_at_zero": (lambda q, cq, ck, mq, mk: (q, cq + 1, ck, mq, mk), ValueError, "cu_seqlens_q must start at 0"),
    "decreasing": (lambda q, cq, ck, mq, mk: (q, _cu([0, 7, 5, 12], q.device), ck, mq, mk), ValueError, "must be non-decreasing"),
    "wrong_total": (lambda q, cq, ck, mq, mk: (q, _cu([0, 5, 7, 11], q.device), ck, mq, mk), ValueError, r"must end at the number of tokens \(12\)"),
    "max_too_small": (lambda q, cq, ck, mq, mk: (q, cq, ck, 4, mk), ValueError, r"max_seqlen_q=4 is smaller than the longest sequence \(5\)"),
    "lengths_differ": (lambda q, cq, ck, mq, mk: (q, cq[:3], ck, mq, mk), ValueError, "same length"),
    "max_not_int": (lambda q, cq, ck, mq, mk: (q, cq, ck, 5.0, mk), ValueError, "max_seqlen_q must be an int"),
    "2d": (lambda q, cq, ck, mq, mk: (q, cq[None], ck, mq, mk), ValueError, "must be 1-D"),
}


@pytest.mark.parametrize("case", VARLEN_CASES.values(), ids=VARLEN_CASES.keys())
def test_varlen_errors(case, device):
    make, exc, pattern = case
    q = torch.randn(12, 2, 16, device=device)
    kv = torch.randn(12, 2, 16, device=device)
    cu = _cu([0, 5, 7, 12], device)
    q_, cq, ck, mq, mk = make(q, cu, cu.clone(), 5, 5)
    with pytest.raises(exc, match=pattern):
        flash_attention_varlen(q_, kv, kv, cq, ck, mq, mk)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    from flash_dist.kernels import validate

    monkeypatch.setattr(validate, "INTERPRET", False)
    q, k, v = _qkv("cpu")
    with pytest.raises(ValueError, match="need a CUDA device.*TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


@pytest.mark.gpu
def test_mixed_devices_are_refused():
    q, k, v = _qkv("cuda")
    with pytest.raises(ValueError, match="must be on one device"):
        flash_attention(q, k.cpu(), v)
