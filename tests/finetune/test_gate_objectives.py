"""The promotion gate across objectives, on real FIB-25 with real (tiny) trainings.

The gate's measure (:func:`centre_measure`) is loss-neutral: a candidate trained with the
blind-spot ``centre`` loss and a parent trained with ``plain`` are judged on the same scale, and
the ordering it gives is the ordering against the clean slices, which the test can check
because FIB-25 noise is synthetic here.
"""

from __future__ import annotations

import numpy as np
import pytest

from nrrn_daemon.finetune.promotion import judge
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.finetune.validation import centre_measure
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.nrrn import NRRNConfig
from nrrn_daemon.sim.noise import noisy_stack

SPEC = "gaussian:25"
CROP = (slice(40, 136), slice(40, 136))


@pytest.fixture(scope="module")
def data(fib25: np.ndarray) -> dict[str, np.ndarray]:
    clean = fib25[0:16][(slice(None), *CROP)]
    return {"clean": clean, "noisy": noisy_stack(clean, SPEC, seed=7)}


def settings(steps: int, loss: str) -> TrainSettings:
    return TrainSettings(
        steps=steps, patch=48, batch=4, loss=loss, compile="off", device="cpu",
        precision="float32", validation_slices=(12, 13, 14, 15), validation_crops=1,
        validation_patch=48,
    )  # fmt: skip


def true_mse(ckpt, data) -> float:
    den = Denoiser(ckpt, device="cpu", tile=None, compile="off", precision="float32")
    noisy, clean = data["noisy"], data["clean"]
    errs = [
        np.mean((den.denoise(noisy[z], [noisy[z - 1], noisy[z + 1]]).astype(float) - clean[z]) ** 2)
        for z in (13, 14)
    ]
    return float(np.mean(errs))


@pytest.fixture(scope="module")
def trained(data) -> dict[str, object]:
    stack = [data["noisy"]]
    config = NRRNConfig(blocks=1, features=8)
    parent, _ = train(stack, settings(60, "plain"), config=config)
    better, _ = train(stack, settings(240, "centre"), init=parent)
    worse, _ = train(stack, settings(2, "plain"), config=NRRNConfig(blocks=1, features=8))
    return {"parent": parent, "better": better, "worse": worse}


def test_the_centre_measure_orders_models_as_the_clean_data_does(data, trained) -> None:
    noisy = data["noisy"]
    triplets = [(noisy[z - 1], noisy[z], noisy[z + 1]) for z in (13, 14)]
    measure = {
        name: centre_measure(ckpt.build_model(), triplets, ckpt.normalisation, patch=96, crops=1)
        for name, ckpt in trained.items()
    }
    truth = {name: true_mse(ckpt, data) for name, ckpt in trained.items()}
    assert sorted(measure, key=measure.get) == sorted(truth, key=truth.get), (measure, truth)
    assert trained["better"].config.blind and not trained["parent"].config.blind


def test_the_gate_promotes_a_better_candidate_of_another_objective(data, trained) -> None:
    noisy = data["noisy"]
    triplets = [(noisy[z - 1], noisy[z], noisy[z + 1]) for z in (13, 14)]
    assert psnr_of(trained["better"], data) > psnr_of(trained["parent"], data)
    verdict = judge(trained["parent"], trained["better"], triplets, device="cpu", loss="centre")
    assert verdict.promote, verdict.reasons
    verdict = judge(trained["parent"], trained["worse"], triplets, device="cpu", loss="plain")
    assert not verdict.promote
    assert any("centre measure" in r for r in verdict.reasons)


def psnr_of(ckpt, data) -> float:
    return 10 * np.log10(255.0**2 / true_mse(ckpt, data))
