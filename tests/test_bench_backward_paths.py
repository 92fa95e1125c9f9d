"""The backward-paths benchmark's argument handling (the measurement itself needs a GPU)."""

import argparse

import pytest

from flash_dist.bench.backward_paths import main, parse_shape


@pytest.mark.parametrize("text,expected", [("1x12x16384x64", (1, 12, 12, 16384, 64)),
                                           ("2x32:8x8192x128", (2, 32, 8, 8192, 128))])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["1x12x64", "1xAx2x3", "1x2:x3x4"])
def test_parse_shape_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--shapes"):
        parse_shape(text)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "deterministic" in capsys.readouterr().out
