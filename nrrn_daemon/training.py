"""Unsupervised NRRN training on adjacent-slice triplets (paper section 2.1.2, eq. 3).

A training sample is a random crop of a triplet (x_{j−1}, x_j, x_{j+1}) of one stack; the network
runs both branches on it (:meth:`NRRN.branches`) and :func:`n2n_loss` scores each branch against
the neighbour it did not see. No clean data is needed: the neighbours carry independent noise.
In repeat-scan mode the triplet is three distinct scans of one slice (same signal, independent
noise), picked at random from the slice's scans.

Choices where the paper leaves room (measurements in the helper's report and ``scripts/``):

* **Crops of 96 px, batch 8** (paper: 256 px, batch 16, on a GPU). A 4 BU × 32 step costs about
  3 MFLOP per pixel (two branches, forward + backward): 8 × 96² px is ~0.2 TFLOP, seconds on two
  CPU cores, so minutes of training buy a few hundred steps. 96 px still leaves most of each crop
  outside the zero-padded rim (receptive radius 2·blocks + 3).
* **Adam lr 1e-3, cosine decay to 5 %, short warm-up** (paper: 1e-4 constant; betas/eps as the
  paper). With a budget of a few hundred steps 1e-4 barely moves the network; 1e-3 with a decay
  to the end of the budget (in steps or minutes, whichever ends first) trains in minutes.
* **Normalisation**: ``dataset`` mode — one mean/std measured on (a subsample of) the training
  slices; ``slice`` mode — each triplet is z-scored with its centre slice's whole-slice stats,
  exactly :meth:`Normalisation.stats_for`, as the Denoiser does at inference.
* **Validation** holds out blocks of consecutive slices: no training triplet contains a held-out
  slice, and only triplets wholly inside a block validate, so no slice is seen by both. The loss
  on fixed crops (fixed seed) is measured at the start, every ``validation_every`` steps and at
  the end.
* **Augmentation**: one of the 8 flips/90° rotations, the same for the three images of a triplet.
* **Precision and speed** (:mod:`nrrn_daemon.acceleration`): channels-last layout, bf16 autocast
  where the hardware has it (``precision="auto"``; fp16-only GPUs train in float32, as fp16
  would need loss scaling), the loss in float32, and ``torch.compile`` for long runs. The
  validation loss is always computed in float32, eagerly, so runs at different precisions are
  compared on equal terms.
* **Synthetic noise** (``noise=``, for training on clean data): called once per triplet on its
  three images stacked, so a hook draws independent pixels (independent noise per slice, as
  Noise2Noise needs) but can give the three one level, as real adjacent slices have (a
  mixed-level hook draws a level per triplet). It is applied to a window of up to 512² px around
  the crop (the whole slice for small slices) and, in ``slice`` mode, the centre's stats are those
  of its noisy window, as at inference on noisy data.

Slices used for training are held in memory (in their own dtype) for random access.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from . import acceleration
from .checkpoints import Checkpoint, Normalisation, NormMode, slice_stats
from .devices import PRECISIONS, DeviceInfo, resolve_device
from .errors import InputError, NRRNError
from .nrrn import NRRN, NRRNConfig, n2n_loss

NoiseHook = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""``noise(images, rng) -> noisy images``: synthetic noise on a ``(k, h, w)`` stack of the images of
one triplet (k = 3), or of one image (k = 1, for dataset statistics); same shape back."""
ProgressCallback = Callable[[int, "int | None", float, float], None]
"""``on_progress(step, total_steps_or_None, loss, elapsed_s)``, called after every step."""
Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(prev, centre, next)`` whole slices (or three scans of one slice)."""

NOISE_WINDOW = 512
VALIDATION_BLOCK = 8
MAX_VALIDATION_TRIPLETS = 16
STATS_SLICES = 32
CURVE_POINTS = 200


class StackLike(Protocol):
    """What training needs of a stack: a :class:`~nrrn_daemon.stacks.Stack` or a 3-D array."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TrainSettings:
    """How to train. At least one budget (``steps``, ``minutes``); training stops at the first.

    Parameters
    ----------
    steps, minutes
        Budget in optimiser steps and/or wall-clock minutes (setup and validation included).
    patch
        Crop side in pixels (clipped to the smallest slice).
    batch
        Triplets per step.
    lr
        Peak Adam learning rate; betas (0.9, 0.999), eps 1e-8 as the paper. Cosine decay to
        ``lr_floor · lr`` over the budget, after a linear warm-up over its first 3 %.
    seed
        Seeds the initial weights, the crops and the noise hook.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    repeat_scans, scans_per_slice
        Consecutive groups of ``scans_per_slice`` (≥ 3) pages are scans of one slice.
    validation_fraction
        Fraction of each stack's slices held out, in blocks of ~8 consecutive slices.
    validation_slices
        Explicit held-out slice indices (of every stack; in repeat-scan mode, slice-group
        indices); overrides ``validation_fraction``.
    validation_every
        Also measure the validation loss every this many steps (0: start and end only).
    validation_every_s
        Also measure it at the first step after every multiple of this many seconds of wall
        time (0: never): runs at different speeds are then compared at the same times, each
        paying for the same number of validations.
    validation_patch, validation_crops
        Size and number of fixed crops per validation triplet.
    augment
        Random flips and 90° rotations (the same for the three images of a triplet).
    normalisation
        ``"dataset"`` or ``"slice"`` for a new model (a resumed one keeps its parent's mode).
    precision
        ``"auto"`` (bf16 autocast where native), ``"float32"`` or ``"bf16"``.
    compile
        ``"auto"`` (on CUDA, and on the CPU for models ≥ 32 channels, when the budget is
        ≥ 5 minutes or ≥ 500 steps), ``"on"`` or ``"off"``.
    """

    steps: int | None = None
    minutes: float | None = None
    patch: int = 96
    batch: int = 8
    lr: float = 1e-3
    lr_floor: float = 0.05
    seed: int = 0
    device: str = "auto"
    repeat_scans: bool = False
    scans_per_slice: int = 3
    validation_fraction: float = 0.1
    validation_slices: tuple[int, ...] | None = None
    validation_every: int = 0
    validation_every_s: float = 0.0
    validation_patch: int = 128
    validation_crops: int = 2
    augment: bool = True
    normalisation: NormMode = "dataset"
    precision: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in acceleration.COMPILE_CHOICES:
            raise ValueError(
                f"compile must be one of {acceleration.COMPILE_CHOICES}, got {self.compile!r}"
            )
        if self.steps is None and self.minutes is None:
            raise ValueError("give a training budget: steps, minutes, or both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.patch < 16 or self.validation_patch < 16:
            raise ValueError(
                f"patch sides must be ≥ 16 px, got {self.patch}, {self.validation_patch}"
            )
        if self.batch < 1 or not self.lr > 0 or not 0 <= self.lr_floor <= 1:
            raise ValueError(
                f"need batch ≥ 1, lr > 0, 0 ≤ lr_floor ≤ 1; got {self.batch}, "
                f"{self.lr}, {self.lr_floor}"
            )
        if self.validation_every < 0 or self.validation_every_s < 0:
            raise ValueError("validation_every and validation_every_s must be ≥ 0")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.normalisation not in ("dataset", "slice"):
            raise ValueError(
                f"normalisation must be 'dataset' or 'slice', got {self.normalisation!r}"
            )


@dataclass
class TrainReport:
    """What a training run did (also stored, JSON-able, in the checkpoint's summary)."""

    steps: int
    seconds: float
    stopped_by: str
    device: str
    val_loss_start: float | None
    val_loss_end: float | None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    """Wall time since the start at which each ``val_curve`` point was measured."""
    train_triplets: int = 0
    val_triplets: int = 0
    precision: str = "float32"
    compiled: bool = False


# -- which slices train, which validate ---------------------------------------------------------
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
class _Source:
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


def _prepare(stacks: Sequence[StackLike], settings: TrainSettings) -> list[_Source]:
    if not stacks:
        raise InputError("no stack to train on — pass at least one stack of ≥ 3 adjacent slices")
    sources: list[_Source] = []
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
        }
        sources.append(_Source(label, pages, train, val, info))
    if len(dtypes) > 1:
        raise InputError(f"stacks mix dtypes {sorted(dtypes)} — train on one bit depth at a time")
    return sources


# -- sampling -------------------------------------------------------------------------------------
class _Sampler:
    """Random (augmented, noised, normalised) triplet crops from the training items."""

    def __init__(
        self,
        sources: list[_Source],
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
        if normalisation.mode == "slice" and noise is None:
            for s, src in enumerate(sources):
                for i, page in src.pages.items():
                    self.stats[s, i] = slice_stats(page)

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
            images = [pages[i][y : y + p, x : x + p] for i in (prev, centre, nxt)]
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


# -- validation -----------------------------------------------------------------------------------
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
) -> float:
    """Mean eq. 3 loss of ``model`` on fixed crops of held-out triplets (deterministic).

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

    Returns
    -------
    float
        The loss, averaged over all crops; ``nan`` for no triplets.
    """
    if not triplets:
        return float("nan")
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
                    loss = n2n_loss(out_prev[one], out_next[one], prev_t[one], next_t[one])
                    total += loss.item() * weight
                    count += 1
    return total / count


def _validation_triplets(
    sources: list[_Source], noise: NoiseHook | None, seed: int
) -> list[Triplet]:
    rng = np.random.default_rng([seed, 7919])  # fixed, independent of the training stream
    out: list[Triplet] = []
    for src in sources:
        for t in src.val:
            images = np.stack([src.pages[i] for i in t])
            if noise is not None:
                images = np.asarray(noise(images, rng))
            out.append((images[0], images[1], images[2]))
    return out


# -- the run --------------------------------------------------------------------------------------
def _lr_factor(progress: float, floor: float, warmup: float = 0.03) -> float:
    """Linear warm-up over the first 3 % of the budget, then cosine decay to ``floor``."""
    if progress < warmup:
        return max(progress / warmup, 0.02)
    t = min((progress - warmup) / (1 - warmup), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _subsample(curve: list[float], points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """Mean loss over ``len(curve)/points`` consecutive steps, tagged with the last step."""
    if not curve:
        return []
    edges = np.linspace(0, len(curve), min(points, len(curve)) + 1).round().astype(int)
    return [
        (int(b), float(np.mean(curve[a:b]))) for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def _branches(
    model: NRRN, device: DeviceInfo, centre: Tensor, prev: Tensor, nxt: Tensor
) -> tuple[Tensor, Tensor]:
    """Both branches of a training batch, under autocast; float32 out for the loss."""
    with acceleration.autocast(device):
        out_prev, out_next = model.branches(centre, [prev, nxt])
    return out_prev.float(), out_next.float()


def train(
    stacks: Sequence[StackLike],
    settings: TrainSettings,
    config: NRRNConfig | None = None,
    init: Checkpoint | None = None,
    on_progress: ProgressCallback | None = None,
    noise: NoiseHook | None = None,
) -> tuple[Checkpoint, TrainReport]:
    """Train (or, with ``init``, resume / fine-tune) an NRRN on noisy stacks, unsupervised.

    Parameters
    ----------
    stacks
        One or more stacks (:class:`~nrrn_daemon.stacks.Stack` or ``(z, y, x)`` arrays) of
        uint8 or uint16 slices; adjacent slices form the triplets (or repeat scans, see settings).
    settings
        Budget, crops, optimiser, validation; see :class:`TrainSettings`.
    config
        Shape of a new network (default :class:`NRRNConfig`); must match ``init``'s if both given.
    init
        A checkpoint to start from: its weights and normalisation mode are kept (``dataset``
        mode re-measures mean/std on the new data); the summary records its sha256 as parent.
    on_progress
        Called after every step with ``(step, total_steps_or_None, loss, elapsed_s)``.
    noise
        Optional synthetic noise (for training on clean data), see :data:`NoiseHook`: called on
        each triplet's three images stacked, with independent pixels.

    Returns
    -------
    (Checkpoint, TrainReport)

    Raises
    ------
    InputError
        Fewer than 3 slices (or scans), slices of different shapes or dtypes, no triplet left
        for training, bad validation indices, or an unknown / unavailable device.
    NRRNError
        The loss became non-finite (lower the learning rate).
    """
    start = time.perf_counter()
    if init is not None and config is not None and config != init.config:
        raise ValueError(f"config {config} differs from the init checkpoint's {init.config}")
    config = init.config if init is not None else (config or NRRNConfig())
    device = resolve_device(settings.device, settings.precision, allow_fp16=False)
    sources = _prepare(stacks, settings)

    mode = init.normalisation.mode if init is not None else settings.normalisation
    train_pages = [
        src.pages[i] for src in sources for i in sorted({i for t in src.train for i in t})
    ]
    norm = dataset_normalisation(train_pages, noise, settings.seed)
    if mode == "slice":  # mean/std of the training data are kept for provenance only
        norm = Normalisation("slice", norm.mean, norm.std)
    sampler = _Sampler(sources, norm, settings.patch, settings.augment, noise)
    val_triplets = _validation_triplets(sources, noise, settings.seed)

    torch.manual_seed(settings.seed)
    model = NRRN.from_config(config)
    if init is not None:
        model.load_state_dict(init.state_dict)
    wanted = acceleration.wants_compile(
        settings.compile, device, config.features,
        minutes=settings.minutes, steps=settings.steps, training=True,
    )  # fmt: skip
    model = acceleration.prepare(model, device, wanted)
    rng = np.random.default_rng(settings.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)

    def validate() -> float | None:
        if not val_triplets:
            return None
        loss = validation_loss(
            model,
            val_triplets,
            norm,
            patch=settings.validation_patch,
            crops=settings.validation_crops,
            seed=settings.seed,
        )
        model.train()
        return loss

    val_seconds = [time.perf_counter() - start]
    val_start = validate()
    val_curve = [(0, val_start)] if val_start is not None else []
    every_s = settings.validation_every_s
    next_val_s = every_s if every_s > 0 else math.inf
    losses: list[float] = []
    budget_s = settings.minutes * 60 if settings.minutes is not None else None
    stopped_by = "steps"
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if settings.steps is not None and len(losses) >= settings.steps:
            break
        if budget_s is not None and elapsed >= budget_s:
            stopped_by = "minutes"
            break
        progress = max(
            len(losses) / settings.steps if settings.steps else 0.0,
            elapsed / budget_s if budget_s else 0.0,
        )
        for group in optimiser.param_groups:
            group["lr"] = settings.lr * _lr_factor(progress, settings.lr_floor)
        prev, centre, nxt = (
            acceleration.to_layout(t.to(device.device)) for t in sampler.batch(rng, settings.batch)
        )
        out_prev, out_next = acceleration.run_with_fallback(
            model, _branches, model, device, centre, prev, nxt
        )
        loss = n2n_loss(out_prev, out_next, prev, nxt)
        if not math.isfinite(loss.item()):
            raise NRRNError(
                f"training diverged at step {len(losses) + 1} (loss {float(loss)}) — lower the "
                f"learning rate (now {settings.lr:g})"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step = len(losses)
        if on_progress is not None:
            on_progress(step, settings.steps, losses[-1], time.perf_counter() - start)
        now_s = time.perf_counter() - start
        if (settings.validation_every and step % settings.validation_every == 0) or (
            now_s >= next_val_s
        ):
            val = validate()
            if val is not None:
                val_curve.append((step, val))
                val_seconds.append(now_s)
            if every_s > 0:
                next_val_s = (now_s // every_s + 1) * every_s
    end_s = time.perf_counter() - start
    val_end = validate()
    if val_end is not None and (not val_curve or val_curve[-1][0] != len(losses)):
        val_curve.append((len(losses), val_end))
        val_seconds.append(end_s)
    model.eval()
    seconds = time.perf_counter() - start
    report = TrainReport(
        steps=len(losses),
        seconds=seconds,
        stopped_by=stopped_by,
        device=device.device,
        val_loss_start=val_start,
        val_loss_end=val_end,
        loss_curve=_subsample(losses),
        val_curve=val_curve,
        val_seconds=[round(t, 2) for t in val_seconds] if val_curve else [],
        train_triplets=len(sampler.items),
        val_triplets=len(val_triplets),
        precision=device.precision,
        compiled=model.compiled,
    )
    summary = {
        "kind": "fine-tune" if init is not None else "train",
        "parent_sha256": init.content_sha256 if init is not None else None,
        "data": [src.info for src in sources],
        "noise": None if noise is None else getattr(noise, "description", repr(noise)),
        "settings": asdict(settings),
        **asdict(report),
        "device_name": device.name,
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Through JSON and back: tuples become lists, as they will be when read from the file.
    model = model.to(memory_format=torch.contiguous_format)  # plain layout in the file
    return Checkpoint.from_model(model, norm, json.loads(json.dumps(summary))), report
