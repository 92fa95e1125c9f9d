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
