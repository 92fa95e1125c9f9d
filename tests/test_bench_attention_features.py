"""The attention feature benchmark end to end on its CPU smoke shapes (Triton interpreter)."""

from __future__ import annotations

import json
import math

import pytest

from flash_dist.bench import attention_features as af
from flash_dist.kernels import INTERPRET

P = af.SMOKE_PLAN


def _expected(suite: str) -> list[tuple]:
    """(method, head_dim, seqlen-or-S, kv_heads, option) for every row the suite should produce."""
    sdpa = [m for m in af.SDPA_METHODS if m in P.sdpa]
    if suite == "gqa":
        return [(m, d, s, kv, None) for d, hq in P.gqa_heads.items() for s in P.seqlens
                for kv in (max(hq // P.gqa_group, 1), hq) for m in ("flash_dist", *sdpa)]
    if suite == "dropout":
        return [(m, P.head_dim, s, P.heads, p) for s in P.seqlens for m in ("flash_dist", "sdpa_flash")
                for p in (0.0, P.dropout_p)]
    if suite == "varlen":
        return [("flash_dist", P.head_dim, s, P.heads, layout) for s in P.seqlens
                for layout in ("varlen", "dense@mean", "dense@S")]
    if suite == "window":
        return [("flash_dist", P.head_dim, s, P.heads, w) for s in P.window_seqlens for w in (*P.windows, None)]
    return [(m, P.head_dim, s, P.memory_heads, None) for s in P.memory_seqlens for m in ("flash_dist", *sdpa)]


def _key(suite: str, row: dict) -> tuple:
    opt = {"dropout": row["options"].get("dropout_p"), "varlen": row["options"].get("layout"),
           "window": row["options"].get("window")}.get(suite)
    seqlen = row["options"]["S"] if suite == "varlen" else row["seqlen"]
    return row["method"], row["head_dim"], seqlen, row["kv_heads"], opt


def _finite(*xs) -> bool:
    return all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in xs)


def _derived(suite: str, row: dict) -> set:
    if suite == "gqa" and row["kv_heads"] < row["heads"]:
        return {"gqa/mha fwd", "gqa/mha fwd+bwd"}
    if suite == "dropout" and row["options"]["dropout_p"]:
        return {"cost fwd", "cost fwd+bwd"}
    if suite == "varlen" and row["options"]["layout"] == "varlen":
        return {"vs dense@mean fwd", "vs dense@mean fwd+bwd", "vs dense@S fwd+bwd"}
    if suite == "window":
        first = P.window_seqlens[0]
        return {"fwd ns/token", "fwd+bwd ns/token", *([f"fwd+bwd ns/token vs S={first}"] * (row["seqlen"] != first))}
    return set()  # memory: its ratios need memory statistics, which the CPU has none of


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not INTERPRET:
        pytest.skip("the CPU smoke run needs TRITON_INTERPRET=1 when flash_dist is imported")
    out = tmp_path_factory.mktemp("features")
    assert af.main(["--cpu-smoke", "--out", str(out)]) == 0
    return json.loads((out / "attention_features.json").read_text()), (out / "attention_features.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("suite", af.SUITES)
def test_cpu_smoke_suite(smoke, suite):
    result, md = smoke
    rows = [r for r in result["rows"] if r["suite"] == suite]
    assert sorted(map(str, (_key(suite, r) for r in rows))) == sorted(map(str, _expected(suite)))
    for r in rows:
        if r["error"]:  # only an SDPA backend may refuse a case on the CPU (FLASH has no CPU dropout)
            assert r["method"] in af.SDPA_METHODS and r["error"].startswith("n/a: "), r
            continue
        assert _finite(r["fwd_bwd_ms"], r["fwd_bwd_tflops"]), r
        assert suite == "memory" or _finite(r["fwd_ms"], r["fwd_tflops"]), r
        assert r["peak_gib"] is None  # no memory statistics on the CPU
        assert all(math.isfinite(v) for v in r["derived"].values()), r

    # the suite's comparisons reach the rows they belong to
    for r in rows:
        if r["method"] == "flash_dist":
            assert _derived(suite, r) <= r["derived"].keys(), r

    section = md.split(f"## {suite}\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # the header and a row per case
    assert suite in result["summaries"] and result["summaries"][suite] in section


def test_doc_lengths_fill_the_batch_exactly():
    for s in (64, 4096, 16384):
        lengths = af.doc_lengths(65536, s, seed=s)
        assert sum(lengths) == 65536
        assert all(s // 4 <= n <= s for n in lengths[:-1]) and 1 <= lengths[-1] <= s
        assert lengths == af.doc_lengths(65536, s, seed=s)


def test_window_pairs_counts_visible_keys():
    for s, w in ((16, 3), (16, 0), (16, 15), (16, None), (7, 100)):
        brute = sum(1 for i in range(s) for j in range(s) if j <= i and (w is None or i - j <= w))
        assert af.window_pairs(s, w) == brute


def test_rejects_unknown_suites():
    with pytest.raises(SystemExit):
        af.main(["--suites", "gqa,paged"])
