"""The backward-paths benchmark's command line (the measurement itself needs a GPU)."""

import pytest
import torch

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


@pytest.mark.parametrize("force_fused", [False, True])
def test_selection_records_the_kernel_and_restores(force_fused):
    """The switch the benchmark times its columns with: which fused kernel ran is recorded, and
    the Hopper switch and the fused-path selection are put back afterwards."""
    from flash_dist.bench.backward_paths import _selection
    from flash_dist.kernels import backward, hopper_backward
    from flash_dist.kernels.backward import attention_backward
    from flash_dist.kernels.forward import attention_forward

    before = hopper_backward.ENABLED, backward.fused_kv_config, hopper_backward.backward_dk_dv_dq
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 40, 16) for _ in range(4))
    out, lse = attention_forward(q, k, v, softmax_scale=0.25, window=(-1, 0))
    taken = []
    with _selection(hopper=not hopper_backward.ENABLED, force_fused=force_fused, taken=taken):
        assert hopper_backward.ENABLED is not before[0]
        attention_backward(dout, q, k, v, out, lse, softmax_scale=0.25, window=(-1, 0), deterministic=False)
    # on the CPU the interpreter takes the tl fused kernel at every length; Gluon never runs
    assert taken == ["tl fused"]
    assert (hopper_backward.ENABLED, backward.fused_kv_config, hopper_backward.backward_dk_dv_dq) == before
