"""The acquisition daemon: watch → slices → triplets → denoise → outputs → provenance.

:meth:`Daemon.work` is a plain loop (STYLE habit 5): signal handlers only call
:meth:`Daemon.request_stop`; each turn polls the watcher for complete files, records them, lets
the grouper say which slices can be denoised, processes one unit at a time and writes a heartbeat.
Every exit path says why; the watcher stops and the run is closed in ``finally``. ``burst=True``
processes what is in the folder (edges as pairs) and returns, which keeps tests deterministic.

Crash safety: outputs are written atomically and recorded in the store afterwards, so a kill at
any point leaves either no output file, or a complete file that the restarted daemon re-makes and
records (denoising is deterministic); our own leftover ``.*.part`` temp files in the output
folder are removed at start. The raw folder is only ever read.

Fine-tuning (not in burst mode) is run by a :class:`~nrrn_daemon.finetune_runner.FinetuneRunner`
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
from pathlib import Path
from typing import Any

import tifffile

from . import __version__
from .checkpoints import BASE_CHECKPOINT, Checkpoint, load_checkpoint
from .denoise import Denoiser
from .errors import Abandoned, InputError, NRRNError, OutputError
from .finetune_runner import FinetuneRunner
from .imageio import sha256_file
from .outputs import ModelInfo, OutputRecord, process
from .profiles import Profile
from .provenance import Store
from .slices import SliceRef, parse_slice
from .states import InputRole, ModelKind, OutputReason, SliceState
from .triplets import TripletGrouper, Work, WorkMode
from .watch import Watcher

log = logging.getLogger("nrrn_daemon")

HEARTBEAT_S = 5.0
"""Seconds between heartbeats written to the store."""
RETRY_S = 10.0
"""Seconds before a unit whose output could not be written is tried again."""
IDLE_WAIT_S = 0.1
"""Sleep of an idle loop turn (the watcher and the grouper's timeouts are checked each turn)."""


@dataclass
class LiveState:
    """Counters the daemon reports in its heartbeat and to a live view. Bounded in size."""

    started_at: float = field(default_factory=time.time)
    seen: int = 0
    denoised: int = 0
    failed: int = 0
    current: str | None = None
    last_output: str | None = None
    last_latency_s: float | None = None
    retries: int = 0
    folder_error: str | None = None
    recent_failures: deque[str] = field(default_factory=lambda: deque(maxlen=5))


def resolve_checkpoint(profile: Profile, store: Store, dataset_id: int) -> tuple[Path, Checkpoint]:
    """The checkpoint the profile asks for: ``base``, ``dataset`` (its promoted model) or a path."""
    choice = profile.model.checkpoint
    if choice == "base":
        path = BASE_CHECKPOINT
    elif choice == "dataset":
        current = store.current_model_path(dataset_id)
        path = Path(current) if current else BASE_CHECKPOINT
    else:
        path = Path(choice).expanduser()
    return path, load_checkpoint(path)


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
    """

    def __init__(
        self,
        profile: Profile,
        store: Store,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        finetune_trigger: Any = None,
    ) -> None:
        self.profile = profile
        self.store = store
        self.on_event = on_event or (lambda kind, data: None)
        self.watch_folder = Path(profile.watch.folder).expanduser().resolve()
        self.output_folder = Path(profile.output.folder).expanduser().resolve()
        self.state = LiveState()
        self._stop_reason: str | None = None
        self._wake = threading.Event()
        self._retry: deque[tuple[float, Work]] = deque()
        self._stale: deque[str] = deque()  # slices to re-denoise with a new model, newest first
        self._shape: tuple[int, ...] | None = None
        self._run_id: int | None = None
        self.dataset_name = str(self.watch_folder)
        self.dataset_id = store.ensure_dataset(
            name=self.dataset_name,
            watch_folder=str(self.watch_folder),
            profile_name=profile.name,
        )
        self.finetuning = FinetuneRunner(
            profile, store, self.dataset_id, self.dataset_name,
            trigger=finetune_trigger, on_event=self.on_event,
        )  # fmt: skip
        ckpt_path, ckpt = resolve_checkpoint(profile, store, self.dataset_id)
        self.denoiser = Denoiser(
            ckpt,
            device=profile.model.device,
            tile=profile.model.tile,
            tile_batch=profile.model.tile_batch,
        )
        model_id = store.ensure_model(
            sha256=ckpt.content_sha256,
            path=str(ckpt_path),
            label=ckpt.summary.get("label")
            or f"{'base' if ckpt_path == BASE_CHECKPOINT else 'model'}-{ckpt.short_sha}",
            kind=ModelKind.BASE if ckpt_path == BASE_CHECKPOINT else ModelKind.FINETUNED,
            config=ckpt.config.to_dict(),
            parent_sha256=ckpt.summary.get("parent_sha256"),
            dataset_id=None if ckpt_path == BASE_CHECKPOINT else self.dataset_id,
        )
        self.model = ModelInfo(
            label=store.model_label(model_id),
            sha256=ckpt.content_sha256,
            path=str(ckpt_path),
            store_id=model_id,
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
        )

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
        run_id = self._run_id = self.store.start_run(
            profile_name=self.profile.name,
            profile_json=self.profile.model_dump_json(),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            device=self.denoiser.device,
        )
        if self.denoiser.cpu_fallback:
            log.warning(
                "no CUDA GPU available: denoising on the CPU (%s), which is much slower",
                self.denoiser.device_name,
            )
        log.info(
            "watching %s (%s observer), writing to %s, model %s on %s",
            self.watch_folder,
            self.profile.watch.observer,
            self.output_folder,
            self.model.label,
            self.denoiser.device,
        )
        reason = "crashed"
        last_beat = 0.0
        try:
            self.watcher.check_folder()  # before anything is created or scheduled
            self._recover()
            if not burst:
                self.finetuning.start()
            self.watcher.start()
            while self._stop_reason is None:
                now = time.time()
                busy = self._turn(now)
                if not burst and self.finetuning.turn(now, self.model.path):
                    self._sync_model()
                if now - last_beat >= HEARTBEAT_S:
                    if not burst:
                        self._sync_model()
                    self._heartbeat(run_id)
                    last_beat = now
                if burst and not busy and self.watcher.idle and not self._retry:
                    for item in self.grouper.flush():
                        self._run_unit(item)
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
            self.watcher.stop()
            self.finetuning.stop()
            self._heartbeat(run_id)
            self.store.end_run(run_id, reason)
            log.info("stopped: %s", reason)
        return reason

    def _turn(self, now: float) -> bool:
        """One turn: new files, timeouts, one unit of work. True when something was done."""
        result = self.watcher.poll(now)
        self.state.folder_error = result.folder_error
        for path in result.complete:
            try:
                self._slice_complete(path, now)
            except (OSError, InputError) as exc:  # gone or unreadable since it was found complete
                if path.exists():
                    self._fail(path, None, f"cannot read it: {exc}")
                else:
                    log.warning("%s disappeared before it could be read; skipped", path.name)
        for path, why in result.failed:
            self._slice_failed_on_arrival(path, why)
        works = self.grouper.tick(now)
        while self._retry and self._retry[0][0] <= now:
            works.append(self._retry.popleft()[1])
        for item in works:
            if self._stop_reason is not None:
                break
            self._run_unit(item)
        busy = bool(result.complete or result.failed or works)
        if not busy and self._stale and self._stop_reason is None:
            # Live slices first: one older output is re-made per idle turn.
            self._redenoise(Path(self._stale.popleft()))
            busy = True
        return busy

    def _redenoise(self, path: Path) -> None:
        """Make a new output version of ``path`` with the model now in service."""
        ref = parse_slice(path, self.watch_folder, self.profile.watch, self.profile.grouping.mode)
        if not isinstance(ref, SliceRef) or not path.exists():
            return
        self._run_unit(self._same_inputs_as_before(ref), OutputReason.NEW_MODEL)

    # -- arrivals --------------------------------------------------------------------------
    def _slice_complete(self, path: Path, now: float) -> None:
        ref = parse_slice(path, self.watch_folder, self.profile.watch, self.profile.grouping.mode)
        if ref is None:  # not a slice of ours (the glob does not match)
            return
        if not isinstance(ref, SliceRef):
            self._record_rejected(path, str(ref))
            return
        st = path.stat()
        known = self.store.get_slice(self.dataset_id, str(path))
        sha = sha256_file(path)
        if known is not None and known.state == SliceState.DENOISED and known.sha256 == sha:
            # A repeat of a slice already processed (same content): not re-done.
            fallback = "repeat" if self.profile.grouping.mode == "repeat-scans" else "triplet"
            self.grouper.add_done(ref, self.store.current_mode(known.id) or fallback)
            return
        changed = known is not None and known.state == SliceState.DENOISED
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.pages[0].shape)
        except Exception as exc:  # noqa: BLE001 - any header problem is the file's
            self._fail(path, ref, f"cannot read TIFF header: {exc}")
            return
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            self._fail(
                path,
                ref,
                f"slice is {'×'.join(map(str, shape))} but this data set's slices are "
                f"{'×'.join(map(str, self._shape))}; it is not denoised nor used as a neighbour",
            )
            return
        self.store.upsert_slice(
            self.dataset_id,
            path=str(path),
            name=path.name,
            index=ref.index,
            scan=ref.scan,
            size=st.st_size,
            mtime=st.st_mtime,
            sha256=sha,
            state=SliceState.READY,
            ready_at=now,
        )
        self.state.seen += 1
        self.on_event("ready", {"name": path.name, "index": ref.index})
        if changed:
            # New content under a name already denoised: a new output version, same neighbours.
            log.warning("%s changed on disk since it was denoised: denoising it again", path.name)
            self._run_unit(self._same_inputs_as_before(ref), OutputReason.INPUT_CHANGED)
            return
        for item in self.grouper.add(ref, now):
            self._run_unit(item)

    def _same_inputs_as_before(self, ref: SliceRef) -> Work:
        """A unit for ``ref`` with the neighbours its current output used (those still there)."""
        report = self.store.provenance(str(ref.path))
        current = next(o for o in report["outputs"] if o["is_current"])
        neighbours = []
        for item in current["inputs"]:
            path = Path(item["path"])
            if item["role"] != InputRole.CENTRE.value and path.exists():
                other = parse_slice(
                    path, self.watch_folder, self.profile.watch, self.profile.grouping.mode
                )
                if isinstance(other, SliceRef):
                    neighbours.append(other)
        mode = current["mode"] if len(neighbours) == len(current["inputs"]) - 1 else None
        if mode is None:
            mode = WorkMode.PAIR if neighbours else WorkMode.SINGLE
        return Work(centre=ref, neighbours=tuple(neighbours), mode=WorkMode(mode))

    def _slice_failed_on_arrival(self, path: Path, why: str) -> None:
        ref = parse_slice(path, self.watch_folder, self.profile.watch, self.profile.grouping.mode)
        self._fail(path, ref if isinstance(ref, SliceRef) else None, why)

    def _record_rejected(self, path: Path, why: str) -> None:
        log.warning("ignoring %s: %s", path.name, why)
        self._fail(path, None, why)

    def _fail(self, path: Path, ref: SliceRef | None, why: str) -> None:
        st = path.stat() if path.exists() else None
        self.store.upsert_slice(
            self.dataset_id,
            path=str(path),
            name=path.name,
            index=ref.index if ref else -1,
            scan=ref.scan if ref else None,
            size=st.st_size if st else 0,
            mtime=st.st_mtime if st else 0.0,
            sha256="",
            state=SliceState.FAILED,
            reason=why,
        )
        self.state.failed += 1
        self.state.recent_failures.append(f"{path.name}: {why}")
        log.error("%s failed: %s", path.name, why)
        self.on_event("failed", {"name": path.name, "reason": why})

    # -- units -----------------------------------------------------------------------------
    def _run_unit(self, item: Work, reason: OutputReason | None = None) -> None:
        centre = item.centre
        self.state.current = centre.name
        name = self.profile.output_name(centre.name, centre.index)
        try:
            with self.finetuning.live_first():
                record = process(
                    item,
                    denoiser=self.denoiser,
                    model=self.model,
                    output_folder=self.output_folder,
                    output_name=name,
                    databar=self.profile.image.databar,
                    databar_rows=self.profile.image.databar_rows,
                    should_stop=lambda: self._stop_reason is not None,
                )
        except OutputError as exc:
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
            return
        except InputError as exc:
            self._fail(centre.path, centre, str(exc))
            return
        except Abandoned:
            # Stopping: the slice stays ready (no output written); the next start redoes it.
            log.info("%s abandoned to stop quickly; it is denoised at the next start", centre.name)
            return
        finally:
            self.state.current = None
        if reason is None:
            reason = OutputReason.REDO_AS_TRIPLET if item.redo else OutputReason.FIRST
        self._record(item, record, reason)

    def _record(self, item: Work, record: OutputRecord, reason: OutputReason) -> None:
        refs = [item.centre, *item.neighbours]
        rows = {r.path: self.store.get_slice(self.dataset_id, str(r.path)) for r in refs}
        roles = _roles(item)
        centre_row = rows[item.centre.path]
        assert centre_row is not None, "a slice reached the grouper without a store row"
        inputs = []
        for ref, role in zip(refs, roles, strict=True):
            row = rows[ref.path]
            if row is not None:
                inputs.append((row.id, role, row.sha256))
        latency = record.finished_at - (centre_row.ready_at or record.started_at)
        self.store.record_output(
            dataset_id=self.dataset_id,
            centre_slice_id=centre_row.id,
            inputs=inputs,
            path=str(record.path),
            sha256=record.sha256,
            mode=record.mode,
            model_id=self.model.store_id,
            settings=record.settings,
            device=record.device,
            ready_at=centre_row.ready_at or record.started_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            read_s=record.read_s,
            model_s=record.model_s,
            write_s=record.write_s,
            reason=reason,
            run_id=self._run_id,
        )
        for ref, role in zip(refs, roles, strict=True):
            row = rows[ref.path]
            if role == InputRole.SCAN and row is not None and row.state == SliceState.READY:
                # A repeat scan is consumed by its slice's output: it waits for nothing more.
                self.store.set_slice_state(
                    row.id, SliceState.DENOISED, reason=f"scan used for {item.centre.name}"
                )
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
        if self.profile.model.checkpoint != "dataset":
            return
        current = self.store.current_model_path(self.dataset_id) or str(BASE_CHECKPOINT)
        if current == self.model.path:
            return
        try:
            ckpt = load_checkpoint(Path(current))
        except NRRNError as exc:
            log.error("cannot switch to the data set's current model: %s", exc)
            return
        self.denoiser = Denoiser(
            ckpt, device=self.profile.model.device, tile=self.profile.model.tile,
            tile_batch=self.profile.model.tile_batch,
        )  # fmt: skip
        model_id = self.store.current_model_id(self.dataset_id)
        if model_id is None:  # rolled back to the base checkpoint
            model_id = self.store.ensure_model(
                sha256=ckpt.content_sha256, path=current, label=f"base-{ckpt.short_sha}",
                kind=ModelKind.BASE, config=ckpt.config.to_dict(),
            )  # fmt: skip
        self.model = ModelInfo(
            label=self.store.model_label(model_id), sha256=ckpt.content_sha256, path=current,
            store_id=model_id,
        )  # fmt: skip
        self._stale = deque(self.store.stale_outputs(self.dataset_id, model_id))
        log.info(
            "now denoising with model %s; re-denoising %d earlier slices in the background",
            self.model.label,
            len(self._stale),
        )
        self.on_event("model", {"label": self.model.label})

    # -- start-up and heartbeat ------------------------------------------------------------
    def _recover(self) -> None:
        """Remove our own half-written temp files; seed the grouper from the store."""
        try:
            self.output_folder.mkdir(parents=True, exist_ok=True)
            for leftover in self.output_folder.glob(".*.part"):
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            # Not fatal: every write is retried and says why; the raw data is safe meanwhile.
            log.error("output folder %s is not usable: %s", self.output_folder, exc)
        for row, mode in self.store.denoised_slices(self.dataset_id):
            path = Path(row.path)
            if path.exists() and _unchanged(path, row):
                ref = parse_slice(
                    path, self.watch_folder, self.profile.watch, self.profile.grouping.mode
                )
                if isinstance(ref, SliceRef):
                    self.grouper.add_done(ref, mode)
                    self.watcher.mark_known(path)

    def _heartbeat(self, run_id: int) -> None:
        s = self.state
        self.store.heartbeat(
            run_id,
            {
                "seen": s.seen,
                "denoised": s.denoised,
                "failed": s.failed,
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
            },
        )
        self.on_event("heartbeat", {"state": s})


def _roles(item: Work) -> list[str]:
    """Centre first, then each neighbour: a scan of the same index, or the previous / next slice."""
    roles = [InputRole.CENTRE]
    for ref in item.neighbours:
        if ref.index == item.centre.index:
            roles.append(InputRole.SCAN)
        else:
            roles.append(InputRole.PREV if ref.index < item.centre.index else InputRole.NEXT)
    return roles


def _unchanged(path: Path, row: Any) -> bool:
    st = path.stat()
    return st.st_size == row.size and abs(st.st_mtime - row.mtime) < 1e-3
