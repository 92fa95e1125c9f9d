"""The register report: occupancy arithmetic, the JIT's specialisation, and the CLI on one candidate."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from flash_dist.bench.kernel_regs import blocks_per_sm, main, signature


@pytest.mark.parametrize("registers, shared, warps, blocks", [
    (168, 64 * 1024, 4, 3),    # 5376 registers per warp: 3 blocks; 3 x 65 KiB of shared memory
    (255, 56 * 1024, 4, 2),    # 8192 per warp: two 4-warp blocks fill the register file
    (240, 64 * 1024, 8, 1),
    (64, 200 * 1024, 4, 1),    # shared memory is the limit
    (32, 0, 1, 32),            # the block limit
])
def test_blocks_per_sm(registers, shared, warps, blocks):
    assert blocks_per_sm(registers, shared, warps) == blocks


def test_signature_specialises_like_the_jit():
    names = ["X", "n", "one", "stride", "scale", "BLOCK"]
    fn = SimpleNamespace(arg_names=names, params=[SimpleNamespace(is_constexpr=n == "BLOCK") for n in names])
    x = torch.empty(4, dtype=torch.bfloat16, device="meta")
    sig, constexprs, attrs = signature(fn, (x, 7, 1, 48, 0.5), {}, {"BLOCK": 64})
    assert sig == {"X": "*bf16", "n": "i32", "one": "constexpr", "stride": "i32", "scale": "fp32",
                   "BLOCK": "constexpr"}
    assert constexprs == {"one": 1, "BLOCK": 64}
    assert set(attrs) == {(0,), (3,)}  # the pointer and the multiple of 16


def test_report_of_one_candidate_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "flash_dist.bench.kernel_regs", "--kernels", "kv", "--group", "2",
                           "--limit", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| kv |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "64x128/8/2"
    registers, spills, blocks = int(cells[2]), int(cells[3]), int(cells[5])
    assert 0 < registers <= 255 and spills >= 0 and blocks >= 1


def test_loop_report_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "flash_dist.bench.kernel_regs", "--kernels", "fwd", "--limit", "1",
                           "--loops"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trips = re.findall(r"^  - (\d+): (.*)$", proc.stdout, flags=re.M)
    # the forward's unmasked and masked key loops, each with its exponentials
    assert len(trips) >= 2, proc.stdout
    assert all(int(n) > 100 and "MUFU" in ops for n, ops in trips[:2]), proc.stdout


def test_hopper_report_without_a_gpu():
    """The Gluon backward's row: two programs per SM without spills and no ptxas advisory."""
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "flash_dist.bench.kernel_regs", "--kernels", "hopper"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| hopper |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "64x64/8/2" and int(cells[3]) == 0 and int(cells[5]) == 2, rows[0]
    assert "advisory" not in proc.stdout


@pytest.mark.parametrize("argv, words", [
    (["--kernels", "fwd,bwd"], "--kernels: choose from fwd, kv, q, hopper"),
    (["--group", "0"], "--group: must be >= 1, got 0"),
])
def test_argument_errors(argv, words, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert words in capsys.readouterr().err


def test_refuses_to_run_interpreted(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        main(["--limit", "1"])
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
