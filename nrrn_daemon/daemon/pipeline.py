"""Overlap the host's work with the model's: a reader, the model and a writer, one thread each.

Per 24-Mpx slice the host's share of a unit (read and decode, sha256, encode, write and fsync,
hash the output: tens of ms each) adds up to about what a GPU needs to denoise it; done in turn
with the model it would nearly double the time per slice. So each unit of work goes through three
stages, each in its own thread, joined by bounded queues::

    daemon loop ─submit─▶ reader ─(1)─▶ model ─(1)─▶ writer ─▶ done ─▶ daemon loop records it

* reader: :func:`~nrrn_daemon.daemon.units.gather` through the slice cache (a slice loaded when it
  arrived is not read again) while the model denoises the previous unit;
* model: :func:`~nrrn_daemon.daemon.units.run_model` with the model in service when the unit starts;
* writer: :func:`~nrrn_daemon.daemon.units.write_output` (temp file, fsync, rename, sha256) while
  the model denoises the next unit.

The daemon's loop stays the store's one writer: it submits units and records the finished ones
(:meth:`Pipeline.collect`), so an output is recorded only once its file is complete. A unit that
fails in a stage passes through the later ones untouched, so results come back in the order the
units were submitted (a redo of a slice is never recorded before its first version).

Memory stays flat: at most one unit is read ahead of the model, and at most one denoised output
waits for the writer (a second one waits in the model's thread); units submitted but not read yet
hold no pixels, and the daemon takes no complete file in while :data:`MAX_AHEAD` units wait for
the model (:attr:`Pipeline.ahead`), so the slices it reads stay cached until their units run.

Stopping (:meth:`Pipeline.close`): the reader takes no more units; the model gives up the unit it
is denoising between two tile batches (:class:`~nrrn_daemon.errors.Abandoned`: nothing written,
the slice stays ready); the writer finishes the outputs already denoised (a fraction of a second
each) and hands them back to be recorded; units not started are dropped (their slices stay ready
and are redone at the next start). A kill at any moment leaves at most a ``.part`` temp file
(removed at the next start) and outputs written but not recorded, which the restart makes again.

``threaded=False`` runs the three steps in turn inside :meth:`Pipeline.submit`: the synchronous
design, kept to compare against (``benchmarks/daemon_overhead.py``) and as a reference in tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from nrrn_daemon.daemon.units import (
    Denoised,
    Inputs,
    Loader,
    OutputRecord,
    gather,
    run_model,
    write_output,
)
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.registry import ModelInfo
from nrrn_daemon.states import OutputReason
from nrrn_daemon.triplets import Work

log = logging.getLogger("nrrn_daemon")

MAX_AHEAD = 2
"""Units submitted and not yet taken by the model beyond which the daemon takes no complete file
in (one unit read ahead, one waiting to be read): the next files wait, as paths, unread."""
CACHE_SLICES = 6
"""Decoded slices the daemon keeps: the inputs of the unit being denoised, of the one read ahead
and of the next arrival's unit (5 slices in order), plus one."""
_POLL_S = 0.05
"""How often a waiting stage looks at the stop flag."""
IO_NICE = 10
"""How much lower the reader's and writer's scheduling priority is than the model's (Linux
threads have their own nice value): where the host's cores are busy they give way to the model,
and they have a whole unit's model time to do their part."""


@dataclass(frozen=True)
class Job:
    """One unit of work as submitted: what to denoise, why, and the output's file name."""

    work: Work
    reason: OutputReason
    output_name: str


@dataclass
class Done:
    """A finished job: its output record, or the error that ended it (in the stage it hit)."""

    job: Job
    record: OutputRecord | None = None
    error: BaseException | None = None


@dataclass
class _Item:
    """A job on its way through the stages."""

    job: Job
    inputs: Inputs | None = None
    denoised: Denoised | None = None
    error: BaseException | None = None


_END = object()
"""Put on the writer's queue by the model's thread when it exits."""


class Pipeline:
    """Runs units of work through reader, model and writer threads (see the module docstring).

    Parameters
    ----------
    load
        How the reader gets a slice (:meth:`SliceCache.load`).
    serving
        ``() -> (denoiser, model)``: the model in service, read when a unit starts denoising.
    output_folder, databar, databar_rows
        Where outputs go; how slices are split (recorded in the outputs' settings).
    should_stop
        The daemon's stop flag, checked by the model between tile batches.
    live
        ``() -> context manager`` around each unit's denoising (a running fine-tune pauses).
    wake
        Called when a unit is done or the model takes one (the daemon loop may act).
    on_current
        Called with the name of the slice being denoised, then with None.
    threaded
        False: run the three steps in turn inside :meth:`submit` (the synchronous design).
    after_write
        Called in the writer's thread with each unit's denoised slice once its output file is
        written (the live OME-Zarr volume, :class:`~nrrn_daemon.daemon.live_volume.LiveZarr`).
    """

    def __init__(
        self,
        *,
        load: Loader,
        serving: Callable[[], tuple[Denoiser, ModelInfo]],
        output_folder: Path,
        databar: str = "none",
        databar_rows: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
        live: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
        wake: Callable[[], None] = lambda: None,
        on_current: Callable[[str | None], None] = lambda name: None,
        threaded: bool = True,
        after_write: Callable[[Denoised], None] | None = None,
    ) -> None:
        self._load = load
        self._serving = serving
        self._output_folder = output_folder
        self._databar = databar
        self._databar_rows = databar_rows
        self._should_stop = should_stop
        self._live = live
        self._wake = wake
        self._on_current = on_current
        self._after_write = after_write
        self.threaded = threaded
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._todo: deque[Job] = deque()
        self._todo_ready = threading.Condition(self._lock)
        self._read_ahead = threading.Semaphore(1)  # one unit read and not yet denoising
        self._to_model: queue.Queue[_Item] = queue.Queue(maxsize=1)
        self._to_writer: queue.Queue[object] = queue.Queue(maxsize=1)
        self._done: deque[Done] = deque()
        self._submitted = self._taken = self._collected = 0
        self._threads: list[threading.Thread] = []
        self._inputs = self._outputs = 0
        self.peak_inputs = 0
        """Most units whose input slices were held at once (read ahead, or being denoised)."""
        self.peak_outputs = 0
        """Most denoised outputs held at once (being written or waiting for the writer)."""

    # -- the daemon loop's side ------------------------------------------------------------
    def start(self) -> None:
        """Start the stage threads (nothing to do when not threaded, or started already)."""
        if not self.threaded or any(thread.is_alive() for thread in self._threads):
            return
        self._stopping.clear()
        self._threads = []
        self._read_ahead = threading.Semaphore(1)
        self._to_model, self._to_writer = queue.Queue(maxsize=1), queue.Queue(maxsize=1)
        for name, target in (
            ("reader", self._reader),
            ("model", self._model),
            ("writer", self._writer),
        ):
            thread = threading.Thread(target=target, name=f"nrrn-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Job) -> None:
        """Queue a unit of work (threaded), or run it now (not threaded)."""
        with self._lock:
            self._submitted += 1
            if self.threaded:
                self._todo.append(job)
                self._todo_ready.notify()
                return
        item = self._read(job)
        with self._lock:
            self._taken += 1
        self._finish(self._write(self._compute(item)))

    def collect(self) -> list[Done]:
        """The units finished since the last call, in the order they were submitted.

        Raises
        ------
        RuntimeError
            A stage thread died (a bug: each stage hands every error on to the loop).
        """
        if not self._stopping.is_set():
            for thread in self._threads:
                if not thread.is_alive():
                    raise RuntimeError(f"pipeline thread {thread.name} died; see the log")
        with self._lock:
            done = list(self._done)
            self._done.clear()
            self._collected += len(done)
        return done

    @property
    def backlog(self) -> int:
        """Units submitted and not collected yet."""
        with self._lock:
            return self._submitted - self._collected

    @property
    def ahead(self) -> int:
        """Units submitted and not taken by the model yet."""
        with self._lock:
            return self._submitted - self._taken

    @property
    def idle(self) -> bool:
        """Nothing submitted is unfinished or uncollected."""
        return self.backlog == 0

    def close(self, timeout_s: float = 30.0) -> list[Done]:
        """Stop: abandon the unit being denoised, finish the writes, return what is done.

        Units not started are dropped (their slices stay ready). Safe to call twice, and
        before :meth:`start`.
        """
        self._stopping.set()
        with self._lock:
            self._todo_ready.notify_all()
            dropped, self._todo = len(self._todo), deque()
        for thread in self._threads:
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("%s did not stop within %.0f s; leaving it", thread.name, timeout_s)
        done = self.collect()
        with self._lock:
            self._collected = self._submitted  # dropped and lost units are not coming back
        if dropped:
            log.info("%d units not started; their slices are denoised at the next start", dropped)
        return done

    # -- the three steps -------------------------------------------------------------------
    def _read(self, job: Job) -> _Item:
        try:
            inputs = gather(job.work, self._load)
        except Exception as exc:  # noqa: BLE001 - handed to the daemon loop, which decides
            return _Item(job, error=exc)
        with self._lock:
            self._inputs += 1
            self.peak_inputs = max(self.peak_inputs, self._inputs)
        return _Item(job, inputs=inputs)

    def _compute(self, item: _Item) -> _Item:
        if item.error is not None or item.inputs is None:
            return item
        try:
            denoiser, model = self._serving()
            self._on_current(item.job.work.centre.name)
            with self._live():
                item.denoised = run_model(
                    item.inputs, denoiser, model, databar=self._databar,
                    databar_rows=self._databar_rows,
                    should_stop=lambda: self._stopping.is_set() or self._should_stop(),
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - Abandoned, out of memory...: the loop decides
            item.error = exc
        finally:
            self._on_current(None)
        item.inputs = None  # the denoised record keeps what the writer needs
        with self._lock:
            self._inputs -= 1
            if item.denoised is not None:
                self._outputs += 1
                self.peak_outputs = max(self.peak_outputs, self._outputs)
        return item

    def _write(self, item: _Item) -> Done:
        if item.error is not None or item.denoised is None:
            return Done(item.job, error=item.error)
        try:
            record = write_output(item.denoised, self._output_folder, item.job.output_name)
            if self._after_write is not None:  # the live volume: never fails the unit
                self._after_write(item.denoised)
            return Done(item.job, record=record)
        except Exception as exc:  # noqa: BLE001 - OutputError is retried; the loop decides
            return Done(item.job, error=exc)
        finally:
            with self._lock:
                self._outputs -= 1

    def _finish(self, done: Done) -> None:
        with self._lock:
            self._done.append(done)
        self._wake()

    # -- the stage threads -----------------------------------------------------------------
    def _next_job(self) -> Job | None:
        with self._lock:
            while not self._todo and not self._stopping.is_set():
                self._todo_ready.wait(_POLL_S)
            return None if self._stopping.is_set() else self._todo.popleft()

    def _reader(self) -> None:
        _lower_priority(IO_NICE)
        while not self._stopping.is_set():
            if not self._read_ahead.acquire(timeout=_POLL_S):
                continue
            job = self._next_job()
            if job is None:
                break
            self._to_model.put(self._read(job))  # room: the semaphore allows one read ahead

    def _model(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    item = self._to_model.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                self._read_ahead.release()
                with self._lock:
                    self._taken += 1
                self._wake()  # room ahead of the model: the loop may take new arrivals
                self._to_writer.put(self._compute(item))
        finally:
            self._to_writer.put(_END)

    def _writer(self) -> None:
        _lower_priority(IO_NICE)
        while (item := self._to_writer.get()) is not _END:
            assert isinstance(item, _Item)
            self._finish(self._write(item))


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` where the OS allows it (Linux)."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:  # not allowed here: the threads keep the process's priority
        log.debug("cannot lower the priority of %s: %s", threading.current_thread().name, exc)
