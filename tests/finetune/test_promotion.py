"""Each rule of the promotion gate rejects a real candidate that only it catches.

The candidates are real tiny NRRNs trained here on real FIB-25 slices (tests/data), judged on
held-out slices of the same light noise (Gaussian σ 12) the data set has:

* **rule 2 (noise left)**: the parent was trained on much heavier noise (σ 45), so it removes
  more than the data set's noise; the candidate, trained on the data set's own light noise, has
  the *lower* validation measure and a residual within the structure tolerance, but leaves more
  noise — only rule 2 refuses it (measured: centre measure 219 vs 277, σ left 9.52 vs 7.08 (+5 %
  allowed: 7.43), residual autocorrelation 0.011 vs 0.038 (+0.05 allowed));
* **rule 3 (over-smoothing)**: the parent is a poor model, the light one with its noise scales
  multiplied by −3 (it adds back three times the noise it estimates: σ left 25.6 on σ 12 input);
  the candidate, trained on far heavier noise (σ 60) than the data set's, smooths structure
  away: a lower validation measure and less noise left than that parent, but a residual whose
  neighbouring pixels correlate — only rule 3 refuses it (measured: centre measure 330 vs 514,
  σ 7.24 vs 25.6, autocorrelation 0.071 vs 0.011 (+0.05 allowed)). With the scales merely
  negated, the loss-neutral measure of rule 1 (issue 12) already refused that candidate;
* the light model replacing that poor parent passes every rule.

The measured numbers are from this module's fixture on the 2-core CPU (precision "auto", seed 0),
with rule 1 the centre measure of :func:`~nrrn_daemon.finetune.validation.centre_measure`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401

from nrrn_daemon.finetune.promotion import NOISE_TOLERANCE, RESIDUAL_TOLERANCE, judge
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.model.checkpoints import Checkpoint
from nrrn_daemon.model.nrrn import NRRNConfig

pytestmark = pytest.mark.usefixtures("one_thread")
LIGHT, HEAVY, HEAVIER = 12.0, 45.0, 60.0
NOISE_GAIN = 3.0
"""The poor parent adds back this many times the noise it estimates."""


def gaussian(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(clean + rng.normal(0, sigma, clean.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models(fib25: np.ndarray) -> dict:
    """Models trained (120 steps, 1 BU × 8) at three noise levels, and a noise-adding one."""
    torch.set_num_threads(1)
    clean = fib25[0:24, 60:124, 60:124].astype(np.float64)
    light = gaussian(clean, LIGHT, seed=1)
    settings = TrainSettings(steps=120, patch=48, batch=4, device="cpu", seed=0)
    trained = {
        name: train([gaussian(clean, sigma, seed=2)[:18] if sigma != LIGHT else light[:18]],
                    settings, NRRNConfig(1, 8))[0]
        for name, sigma in (("light", LIGHT), ("heavy", HEAVY), ("heavier", HEAVIER))
    }  # fmt: skip
    noisier = trained["light"].build_model()
    with torch.no_grad():  # the same network, adding back the noise it estimates
        noisier.tail_scale.mul_(-NOISE_GAIN)
        for unit in noisier.units:
            unit.noise_scale.mul_(-NOISE_GAIN)
    trained["noisier"] = Checkpoint.from_model(noisier, trained["light"].normalisation)
    held_out = [(light[j - 1], light[j], light[j + 1]) for j in range(19, 23)]  # never trained
    return {"models": trained, "held_out": held_out}


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
    verdict = judge(m["noisier"], m["heavier"], models["held_out"], device="cpu")
    p, c = verdict.parent, verdict.candidate
    assert c["val_loss"] < p["val_loss"], "rule 1 would let it through"
    assert c["noise_sigma"] <= p["noise_sigma"] * (1 + NOISE_TOLERANCE), "so would rule 2"
    assert c["residual_structure"] > p["residual_structure"] + RESIDUAL_TOLERANCE, (p, c)
    assert not verdict.promote
    assert len(verdict.reasons) == 1 and "over-smoothing" in verdict.reasons[0], verdict


def test_a_better_candidate_passes_every_rule(models: dict) -> None:
    m = models["models"]
    verdict = judge(m["noisier"], m["light"], models["held_out"], device="cpu")
    assert verdict.promote, verdict.reasons
