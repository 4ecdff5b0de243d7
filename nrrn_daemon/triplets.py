"""Group slices into units of work: triplets of adjacent slices, or the scans of one slice. Pure.

The daemon calls :meth:`TripletGrouper.add` when a slice file is complete, ``tick`` regularly
(``next_deadline`` says when a timeout is next due), and ``flush`` at the end of a burst or of
the acquisition. Each returns the :class:`Work`
that just became ready. Times are plain floats from any non-decreasing clock (``time.monotonic``).

Adjacent mode (Noise2Noise on slices j-1, j, j+1)
    * Slice j emits a ``triplet`` (neighbours ``(prev, next)`` = (j-1, j+1)) as soon as j-1, j and
      j+1 are all in, whatever order they arrived in.
    * A slice still missing a neighbour ``neighbour_wait_s`` after it became ready is emitted by
      :meth:`tick` with what it has: ``pair`` (the one neighbour present) or ``single`` (none).
      This is also how the stack edges resolve: the lowest (highest) index seen so far cannot know
      that it is the first (last) slice, so it waits like any slice missing a neighbour. Across a
      gap (j+1 missing, j+2 present) slice j likewise waits for j+1, then pairs with j-1.
    * With ``redo_as_triplet``, a slice done as a pair or single is emitted again as a triplet with
      ``redo=True`` once both its neighbours are in (the late neighbour gets its own handling).
      Apart from such redos, no slice is emitted twice.
    * Adding the same file again does nothing. A different file with the same index is a
      replacement: it takes the old file's place for any work not yet emitted (as centre or as a
      neighbour); work already emitted is not repeated.

Unusable slices (adjacent mode)
    :meth:`TripletGrouper.add_unusable` records a slice that carries no signal (a blank, broken
    or unrelated frame, :mod:`nrrn_daemon.frames`). It is never a neighbour: a slice beside it
    is emitted as soon as its other side is settled, as ``pair`` (the other neighbour is in) or
    ``single`` (it is unusable too), or waits for its other neighbour as beside any gap. The
    unusable slice's own output is the caller's (a copy, or denoised alone). A usable file added
    later under the same index (a re-acquired slice) replaces it: it is emitted as a triplet
    when its neighbours are in, and with ``redo_as_triplet`` its neighbours are redone as
    triplets. An unusable slot is never forgotten, so a re-acquired frame is always recognised.

Repeat-scans mode (Noise2Noise on repeated scans of one slice)
    The group key is the index; the ``scan`` numbers of one index form its group. The group is
    emitted as ``repeat`` once ``scans_per_slice`` scans are in, with the centre the lowest scan
    number and the neighbours the other scans in scan order. A group still incomplete after the
    wait (counted from its first scan) is emitted as ``pair`` (at least two scans, all of them
    used) or ``single``; with ``redo_as_triplet`` it is emitted again as ``repeat`` with
    ``redo=True`` once complete. Scans beyond a complete group are ignored.

Memory
    A slice is forgotten once it can produce no more work, neither its own nor as a neighbour:
    (adjacent) it and both its neighbours are *final*, that is done as a triplet, or done in any
    mode when ``redo_as_triplet`` is off; (repeat-scans) its group is final. Forgotten indices are
    kept as merged intervals, so a late re-report of a finished slice is recognised and ignored.
    An in-order acquisition therefore holds a handful of slices plus one interval, however long;
    each stack edge or unfilled gap keeps at most a few slices.

Restart
    :meth:`TripletGrouper.add_done` seeds a slice that was already processed, with the mode of its
    latest result, so a slice done as a pair before the restart is redone as a triplet when its
    missing neighbour arrives (or at once, when the seeded state already allows it).
"""

from __future__ import annotations

import bisect
from collections.abc import Container
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal

from nrrn_daemon.errors import InputError
from nrrn_daemon.slices import SliceRef
from nrrn_daemon.states import InputRole

if TYPE_CHECKING:
    from nrrn_daemon.config.profiles import GroupingSettings

__all__ = ["TripletGrouper", "Work", "WorkMode"]


class WorkMode(str, Enum):
    """How a slice is denoised: which inputs its unit of work has. Stored as text."""

    TRIPLET = "triplet"
    """Adjacent mode: the slice with both neighbours (j-1, j+1)."""
    PAIR = "pair"
    """One neighbour only (adjacent), or an incomplete group of at least two scans (repeat)."""
    SINGLE = "single"
    """No neighbour or second scan at all."""
    REPEAT = "repeat"
    """Repeat-scans mode: a complete group of scans of one slice."""
    COPY = "copy"
    """An unusable slice with no signal: written as a copy of its input, not denoised."""


@dataclass(frozen=True)
class Work:
    """One unit of work: denoise ``centre`` using ``neighbours`` as Noise2Noise inputs."""

    centre: SliceRef
    """The slice whose denoised image is written."""
    neighbours: tuple[SliceRef, ...]
    """Triplet: ``(prev, next)``; pair: the one neighbour; single: empty; repeat: other scans."""
    mode: WorkMode
    """Which inputs this work has."""
    redo: bool = False
    """True when it redoes an earlier pair or single result now that the inputs are complete."""
    unusable: str | None = None
    """Why the centre is not used as a neighbour (``frames.Verdict.reason``); its own output is
    then a copy (mode ``copy``) or a single-image denoise."""

    @property
    def index(self) -> int:
        """The centre slice's index."""
        return self.centre.index

    @property
    def roles(self) -> list[InputRole]:
        """Centre first, then each neighbour's role (see :func:`input_role`)."""
        return [InputRole.CENTRE, *(input_role(self.index, n.index) for n in self.neighbours)]


def neighbour_indices(
    index: int, present: Container[int], inputs: int = 3, unusable: Container[int] = frozenset()
) -> list[int]:
    """The neighbours slice ``index`` is denoised with: the rule of the daemon, ``reprocess`` and
    ``denoise`` alike.

    With 3 inputs, ``index − 1`` and ``index + 1`` where present (a missing index is a gap: pair
    mode, or single); with 2, one of them (the previous one first); with 1, none. A slice in
    ``unusable`` (:mod:`nrrn_daemon.frames`) is never a neighbour, and has none itself.
    """
    if inputs == 1 or index in unusable:
        return []
    near = [j for j in (index - 1, index + 1) if j in present and j not in unusable]
    return near[:1] if inputs == 2 else near


def input_role(centre: int, neighbour: int) -> InputRole:
    """A neighbour's role: a scan of the same index, or the previous / next slice."""
    if neighbour == centre:
        return InputRole.SCAN
    return InputRole.PREV if neighbour < centre else InputRole.NEXT


def mode_for(neighbours: int) -> WorkMode:
    """The adjacent mode of a slice with this many neighbours."""
    return (WorkMode.SINGLE, WorkMode.PAIR, WorkMode.TRIPLET)[neighbours]


class _IntervalSet:
    """A set of integers stored as sorted, merged, inclusive ``[lo, hi]`` intervals."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self._lo, value) - 1
        return i >= 0 and value <= self._hi[i]

    def __len__(self) -> int:
        return len(self._lo)

    def add(self, value: int) -> None:
        if value in self:
            return
        i = bisect.bisect_right(self._lo, value)  # the interval at i-1 (if any) lies before value
        joins_left = i > 0 and self._hi[i - 1] == value - 1
        joins_right = i < len(self._lo) and self._lo[i] == value + 1
        if joins_left and joins_right:
            self._hi[i - 1] = self._hi[i]
            del self._lo[i], self._hi[i]
        elif joins_left:
            self._hi[i - 1] = value
        elif joins_right:
            self._lo[i] = value
        else:
            self._lo.insert(i, value)
            self._hi.insert(i, value)


@dataclass
class _Slot:
    """What the grouper knows of one index (adjacent mode) or one group (repeat-scans mode)."""

    refs: dict[int, SliceRef]  # adjacent: {0: ref}; repeat-scans: {scan: ref}
    ready_at: float | None  # when it became ready; None once done
    done: WorkMode | None = None  # the mode of its latest emitted (or seeded) work
    unusable: bool = False  # adjacent mode: never a neighbour (see add_unusable)


class TripletGrouper:
    """Turn completed slices into units of work (see the module docstring for the rules).

    Parameters
    ----------
    mode
        ``"adjacent"`` (triplets j-1, j, j+1) or ``"repeat-scans"`` (the scans of one index).
    neighbour_wait_s
        Seconds a ready slice waits for a missing neighbour (or scan) before :meth:`tick` emits it
        with what it has.
    redo_as_triplet
        Emit a slice done in pair or single mode again, with ``redo=True``, once complete.
    scans_per_slice
        Repeat-scans mode: the number of scans that completes a group.
    """

    def __init__(
        self,
        mode: Literal["adjacent", "repeat-scans"] = "adjacent",
        neighbour_wait_s: float = 600.0,
        redo_as_triplet: bool = True,
        scans_per_slice: int = 2,
    ) -> None:
        if mode not in ("adjacent", "repeat-scans"):
            raise ValueError(f"mode must be 'adjacent' or 'repeat-scans', got {mode!r}")
        if neighbour_wait_s < 0:
            raise ValueError(f"neighbour_wait_s must be >= 0, got {neighbour_wait_s!r}")
        if scans_per_slice < 2:
            raise ValueError(f"scans_per_slice must be >= 2, got {scans_per_slice!r}")
        self.mode = mode
        self.neighbour_wait_s = float(neighbour_wait_s)
        self.redo_as_triplet = redo_as_triplet
        self.scans_per_slice = scans_per_slice
        self._slots: dict[int, _Slot] = {}
        self._forgotten = _IntervalSet()

    @classmethod
    def from_settings(cls, grouping: GroupingSettings) -> TripletGrouper:
        """The grouper a profile's ``[grouping]`` table describes."""
        return cls(
            grouping.mode,
            grouping.neighbour_wait_s,
            grouping.redo_as_triplet,
            grouping.scans_per_slice,
        )

    # -- public API ---------------------------------------------------------------------------

    def add(self, ref: SliceRef, now: float) -> list[Work]:
        """Record that a slice file is complete (ready) at time ``now``.

        Returns
        -------
        list[Work]
            The work this arrival made ready (its own triplet, its neighbours' triplets, redos),
            in index order.
        """
        return self._insert(ref, now, None)

    def add_unusable(self, ref: SliceRef) -> list[Work]:
        """Record a slice that must not serve as a neighbour (adjacent mode).

        Returns the work of its neighbours that this settles (pair or single, in index order);
        the unusable slice's own output is not emitted here.
        """
        if self.mode != "adjacent":
            raise ValueError("unusable slices are judged in adjacent mode only")
        i = ref.index
        if i in self._forgotten:
            return []  # done with long ago: nothing more to settle
        self._slots[i] = _Slot({0: ref}, None, unusable=True)
        works = [w for j in (i - 1, i + 1) if (w := self._try_triplet(j)) is not None]
        self._forget_around([w.index for w in works])
        return works

    def add_done(self, ref: SliceRef, mode: WorkMode | str) -> list[Work]:
        """Seed a slice already processed before a restart, with the mode of its latest result.

        In repeat-scans mode call it for each scan the result used. Returns the redo work the
        seeded state already allows (a redo that was due when the daemon stopped).
        """
        return self._insert(ref, None, WorkMode(mode))

    def tick(self, now: float) -> list[Work]:
        """Emit, with what they have, the slices whose wait for a neighbour ran out by ``now``."""
        due = [
            i
            for i, slot in sorted(self._slots.items())
            if slot.ready_at is not None and now - slot.ready_at >= self.neighbour_wait_s
        ]
        return self._emit_partial(due)

    def flush(self) -> list[Work]:
        """Emit every waiting slice with what it has (end of a burst or of the acquisition)."""
        return self._emit_partial(
            [i for i, slot in sorted(self._slots.items()) if slot.ready_at is not None]
        )

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` will emit something, or None."""
        times = [s.ready_at for s in self._slots.values() if s.ready_at is not None]
        return min(times) + self.neighbour_wait_s if times else None

    @property
    def pending(self) -> list[int]:
        """Indices of the slices waiting to be emitted, in order."""
        return sorted(i for i, s in self._slots.items() if s.ready_at is not None)

    def __len__(self) -> int:
        """The number of slices (or groups) still tracked; forgotten ones are not counted."""
        return len(self._slots)

    @property
    def state_size(self) -> int:
        """Tracked slices plus the intervals of forgotten ones: what the grouper holds in memory."""
        return len(self._slots) + len(self._forgotten)

    # -- shared machinery ---------------------------------------------------------------------

    def _insert(self, ref: SliceRef, now: float | None, done: WorkMode | None) -> list[Work]:
        i = ref.index
        if i in self._forgotten:
            return []
        key = 0 if self.mode == "adjacent" else ref.scan
        if key is None:
            raise InputError(f"{ref.name!r} has no scan number but grouping.mode is repeat-scans")
        slot = self._slots.get(i)
        if slot is None:
            slot = self._slots[i] = _Slot({}, now)
        elif slot.unusable:  # a re-acquired, usable frame replaces an unusable one
            slot.unusable, slot.done, slot.ready_at = False, None, now
        elif key in slot.refs and slot.refs[key].path == ref.path and done is None:
            return []  # the same file reported again
        if self.mode == "repeat-scans" and key not in slot.refs and self._complete(slot):
            return []  # a scan beyond a complete group
        slot.refs[key] = ref  # new, or a replacement of the file with this index (and scan)
        if done is not None:
            slot.done, slot.ready_at = done, None
        if self.mode == "adjacent":
            works = [w for j in (i - 1, i, i + 1) if (w := self._try_triplet(j)) is not None]
        else:
            works = [w] if (w := self._try_group(i)) is not None else []
        self._forget_around([i, *(w.index for w in works)])
        return works

    def _emit_partial(self, indices: list[int]) -> list[Work]:
        works = []
        for i in indices:
            slot = self._slots[i]
            if self.mode == "adjacent":
                near = [j for j in neighbour_indices(i, self._slots) if self._usable(j)]
                neighbours = tuple(self._slots[j].refs[0] for j in near)
                centre = slot.refs[0]
            else:
                centre, *rest = (slot.refs[k] for k in sorted(slot.refs))
                neighbours = tuple(rest)
            mode = WorkMode.PAIR if neighbours else WorkMode.SINGLE
            if self.mode == "adjacent" and len(neighbours) == 2:
                mode = WorkMode.TRIPLET  # not reached: a slice with both neighbours is emitted
            slot.done, slot.ready_at = mode, None
            works.append(Work(centre, neighbours, mode))
        self._forget_around(indices)
        return works

    def _final(self, i: int) -> bool:
        """Whether index i can produce no more work of its own (forgotten counts as final)."""
        if i in self._forgotten:
            return True
        slot = self._slots.get(i)
        if slot is None or slot.done is None or slot.unusable:
            return False
        return slot.done in (WorkMode.TRIPLET, WorkMode.REPEAT) or not self.redo_as_triplet

    def _forget_around(self, changed: list[int]) -> None:
        span = 1 if self.mode == "adjacent" else 0  # only adjacent slices lend each other refs
        for i in {c + d for c in changed for d in range(-span, span + 1)}:
            if i in self._slots and all(self._final(i + d) for d in range(-span, span + 1)):
                del self._slots[i]
                self._forgotten.add(i)

    # -- adjacent mode ------------------------------------------------------------------------

    def _usable(self, i: int) -> bool:
        slot = self._slots.get(i)
        return slot is not None and not slot.unusable

    def _try_triplet(self, i: int) -> Work | None:
        """Emit slice i as a triplet if it and both neighbours are in and it still needs one;
        as a pair or single, the first time, if its neighbours are settled and one is unusable."""
        slot, prev, nxt = (self._slots.get(j) for j in (i, i - 1, i + 1))
        if slot is None or slot.unusable or prev is None or nxt is None:
            return None
        if prev.unusable or nxt.unusable:
            if slot.done is not None:
                return None  # done already (redone as a triplet if a neighbour is re-acquired)
            others = tuple(s.refs[0] for s in (prev, nxt) if not s.unusable)
            slot.done, slot.ready_at = (WorkMode.PAIR if others else WorkMode.SINGLE), None
            return Work(slot.refs[0], others, slot.done)
        redo = self._claim(slot, WorkMode.TRIPLET)
        if redo is None:
            return None
        return Work(slot.refs[0], (prev.refs[0], nxt.refs[0]), WorkMode.TRIPLET, redo)

    def _claim(self, slot: _Slot, mode: WorkMode) -> bool | None:
        """Mark ``slot`` done in ``mode``: None if it needs no such work, else whether it redoes
        an earlier, partial result."""
        if slot.done is None:
            redo = False
        elif slot.done is not mode and self.redo_as_triplet:
            redo = True
        else:
            return None
        slot.done, slot.ready_at = mode, None
        return redo

    # -- repeat-scans mode --------------------------------------------------------------------

    def _complete(self, slot: _Slot) -> bool:
        return len(slot.refs) >= self.scans_per_slice

    def _try_group(self, i: int) -> Work | None:
        """Emit group i as a repeat if it is complete and still needs one."""
        slot = self._slots[i]
        if not self._complete(slot):
            return None
        redo = self._claim(slot, WorkMode.REPEAT)
        if redo is None:
            return None
        centre, *rest = (slot.refs[k] for k in sorted(slot.refs))
        return Work(centre, tuple(rest), WorkMode.REPEAT, redo)
