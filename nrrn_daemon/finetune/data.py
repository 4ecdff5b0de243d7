"""Training data for NRRN: which slices train and which validate, and random triplet crops.

A training sample is a random crop of a triplet (x_{j−1}, x_j, x_{j+1}) of one stack, or in
repeat-scan mode of three distinct scans of one slice (same signal, independent noise), picked at
random from the slice's scans. :func:`prepare_sources` reads and checks the stacks and splits each
into training items and validation triplets; :class:`Sampler` draws the crops that
:func:`nrrn_daemon.finetune.training.train` feeds the network.

Choices where the paper leaves room (measurements in the helper's report and ``scripts/``):

* **Normalisation**: ``dataset`` mode — one mean/std measured on (a subsample of) the training
  slices; ``slice`` mode — each triplet is z-scored with its centre slice's whole-slice stats,
  exactly :meth:`Normalisation.stats_for`, as the Denoiser does at inference.
* **Validation** slices are held out in blocks of consecutive slices
  (:mod:`nrrn_daemon.finetune.validation`): no training triplet contains a held-out slice, and only
  triplets wholly inside a block validate, so no slice is seen by both.
* **Alignment**: on real data, each neighbour crop is resampled onto its centre's grid when the
  two slices drifted by ≥ 0.5 px (:mod:`nrrn_daemon.imaging.alignment`, the Denoiser's rule), so
  training sees what inference sees.
* **Augmentation**: one of the 8 flips/90° rotations, the same for the three images of a triplet.
* **Synthetic noise** (``noise=``, for training on clean data): called once per triplet on its
  three images stacked, so a hook draws independent pixels (independent noise per slice, as
  Noise2Noise needs) but can give the three one level, as real adjacent slices have (a
  mixed-level hook draws a level per triplet). It is applied to a window of up to 512² px around
  the crop (the whole slice for small slices) and, in ``slice`` mode, the centre's stats are those
  of its noisy window, as at inference on noisy data.

Slices used for training are held in memory (in their own dtype) for random access.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from nrrn_daemon.errors import InputError
from nrrn_daemon.finetune.validation import Triplet, validation_blocks
from nrrn_daemon.frames import judge_stack
from nrrn_daemon.imaging.alignment import MIN_SHIFT, apply_shift, estimate_shift
from nrrn_daemon.model.checkpoints import Normalisation, slice_stats

if TYPE_CHECKING:  # only for annotations: training imports this module
    from nrrn_daemon.finetune.training import TrainSettings

NoiseHook = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""``noise(images, rng) -> noisy images``: synthetic noise on a ``(k, h, w)`` stack of the images of
one triplet (k = 3), or of one image (k = 1, for dataset statistics); same shape back."""

NOISE_WINDOW = 512
MAX_VALIDATION_TRIPLETS = 16
STATS_SLICES = 32


class StackLike(Protocol):
    """What training needs of a stack: a :class:`~nrrn_daemon.imaging.stacks.Stack` or a 3-D
    array."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> np.ndarray: ...


# -- which slices train, which validate ---------------------------------------------------------
def _ranges(indices: Sequence[int]) -> list[str]:
    """``[0, 1, 2, 5]`` → ``["0-2", "5"]`` (compact, for the summary)."""
    out: list[str] = []
    for i in sorted(indices):
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return out


@dataclass
class Source:
    """One stack in memory: its pages, training items and validation triplets (page indices)."""

    label: str
    pages: dict[int, np.ndarray]
    train: list[tuple[int, ...]]  # (j−1, j, j+1), or all scans of one slice in repeat mode
    val: list[tuple[int, int, int]]
    info: dict[str, Any]


def _label(stack: StackLike, k: int) -> str:
    paths = getattr(stack, "paths", None)
    if paths:
        return str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} files)"
    return f"stack #{k}"


def prepare_sources(stacks: Sequence[StackLike], settings: TrainSettings) -> list[Source]:
    """Read and check ``stacks``; split each into training items and validation triplets.

    Raises
    ------
    InputError
        Fewer than 3 slices (or scans), slices of different shapes or dtypes, mixed bit depths,
        no triplet left for training, or validation indices outside a stack.
    """
    if not stacks:
        raise InputError("no stack to train on — pass at least one stack of ≥ 3 adjacent slices")
    sources: list[Source] = []
    dtypes: set[str] = set()
    for k, stack in enumerate(stacks):
        label, n = _label(stack, k), len(stack)
        spp = settings.scans_per_slice if settings.repeat_scans else 1
        if settings.repeat_scans:
            if spp < 3:
                raise InputError(
                    f"repeat-scan training needs ≥ 3 scans per slice (centre + two neighbours), "
                    f"got scans_per_slice={spp} for {label} — acquire ≥ 3 scans, or train on "
                    "adjacent slices instead"
                )
            if n < spp or n % spp:
                raise InputError(
                    f"{label} has {n} pages, not a whole number of groups of {spp} scans — "
                    "check scans_per_slice"
                )
        elif n < 3:
            raise InputError(
                f"need at least 3 adjacent slices to train, {label} has {n} — add slices, or "
                "use repeat-scan mode if each slice was scanned several times"
            )
        units = n // spp
        if settings.validation_slices is not None:
            held = sorted(set(settings.validation_slices))
            bad = [i for i in held if not 0 <= i < units]
            if bad:
                raise InputError(f"validation slices {bad} are outside {label} (0–{units - 1})")
        else:
            held = validation_blocks(units, settings.validation_fraction, 1 if spp > 1 else 3)
        held_set = set(held)
        if spp > 1:
            groups = [tuple(range(g * spp, (g + 1) * spp)) for g in range(units)]
            train = [groups[g] for g in range(units) if g not in held_set]
            val = [(grp[0], grp[1], grp[2]) for g, grp in enumerate(groups) if g in held_set]
        else:
            triplets = [(j - 1, j, j + 1) for j in range(1, n - 1)]
            train = [t for t in triplets if held_set.isdisjoint(t)]
            val = [t for t in triplets if held_set.issuperset(t)]
        if not train:
            raise InputError(
                f"{label}: no training triplet is left outside the validation slices {held} — "
                "use more slices or a smaller validation fraction"
            )
        if len(val) > MAX_VALIDATION_TRIPLETS:  # evenly chosen: validation stays cheap
            pick = np.linspace(0, len(val) - 1, MAX_VALIDATION_TRIPLETS).round().astype(int)
            val = [val[i] for i in pick]
        needed = sorted({i for t in (*train, *val) for i in t})
        pages = {i: np.asarray(stack[i]) for i in needed}
        shape, dtype = pages[needed[0]].shape, pages[needed[0]].dtype
        for i, page in pages.items():
            if page.ndim != 2 or page.shape != shape:
                raise InputError(
                    f"slice {i} of {label} has shape {page.shape}, slice {needed[0]} has {shape} "
                    "— all slices of a stack must be 2-D and the same size"
                )
            if page.dtype != dtype:
                raise InputError(f"slice {i} of {label} has dtype {page.dtype}, not {dtype}")
        if dtype not in (np.uint8, np.uint16):
            raise InputError(f"{label} has dtype {dtype}; training takes uint8 or uint16 slices")
        dtypes.add(str(dtype))
        unusable: dict[int, str] = {}
        if spp == 1 and settings.frames is not None:  # never a neighbour, nor a target
            verdicts = judge_stack(pages, pages.__getitem__, settings.frames)
            unusable = {i: v.reason or "" for i, v in verdicts.items() if not v.usable}
            train = [t for t in train if unusable.keys().isdisjoint(t)]
            val = [t for t in val if unusable.keys().isdisjoint(t)]
            if not train:
                raise InputError(
                    f"{label}: every training triplet holds an unusable slice "
                    f"({', '.join(_ranges(unusable))}: blank, saturated, cut short or unrelated) "
                    "— train on other slices, or pass frames=None to use them all"
                )
            for i in unusable:  # in no triplet left: not kept in memory
                pages.pop(i, None)
        used = sorted({i // spp for t in train for i in t})
        info = {
            "source": label,
            "paths": [str(p) for p in getattr(stack, "paths", ())],
            "pages": n,
            "shape": list(shape),
            "dtype": str(dtype),
            "scans_per_slice": spp,
            "train_slices": _ranges(used),
            "validation_slices": _ranges(held),
            "train_triplets": len(train),
            "validation_triplets": len(val),
            "unusable_slices": {str(i): why for i, why in sorted(unusable.items())},
        }
        sources.append(Source(label, pages, train, val, info))
    if len(dtypes) > 1:
        raise InputError(f"stacks mix dtypes {sorted(dtypes)} — train on one bit depth at a time")
    return sources


# -- sampling -------------------------------------------------------------------------------------
class Sampler:
    """Random (augmented, noised, normalised) triplet crops from the training items."""

    def __init__(
        self,
        sources: list[Source],
        normalisation: Normalisation,
        patch: int,
        augment: bool,
        noise: NoiseHook | None,
    ) -> None:
        self.sources, self.norm, self.augment, self.noise = sources, normalisation, augment, noise
        self.items = [(s, t) for s, src in enumerate(sources) for t in src.train]
        smallest = min(min(p.shape) for src in sources for p in src.pages.values())
        self.patch = min(patch, smallest)
        # Slice mode on real data: whole-slice stats of every centre, once (as the Denoiser does).
        self.stats: dict[tuple[int, int], tuple[float, float]] = {}
        self.shifts: dict[tuple[int, int, int], tuple[float, float]] = {}
        if normalisation.mode == "slice" and noise is None:
            for s, src in enumerate(sources):
                for i, page in src.pages.items():
                    self.stats[s, i] = slice_stats(page)

    def _aligned_crop(self, s: int, centre: int, other: int, y: int, x: int) -> np.ndarray:
        """The crop of page ``other`` at (y, x), resampled onto ``centre``'s grid.

        The shift between the two whole slices is estimated once
        (:func:`~nrrn_daemon.imaging.alignment.estimate_shift`, as the Denoiser does at
        inference); a drift below :data:`~nrrn_daemon.imaging.alignment.MIN_SHIFT` px is left.
        """
        pages, p = self.sources[s].pages, self.patch
        key = (s, centre, other)
        if key not in self.shifts:
            self.shifts[key] = estimate_shift(pages[centre], pages[other])
        dy, dx = self.shifts[key]
        if math.hypot(dy, dx) < MIN_SHIFT:
            return pages[other][y : y + p, x : x + p]
        height, width = pages[other].shape
        m = math.ceil(max(abs(dy), abs(dx))) + 4  # spline support around the crop
        y0, x0 = max(y - m, 0), max(x - m, 0)
        window = pages[other][y0 : min(y + p + m, height), x0 : min(x + p + m, width)]
        moved = apply_shift(window, (dy, dx))
        return moved[y - y0 : y - y0 + p, x - x0 : x - x0 + p]

    def batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor, Tensor]:
        crops = [self.sample(rng) for _ in range(size)]
        return tuple(torch.from_numpy(np.stack([c[k] for c in crops])[:, None]) for k in range(3))  # type: ignore[return-value]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One ``(3, patch, patch)`` float32 array: normalised prev, centre, next."""
        s, item = self.items[rng.integers(len(self.items))]
        if len(item) == 3 and self.sources[s].info["scans_per_slice"] == 1:
            prev, centre, nxt = item
        else:  # repeat scans: three distinct scans, a random one the centre
            prev, centre, nxt = (item[i] for i in rng.choice(len(item), 3, replace=False))
        pages = self.sources[s].pages
        height, width = pages[centre].shape
        p = self.patch
        y, x = int(rng.integers(height - p + 1)), int(rng.integers(width - p + 1))
        if self.noise is None:
            images = [
                self._aligned_crop(s, centre, i, y, x)
                if i != centre
                else pages[i][y : y + p, x : x + p]
                for i in (prev, centre, nxt)
            ]
            mean, std = self.stats.get((s, centre)) or self.norm.stats_for(pages[centre])
        else:
            wy, wx, wh, ww = _window(y, x, p, height, width)
            clean = np.stack([pages[i][wy : wy + wh, wx : wx + ww] for i in (prev, centre, nxt)])
            windows = np.asarray(self.noise(clean, rng))
            mean, std = self.norm.stats_for(windows[1])
            oy, ox = y - wy, x - wx
            images = [w[oy : oy + p, ox : ox + p] for w in windows]
        out = (np.stack(images).astype(np.float32) - np.float32(mean)) / np.float32(std)
        if self.augment:
            out = np.rot90(out, int(rng.integers(4)), axes=(1, 2))
            if rng.integers(2):
                out = out[:, :, ::-1]
        return np.ascontiguousarray(out)


def _window(y: int, x: int, p: int, height: int, width: int) -> tuple[int, int, int, int]:
    """A window of up to :data:`NOISE_WINDOW` px per side that contains the crop at (y, x)."""
    wh, ww = min(height, max(NOISE_WINDOW, p)), min(width, max(NOISE_WINDOW, p))
    wy = min(max(y + p // 2 - wh // 2, 0), height - wh)
    wx = min(max(x + p // 2 - ww // 2, 0), width - ww)
    return wy, wx, wh, ww


def dataset_normalisation(
    sources: Sequence[np.ndarray], noise: NoiseHook | None = None, seed: int = 0
) -> Normalisation:
    """``dataset``-mode stats from up to :data:`STATS_SLICES` evenly spread slices (noised)."""
    rng = np.random.default_rng(seed)
    pick = np.linspace(0, len(sources) - 1, min(STATS_SLICES, len(sources))).round().astype(int)
    means, variances = [], []
    for i in sorted(set(pick.tolist())):
        image = sources[i][::4, ::4] if sources[i].size > (1 << 20) else sources[i]
        if noise is not None:
            image = np.asarray(noise(image[None], rng))[0]
        image = image.astype(np.float64)
        means.append(image.mean())
        variances.append(image.var())
    mean = float(np.mean(means))
    std = math.sqrt(float(np.mean(variances)) + float(np.var(means)))
    return Normalisation("dataset", mean, max(std, 1e-3))


def validation_triplets(sources: list[Source], noise: NoiseHook | None, seed: int) -> list[Triplet]:
    """The held-out triplets as whole slices, noised once with a fixed seed (same every call)."""
    rng = np.random.default_rng([seed, 7919])  # fixed, independent of the training stream
    out: list[Triplet] = []
    for src in sources:
        for t in src.val:
            images = np.stack([src.pages[i] for i in t])
            if noise is not None:
                images = np.asarray(noise(images, rng))
            out.append((images[0], images[1], images[2]))
    return out
