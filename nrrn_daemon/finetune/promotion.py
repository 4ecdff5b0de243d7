"""The promotion gate: does a fine-tuned candidate replace the model in service?

:func:`judge` compares the two on the same held-out validation triplets of the data set (never
trained on); the fine-tune (:mod:`nrrn_daemon.finetune.run`) calls it and records its verdict.

The rules, on the same validation triplets for both models:

1. **The loss-neutral centre measure**
   (:func:`~nrrn_daemon.finetune.validation.centre_measure`) in grey levels, same crops and
   seed for both: an unbiased estimate of the MSE to the clean centre plus the noise variance,
   for any model, so a candidate trained with another objective (the blind-spot ``centre``
   loss against a ``plain`` parent, say) is judged on equal terms. The candidate must be
   strictly lower. (Each model's own training loss would not do: the ``plain`` loss scores
   against the neighbours, the ``centre`` loss against the centre, and their values differ
   by more than any model difference.)
2. **Noise left** (no reference): median wavelet-MAD σ
(:func:`~nrrn_daemon.evaluation.metrics.estimate_noise`)
   of the denoised validation centres may not exceed the parent's by more than
   :data:`NOISE_TOLERANCE` (relative) — a candidate that denoises less is refused.
3. **Over-smoothing**: the residual (input − output) of a good denoiser is the noise, which is
   white (independent pixels); structure the model wrongly removed (edges, membranes) is
   spatially correlated. :func:`residual_structure` (|mean lag-1 autocorrelation| of the residual)
   of the candidate may not exceed the parent's by more than :data:`RESIDUAL_TOLERANCE`. (This
   needs no signal estimate, so a poor parent does not bias it; scan-line-correlated noise
   raises both models' value alike.)

Checks 2 and 3 run on central crops (≤ :data:`CHECK_CROP` px) of up to :data:`CHECK_TRIPLETS`
validation triplets, to stay cheap on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.metrics import estimate_noise
from nrrn_daemon.finetune.validation import Triplet, centre_measure
from nrrn_daemon.model.checkpoints import Checkpoint

NOISE_TOLERANCE = 0.05
"""Relative increase of the residual-noise estimate a candidate may show (5 %)."""
RESIDUAL_TOLERANCE = 0.05
"""Absolute increase of the residual's lag-1 autocorrelation a candidate may show."""
CHECK_TRIPLETS = 4
CHECK_CROP = 256


@dataclass
class Verdict:
    """The promotion gate's decision, its reasons and both models' metrics."""

    promote: bool
    reasons: list[str]
    parent: dict[str, float]
    candidate: dict[str, float]


def _centre_crop(images: Triplet, side: int) -> Triplet:
    h, w = images[1].shape
    ph, pw = min(side, h), min(side, w)
    y, x = (h - ph) // 2, (w - pw) // 2
    a, b, c = (im[y : y + ph, x : x + pw] for im in images)
    return a, b, c


def residual_structure(residual: np.ndarray) -> float:
    """|Mean lag-1 autocorrelation| (rows and columns) of a residual: ~0 for white noise.

    Structure a denoiser removed (edges, membranes, texture) is spatially correlated, so an
    over-smoothing model leaves a residual whose neighbouring pixels correlate (positive); a
    model that adds checkerboard or ringing gives a negative one. Either is structure.
    """
    r = np.asarray(residual, dtype=np.float64)
    r = r - r.mean()
    var = float((r * r).mean())
    if var == 0:
        return 0.0
    rows = float((r[:, 1:] * r[:, :-1]).mean()) / var
    cols = float((r[1:, :] * r[:-1, :]).mean()) / var
    return abs(rows + cols) / 2


def judge(
    parent: Checkpoint,
    candidate: Checkpoint,
    triplets: Sequence[Triplet],
    *,
    device: str = "auto",
    patch: int = 128,
    crops: int = 2,
    seed: int = 0,
    precision: str = "auto",
    loss: str = "plain",
) -> Verdict:
    """Decide whether ``candidate`` replaces ``parent`` (see the module docstring for the rules).

    Parameters
    ----------
    parent, candidate
        The model in service and the fine-tuned one.
    triplets
        Held-out ``(prev, centre, next)`` raw slices, never trained on.
    device, patch, crops, seed
        Where to run, and the validation crops (identical for both models).
    loss
        The candidate's training loss; recorded only (rule 1 is loss-neutral).
    precision
        Of the denoised check crops (the validation loss is always float32); not compiled:
        a few passes do not repay a compilation.

    Raises
    ------
    InputError
        No validation triplet.
    """
    from nrrn_daemon.model.denoise import Denoiser

    if not triplets:
        raise InputError("no validation triplet to judge the candidate on — need more slices")
    checks = [_centre_crop(t, CHECK_CROP) for t in triplets[:CHECK_TRIPLETS]]
    outputs: dict[str, list[np.ndarray]] = {}
    metrics: dict[str, dict[str, float]] = {}
    for name, ckpt in (("parent", parent), ("candidate", candidate)):
        den = Denoiser(ckpt, device=device, tile=None, precision=precision, compile="off")
        val_loss = centre_measure(
            den.model, triplets, ckpt.normalisation, patch=patch, crops=crops, seed=seed
        )
        outputs[name] = [den.denoise(c, [p, n]).astype(np.float64) for p, c, n in checks]
        metrics[name] = {
            "val_loss": float(val_loss),
            "noise_sigma": float(np.median([estimate_noise(o) for o in outputs[name]])),
        }
    for name in ("parent", "candidate"):
        metrics[name]["residual_structure"] = float(
            np.mean([residual_structure(c.astype(np.float64) - o)
                     for (_, c, _), o in zip(checks, outputs[name], strict=True)])
        )  # fmt: skip
    p, c = metrics["parent"], metrics["candidate"]
    reasons = []
    if not c["val_loss"] < p["val_loss"]:
        reasons.append(
            f"validation loss (centre measure) {c['val_loss']:.4g} not below parent's "
            f"{p['val_loss']:.4g}"
        )
    if c["noise_sigma"] > p["noise_sigma"] * (1 + NOISE_TOLERANCE) + 1e-6:
        reasons.append(
            f"noise left σ {c['noise_sigma']:.3g} above parent's {p['noise_sigma']:.3g} "
            f"(+{NOISE_TOLERANCE:.0%} allowed)"
        )
    if c["residual_structure"] > p["residual_structure"] + RESIDUAL_TOLERANCE:
        reasons.append(
            f"residual has structure (lag-1 autocorrelation {c['residual_structure']:.3f} vs "
            f"parent's {p['residual_structure']:.3f}): over-smoothing"
        )
    if not reasons:
        reasons.append(
            f"validation loss (centre measure) {c['val_loss']:.4g} < parent's "
            f"{p['val_loss']:.4g} (candidate trained with {loss})"
        )
        return Verdict(True, reasons, p, c)
    return Verdict(False, reasons, p, c)
