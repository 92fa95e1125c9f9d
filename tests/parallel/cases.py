"""Rank-side test bodies (module-level, so the worker pool can run them by name).

Each returns plain data (error ratios, messages) for the test process to assert on.
"""

from __future__ import annotations

import torch

from flash_dist.kernels import attention_reference
from flash_dist.parallel import ring_attention, split_sequence, ulysses_attention

from .checks import GRAD_TOL, TOL, error_ratio

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def ring_keep_mask(rng: torch.Tensor, world_size: int, batch: int, heads: int, seq: int, *, causal: bool,
                   layout: str, dropout_p: float) -> torch.Tensor:
    """The (batch, heads, seq, seq) keep-mask ring attention uses over the full sequence: each chunk
    pair's mask regenerated from its own (seed, offset) (``block_rngs``) at its global positions."""
    from flash_dist.kernels import dropout_mask
    from flash_dist.parallel.ring import block_rngs, ring_schedule

    local = seq // world_size
    positions = [split_sequence(torch.arange(seq), r, world_size, dim=0, layout=layout) for r in range(world_size)]
    keep = torch.ones(batch, heads, seq, seq, dtype=torch.bool)
    for r in range(world_size):
        rngs = block_rngs(rng, r, world_size)
        for step in range(world_size):
            source = (r - step) % world_size
            for block in ring_schedule(r, source, local, causal=causal, layout=layout):
                rows, cols = positions[r][block.q], positions[source][block.k]
                m = dropout_mask(rngs[step], batch, heads, len(rows), len(cols), dropout_p)
                keep[:, :, rows[:, None], cols[None, :]] = m
    return keep


def attention_case(rank: int, world_size: int, mode: str, *, causal: bool, layout: str = "zigzag",
                   batch: int = 1, heads_q: int = 2, heads_kv: int = 2, seq: int = 64, head_dim: int = 32,
                   dtype: str = "float32", return_lse: bool = False, seed: int = 0,
                   options: dict | None = None, dropout_p: float = 0.0) -> dict[str, float]:
    """Ring or Ulysses attention on this rank's shard vs the float64 reference on the full sequence.

    Every rank draws the same full q, k, v, output gradient (and lse gradient), keeps its shard,
    runs the distributed function forward and backward, and compares its shard of out, lse, dq,
    dk and dv with the reference's. With ``dropout_p`` (ring only) the reference applies the
    keep-mask the ring's chunk pairs regenerate (:func:`ring_keep_mask`), and the share of
    dropped weights among the visible ones must be close to ``dropout_p``.
    """
    from flash_dist.kernels import draw_rng

    options = dict(options or {})
    ring_seed = 1000 + seed
    if dropout_p:
        torch.manual_seed(ring_seed)
        keep = ring_keep_mask(draw_rng("cpu"), world_size, batch, heads_q, seq, causal=causal, layout=layout,
                              dropout_p=dropout_p)
        visible = torch.ones(seq, seq, dtype=torch.bool).tril() if causal else torch.ones(seq, seq, dtype=torch.bool)
        dropped = (~keep & visible).sum().item() / (visible.sum().item() * batch * heads_q)
        assert abs(dropped - dropout_p) < 0.03, f"{dropped:.3f} of the weights dropped, not ~{dropout_p}"
        options.update(dropout_p=dropout_p, dropout_mask=keep)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    if options.get("alibi") == "heads":
        del options["alibi"]
        options["alibi_slopes"] = torch.rand(heads_q, generator=g) + 0.1
    q = torch.randn(batch, heads_q, seq, head_dim, generator=g).to(dt)
    k = torch.randn(batch, heads_kv, seq, head_dim, generator=g).to(dt)
    v = torch.randn(batch, heads_kv, seq, head_dim, generator=g).to(dt)
    dout = torch.randn(batch, heads_q, seq, head_dim, generator=g).to(dt)
    dlse = torch.randn(batch, heads_q, seq, generator=g) if return_lse else None

    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_reference(*ref, causal=causal, **options)
    objective = (out_ref * dout.double()).sum()
    if return_lse:
        objective = objective + (lse_ref * dlse.double()).sum()
    grads_ref = torch.autograd.grad(objective, ref)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return split_sequence(t, rank, world_size, dim=2, layout=layout)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    fn = ring_attention if mode == "ring" else ulysses_attention
    options.pop("dropout_mask", None)
    torch.manual_seed(ring_seed)
    result = fn(*local, causal=causal, layout=layout, return_lse=return_lse, **options)
    out, lse = result if return_lse else (result, None)
    objective = (out.float() * shard(dout).float()).sum()
    if return_lse:
        objective = objective + (lse * shard(dlse)).sum()
    objective.backward()

    ratios = {"out": error_ratio(out, shard(out_ref), TOL[dt])}
    assert out.dtype == dt and out.shape == local[0].shape
    if return_lse:
        assert lse.dtype == torch.float32
        ratios["lse"] = error_ratio(lse, shard(lse_ref), TOL[dt])
    for name, t, g_ref in zip(("dq", "dk", "dv"), local, grads_ref):
        ratios[name] = error_ratio(t.grad, shard(g_ref), GRAD_TOL[dt])
    return ratios


def argument_errors(rank: int, world_size: int) -> list[str]:
    """Every rejected argument raises ValueError on every rank before any communication."""
    import pytest

    g = torch.Generator().manual_seed(1)

    def qkv(heads_q=2, heads_kv=2, seq=16, seq_k=None):
        return (torch.randn(1, heads_q, seq, 16, generator=g),
                torch.randn(1, heads_kv, seq if seq_k is None else seq_k, 16, generator=g),
                torch.randn(1, heads_kv, seq if seq_k is None else seq_k, 16, generator=g))

    messages = []
    cases = [
        (ring_attention, qkv(seq=15), dict(causal=True), r"must be even.*divisible by 2 \* group size = 4"),
        (ring_attention, qkv(), dict(causal=True, dropout_p=1.0), r"dropout_p must be a number in \[0, 1\), got 1.0"),
        (ring_attention, qkv(), dict(causal=True, window_size=(8, 0)), r"window_size=\(8, 0\) is not allowed"),
        (ring_attention, qkv(), dict(causal=False, alibi_slopes=torch.ones(2)), r"alibi_slopes is not allowed"),
        (ring_attention, qkv(), dict(causal=True, layout="striped"), r"layout must be one of"),
        (ring_attention, qkv(seq_k=8), dict(causal=False), r"same shard of one sequence"),
        (ulysses_attention, qkv(heads_q=3, heads_kv=1), dict(causal=True),
         r"query heads \(3\) and of key/value heads \(1\) must both be divisible by the context-parallel "
         r"group size 2"),
        (ulysses_attention, qkv(heads_q=2, heads_kv=1), dict(causal=True), r"key/value heads \(1\)"),
        (ulysses_attention, qkv(seq=15), dict(causal=True), r"must be even"),
        (ulysses_attention, qkv(), dict(causal=True, alibi_slopes=torch.ones(3)), r"alibi_slopes must be"),
    ]
    for fn, (q, k, v), kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            fn(q, k, v, **kwargs)
        messages.append(str(info.value))
    return messages


def loss_and_batch(rank: int, world_size: int, layout: str) -> dict:
    """shard_batch, gather_sequence and sequence_loss against the same computation on the full batch."""
    import torch.distributed as dist

    from flash_dist.parallel import gather_sequence, sequence_loss, shard_batch

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (2, 16), generator=g)
    labels = torch.randint(0, 50, (2, 16), generator=g)
    labels[0, 3:7] = -100  # ignored tokens, unevenly spread over the shards
    labels[1, 13] = -100
    weight = torch.randn(50, generator=g)

    def token_losses(w, ids, labels):
        # any per-token function of a parameter; ignored labels contribute nothing
        return torch.where(labels != -100, (w[ids] * w[labels.clamp(min=0)]).sin() + 1.0, 0.0)

    w_full = weight.clone().requires_grad_()
    full = token_losses(w_full, ids, labels).sum() / (labels != -100).sum()
    full.backward()

    shard = shard_batch({"input_ids": ids, "labels": labels, "other": ids}, layout=layout)
    result = {
        "other_untouched": torch.equal(shard["other"], ids),
        "ids_gathered": torch.equal(gather_sequence(shard["input_ids"], layout=layout), ids),
        "positions_gathered": torch.equal(gather_sequence(shard["position_ids"], layout=layout),
                                          torch.arange(16).expand(2, 16)),
    }
    for mode in ("sum", "mean"):
        w = weight.clone().requires_grad_()
        local = token_losses(w, shard["input_ids"], shard["labels"])
        loss = sequence_loss(local.sum(), (shard["labels"] != -100).sum(), gradient=mode)
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        if mode == "mean":
            grad /= world_size
        result[f"{mode}_value_err"] = abs(loss.item() - full.item()) / abs(full.item())
        result[f"{mode}_grad_err"] = ((grad - w_full.grad).norm() / w_full.grad.norm()).item()
    return result


def mesh_layout(rank: int, world_size: int) -> dict:
    """The (dp, cp) mesh of init_context_parallel_mesh, and its argument check."""
    import pytest
    import torch.distributed as dist

    from flash_dist.parallel import init_context_parallel_mesh

    found = {}
    for cp in (1, 2, world_size):
        mesh = init_context_parallel_mesh(cp, device_type="cpu")
        found[cp] = dict(cp_ranks=dist.get_process_group_ranks(mesh.cp_group),
                         dp_ranks=dist.get_process_group_ranks(mesh.dp_group),
                         cp_rank=mesh.cp_rank, cp_size=mesh.cp_size, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size)
    with pytest.raises(ValueError, match=f"positive divisor of the world size {world_size}, got 3"):
        init_context_parallel_mesh(3)
    with pytest.raises(ValueError, match="got 0"):
        init_context_parallel_mesh(0)
    return found


# ---------------------------------------------------------------- GPT-2 with context parallelism

GPT2_VOCAB, GPT2_SEQ, GPT2_BATCH = 128, 64, 2


def gpt2_model(position_embedding: str = "learned"):
    from flash_dist.models.gpt2 import GPT2, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config.from_name("tiny", vocab_size=GPT2_VOCAB, block_size=GPT2_SEQ,
                                  position_embedding=position_embedding)
    return GPT2(config).train()


def gpt2_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two fixed batches, alternated, so the loss falls as the model memorises them; labels shifted."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, GPT2_VOCAB, (GPT2_BATCH, GPT2_SEQ + 1), generator=g) for _ in range(2)]
    for ids in data:
        ids[0, 5] = 0  # the labels carry one ignored token: the loss counts it out on its shard only
    batches = [(ids[:, :-1], ids[:, 1:].masked_fill(ids[:, 1:] == 0, -100)) for ids in data]
    return [batches[i % 2] for i in range(steps)]


def train_gpt2(model, batches, loss_fn, after_backward=lambda model: None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for ids, labels in batches:
        loss = loss_fn(model, ids, labels)
        loss.backward()
        after_backward(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_gpt2_context_parallel(rank: int, world_size: int, mode: str, layout: str, steps: int) -> list[float]:
    """The tiny GPT-2 trained on the same batches with every sequence split over the group."""
    import torch.distributed as dist

    from flash_dist.parallel import context_parallel, sequence_loss, shard_batch

    model = gpt2_model()
    handle = context_parallel(model, mode=mode, layout=layout)
    assert len(handle.modules) == model.config.n_layer

    def loss_fn(model, ids, labels):
        shard = shard_batch({"input_ids": ids, "labels": labels}, layout=layout)
        loss_sum = model(shard["input_ids"], labels=shard["labels"], position_ids=shard["position_ids"],
                         reduction="sum")
        return sequence_loss(loss_sum, (shard["labels"] != -100).sum())

    def sum_gradients(model):
        for p in model.parameters():
            dist.all_reduce(p.grad)

    losses = train_gpt2(model, gpt2_batches(steps), loss_fn, sum_gradients)
    handle.remove()
    assert "attend" not in model.transformer.h[0].attn.__dict__
    return losses


def gpt2_ring_dropout(rank: int, world_size: int) -> dict:
    """GPT-2 with attention dropout through ring attention: one step's gradients with activation
    checkpointing equal those without (the recomputed forward regenerates the same masks), and
    differ from the dropout-free model's."""
    from flash_dist.parallel import context_parallel, sequence_loss, shard_batch
    from flash_dist.strategy.strategy import checkpoint_block

    ids, labels = gpt2_batches(1)[0]

    def grads(dropout: float, checkpointing: bool) -> tuple[float, list[torch.Tensor]]:
        model = gpt2_model()
        for block in model.transformer.h:
            block.attn.attn_pdrop = dropout
            if checkpointing:
                checkpoint_block(block)
        with context_parallel(model, mode="ring"):
            shard = shard_batch({"input_ids": ids, "labels": labels})
            torch.manual_seed(7)
            loss_sum = model(shard["input_ids"], labels=shard["labels"], position_ids=shard["position_ids"],
                             reduction="sum")
            loss = sequence_loss(loss_sum, (shard["labels"] != -100).sum())
            loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    loss_plain, plain = grads(0.3, False)
    loss_ckpt, ckpt = grads(0.3, True)
    loss_nodrop, nodrop = grads(0.0, False)
    same = all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    differs = any(not torch.allclose(a, b) for a, b in zip(plain, nodrop))
    finite = all(torch.isfinite(g).all() for g in plain)
    return {"checkpointed_equal": same and loss_plain == loss_ckpt, "dropout_changes_gradients": differs,
            "loss_changes": loss_plain != loss_nodrop, "finite": finite}


def gpt2_hook_checks(rank: int, world_size: int) -> dict:
    """ALiBi GPT-2 through Ulysses matches the plain model; ring and packed documents are refused."""
    import pytest

    from flash_dist.parallel import context_parallel, gather_sequence, shard_batch

    model = gpt2_model("alibi").eval()
    ids, labels = gpt2_batches(1)[0]
    with torch.no_grad():
        logits_ref = model(ids)
        with context_parallel(model, mode="ulysses"):
            shard = shard_batch({"input_ids": ids})
            logits = gather_sequence(model(shard["input_ids"], position_ids=shard["position_ids"]))
        with context_parallel(model, mode="ring"):
            with pytest.raises(ValueError, match="alibi_slopes is not allowed"):
                model(shard["input_ids"])
    learned = gpt2_model()
    with context_parallel(learned, mode="ring"):
        cu = torch.tensor([0, 16, 32], dtype=torch.int32)
        with pytest.raises(ValueError, match="packed documents"):
            learned(shard["input_ids"], cu_seqlens=cu, position_ids=shard["position_ids"])
        with pytest.raises(ValueError, match="already runs context-parallel attention"):
            context_parallel(learned, mode="ring")
    return {"alibi_ulysses_logits": error_ratio(logits, logits_ref, TOL[torch.float32])}


def bench_smoke(rank: int, world_size: int, out_dir: str) -> int:
    """The context-parallel benchmark script end to end on tiny CPU shapes."""
    from flash_dist.bench.context_parallel import main

    return main(["--cpu-smoke", "--out", out_dir])


def ring_overlap_off(rank: int, world_size: int) -> dict[str, bool]:
    """overlap=False (wait for each transfer first) computes exactly what the overlapped ring does."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    dout = torch.randn(1, 2, 32, 16, generator=g)
    results = []
    for overlap in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*leaves, causal=True, overlap=overlap)
        out.backward(dout)
        results.append([out] + [t.grad for t in leaves])
    return {name: torch.equal(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), *results)}


def ring_group_of_one(rank: int, world_size: int) -> dict[str, float]:
    """A context-parallel group of one rank (CP size 1) is plain attention: no transfer at all."""
    import torch.distributed as dist

    mine, _ = dist.new_subgroups(group_size=1)
    g = torch.Generator().manual_seed(5 + rank)
    q, k, v, dout = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(4))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out_ref, _ = attention_reference(*ref, causal=True)
    grads_ref = torch.autograd.grad((out_ref * dout.double()).sum(), ref)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, mine, causal=True)
    out.backward(dout)
    ratios = {"out": error_ratio(out, out_ref, TOL[torch.float32])}
    for name, t, g_ref in zip(("dq", "dk", "dv"), leaves, grads_ref):
        ratios[name] = error_ratio(t.grad, g_ref, GRAD_TOL[torch.float32])
    return ratios
