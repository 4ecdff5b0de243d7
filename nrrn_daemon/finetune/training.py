"""Unsupervised NRRN training on adjacent-slice triplets (paper section 2.1.2, eq. 3).

A training sample is a random crop of a triplet (x_{j−1}, x_j, x_{j+1}) of one stack; the network
runs both branches on it (:meth:`NRRN.branches`) and :func:`n2n_loss` scores each branch against
the neighbour it did not see. No clean data is needed: the neighbours carry independent noise.
In repeat-scan mode the triplet is three distinct scans of one slice (same signal, independent
noise), picked at random from the slice's scans. The data side — which slices train and which
validate, normalisation, augmentation, synthetic noise, the random crops — is in
:mod:`nrrn_daemon.finetune.data`; the held-out blocks and the validation loss are in
:mod:`nrrn_daemon.finetune.validation`.

**The loss: eq. 3, eq. 3 without its last term (``plain``, the default for adjacent slices),
or the blind-spot centre target (``centre``).** Eq. 3's linear term in the branches'
half-difference d does *not* average to zero, even for repeat scans: its expectation
½(E⟨x', n_{j−1}⟩ + E⟨x'', n_{j+1}⟩) cancels the noise-fitting reward of the other two terms,
which is what gives E[eq. 3] = E‖m − s‖² + σ² for repeat scans; ``plain`` = eq. 3 + ‖d‖².
Between adjacent slices the term also pays each branch for extrapolating towards the neighbour
it did not see, which amplifies noise and dominates when the noise is light (the derivation is
in :func:`~nrrn_daemon.model.nrrn.n2n_loss`). Measured on FIB-25 (BENCHMARKS §1), 300 fine-tune
steps from the shipped base on the held-out block: Gaussian σ 25 gives 25.74 dB with eq. 3 and
29.61 dB with ``plain`` (base 29.57); Poisson peak 4 gives 24.50 and 24.20 dB (base 24.04), the
small price ``plain`` pays at heavy noise. So ``loss="auto"`` trains adjacent slices with
``plain`` (:func:`~nrrn_daemon.model.nrrn.plain_loss`: each branch still scored against the
neighbour it did not see, the paper's Noise2Noise pairing) and repeat scans with eq. 3; either
can be forced. Both train towards the *neighbours'* signal. ``centre``
(:func:`~nrrn_daemon.model.nrrn.centre_loss`) trains the blind-spot network
(:attr:`~nrrn_daemon.model.nrrn.NRRNConfig.blind`; a paper-network ``init`` warm-starts it) with
the centre slice itself as target; ``auto`` picks it for a blind network, so fine-tunes of a
blind base train with it (:func:`loss_for`). Validation
uses the loss the model was trained with; the promotion gate uses the loss-neutral
:func:`~nrrn_daemon.finetune.validation.centre_measure`.

Choices where the paper leaves room (measurements in the helper's report and ``scripts/``):

* **Crops of 96 px, batch 8** (paper: 256 px, batch 16, on a GPU). A 4 BU × 32 step costs about
  3 MFLOP per pixel (two branches, forward + backward): 8 × 96² px is ~0.2 TFLOP, seconds on two
  CPU cores, so minutes of training buy a few hundred steps. 96 px still leaves most of each crop
  outside the zero-padded rim (receptive radius 2·blocks + 3).
* **Adam lr 1e-3, cosine decay to 5 %, short warm-up** (paper: 1e-4 constant; betas/eps as the
  paper). With a budget of a few hundred steps 1e-4 barely moves the network; 1e-3 with a decay
  to the end of the budget (in steps or minutes, whichever ends first) trains in minutes.
* **Validation**: the loss on fixed crops (fixed seed) of the held-out triplets is measured at
  the start, every ``validation_every`` steps and at the end.
* **Precision and speed** (:mod:`nrrn_daemon.model.acceleration`): channels-last layout, bf16
autocast
  where the hardware has it (``precision="auto"``; fp16-only GPUs train in float32, as fp16
  would need loss scaling), the loss in float32, and ``torch.compile`` for long runs. The
  validation loss is always computed in float32, eagerly, so runs at different precisions are
  compared on equal terms.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from nrrn_daemon.config.profiles import FrameSettings
from nrrn_daemon.errors import NRRNError
from nrrn_daemon.finetune.data import (
    NoiseHook,
    Sampler,
    StackLike,
    dataset_normalisation,
    prepare_sources,
    validation_triplets,
)
from nrrn_daemon.finetune.validation import validation_loss
from nrrn_daemon.model import acceleration
from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation, NormMode
from nrrn_daemon.model.devices import PRECISIONS, DeviceInfo, resolve_device
from nrrn_daemon.model.nrrn import LOSSES, NRRN, NRRNConfig
from nrrn_daemon.model.posterior import fit_noise_model

ProgressCallback = Callable[[int, "int | None", float, float], None]
"""``on_progress(step, total_steps_or_None, loss, elapsed_s)``, called after every step."""

CURVE_POINTS = 200
LOSS_CHOICES = ("auto", *LOSSES)


def loss_for(choice: str, repeat_scans: bool, blind: bool = False) -> str:
    """The loss ``choice`` means. ``auto`` follows the network: ``centre`` for a blind-spot
    network (the only objective it was built for), else ``eq3`` for repeat scans and ``plain``
    for adjacent slices. A fine-tune's network is its parent's, so which objective the daemon
    uses is decided by which base checkpoint ships (BENCHMARKS §1)."""
    if choice == "auto":
        if blind:
            return "centre"
        return "eq3" if repeat_scans else "plain"
    return choice


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
    loss
        ``"eq3"`` (the paper's), ``"plain"`` (eq. 3 without its last term) or ``"auto"``:
        ``plain`` for adjacent slices, ``eq3`` for repeat scans (see the module docstring).
        The validation loss uses the same one.
    frames
        Adjacent slices: the frame judgement (:mod:`nrrn_daemon.frames`); no triplet that holds
        an unusable slice (blank, saturated, cut short, unrelated) trains or validates. None:
        every slice is used.
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
    frames: FrameSettings | None = field(default_factory=FrameSettings)
    normalisation: NormMode = "dataset"
    precision: str = "auto"
    compile: str = "auto"
    loss: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in acceleration.COMPILE_CHOICES:
            raise ValueError(
                f"compile must be one of {acceleration.COMPILE_CHOICES}, got {self.compile!r}"
            )
        if self.loss not in LOSS_CHOICES:
            raise ValueError(f"loss must be one of {LOSS_CHOICES}, got {self.loss!r}")
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
    loss: str = "plain"


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


def _load_init(model: NRRN, init: Checkpoint) -> None:
    """Start from ``init``'s weights; a paper-network init of a blind model keeps all it has.

    The blind network has the same weights as the paper's plus ``combine`` (left at its start,
    the mean of the four directions); its masked convs use the rest of each kernel.
    """
    if init.config.blind == model.blind:
        model.load_state_dict(init.state_dict)
        return
    missing, unexpected = model.load_state_dict(init.state_dict, strict=False)
    if unexpected or any(not k.startswith("combine.") for k in missing):
        raise ValueError(f"cannot start a {model.config} from a {init.config} checkpoint")


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
        One or more stacks (:class:`~nrrn_daemon.imaging.stacks.Stack` or ``(z, y, x)`` arrays) of
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
    loss_name = loss_for(settings.loss, settings.repeat_scans, blind=config.blind)
    if loss_name == "centre" and not config.blind:
        # The centre target needs the blind-spot network; a paper-network init warm-starts it.
        config = replace(config, blind=True)
    device = resolve_device(settings.device, settings.precision, allow_fp16=False)
    sources = prepare_sources(stacks, settings)

    mode = init.normalisation.mode if init is not None else settings.normalisation
    train_pages = [
        src.pages[i] for src in sources for i in sorted({i for t in src.train for i in t})
    ]
    norm = dataset_normalisation(train_pages, noise, settings.seed)
    if mode == "slice":  # mean/std of the training data are kept for provenance only
        norm = Normalisation("slice", norm.mean, norm.std)
    sampler = Sampler(sources, norm, settings.patch, settings.augment, noise)
    val_triplets = validation_triplets(sources, noise, settings.seed)

    torch.manual_seed(settings.seed)
    model = NRRN.from_config(config)
    if init is not None:
        _load_init(model, init)
    wanted = acceleration.wants_compile(
        settings.compile, device, config.features,
        minutes=settings.minutes, steps=settings.steps, training=True,
    )  # fmt: skip
    model = acceleration.prepare(model, device, wanted)
    loss_fn = LOSSES[loss_name]
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
            loss=loss_name,
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
        loss = loss_fn(out_prev, out_next, prev, nxt, centre)
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
        loss=loss_name,
    )
    summary = {
        "kind": "fine-tune" if init is not None else "train",
        "parent_sha256": init.content_sha256 if init is not None else None,
        "data": [src.info for src in sources],
        "noise": None if noise is None else getattr(noise, "description", repr(noise)),
        "settings": {
            **asdict(settings),
            "frames": settings.frames.model_dump() if settings.frames else None,
        },
        **asdict(report),
        # The Poisson–Gaussian noise model of the raw training slices (the Denoiser refits it
        # on every slice it denoises); not measured when the noise is synthetic.
        "noise_model": None if noise is not None else fit_noise_model(train_pages[:8]).to_dict(),
        "device_name": device.name,
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Through JSON and back: tuples become lists, as they will be when read from the file.
    model = model.to(memory_format=torch.contiguous_format)  # plain layout in the file
    return Checkpoint.from_model(model, norm, json.loads(json.dumps(summary))), report
