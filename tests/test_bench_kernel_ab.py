"""The kernel A/B script: it imports a second copy of the kernel package and compares results."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flash_dist.kernels


def copy_kernels(tmp_path, file: str | None = None, old: str = "", new: str = "") -> Path:
    """A copy of the kernel package under ``tmp_path``; ``file`` gets ``old`` replaced by ``new``."""
    base = tmp_path / "kernels"
    shutil.copytree(Path(flash_dist.kernels.__file__).resolve().parent, base,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if file is not None:
        path = base / file
        text = path.read_text()
        assert old in text, f"{file} no longer contains {old!r}: update the test's edit"
        path.write_text(text.replace(old, new))
    return base


def kernel_ab(base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "flash_dist.bench.kernel_ab", "--baseline", str(base), *args],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backward, tiles", [("deterministic", []), ("fused", ["--default-tiles"])])
def test_kernel_ab_against_a_copy_of_itself(tmp_path, backward, tiles):
    proc = kernel_ab(copy_kernels(tmp_path), "--backward", backward, *tiles)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("tiles: each kernel's first autotune candidate" in proc.stdout) == bool(tiles), proc.stdout
    # the same kernels from two packages give identical gradients, with and without GQA
    assert proc.stdout.count("max rel. diff of gradients 0.0e+00") == 2, proc.stdout
    assert "1, 4, 2, 80, 32" in proc.stdout, proc.stdout


@pytest.mark.parametrize("bad, words", [("4x32x16384", "BxHQ:HKVxSxD"), ("1x6:4x128x64", "multiple of key/value heads")])
def test_shapes_with_and_without_grouped_query_heads(bad, words):
    from flash_dist.bench.kernel_ab import parse_shapes

    assert parse_shapes("4x32x16384x64,1x32:8x8192x128") == [(4, 32, 32, 16384, 64), (1, 32, 8, 8192, 128)]
    with pytest.raises(SystemExit, match=words):
        parse_shapes(bad)


def test_kernel_ab_refuses_the_fused_backward_of_a_baseline_without_one(tmp_path):
    # an old baseline: its attention_backward takes no deterministic argument
    base = copy_kernels(tmp_path, "backward.py", "deterministic: bool = True, path: str | None = None):",
                        "path: str | None = None):")
    proc = kernel_ab(base, "--backward", "fused")
    assert proc.returncode == 2
    assert "--backward fused: the baseline's attention_backward has no fused path" in proc.stderr


def test_kernel_ab_rejects_a_folder_without_a_package(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flash_dist.bench.kernel_ab", "--baseline", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is not a kernel package" in proc.stderr


def test_default_tiles_needs_a_baseline_with_the_autotune_switch(tmp_path):
    proc = kernel_ab(copy_kernels(tmp_path, "tuning.py", "AUTOTUNE", "AUTOTUNE_RENAMED"), "--default-tiles")
    assert proc.returncode == 2
    assert "--default-tiles: the baseline's tuning module has no AUTOTUNE switch" in proc.stderr
