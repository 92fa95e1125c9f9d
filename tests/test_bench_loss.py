"""The loss benchmark's command line (the measurement itself needs a GPU)."""

import pytest

from flash_dist.bench.loss import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--chunk-size" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["--impls", "ours,nope"], "--impls: unknown"),
                                          (["--tokens", "0"], "--tokens: must be >= 1"),
                                          (["--block-n", "100"], "--block-n: must be a power of two"),
                                          (["--num-warps", "3"], "--num-warps: must be one of")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
