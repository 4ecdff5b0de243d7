"""Each rule of the promotion gate rejects a real candidate that only it catches.

The candidates are real tiny NRRNs trained here on real FIB-25 slices (tests/data), judged on
held-out slices of the same light noise (Gaussian σ 12) the data set has:

* **rule 2 (noise left)**: the parent was trained on much heavier noise (σ 45), so it removes
  more than the data set's noise; the candidate, trained on the data set's own light noise, has
  the *lower* validation loss and the less structured residual, but leaves more noise (σ ~9.7
  against ~7.3 measured) — only rule 2 refuses it;
* **rule 3 (over-smoothing)**: the parent is the identity (an NRRN whose noise scales are zero:
  it returns its input, a model that does nothing); the candidate, trained on far heavier noise
  than the data set's, smooths away structure: lower validation loss and less noise left than the
  identity, but a residual whose neighbouring pixels correlate — only rule 3 refuses it.

Measured on this crop (CPU, seed 0; see the module's fixture): parent/candidate validation loss,
noise σ and residual autocorrelation are asserted rule by rule below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401

from nrrn_daemon.finetune.promotion import NOISE_TOLERANCE, RESIDUAL_TOLERANCE, judge
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation
from nrrn_daemon.model.nrrn import NRRN, NRRNConfig

pytestmark = pytest.mark.usefixtures("one_thread")
LIGHT, HEAVY, HEAVIER = 12.0, 45.0, 90.0


def gaussian(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(clean + rng.normal(0, sigma, clean.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models(fib25: np.ndarray) -> dict:
    """Models trained (120 steps, 1 BU × 8) at three noise levels, and the identity."""
    torch.set_num_threads(1)
    clean = fib25[0:24, 60:124, 60:124].astype(np.float64)
    light = gaussian(clean, LIGHT, seed=1)
    settings = TrainSettings(steps=120, patch=48, batch=4, device="cpu", seed=0)
    trained = {
        name: train([gaussian(clean, sigma, seed=2)[:18] if sigma != LIGHT else light[:18]],
                    settings, NRRNConfig(1, 8))[0]
        for name, sigma in (("light", LIGHT), ("heavy", HEAVY), ("heavier", HEAVIER))
    }  # fmt: skip
    torch.manual_seed(0)
    identity = NRRN(1, 8)
    with torch.no_grad():
        identity.tail_scale.zero_()
        for unit in identity.units:
            unit.noise_scale.zero_()
    trained["identity"] = Checkpoint.from_model(identity, Normalisation("slice"))
    held_out = [(light[j - 1], light[j], light[j + 1]) for j in range(19, 23)]  # never trained
    return {"models": trained, "held_out": held_out}


def test_the_identity_is_the_identity(models: dict) -> None:
    from nrrn_daemon.model.denoise import Denoiser

    prev, centre, nxt = models["held_out"][0]
    out = Denoiser(models["models"]["identity"], device="cpu", tile=None).denoise(
        centre, [prev, nxt]
    )
    assert np.abs(out.astype(int) - centre.astype(int)).max() <= 1


def test_rule_2_alone_refuses_a_candidate_that_leaves_more_noise(models: dict) -> None:
    m = models["models"]
    verdict = judge(m["heavy"], m["light"], models["held_out"], device="cpu")
    p, c = verdict.parent, verdict.candidate
    assert c["val_loss"] < p["val_loss"], "rule 1 would let it through"
    assert c["residual_structure"] <= p["residual_structure"] + RESIDUAL_TOLERANCE, "so would 3"
    assert c["noise_sigma"] > p["noise_sigma"] * (1 + NOISE_TOLERANCE), (p, c)
    assert not verdict.promote
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith("noise left"), verdict


def test_rule_3_alone_refuses_an_over_smoothing_candidate(models: dict) -> None:
    m = models["models"]
    verdict = judge(m["identity"], m["heavier"], models["held_out"], device="cpu")
    p, c = verdict.parent, verdict.candidate
    assert c["val_loss"] < p["val_loss"], "rule 1 would let it through"
    assert c["noise_sigma"] <= p["noise_sigma"] * (1 + NOISE_TOLERANCE), "so would rule 2"
    assert c["residual_structure"] > p["residual_structure"] + RESIDUAL_TOLERANCE, (p, c)
    assert not verdict.promote
    assert len(verdict.reasons) == 1 and "over-smoothing" in verdict.reasons[0], verdict


def test_a_better_candidate_passes_every_rule(models: dict) -> None:
    m = models["models"]
    verdict = judge(m["identity"], m["heavy"], models["held_out"], device="cpu")
    assert verdict.promote, verdict.reasons
