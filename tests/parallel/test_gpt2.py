"""A tiny GPT-2 trained with context parallelism over 2 ranks has the loss curve of the plain model."""

import pytest

from .cases import (gpt2_batches, gpt2_hook_checks, gpt2_model, gpt2_ring_dropout, train_gpt2,
                    train_gpt2_context_parallel)
from .checks import assert_ratios

STEPS = 4


@pytest.fixture(scope="module")
def reference_losses():
    model = gpt2_model()
    return train_gpt2(model, gpt2_batches(STEPS), lambda m, ids, labels: m(ids, labels=labels))


@pytest.mark.parametrize("mode,layout", [("ring", "zigzag"), ("ulysses", "zigzag"), ("ring", "contiguous")])
def test_loss_curve_matches_single_process(ranks2, reference_losses, mode, layout):
    per_rank = ranks2.run(train_gpt2_context_parallel, mode, layout, STEPS)
    ref = reference_losses
    assert ref[-1] < ref[0] - 0.1, f"reference did not learn: {ref}"
    for rank, losses in enumerate(per_rank):
        for step, (a, b) in enumerate(zip(losses, ref)):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {rank} step {step}: CP {a:.7f} vs plain {b:.7f}"
    assert len(per_rank[0]) == STEPS


def test_model_hook(ranks2):
    assert_ratios(ranks2.run(gpt2_hook_checks))


def test_ring_dropout_under_activation_checkpointing(ranks2):
    for checks in ranks2.run(gpt2_ring_dropout):
        assert checks == {"checkpointed_equal": True, "dropout_changes_gradients": True, "loss_changes": True,
                          "finite": True}
