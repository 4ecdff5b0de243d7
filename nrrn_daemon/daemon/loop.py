"""The acquisition daemon: watch → slices → triplets → denoise → outputs → provenance.

:meth:`Daemon.work` is a plain loop (STYLE habit 5): signal handlers only call
:meth:`Daemon.request_stop`; each turn polls the watcher for complete files, records them, lets
the grouper say which slices can be denoised, submits those units to the
:class:`~nrrn_daemon.daemon.pipeline.Pipeline` (reader, model and writer threads, so the host's I/O
overlaps with the model), records the units it finished and writes a heartbeat. The loop is the
store's one writer. Every exit path says why; the watcher stops, the pipeline finishes its
writes and the run is closed in ``finally``. ``burst=True`` processes what is in the folder
(edges as pairs) and returns, which keeps tests deterministic.

Each slice is read once (:class:`~nrrn_daemon.daemon.slicecache.SliceCache`): when the loop takes a
complete file in, one read gives its sha256 and its pixels, and the units that use it (as the
previous slice, the centre, the next slice) take it from memory. Files are taken in only while
fewer than :data:`~nrrn_daemon.daemon.pipeline.MAX_AHEAD` units wait for the model (the others wait,
as paths, unread), so the cache still holds the slices the next units need when they run, and
memory stays flat. ``Daemon(overlap=False)`` is the synchronous design, kept to compare.

Crash safety: outputs are written atomically and recorded in the store afterwards, so a kill at
any point leaves either no output file, or a complete file that the restarted daemon re-makes and
records (denoising is deterministic); our own leftover ``.*.part`` temp files in the output
folder are removed at start. The raw folder is only ever read.

Fine-tuning (not in burst mode) is run by a :class:`~nrrn_daemon.finetune.runner.FinetuneRunner`
in a subprocess while the loop keeps denoising; with ``model.checkpoint = "dataset"`` the loop
switches to the data set's current model when a fine-tune ends and at every heartbeat (so
``models promote|rollback`` by hand is picked up too).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from nrrn_daemon import __version__
from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.daemon.arrivals import Arrivals, still_there
from nrrn_daemon.daemon.live_volume import LiveZarr
from nrrn_daemon.daemon.pipeline import CACHE_SLICES, MAX_AHEAD, Done, Job, Pipeline
from nrrn_daemon.daemon.recording import record_unit
from nrrn_daemon.daemon.serving import Serving
from nrrn_daemon.daemon.slicecache import SliceCache, read_unhashed
from nrrn_daemon.daemon.units import OutputRecord
from nrrn_daemon.errors import Abandoned, InputError, NRRNError, OutputError
from nrrn_daemon.files import resolve_soon
from nrrn_daemon.finetune.runner import FinetuneRunner
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.registry import ModelInfo
from nrrn_daemon.slices import SliceRef
from nrrn_daemon.states import OutputReason, SliceState
from nrrn_daemon.store.store import Store
from nrrn_daemon.triplets import TripletGrouper, Work
from nrrn_daemon.watch.watcher import Watcher
from nrrn_daemon.watch.worker import PollWorker

log = logging.getLogger("nrrn_daemon")

HEARTBEAT_S = 5.0
"""Seconds between heartbeats written to the store."""
RETRY_S = 10.0
"""Seconds before a unit whose output could not be written is tried again."""
IDLE_WAIT_S = 0.1
"""Sleep of an idle loop turn (the watcher and the grouper's timeouts are checked each turn)."""
STOP_TIMEOUT_S = 30.0
"""At stop, how long each pipeline stage may take to finish (the writer: its last outputs)."""


@dataclass
class LiveState:
    """Counters the daemon reports in its heartbeat and to a live view. Bounded in size."""

    started_at: float = field(default_factory=time.time)
    seen: int = 0
    denoised: int = 0
    failed: int = 0
    unusable: int = 0
    """Slices judged unusable as neighbours (:mod:`nrrn_daemon.frames`) by this run."""
    current: str | None = None
    last_output: str | None = None
    last_latency_s: float | None = None
    retries: int = 0
    folder_error: str | None = None
    recent_failures: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    recent_unusable: deque[str] = field(default_factory=lambda: deque(maxlen=5))


class Daemon:
    """Watches one data set's folder and denoises every slice as it is acquired.

    Parameters
    ----------
    profile
        The validated profile (folders already overridden from the command line).
    store
        The provenance store, opened for writing (this daemon is its one writer).
    on_event
        Optional callback ``(kind, data)`` for a live view ("output", "failed", "heartbeat"...).
    finetune_trigger
        An APScheduler trigger replacing the profile's ``finetune.cron`` (tests).
    overlap
        True: read, denoise and write in three threads, each slice read once. False: the
        synchronous design (each unit read, denoised and written in turn by the loop, inputs read
        per unit), kept to measure against (``benchmarks/daemon_overhead.py``).
    channel
        The detector channel this daemon handles (``profile.watch.glob`` is then that channel's
        glob; see :class:`~nrrn_daemon.daemon.channels.Channels`): its data set is named
        ``"<watch folder> [<channel>]"``. None: the folder is one data set, named by the folder.
    wake, state
        The event that wakes the loop and the live counters (shared by the channels of one
        loop); new ones when not given.
    """

    def __init__(
        self,
        profile: Profile,
        store: Store,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        finetune_trigger: Any = None,
        overlap: bool = True,
        channel: str | None = None,
        wake: threading.Event | None = None,
        state: LiveState | None = None,
    ) -> None:
        self.profile = profile
        self.channel = channel
        self.overlap = overlap
        self.store = store
        self.on_event = on_event or (lambda kind, data: None)
        # a share hung at start must not hang the start: resolved within the answer deadline
        self.watch_folder = resolve_soon(profile.watch.folder, profile.watch.answer_timeout_s)
        self.output_folder = Path(profile.output.folder).expanduser().resolve()
        self.state = state or LiveState()
        self._stop_reason: str | None = None
        self._wake = wake or threading.Event()
        self._last_beat = 0.0
        self._retry: deque[tuple[float, Work]] = deque()
        self._stale: deque[str] = deque()  # slices to re-denoise with a new model, newest first
        self._arrived: deque[Path] = deque()  # complete files not taken in yet (paths only)
        self._run_id: int | None = None
        self.dataset_name = dataset_name(self.watch_folder, channel)
        self.dataset_id = store.ensure_dataset(
            name=self.dataset_name,
            watch_folder=str(self.watch_folder),
            profile_name=profile.name,
        )
        self.finetuning = FinetuneRunner(
            profile, store, self.dataset_id, self.dataset_name,
            trigger=finetune_trigger, on_event=self.on_event,
        )  # fmt: skip
        self.serving = Serving(profile, store, self.dataset_id)
        zarr = profile.output.zarr_path
        label = self.watch_folder.name + (f" [{channel}]" if channel else "")
        self.live_zarr = LiveZarr(zarr, name=label) if zarr else None
        image = profile.image
        self.cache = SliceCache(CACHE_SLICES if overlap else 0, image.databar, image.databar_rows)
        self.pipeline = Pipeline(
            load=self.cache.load
            if overlap
            else partial(read_unhashed, databar=image.databar, databar_rows=image.databar_rows),
            serving=self.serving.get,
            output_folder=self.output_folder,
            databar=image.databar,
            databar_rows=image.databar_rows,
            should_stop=lambda: self._stop_reason is not None,
            live=self.finetuning.live_first,
            wake=self._wake.set,
            on_current=lambda name: setattr(self.state, "current", name),
            threaded=overlap,
            after_write=self.live_zarr.write if self.live_zarr else None,
        )
        g = profile.grouping
        self.grouper = TripletGrouper(
            mode=g.mode,
            neighbour_wait_s=g.neighbour_wait_s,
            redo_as_triplet=g.redo_as_triplet,
            scans_per_slice=g.scans_per_slice,
        )
        w = profile.watch
        self.watcher = Watcher(
            self.watch_folder,
            w.glob,
            recursive=w.recursive,
            observer=w.observer,
            poll_interval_s=w.poll_interval_s,
            settle_s=w.settle_s,
            rescan_interval_s=w.rescan_interval_s,
            decode_check=self.cache.check if overlap else None,
            follow_links=w.follow_links,
        )
        self.watch = PollWorker(self.watcher, w.answer_timeout_s, on_done=self._wake.set)
        self.arrivals = Arrivals(
            profile=profile, store=store, dataset_id=self.dataset_id,
            watch_folder=self.watch_folder, grouper=self.grouper,
            cache=self.cache if overlap else None, state=self.state, on_event=self.on_event,
            wake=self._wake.set,
        )  # fmt: skip

    # -- control ---------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after (or by abandoning) the current unit. Signal-safe."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT only set the stop flag (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))

    # -- the loop --------------------------------------------------------------------------
    def work(self, burst: bool = False) -> str:
        """Run until stopped (or, with ``burst``, until the folder's slices are done).

        Returns
        -------
        str
            Why the loop ended ("SIGTERM", "burst complete"...).
        """
        run_id = self.start_run()
        reason = "crashed"
        try:
            self.open(run_id, burst)
            while self._stop_reason is None:
                busy, done = self.step(time.time(), burst)
                if done:
                    self.request_stop("burst complete")
                elif not busy:
                    self._wake.wait(IDLE_WAIT_S)
            reason = self._stop_reason or "stopped"
        except NRRNError as exc:
            reason = f"error: {exc}"
            raise
        except BaseException as exc:
            reason = f"crashed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self.close()
            self._heartbeat(run_id)
            self.store.end_run(run_id, reason)
            log.info("stopped: %s", reason)
        return reason

    # The phases of :meth:`work`, also run one channel after the other by
    # :class:`~nrrn_daemon.daemon.channels.Channels` (several detectors, one loop, one writer).
    def start_run(self) -> int:
        """Record the start of a daemon run in the store; returns its id."""
        return self.store.start_run(
            profile_name=self.profile.name,
            profile_json=self.profile.model_dump_json(),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            device=self.denoiser.device,
        )

    def open(self, run_id: int, burst: bool) -> None:
        """Check the folder, recover, warm up, start the watcher, pipeline (and fine-tunes)."""
        self._run_id = run_id
        self._last_beat = 0.0
        if self.denoiser.cpu_fallback:
            log.warning(
                "no CUDA GPU available: denoising on the CPU (%s), which is much slower",
                self.denoiser.device_name,
            )
        log.info(
            "watching %s%s (%s observer), writing to %s, model %s on %s",
            self.watch_folder,
            f" ({self.profile.watch.glob})" if self.channel else "",
            self.profile.watch.observer,
            self.output_folder,
            self.model.label,
            self.denoiser.device,
        )
        self.watch.check_folder()  # before anything is created; a hung share is only logged
        self._recover()
        seeds = self.arrivals.seed_plan()
        self.denoiser.warm_up()  # compiles now, so that no slice waits for it
        if not burst:
            self.finetuning.start()
        # The watch worker starts the watcher (and checks the known slices on disk): only its
        # thread touches the watch folder, so a share hung at start does not hang the loop.
        self.watch.start(
            prepare=partial(still_there, seeds, self.watcher.mark_known),
            then=self.arrivals.seed_from,
        )
        self.pipeline.start()

    def step(self, now: float, burst: bool, *, heartbeat: bool = True) -> tuple[bool, bool]:
        """One turn of the loop; returns (busy, done): ``done`` only in burst mode, once the
        folder's slices are all denoised (the edges flushed)."""
        self._wake.clear()  # set again by a stop, a finished unit, room in the pipeline
        busy = self._turn(now)
        if not burst and self.finetuning.turn(now, self.model.path):
            self._sync_model()
        if now - self._last_beat >= HEARTBEAT_S:
            if not burst:
                self._sync_model()
            if heartbeat and self._run_id is not None:
                self._heartbeat(self._run_id)
            self._last_beat = now
        settled = not (busy or self._retry or self._arrived) and self.pipeline.idle
        if burst and settled and self.watch.idle:
            released = self.arrivals.release(None)  # held slices: usable after all
            for item, reason in released:
                self._submit(item, reason)
            flushed = self.grouper.flush()  # the edges, with what they have
            for item in flushed:
                self._submit(item)
            return True, not (flushed or released)
        return busy, False

    def close(self) -> None:
        """Stop the watcher and fine-tunes; finish and record the outputs being written."""
        self.watch.stop()
        self.finetuning.stop()
        for done in self.pipeline.close(STOP_TIMEOUT_S):  # outputs written are recorded
            self._finish(done, closing=True)

    def _turn(self, now: float) -> bool:
        """One turn: new files, timeouts, submit units, record finished ones. True if busy."""
        result = self.watch.poll(now)  # in the watch worker: waits ≤ 0.5 s on a hung share
        self.state.folder_error = result.folder_error or self.arrivals.late_read()
        self._arrived.extend(result.complete)
        for path, why in result.failed:
            self.arrivals.failed_on_arrival(path, why)
        busy = bool(result.failed)
        # Complete files are taken in (read, hashed, grouped) only while the model has room, so
        # that the slices read stay in the cache until the units that use them have run.
        while self._arrived and self.pipeline.ahead < MAX_AHEAD:
            path = self._arrived[0]
            try:
                ready = self.arrivals.take(path, now)  # its read waited ≤ 0.5 s on a hung share
            except (OSError, InputError) as exc:  # gone or unreadable since found complete
                self._arrived.popleft()
                busy = True
                if path.exists():
                    self.arrivals.fail(path, None, f"cannot read it: {exc}")
                else:
                    log.warning("%s disappeared before it could be read; skipped", path.name)
                continue
            if ready is None:  # its read is late: taken in at a later turn (the read wakes us)
                break
            self._arrived.popleft()
            busy = True
            for item, reason in ready:
                self._submit(item, reason)
        released = self.arrivals.release(now)  # held slices whose other neighbour never came
        for item, reason in released:
            self._submit(item, reason)
        works = self.grouper.tick(now)
        while self._retry and self._retry[0][0] <= now:
            works.append(self._retry.popleft()[1])
        for item in works:
            if self._stop_reason is not None:
                break
            self._submit(item)
        finished = self.pipeline.collect()
        for done in finished:
            self._finish(done)
        busy = busy or bool(works or finished or released)
        if not busy and self._stale and self._stop_reason is None and self.pipeline.idle:
            # Live slices first: one older output is re-made when nothing else is under way.
            self._redenoise(Path(self._stale.popleft()))
            busy = True
        return busy

    def _redenoise(self, path: Path) -> None:
        """Make a new output version of ``path`` with the model now in service."""
        ref = self.arrivals.parse(path)
        if not isinstance(ref, SliceRef) or not path.exists():
            return
        self._submit(self.arrivals.same_inputs_as_before(ref), OutputReason.NEW_MODEL)

    # -- units -----------------------------------------------------------------------------
    def _submit(self, item: Work, reason: OutputReason | None = None) -> None:
        """Hand a unit to the pipeline (overlapping: it runs beside the loop; else now)."""
        if reason is None:
            reason = OutputReason.REDO_AS_TRIPLET if item.redo else OutputReason.FIRST
        name = self.profile.output_name(item.centre.name, item.centre.index)
        self.pipeline.submit(Job(item, reason, name))

    def _finish(self, done: Done, *, closing: bool = False) -> None:
        """Record a finished unit, or act on what ended it (retry, fail, leave for next start)."""
        item, exc, centre = done.job.work, done.error, done.job.work.centre
        if exc is None:
            assert done.record is not None
            self._record(item, done.record, done.job.reason)
        elif isinstance(exc, OutputError):
            # The slice stays ready; the unit is tried again later.
            self.state.retries += 1
            row = self.store.get_slice(self.dataset_id, str(centre.path))
            if row is not None:
                self.store.set_slice_state(
                    row.id, SliceState.READY, reason=f"output not written: {exc}"
                )
            log.error("%s — will retry in %.0f s", exc, RETRY_S)
            self.on_event("retry", {"name": centre.name, "reason": str(exc)})
            self._retry.append((time.time() + RETRY_S, item))
        elif isinstance(exc, InputError):
            self.arrivals.fail(centre.path, centre, str(exc))
        elif isinstance(exc, Abandoned):
            # Stopping: the slice stays ready (no output written); the next start redoes it.
            log.info("%s abandoned to stop quickly; it is denoised at the next start", centre.name)
        elif closing:  # already on the way out: say it, and record the others
            log.error("%s not denoised: %s: %s", centre.name, type(exc).__name__, exc)
        else:
            raise exc

    def _record(self, item: Work, record: OutputRecord, reason: OutputReason) -> None:
        model = record.model or self.model
        latency = record_unit(
            self.store, dataset_id=self.dataset_id, run_id=self._run_id, work=item,
            record=record, reason=reason, model=model,
        )  # fmt: skip
        if model.store_id != self.model.store_id:  # made by the model in service before a switch
            self._stale.appendleft(str(item.centre.path))
        self.state.denoised += 1
        self.state.last_output = record.path.name
        self.state.last_latency_s = latency
        log.info(
            "%s denoised (%s, model %.2f s, latency %.1f s) → %s",
            item.centre.name,
            item.mode.value,
            record.model_s,
            latency,
            record.path,
        )
        self.on_event(
            "output", {"name": item.centre.name, "mode": item.mode.value, "latency_s": latency}
        )

    def _sync_model(self) -> None:
        """With ``model.checkpoint = "dataset"``, denoise with the data set's current model."""
        current = self.serving.current_path()
        if current is None or current == self.model.path:
            return
        try:
            self.serving.switch(current)
        except NRRNError as exc:
            log.error("cannot switch to the data set's current model: %s", exc)
            return
        self._stale = deque(self.store.stale_outputs(self.dataset_id, self.model.store_id))
        log.info(
            "now denoising with model %s; re-denoising %d earlier slices in the background",
            self.model.label,
            len(self._stale),
        )
        self.on_event("model", {"label": self.model.label})

    @property
    def denoiser(self) -> Denoiser:
        """The Denoiser in service."""
        return self.serving.denoiser

    @property
    def model(self) -> ModelInfo:
        """The model in service, as provenance names it."""
        return self.serving.model

    # -- start-up and heartbeat ------------------------------------------------------------
    def _recover(self) -> None:
        """Remove our own half-written temp files."""
        try:
            self.output_folder.mkdir(parents=True, exist_ok=True)
            for leftover in self.output_folder.glob(".*.part"):
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            # Not fatal: every write is retried and says why; the raw data is safe meanwhile.
            log.error("output folder %s is not usable: %s", self.output_folder, exc)

    def _heartbeat(self, run_id: int) -> None:
        self.store.heartbeat(run_id, self.heartbeat_state())
        self.on_event("heartbeat", {"state": self.state})

    def heartbeat_state(self) -> dict[str, Any]:
        """The live counters the heartbeat records (read back by ``status``)."""
        s = self.state
        return {
            "seen": s.seen,
            "denoised": s.denoised,
            "failed": s.failed,
            "unusable": s.unusable,
            "current": s.current,
            "last_output": s.last_output,
            "last_latency_s": s.last_latency_s,
            "retries_pending": len(self._retry),
            "redenoise_pending": len(self._stale),
            "folder_error": s.folder_error,
            "device": self.denoiser.device,
            "device_name": self.denoiser.device_name,
            "precision": self.denoiser.precision,
            "cpu_fallback": self.denoiser.cpu_fallback,
            "model": self.model.label,
            "next_finetune": self.finetuning.next_run(),
            "recent_failures": list(s.recent_failures),
            "recent_unusable": list(s.recent_unusable),
            "live_volume": _volume_state(self.live_zarr),
        }


def dataset_name(watch_folder: Path, channel: str | None) -> str:
    """The data set of a watch folder (one channel of it when ``channel`` is given)."""
    return str(watch_folder) if channel is None else f"{watch_folder} [{channel}]"


def _volume_state(live: LiveZarr | None) -> dict[str, Any] | None:
    if live is None:
        return None
    return {"path": str(live.path), "written": live.written, "errors": live.errors,
            "last_error": live.last_error}  # fmt: skip
