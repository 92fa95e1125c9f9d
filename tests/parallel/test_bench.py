"""The context-parallel benchmark runs end to end (tiny fp32 shapes on 2 CPU ranks)."""

import json

from .cases import bench_smoke


def test_bench_cpu_smoke(ranks2, tmp_path):
    assert ranks2.run(bench_smoke, str(tmp_path)) == [0, 0]
    result = json.loads((tmp_path / "context_parallel.json").read_text())
    assert result["check_failures"] == []
    assert [r["seqlen"] for r in result["rows"]] == [64, 128]
    for row in result["rows"]:
        for key in ("ring_ms", "ring_serial_ms", "compute_ms", "comm_ms", "ulysses_ms", "single_gpu_ms"):
            assert row[key] is not None and row[key] > 0, (key, row)
    table = (tmp_path / "context_parallel.md").read_text()
    assert "| 128 | 64 |" in table
