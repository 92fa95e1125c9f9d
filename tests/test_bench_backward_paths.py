"""The backward-paths benchmark's command line (the measurement itself needs a GPU)."""

import pytest

from flash_dist.bench.backward_paths import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "deterministic" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["1x12x64", "1xAx2x3", "1x3:2x4x8"])
def test_bad_shapes_are_refused_naming_the_option(text):
    # shapes are parsed (by kernel_ab.parse_shapes) before the CUDA check
    with pytest.raises(SystemExit, match="--shapes"):
        main(["--shapes", text])


def test_measure_times_each_path_that_takes_the_shape(monkeypatch):
    """On the CPU (interpreter, a stand-in timer): the deterministic and fused paths run, the
    Gluon one is skipped as unable to take the inputs, and the automatic choice is named."""
    import triton.testing

    from flash_dist.bench.backward_paths import measure

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 2.0)[1])
    r = measure(1, 2, 1, 40, 16, device="cpu")
    assert set(r["ms"]) == {"deterministic", "fused"} and r["auto"] == "fused"
    assert 0 < r["diff"] < 3e-2  # bf16 gradients of the fused path against the deterministic ones
