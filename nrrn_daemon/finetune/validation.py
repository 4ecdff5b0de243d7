"""Validation: which slices are held out of training, and a model's loss on them.

Validation holds out blocks of consecutive slices: no training triplet contains a held-out slice,
and only triplets wholly inside a block validate, so no slice is seen by both. The loss is the
training loss (eq. 3 or its ``plain`` form, :data:`~nrrn_daemon.model.nrrn.LOSSES`) on fixed crops
(fixed seed) of held-out triplets, always in float32 and eagerly, so runs at different
precisions — and a parent and its fine-tuned child — are compared on equal terms. Used by
:func:`nrrn_daemon.finetune.training.train` for its curves and by :mod:`nrrn_daemon.finetune.run`
to decide a promotion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from nrrn_daemon.model.checkpoints import Normalisation
from nrrn_daemon.model.nrrn import LOSSES, NRRN

Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(prev, centre, next)`` whole slices (or three scans of one slice)."""

VALIDATION_BLOCK = 8


def validation_blocks(n: int, fraction: float, min_block: int = 3) -> list[int]:
    """Held-out indices of ``n`` units: ~``fraction·n`` in evenly spread blocks of neighbours.

    Blocks are ~:data:`VALIDATION_BLOCK` long and at least ``min_block`` (3 for adjacent-slice
    triplets, so a block holds a whole triplet; 1 for repeat scans). Empty when ``fraction`` is 0.
    """
    if fraction <= 0 or n == 0:
        return []
    total = max(min_block, math.ceil(fraction * n))
    count = max(1, round(total / max(VALIDATION_BLOCK, min_block)))
    held: list[int] = []
    for k in range(count):
        size = total // count + (k < total % count)
        first = round((k + 0.5) * n / count - size / 2)
        first = min(max(first, 0), n - size)
        held.extend(range(first, first + size))
    return sorted(set(held))


def validation_loss(
    model: NRRN,
    triplets: Sequence[Triplet],
    normalisation: Normalisation,
    *,
    patch: int = 128,
    crops: int = 2,
    seed: int = 0,
    batch: int = 8,
    grey_levels: bool = False,
    loss: str = "plain",
) -> float:
    """Mean training loss of ``model`` on fixed crops of held-out triplets (deterministic).

    The same ``triplets``, ``patch``, ``crops`` and ``seed`` give the same crops, so two models
    (a parent and a fine-tuned child) are compared on identical data.

    Parameters
    ----------
    model
        The network (its device is used; it is put in eval mode and left there).
    triplets
        ``(prev, centre, next)`` whole slices, already noisy; normalised with
        ``normalisation.stats_for(centre)`` as at inference.
    patch, crops, seed
        Crop side (clipped to the slice), crops per triplet, and the seed of their positions.
    grey_levels
        Report the loss in squared grey levels instead of normalised units: needed to compare
        models whose normalisations differ (e.g. dataset mode measured on different data).
    loss
        Which loss of :data:`~nrrn_daemon.model.nrrn.LOSSES` (``eq3`` or ``plain``).

    Returns
    -------
    float
        The loss, averaged over all crops; ``nan`` for no triplets.
    """
    if not triplets:
        return float("nan")
    loss_fn = LOSSES[loss]
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    samples: list[tuple[np.ndarray, float]] = []
    for prev, centre, nxt in triplets:
        mean, std = normalisation.stats_for(centre)
        height, width = centre.shape
        p = min(patch, height, width)
        for _ in range(crops):
            y, x = int(rng.integers(height - p + 1)), int(rng.integers(width - p + 1))
            stack = np.stack([im[y : y + p, x : x + p] for im in (prev, centre, nxt)])
            samples.append(
                ((stack.astype(np.float32) - mean) / std, std**2 if grey_levels else 1.0)
            )
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), model.eager():
        for shape in sorted({s.shape for s, _ in samples}):
            group = [(s, w) for s, w in samples if s.shape == shape]
            for i in range(0, len(group), batch):
                chunk = group[i : i + batch]
                x = torch.from_numpy(np.stack([s for s, _ in chunk])[:, :, None]).to(device)
                prev_t, centre_t, next_t = x[:, 0], x[:, 1], x[:, 2]
                out_prev, out_next = model.branches(centre_t, [prev_t, next_t])
                for k, (_, weight) in enumerate(chunk):
                    one = slice(k, k + 1)
                    value = loss_fn(
                        out_prev[one], out_next[one], prev_t[one], next_t[one], centre_t[one]
                    )
                    total += value.item() * weight
                    count += 1
    return total / count


MEASURE_STRIDE = 4
"""Grid step of the pixels the centre measure scores (1/16 of the pixels per offset)."""
MEASURE_OFFSETS = ((0, 0), (2, 2))


def _masked(centre: np.ndarray, oy: int, ox: int, stride: int) -> np.ndarray:
    """``centre`` with the grid pixels replaced by the mean of their four neighbours.

    No grid pixel is another's neighbour (stride ≥ 2), so the replacement carries no trace of
    the grid pixels' own noise: the Noise2Self construction of a J-invariant function.
    """
    padded = np.pad(centre, 1, mode="reflect")
    mean4 = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
    out = centre.copy()
    out[oy::stride, ox::stride] = mean4[oy::stride, ox::stride]
    return out


def centre_measure(
    model: NRRN,
    triplets: Sequence[Triplet],
    normalisation: Normalisation,
    *,
    patch: int = 128,
    crops: int = 2,
    seed: int = 0,
) -> float:
    """The loss-neutral model measure: squared error to the *noisy centre*, J-invariantly.

    On grid pixels J of fixed crops of held-out triplets (:data:`MEASURE_STRIDE`,
    :data:`MEASURE_OFFSETS`), the triplet output at J is scored against the noisy centre
    there, in squared grey levels. The output at J never depends on the centre's noise at J —
    a blind model (:attr:`~nrrn_daemon.model.nrrn.NRRNConfig.blind`) by construction; a paper
    network because its centre is given with J replaced by the mean of its four neighbours
    (Noise2Self) — and that noise is independent of everything else the model sees, so the
    measure is an unbiased estimate of the MSE to the clean centre plus the noise variance,
    whatever the model was trained with. Candidates trained with different objectives are
    therefore compared on equal terms (the noise variance is the same for both). What it
    scores is the model's J-invariant prediction: a blind model's estimate before the
    posterior step, a paper network's output with the pixel masked.

    Returns
    -------
    float
        Mean squared grey levels; ``nan`` for no triplets.
    """
    if not triplets:
        return float("nan")
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), model.eager():
        for prev, centre, nxt in triplets:
            mean, std = normalisation.stats_for(centre)
            height, width = centre.shape
            p = min(patch, height, width)
            for _ in range(crops):
                y, x = int(rng.integers(height - p + 1)), int(rng.integers(width - p + 1))
                crop = [im[y : y + p, x : x + p].astype(np.float64) for im in (prev, centre, nxt)]
                for oy, ox in MEASURE_OFFSETS:
                    given = crop[1] if model.blind else _masked(crop[1], oy, ox, MEASURE_STRIDE)
                    x_in = [
                        torch.from_numpy(((im - mean) / std).astype(np.float32))[None, None]
                        for im in (given, crop[0], crop[2])
                    ]
                    out = model(*(t.to(device) for t in x_in))[0, 0].cpu().numpy()
                    levels = out.astype(np.float64) * std + mean
                    err = levels - crop[1]
                    scored = err[oy::MEASURE_STRIDE, ox::MEASURE_STRIDE]
                    total += float((scored**2).sum())
                    count += scored.size
    return total / count
