"""A slice file is complete: identify it, record it in the store, hand it to the grouper.

The daemon loop's side of the raw folder (only its thread calls in, so the store keeps one
writer): for each file the watcher reports complete, :meth:`Arrivals.complete` parses its name,
learns its sha256, shape and dtype (from the one read that loads it into the slice cache), skips
a repeat of content already denoised, fails a slice whose size or bit depth is not the data
set's, records the slice as ready and returns the units the grouper says are now ready (or, for
new content under a name already denoised, a new version with the same neighbours as before).

Before a slice may serve as a neighbour it is judged (:class:`~nrrn_daemon.frames.LiveJudge`,
the profile's ``[frames]``): an unusable one is recorded as such with its reason, the grouper
treats it as missing for its neighbours, and its own output is a copy of the input (no signal)
or a single-image denoise. A slice that does not resemble the one neighbour it has is held back
from the grouper until its other neighbour arrives (or ``grouping.neighbour_wait_s`` runs out:
:meth:`Arrivals.release`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tifffile

from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.daemon.slicecache import LoadedSlice, SliceCache, read_unhashed
from nrrn_daemon.errors import InputError
from nrrn_daemon.files import Background, sha256_file
from nrrn_daemon.frames import LiveJudge, Verdict
from nrrn_daemon.slices import NameRejected, SliceRef, parse_slice
from nrrn_daemon.states import InputRole, OutputReason, SliceState
from nrrn_daemon.store.store import SliceInfo, Store
from nrrn_daemon.triplets import TripletGrouper, Work, WorkMode

log = logging.getLogger("nrrn_daemon")

READ_WAIT_S = 0.5
"""How long the loop waits for a slice's read (:meth:`Arrivals.take`): a healthy file answers in
milliseconds; a late one is taken in at a later turn."""
Seed = tuple[SliceInfo, str | None]
"""A slice recorded as processed: its row, and its output's mode (``None``: unusable)."""

Ready = tuple[Work, OutputReason | None]
"""A unit of work made ready, with the reason its output is recorded with (None: first/redo)."""


def _first(works: list[Work]) -> list[Ready]:
    """Units the grouper made ready, recorded as first outputs (or redos as triplets)."""
    return [(item, None) for item in works]


Kind = tuple[tuple[int, ...], np.dtype]
"""A slice file's full shape (databar included) and dtype; one per data set."""


class Counters(Protocol):
    """The live counters arrivals update (the daemon's ``LiveState``)."""

    seen: int
    failed: int
    unusable: int
    recent_failures: Any
    recent_unusable: Any


@dataclass(frozen=True)
class Found:
    """What a complete slice file tells the store and the size check."""

    size: int
    mtime: float
    sha256: str
    kind: Kind
    pixels: np.ndarray | None = None
    """The decoded image (the databar cropped off) where it was read; judged by the frames."""


class Arrivals:
    """Turns complete slice files into store rows and units of work (see the module docstring).

    Parameters
    ----------
    profile, store, dataset_id, watch_folder, grouper
        The daemon's.
    cache
        Where slices are loaded; ``None``: the synchronous design (hash the file, read its
        header; the pixels are read per unit).
    state
        Counters for the heartbeat (``seen``, ``failed``, ``recent_failures``).
    on_event
        The daemon's live-view callback.
    wake
        Wakes the daemon loop (called when a slice's late read ends, see :meth:`take`).
    """

    def __init__(
        self,
        *,
        profile: Profile,
        store: Store,
        dataset_id: int,
        watch_folder: Path,
        grouper: TripletGrouper,
        cache: SliceCache | None,
        state: Counters,
        on_event: Callable[[str, dict[str, Any]], None],
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.profile = profile
        self.store = store
        self.dataset_id = dataset_id
        self.watch_folder = watch_folder
        self.grouper = grouper
        self.cache = cache
        self.state = state
        self.on_event = on_event
        self.kind: Kind | None = None  # the data set's, from its first slice
        self.judge = LiveJudge(profile.frames, profile.grouping.neighbour_wait_s)
        self._held: dict[int, SliceRef] = {}  # slices waiting for their other neighbour
        self._wake = wake
        self._reading: Background[LoadedSlice] | None = None  # the read of take()'s slice

    def parse(self, path: Path) -> SliceRef | NameRejected | None:
        """The slice a path names, why it names none, or None when it is not ours."""
        return parse_slice(path, self.watch_folder, self.profile.watch, self.profile.grouping.mode)

    def complete(
        self, path: Path, now: float, *, loaded: LoadedSlice | InputError | None = None
    ) -> list[Ready]:
        """A file the watcher found complete (stable and decodable): the units it made ready.

        Each comes with its reason: ``None`` for a first output (or a redo as a triplet),
        :attr:`OutputReason.INPUT_CHANGED` for new content under a name already denoised. The
        caller (the loop) hands them to the pipeline; nothing is submitted from here.
        ``loaded``: the slice as read already (or why it could not be), see :meth:`take`.
        """
        ref = self.parse(path)
        if ref is None:  # not a slice of ours (the glob does not match)
            return []
        if not isinstance(ref, SliceRef):
            log.warning("ignoring %s: %s", path.name, ref)
            self.fail(path, None, str(ref))
            return []
        try:
            found = self._identify(path, loaded)
        except InputError as exc:
            if not path.exists():
                log.warning("%s disappeared before it could be read; skipped", path.name)
            else:
                self.fail(path, ref, str(exc))
            return []
        known = self.store.get_slice(self.dataset_id, str(path))
        if (
            known is not None
            and known.state == SliceState.UNUSABLE
            and known.sha256 == found.sha256
            and self.store.current_mode(known.id) is not None
        ):
            # An unusable slice already written (a restart): still no neighbour.
            return _first(self.grouper.add_unusable(ref))
        if (
            known is not None
            and known.state == SliceState.DENOISED
            and known.sha256 == found.sha256
        ):
            # A repeat of a slice already processed (same content): not re-done.
            fallback = "repeat" if self.profile.grouping.mode == "repeat-scans" else "triplet"
            self.grouper.add_done(ref, self.store.current_mode(known.id) or fallback)
            return []
        changed = known is not None and known.state == SliceState.DENOISED
        if self.kind is None:
            self.kind = found.kind
        elif found.kind != self.kind:
            if self.cache is not None:
                self.cache.forget(path)
            self.fail(path, ref, _misfit(found.kind, self.kind))
            return []
        self.store.upsert_slice(
            self.dataset_id, path=str(path), name=path.name, index=ref.index, scan=ref.scan,
            size=found.size, mtime=found.mtime, sha256=found.sha256, state=SliceState.READY,
            ready_at=now,
        )  # fmt: skip
        self.state.seen += 1
        self.on_event("ready", {"name": path.name, "index": ref.index})
        if self.profile.grouping.mode == "adjacent" and self.profile.frames.enabled:
            pixels = found.pixels if found.pixels is not None else self._pixels(path)
            self._held.pop(ref.index, None)
            verdicts = self.judge.add(ref.index, pixels, now)
            if ref.index in self.judge.held:
                self._held[ref.index] = ref
                log.info("%s does not resemble its neighbour: judged when the other one arrives",
                         path.name)  # fmt: skip
            ready: list[Ready] = []
            for index, verdict in verdicts:
                this = ref if index == ref.index else self._held.pop(index, None)
                if this is None:
                    continue
                if verdict.usable and this is ref and changed:
                    ready.append((self.same_inputs_as_before(ref), OutputReason.INPUT_CHANGED))
                elif verdict.usable:
                    ready += _first(self.grouper.add(this, now))
                else:
                    ready += self.unusable(this, verdict)
            return ready
        if changed:
            # New content under a name already denoised: a new output version, same neighbours.
            log.warning("%s changed on disk since it was denoised: denoising it again", path.name)
            return [(self.same_inputs_as_before(ref), OutputReason.INPUT_CHANGED)]
        return _first(self.grouper.add(ref, now))

    def unusable(self, ref: SliceRef, verdict: Verdict) -> list[Ready]:
        """Record a slice that must not serve as a neighbour; the units that write it (a copy, or
        alone) and those its neighbours can now do without it."""
        row = self.store.get_slice(self.dataset_id, str(ref.path))
        label = verdict.label or ""
        if row is not None:
            self.store.set_slice_state(row.id, SliceState.UNUSABLE, reason=label)
        self.state.unusable += 1
        self.state.recent_unusable.append(f"{ref.name}: {label}")
        log.warning("%s is %s: not used as a neighbour", ref.name, label)
        self.on_event("unusable", {"name": ref.name, "index": ref.index, "reason": label})
        mode = WorkMode.SINGLE if verdict.has_signal else WorkMode.COPY
        return [*_first(self.grouper.add_unusable(ref)),
                (Work(ref, (), mode, unusable=verdict.reason), None)]  # fmt: skip

    def release(self, now: float | None) -> list[Ready]:
        """Held slices that waited long enough (``None``: all of them) go to the grouper as
        usable; returns the units that made ready."""
        ready: list[Ready] = []
        for index, verdict in self.judge.release(now):
            ref = self._held.pop(index, None)
            if ref is not None and verdict.usable:
                ready += _first(self.grouper.add(ref, now or 0.0))
        return ready

    def next_deadline(self) -> float | None:
        """When :meth:`release` next releases a held slice, or None."""
        return self.judge.next_deadline()

    def _pixels(self, path: Path) -> np.ndarray:
        image = self.profile.image
        return read_unhashed(path, image.databar, image.databar_rows).image.pixels

    def failed_on_arrival(self, path: Path, why: str) -> None:
        """A file the watcher gave up on (stable but undecodable)."""
        ref = self.parse(path)
        self.fail(path, ref if isinstance(ref, SliceRef) else None, why)

    def fail(self, path: Path, ref: SliceRef | None, why: str) -> None:
        """Record the slice at ``path`` as failed, with the reason."""
        st = path.stat() if path.exists() else None
        self.store.upsert_slice(
            self.dataset_id, path=str(path), name=path.name,
            index=ref.index if ref else -1, scan=ref.scan if ref else None,
            size=st.st_size if st else 0, mtime=st.st_mtime if st else 0.0, sha256="",
            state=SliceState.FAILED, reason=why,
        )  # fmt: skip
        self.state.failed += 1
        self.state.recent_failures.append(f"{path.name}: {why}")
        log.error("%s failed: %s", path.name, why)
        self.on_event("failed", {"name": path.name, "reason": why})

    def same_inputs_as_before(self, ref: SliceRef) -> Work:
        """A unit for ``ref`` with the neighbours its current output used (those still there)."""
        report = self.store.provenance(str(ref.path))
        current = next(o for o in report["outputs"] if o["is_current"])
        neighbours = []
        for item in current["inputs"]:
            path = Path(item["path"])
            if item["role"] != InputRole.CENTRE.value and path.exists():
                other = self.parse(path)
                if isinstance(other, SliceRef):
                    neighbours.append(other)
        mode = current["mode"] if len(neighbours) == len(current["inputs"]) - 1 else None
        if mode is None:
            mode = WorkMode.PAIR if neighbours else WorkMode.SINGLE
        return Work(centre=ref, neighbours=tuple(neighbours), mode=WorkMode(mode))

    def seed(self, mark_known: Callable[[Path], None]) -> None:
        """At start: the slices denoised before (and unchanged since) go to the grouper as done,
        and to ``mark_known`` (the watcher's), so they are not reported again. The three steps
        below, in turn; the daemon runs the middle one, the only one on the watch folder, in
        its watch worker (:meth:`PollWorker.start <nrrn_daemon.watch.worker.PollWorker.start>`)."""
        self.seed_from(still_there(self.seed_plan(), mark_known))

    def seed_plan(self) -> list[Seed]:
        """The slices the store holds as processed: denoised ones (with their mode) and, when
        grouping adjacent slices, unusable ones already written (mode ``None``). Store only."""
        plan: list[Seed] = [
            (row, mode) for row, mode in self.store.denoised_slices(self.dataset_id)
        ]
        if self.profile.grouping.mode == "adjacent":
            for row in self.store.slices_in_state(self.dataset_id, [SliceState.UNUSABLE]):
                if self.store.current_mode(row.id):
                    plan.append((row, None))
        return plan

    def seed_from(self, kept: list[Seed]) -> None:
        """The slices of :meth:`seed_plan` still on disk unchanged go to the grouper: as done
        (denoised), or as missing for their neighbours (unusable)."""
        for row, mode in kept:
            ref = self.parse(Path(row.path))
            if not isinstance(ref, SliceRef):
                continue
            if mode is None:
                self.grouper.add_unusable(ref)
            else:
                self.grouper.add_done(ref, mode)

    def take(self, path: Path, now: float) -> list[Ready] | None:
        """:meth:`complete`, with the slice's read beside the caller: ``None`` while it is late.

        The read (:meth:`SliceCache.load`) runs in a thread of its own and is waited for at
        most :data:`READ_WAIT_S`; a slice on a share that stopped answering is then not taken in
        yet, and the caller asks again for the same ``path`` at a later turn (it stays a
        complete file, unread: nothing is recorded, nothing lost). Without a cache (the
        synchronous design) it is :meth:`complete`.
        """
        if self.cache is None:
            return self.complete(path, now)
        job = self._reading
        if job is None or job.args != (path,):
            job = Background(self.cache.load, path, name="nrrn-read-slice", on_done=self._wake)
            self._reading = job
            job.wait(READ_WAIT_S)
        if not job.done:
            return None
        self._reading = None
        try:
            loaded = job.result()
        except InputError as exc:
            return self.complete(path, now, loaded=exc)
        return self.complete(path, now, loaded=loaded)

    def late_read(self) -> str | None:
        """Why a slice is not taken in yet: its read has not answered for ``answer_timeout_s``."""
        job = self._reading
        if job is None or job.done or job.age < self.profile.watch.answer_timeout_s:
            return None
        (path,) = job.args
        return (
            f"reading {path} not answering for {job.age:.0f} s (a hung network share?) — "
            "slices already read are still denoised; it is read once the share answers"
        )

    def _identify(self, path: Path, loaded: LoadedSlice | InputError | None = None) -> Found:
        """Size, mtime, sha256, shape and dtype of a complete slice file.

        With the cache: from the one read that loads the slice (usually done already by the
        watcher's decode check). Without: hash the file, then read its TIFF header.

        Raises
        ------
        InputError
            The file cannot be read, or is not a usable slice.
        """
        if isinstance(loaded, InputError):
            raise loaded
        if self.cache is not None:
            loaded = loaded or self.cache.load(path)
            kind = (loaded.image.full_shape, loaded.image.dtype)
            return Found(loaded.size, loaded.mtime, loaded.sha256 or "", kind, loaded.image.pixels)
        try:
            st = path.stat()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        sha = sha256_file(path)
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                kind = (tuple(page.shape), np.dtype(page.dtype))
        except Exception as exc:  # noqa: BLE001 - any header problem is the file's
            raise InputError(f"cannot read TIFF header: {exc}") from None
        return Found(st.st_size, st.st_mtime, sha, kind)


def _misfit(kind: Kind, expected: Kind) -> str:
    """Why a slice of another shape or dtype than the data set's is not used."""
    (shape, dtype), (want_shape, want_dtype) = kind, expected
    what, want = "×".join(map(str, shape)), "×".join(map(str, want_shape))
    if shape == want_shape:
        what, want = f"{what} {dtype}", f"{want} {want_dtype}"
    return (
        f"slice is {what} but this data set's slices are {want}; it is not denoised nor used as"
        " a neighbour"
    )


def still_there(plan: list[Seed], mark_known: Callable[[Path], None]) -> list[Seed]:
    """The slices of ``plan`` whose files are unchanged since recorded, each given to
    ``mark_known``. Only this step of :meth:`Arrivals.seed` looks at the watch folder."""
    kept = []
    for row, mode in plan:
        path = Path(row.path)
        try:
            st = path.stat()
        except OSError:
            continue
        if row.unchanged(st.st_size, st.st_mtime):
            kept.append((row, mode))
            mark_known(path)
    return kept
