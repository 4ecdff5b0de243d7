"""Judge a slice before it may serve as a neighbour: blank, saturated, cut short or unrelated. Pure.

Numpy in, :class:`Verdict` out. Real acquisitions have bad frames (a blanked beam, a detector
dropout, a frame cut short, a stage jump, a charging event); used as a Noise2Noise neighbour such
a frame costs the slice beside it about 2 dB, silently. So every slice is judged first, cheaply,
from the pixels the pipeline already decoded:

* :func:`inspect_frame`, from the slice alone: *blank* (standard deviation below
  ``blank_std``), *saturated* (more than ``saturated_fraction`` of the pixels at the dtype's
  maximum), *cut short* (more than ``empty_fraction`` of the rows, or of the columns, constant);
* *unrelated*, from the slice and its neighbours: the normalised cross-correlation (NCC) of its
  block-mean :func:`thumbnail` with **both** neighbours' is below ``unrelated_ratio`` times the
  data set's level. The level is learned from the data set itself (the median NCC of adjacent
  usable slices), since isotropic FIB-SEM and anisotropic serial sections differ by a lot; below
  ``ncc_min_level`` (slices too noisy or too far apart to resemble each other) the test is off.
  A slice with one usable neighbour only (a stack edge, beside a bad frame) cannot be told from
  a stage jump and is kept; so are two unrelated slices in a row that resemble each other.

:func:`judge_stack` judges a whole stack at once (offline ``denoise``, ``reprocess``,
``train``): the level is the median over the stack. :class:`LiveJudge` judges slices as they
arrive (the daemon): the level is a running median, and a slice that does not resemble the one
neighbour it has so far is *held* until its other neighbour arrives (or the wait runs out), so
that its neighbours are not grouped with it before it is judged.

An unusable slice is treated as missing by the neighbour rule (its neighbours use the pair mode,
or single at a run of bad frames). It is still written: a copy of the input when it carries no
signal (:attr:`Verdict.has_signal` false), else denoised alone.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nrrn_daemon.config.profiles import FrameSettings

__all__ = [
    "GOOD",
    "LiveJudge",
    "Verdict",
    "inspect_frame",
    "judge_stack",
    "ncc",
    "thumbnail",
    "unusable_label",
]

UNUSABLE_PREFIX = "unusable: "
"""How a slice's recorded reason starts when it is not used as a neighbour."""


@dataclass(frozen=True)
class Verdict:
    """Whether a slice may serve as a neighbour, and if not why."""

    usable: bool
    """True: the slice may be used as a neighbour (and is denoised normally)."""
    reason: str | None = None
    """Why not, for people: "blank frame (std 0.00)", "frame cut short (50% of rows constant)"."""
    has_signal: bool = True
    """False for a blank or saturated frame: it is written as a copy of the input, not denoised."""

    @property
    def label(self) -> str | None:
        """The reason as recorded in the store: ``"unusable: <reason>"`` (None when usable)."""
        return None if self.usable else unusable_label(self.reason or "unknown")


GOOD = Verdict(True)
"""The verdict of a usable slice."""


def unusable_label(reason: str) -> str:
    """``"unusable: <reason>"``: the text recorded with an unusable slice."""
    return f"{UNUSABLE_PREFIX}{reason}"


def inspect_frame(pixels: np.ndarray, settings: FrameSettings) -> Verdict:
    """Judge one slice from its own pixels: blank, saturated or cut short.

    Parameters
    ----------
    pixels
        The 2-D image (the databar cropped off).
    settings
        The profile's ``[frames]`` table.

    Returns
    -------
    Verdict
        :data:`GOOD`, or why the slice is unusable.
    """
    if not settings.enabled:
        return GOOD
    image = np.asarray(pixels)
    std = float(image.std(dtype=np.float64))
    if std < settings.blank_std:
        return Verdict(False, f"blank frame (std {std:.2f})", has_signal=False)
    if np.issubdtype(image.dtype, np.integer):
        top = np.iinfo(image.dtype).max
        at_top = float(np.count_nonzero(image == top)) / image.size
        if at_top > settings.saturated_fraction:
            return Verdict(
                False, f"saturated frame ({at_top:.0%} of pixels at {top})", has_signal=False
            )
    rows = float(np.mean(np.ptp(image, axis=1) == 0))
    cols = float(np.mean(np.ptp(image, axis=0) == 0))
    if max(rows, cols) > settings.empty_fraction:
        what = f"{rows:.0%} of rows" if rows >= cols else f"{cols:.0%} of columns"
        return Verdict(False, f"frame cut short ({what} constant)")
    return GOOD


def thumbnail(pixels: np.ndarray, block: int) -> np.ndarray:
    """The block-mean of ``pixels`` (float32), the block shrunk so that at least 16 px remain."""
    image = np.asarray(pixels, dtype=np.float32)
    f = max(1, min(block, min(image.shape) // 16))
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    return image[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two images of one shape (0 when either is constant)."""
    a = np.asarray(a, dtype=np.float64) - float(np.mean(a))
    b = np.asarray(b, dtype=np.float64) - float(np.mean(b))
    denom = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / denom) if denom > 0 else 0.0


def _threshold(level: float | None, count: int, settings: FrameSettings) -> float | None:
    """The NCC below which a slice is unrelated, or None while the test does not apply."""
    if level is None or count < settings.ncc_warmup or level < settings.ncc_min_level:
        return None
    return settings.unrelated_ratio * level


def _unrelated(values: list[float], level: float) -> Verdict:
    shown = " and ".join(f"{v:.2f}" for v in values)
    return Verdict(
        False, f"unrelated to its neighbours (NCC {shown}; this data set's level {level:.2f})"
    )


def judge_stack(
    indices: Iterable[int],
    load: Callable[[int], np.ndarray],
    settings: FrameSettings,
) -> dict[int, Verdict]:
    """Judge every slice of a whole stack (offline ``denoise``, ``reprocess``, ``train``).

    Parameters
    ----------
    indices
        The slice indices (neighbours are ``index ± 1``; a missing index is a gap).
    load
        ``load(index)`` → the slice's 2-D pixels. Each slice is loaded once; only its thumbnail
        is kept.
    settings
        The profile's ``[frames]`` table.

    Returns
    -------
    dict[int, Verdict]
        One verdict per index. The NCC level is the median over adjacent pairs of slices that
        pass :func:`inspect_frame`.
    """
    order = sorted(set(indices))
    verdicts: dict[int, Verdict] = {}
    thumbs: dict[int, np.ndarray] = {}
    for i in order:
        pixels = load(i)
        verdicts[i] = inspect_frame(pixels, settings)
        if verdicts[i].usable and settings.enabled:
            thumbs[i] = thumbnail(pixels, settings.ncc_block)
    pairs = {i: ncc(thumbs[i], thumbs[i + 1]) for i in thumbs if i + 1 in thumbs}
    if not pairs:
        return verdicts
    level = statistics.median(pairs.values())
    threshold = _threshold(level, len(pairs), settings)
    if threshold is None:
        return verdicts
    for i in thumbs:
        if i - 1 in pairs and i in pairs:
            values = [pairs[i - 1], pairs[i]]
            if max(values) < threshold:
                verdicts[i] = _unrelated(values, level)
    return verdicts


@dataclass
class _Held:
    """A slice that does not resemble the one neighbour it has: judged when the other arrives."""

    since: float
    values: list[float] = field(default_factory=list)


class LiveJudge:
    """Judge slices as they arrive, in any order (the daemon's side of :func:`judge_stack`).

    :meth:`add` returns the verdicts that became final: the new slice's, and a held neighbour's.
    A slice that passes :func:`inspect_frame` and resembles a usable neighbour (or has none yet,
    or arrives before the level is learned) is final at once; one whose NCC with every usable
    neighbour present is below the threshold is unusable when it has two, *held* when it has
    one. A held slice is decided when its other neighbour arrives, and released as usable by
    :meth:`release` once it has waited ``wait_s`` (the stack's last slice, a gap).

    Thumbnails are kept for the last ``keep`` indices only.
    """

    def __init__(self, settings: FrameSettings, wait_s: float, keep: int = 16) -> None:
        self.settings = settings
        self.wait_s = float(wait_s)
        self.keep = keep
        self._thumbs: dict[int, np.ndarray] = {}
        self._usable: dict[int, bool] = {}  # final verdicts of the indices kept
        self._held: dict[int, _Held] = {}
        self._recent: deque[float] = deque(maxlen=settings.ncc_window)
        self._learned = 0

    @property
    def level(self) -> float | None:
        """The running NCC level of adjacent usable slices (None before any pair)."""
        return statistics.median(self._recent) if self._recent else None

    @property
    def held(self) -> list[int]:
        """Indices waiting for their other neighbour before they are judged."""
        return sorted(self._held)

    def add(self, index: int, pixels: np.ndarray, now: float) -> list[tuple[int, Verdict]]:
        """Judge a slice that arrived (again, for a re-acquired slice) at ``now``.

        Returns
        -------
        list[tuple[int, Verdict]]
            The verdicts now final, each (index, verdict): possibly a held neighbour's, then the
            new slice's unless it is held.
        """
        final: list[tuple[int, Verdict]] = []
        self._held.pop(index, None)
        self._usable.pop(index, None)
        verdict = inspect_frame(pixels, self.settings)
        if not verdict.usable or not self.settings.enabled:
            self._thumbs.pop(index, None)
            for n in (index - 1, index + 1):
                if n in self._held:  # its other side cannot be judged: benefit of the doubt
                    final.append((n, self._decide(n, GOOD)))
            self._usable[index] = verdict.usable
            final.append((index, verdict))
            self._prune(index)
            return final
        thumb = self._thumbs[index] = thumbnail(pixels, self.settings.ncc_block)
        threshold = self._threshold()
        for n in (index - 1, index + 1):
            if n in self._held:
                value = ncc(thumb, self._thumbs[n])
                held = self._held[n]
                if threshold is not None and max(value, *held.values) < threshold:
                    final.append(
                        (n, self._decide(n, _unrelated([*held.values, value], self.level or 0.0)))
                    )
                else:
                    final.append((n, self._decide(n, GOOD)))
        present = [n for n in (index - 1, index + 1) if self._usable.get(n) and n in self._thumbs]
        values = [ncc(thumb, self._thumbs[n]) for n in present]
        threshold = self._threshold()
        if threshold is not None and values and max(values) < threshold:
            if len(values) == 2:
                verdict = _unrelated(values, self.level or 0.0)
            else:
                self._held[index] = _Held(now, values)
                self._prune(index)
                return final
        final.append((index, self._decide(index, verdict)))
        self._prune(index)
        return final

    def release(self, now: float | None = None) -> list[tuple[int, Verdict]]:
        """Release as usable the held slices that waited ``wait_s`` by ``now`` (None: all)."""
        due = [
            i for i, h in sorted(self._held.items()) if now is None or now - h.since >= self.wait_s
        ]
        return [(i, self._decide(i, GOOD)) for i in due]

    def next_deadline(self) -> float | None:
        """When :meth:`release` next releases a slice, or None."""
        times = [h.since for h in self._held.values()]
        return min(times) + self.wait_s if times else None

    # -- internals --------------------------------------------------------------------------
    def _threshold(self) -> float | None:
        return _threshold(self.level, self._learned, self.settings)

    def _decide(self, index: int, verdict: Verdict) -> Verdict:
        """Make ``verdict`` final for ``index``; a usable slice teaches the level its NCCs."""
        self._held.pop(index, None)
        self._usable[index] = verdict.usable
        if verdict.usable and index in self._thumbs:
            for n in (index - 1, index + 1):
                if self._usable.get(n) and n in self._thumbs:
                    self._recent.append(ncc(self._thumbs[index], self._thumbs[n]))
                    self._learned += 1
        else:
            self._thumbs.pop(index, None)
        return verdict

    def _prune(self, latest: int) -> None:
        for i in [i for i in self._usable if abs(i - latest) > self.keep and i not in self._held]:
            del self._usable[i]
            self._thumbs.pop(i, None)
