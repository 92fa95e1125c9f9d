"""The GPT-2 swap benchmark script, on its toy configuration."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from flash_dist.bench import swap_gpt2  # noqa: E402


def test_swap_gpt2_runs_and_compares(device):
    rows = swap_gpt2.run([32], batch=1, dtype=torch.float32, autocast=False, implementations=["flash_dist", "sdpa"],
                         device=device, tiny=True, dropout=0.0, warmup_ms=1, rep_ms=5)
    assert [r.implementation for r in rows] == ["flash_dist", "sdpa"]
    for r in rows:
        assert r.error is None, r.error
        assert r.train_ms > 0 and r.infer_ms > 0 and r.train_tokens_per_s > 0
    assert rows[0].max_logit_diff_vs_sdpa < 1e-4
    text = swap_gpt2.table(rows)
    assert text.splitlines()[0].startswith("impl ")
    assert "flash_dist" in text and "1.00x" in text


def test_swap_gpt2_rejects_unknown_implementations():
    with pytest.raises(SystemExit):
        swap_gpt2.main(["--impls", "flash_dist,cudnn"])
