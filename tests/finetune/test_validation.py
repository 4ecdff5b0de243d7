"""Validation: held-out blocks never leak into training triplets, and the validation loss is
deterministic and converts to grey levels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noisy_test_stack
from hypothesis import given
from hypothesis import strategies as st

from nrrn_daemon.finetune.validation import validation_blocks, validation_loss
from nrrn_daemon.model.checkpoints import Normalisation
from nrrn_daemon.model.nrrn import NRRN


@given(n=st.integers(3, 400), fraction=st.floats(0.01, 0.5))
def test_validation_blocks_never_leak_into_training_triplets(n: int, fraction: float) -> None:
    held = validation_blocks(n, fraction)
    assert held == sorted(set(held)) and all(0 <= i < n for i in held)
    assert len(held) >= min(n, max(3, int(fraction * n)))
    runs = np.split(np.array(held), np.where(np.diff(held) != 1)[0] + 1)
    assert all(len(r) >= 3 for r in runs)  # every block holds at least one whole triplet


def test_validation_loss_is_deterministic_and_scales_to_grey_levels() -> None:
    stack = noisy_test_stack(n=3, size=40)
    triplets = [(stack[0], stack[1], stack[2])]
    model = NRRN(1, 4)
    norm = Normalisation("dataset", 100.0, 20.0)
    a = validation_loss(model, triplets, norm, patch=32, crops=3, seed=5)
    assert a == validation_loss(model, triplets, norm, patch=32, crops=3, seed=5)
    grey = validation_loss(model, triplets, norm, patch=32, crops=3, seed=5, grey_levels=True)
    assert grey == pytest.approx(a * 400.0, rel=1e-5)
