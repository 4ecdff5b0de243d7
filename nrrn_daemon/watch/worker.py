"""The watcher's file-system calls run in a worker thread, so the daemon loop never waits on them.

A network share (SMB/NFS) that stops answering blocks ``stat``, ``listdir`` and ``scandir`` for
minutes, uninterruptibly. :meth:`Watcher.poll <nrrn_daemon.watch.watcher.Watcher.poll>` (the
listing or observer hints, the reconciliation scan, the candidates' stats and decode checks) is
therefore run by :class:`PollWorker` in a thread of its own. The loop's :meth:`PollWorker.poll`
hands it a request and waits at most ``wait_s`` for the answer (a healthy folder answers in
milliseconds, so the daemon behaves as if it polled itself); when the answer is late, the loop
does not wait for it again: it goes on with what it has — denoising slices already read, the
heartbeat, stop requests, ``status`` — and picks the answer up at a later turn. Once a poll
has been running longer than ``deadline_s`` the folder is reported "not answering for N s" (log
and ``status``); when the share answers again the poll's result is used and watching resumes by
itself.

The watcher is started by the worker thread too (:meth:`PollWorker.start`: its first scan
lists the folder), so a daemon whose share is already hung when it starts still starts: the
start is waited for at most ``deadline_s``, then the folder is reported "not answering" like a
late poll, and watching begins by itself once the share answers. Only a folder that answers
"missing" or "not a folder" stops the start (:meth:`PollWorker.check_folder`). The watcher is
only ever called from the worker thread once started; the loop reads nothing of it but
:attr:`PollWorker.idle`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from nrrn_daemon.files import Background
from nrrn_daemon.watch.watcher import PollResult, Watcher

log = logging.getLogger(__name__)


class PollWorker:
    """Run :meth:`Watcher.poll` in a thread with a deadline.

    Parameters
    ----------
    watcher
        The started watcher.
    deadline_s
        A poll running longer than this reports the folder as not answering.
    wait_s
        How long :meth:`poll` waits for a poll it has just requested (default: the smaller of
        ``deadline_s`` and 0.5 s).
    on_done
        Called (from the worker thread) when a poll finishes: the loop's wake-up.
    clock
        Monotonic seconds (for the ages it reports).
    """

    def __init__(
        self,
        watcher: Watcher,
        deadline_s: float,
        *,
        wait_s: float | None = None,
        on_done: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watcher = watcher
        self.deadline_s = deadline_s
        self.wait_s = min(deadline_s, 0.5) if wait_s is None else wait_s
        self._on_done = on_done
        self._clock = clock
        self._cond = threading.Condition()
        self._request: float | None = None  # the `now` of a poll asked for, not yet begun
        self._requested_at = 0.0  # clock time of that request
        self._started: float | None = None  # clock time the poll in flight began
        self._result: PollResult | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._stalled_since: float | None = None  # logged once per stall
        self._thread: threading.Thread | None = None
        self._starting = False  # the watcher's start is under way in the worker
        self._prepared: list[Any] = []  # what `prepare` gave, for `then` (once, on the loop)
        self._then: Callable[[Any], None] | None = None
        self._answered_check = True  # the last check_folder() answered in time

    def check_folder(self) -> None:
        """:meth:`Watcher.check_folder`, waited for at most ``deadline_s``.

        Raises
        ------
        InputError
            The folder answered: it is missing or not a folder.

        A folder that does not answer in time is logged; the daemon starts all the same.
        """
        job = Background(self.watcher.check_folder, name="nrrn-watch-check", clock=self._clock)
        self._answered_check = job.wait(self.deadline_s)
        if self._answered_check:
            job.result()
        else:
            log.warning(
                "watch folder %s not answering at start (a hung network share?): starting "
                "anyway; it is watched once it answers",
                self.watcher.folder,
            )

    def start(
        self,
        *,
        prepare: Callable[[], Any] | None = None,
        then: Callable[[Any], None] | None = None,
        start_watcher: bool = True,
    ) -> None:
        """Start the worker thread (a daemon thread: a share hung for good cannot keep the
        process alive after the loop has stopped), which starts the watcher.

        Parameters
        ----------
        prepare
            Run in the worker thread before the watcher starts (file-system work of the caller's,
            e.g. :meth:`Watcher.mark_known` of the files already processed).
        then
            Called with what ``prepare`` returned, on the caller's thread, by the first
            :meth:`poll` after the start (before any file is reported).
        start_watcher
            False when the watcher was started already.

        Raises
        ------
        InputError
            The watcher's start failed in time (the folder cannot be read). The start is waited
            for at most ``deadline_s`` (not at all when :meth:`check_folder` found the folder
            not answering); a later failure is raised by :meth:`poll`.
        """
        with self._cond:
            self._starting = True
            self._started = self._requested_at = self._clock()
            self._then = then
        self._thread = threading.Thread(
            target=self._run,
            args=(prepare, start_watcher),
            name="nrrn-watch-worker",
            daemon=True,
        )
        self._thread.start()
        with self._cond:
            wait = self.deadline_s if self._answered_check else 0.0
            self._cond.wait_for(lambda: not self._starting, timeout=wait)
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    @property
    def idle(self) -> bool:
        """No poll in flight or waiting to be taken, and the watcher has nothing pending."""
        with self._cond:
            busy = self._request is not None or self._started is not None
            return not busy and self._result is None and self.watcher.idle

    def poll(self, now: float) -> PollResult:
        """The result of the latest finished poll, or an empty one while the folder is slow.

        Raises
        ------
        BaseException
            What the watcher's poll raised (a bug, not a folder error: those are results).
        """
        with self._cond:
            prepared, self._prepared = self._prepared, []
        if prepared and self._then is not None:
            self._then(prepared[0])  # on the caller's thread, before any file is reported
        with self._cond:
            if self._result is None and self._request is None and self._started is None:
                self._request, self._requested_at = now, self._clock()
                self._cond.notify_all()
                # only a poll asked for now is waited for; one already late is not waited on
                self._cond.wait_for(lambda: self._result is not None, timeout=self.wait_s)
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._result is not None:
                result, self._result = self._result, None
                if self._stalled_since is not None:
                    log.warning(
                        "watch folder %s answers again after %.0f s; watching resumes",
                        self.watcher.folder,
                        self._clock() - self._stalled_since,
                    )
                    self._stalled_since = None
                return result
            asked = self._requested_at  # the poll in flight (or not yet begun) was asked then
        age = self._clock() - asked
        if age < self.deadline_s:
            return PollResult(pending=0)
        message = (
            f"watch folder {self.watcher.folder} not answering for {age:.0f} s (a hung network "
            "share?) — slices already read are still denoised; watching resumes by itself"
        )
        if self._stalled_since is None:
            self._stalled_since = asked
            log.warning("%s", message)
        return PollResult(folder_error=message)

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the worker and the watcher; True if the worker ended within ``timeout``.

        A worker stuck in a call to a hung share is left behind (it is a daemon thread); it stops
        the watcher itself if that call ever returns.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            self.watcher.stop()
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "watch folder %s still not answering at stop: its worker is left behind",
                self.watcher.folder,
            )
            return False
        return True

    def _run(self, prepare: Callable[[], Any] | None, start_watcher: bool) -> None:
        try:
            if self._begin(prepare, start_watcher):
                self._serve()
        finally:
            self.watcher.stop()

    def _begin(self, prepare: Callable[[], Any] | None, start_watcher: bool) -> bool:
        """Prepare and start the watcher; False if that failed (the error goes to the loop)."""
        error: BaseException | None = None
        prepared: list[Any] = []
        try:
            if prepare is not None:
                prepared.append(prepare())
            if start_watcher:
                self.watcher.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it
            error = exc
        with self._cond:
            self._starting = False
            self._started = None
            self._prepared = prepared
            self._error = error
            if error is not None:
                self._result = PollResult()  # the error is handed over as a poll's
            self._cond.notify_all()
        if self._on_done is not None:
            self._on_done()
        return error is None

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._request is not None)
                if self._stopping:
                    return
                self._started = self._clock()
                # the loop's time, moved on by however long the request waited
                now, self._request = self._request + (self._started - self._requested_at), None
            result: PollResult | None = None
            error: BaseException | None = None
            try:
                result = self.watcher.poll(now)
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it
                error = exc
            with self._cond:
                self._started = None
                self._result = result if error is None else PollResult()
                self._error = error
                self._cond.notify_all()
            if self._on_done is not None:
                self._on_done()
