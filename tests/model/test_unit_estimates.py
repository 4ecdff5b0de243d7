"""The estimate after every building unit (paper 2.2.4, Fig. 5): Denoiser and --intermediate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from nrrn_daemon.batch.offline import denoise_stack
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.model.checkpoints import Checkpoint, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.posterior import NoiseModel, posterior_mean
from nrrn_daemon.sim.noise import noisy_stack


@pytest.mark.parametrize("which", ["shipped", "paper"])
def test_one_estimate_per_unit_and_the_last_is_the_output(
    fib25: np.ndarray, paper_base: Checkpoint, which: str
) -> None:
    """The shipped (blind-spot) base and the paper network: one estimate per BU, then the
    network's output, which is the Denoiser's output for the paper network; a blind network's
    output is then combined with the noisy pixel (the posterior step), not part of the trace."""
    clean = fib25[4:7, :80, :96]
    noisy = noisy_stack(clean, "gaussian:25", seed=0)
    base = load_checkpoint(None) if which == "shipped" else paper_base
    den = Denoiser(base, device="cpu", tile=None, compile="off", precision="float32")
    steps = den.unit_estimates(noisy[1], [noisy[0], noisy[2]])
    assert len(steps) == base.config.blocks + 1
    assert all(s.dtype == np.uint8 and s.shape == (80, 96) for s in steps)
    out = den.denoise(noisy[1], [noisy[0], noisy[2]])
    if base.config.blind:
        combined = posterior_mean(
            noisy[1], steps[-1].astype(np.float64), *_posterior_inputs(den.last_posterior)
        )
        expected = np.clip(np.rint(combined), 0, 255)
    else:
        expected = steps[-1]
    # The trace's output is rounded to uint8 before the posterior step: ≤ 1 grey level apart.
    assert np.abs(expected.astype(int) - out.astype(int)).max() <= 1
    scores = [psnr(s, clean[1]) for s in steps]
    assert scores[-1] > psnr(noisy[1], clean[1]) + 3  # the BUs denoise: not a copy of the input
    assert len({s.tobytes() for s in steps}) == len(steps)


def _posterior_inputs(record: dict[str, float] | None) -> tuple[NoiseModel, float]:
    assert record is not None
    return NoiseModel(a=record["a"], b=record["b"]), record["prior_variance"]


def test_denoise_writes_the_intermediates(fib25: np.ndarray, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    noisy = noisy_stack(fib25[4:7, :48, :48], "gaussian:25", seed=0)
    files = []
    for i, image in enumerate(noisy):
        files.append(raw / f"s_{i:03d}.tif")
        tifffile.imwrite(files[-1], image)
    den = Denoiser(load_checkpoint(None), device="cpu", tile=None, compile="off")
    denoise_stack(files, tmp_path / "out", den, intermediate=tmp_path / "bu")
    written = sorted(p.name for p in (tmp_path / "bu").iterdir())
    blocks = den.checkpoint.config.blocks
    assert written == sorted(f"s_{i:03d}_bu{k}.tif" for i in range(3) for k in range(1, blocks + 1))
    image = tifffile.imread(tmp_path / "bu" / "s_001_bu1.tif")
    assert image.shape == (48, 48) and image.dtype == np.uint8
