"""Several detectors in one daemon: one loop over the channels of one watch folder.

Auto Slice & View acquires several detectors at once into one folder (``SEM Image - SliceImage -
001.tif``, ``SEM Image 2 - SliceImage - 001.tif``). A profile names them in ``watch.channels``
(channel name = file name glob), or in ``watch.detectors`` (Auto Slice & View detector names,
each with its derived glob). Each channel is a :class:`~nrrn_daemon.daemon.loop.Daemon` of
its own (its own watcher on its glob, triplets, pipeline, model and fine-tune, data set
``"<folder> [<channel>]"``); :class:`Channels` runs their turns one after the other in one loop,
so the store keeps its one writer and one daemon run records them all. :func:`make_daemon` gives
a :class:`Channels` for a profile with channels and a plain ``Daemon`` otherwise.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.daemon.loop import HEARTBEAT_S, IDLE_WAIT_S, Daemon, LiveState
from nrrn_daemon.daemon.units import ModelInfo
from nrrn_daemon.errors import NRRNError
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.store.store import Store

log = logging.getLogger("nrrn_daemon")

SUMMED = ("retries_pending", "redenoise_pending")
"""Heartbeat counters that are per channel and reported as their sum."""


class Channels:
    """The channels of one profile's watch folder, denoised by one loop (same interface as
    :class:`~nrrn_daemon.daemon.loop.Daemon`: :meth:`work`, :meth:`request_stop`).

    Parameters
    ----------
    profile
        A validated profile with at least one channel (``watch.channels`` or
        ``watch.detectors``).
    store, on_event, finetune_trigger, overlap
        As for :class:`~nrrn_daemon.daemon.loop.Daemon`; shared by the channels.
    """

    def __init__(
        self,
        profile: Profile,
        store: Store,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        finetune_trigger: Any = None,
        overlap: bool = True,
    ) -> None:
        if not profile.watch.channel_globs:
            raise ValueError("Channels needs a profile with watch.channels or watch.detectors")
        self.profile = profile
        self.store = store
        self.on_event = on_event or (lambda kind, data: None)
        self.state = LiveState()  # one set of counters for the live view and the heartbeat
        self._wake = threading.Event()
        self._stop_reason: str | None = None
        self.channels: dict[str, Daemon] = {}
        for name in profile.watch.channel_globs:
            daemon = Daemon(
                profile.for_channel(name), store, on_event=self.on_event,
                finetune_trigger=finetune_trigger, overlap=overlap, channel=name, wake=self._wake,
                state=self.state,
            )  # fmt: skip
            self.channels[name] = daemon
        first = next(iter(self.channels.values()))
        self.watch_folder: Path = first.watch_folder
        self.output_folder: Path = first.output_folder

    @property
    def denoiser(self) -> Denoiser:
        """The first channel's Denoiser (every channel runs on the same device)."""
        return next(iter(self.channels.values())).denoiser

    @property
    def model(self) -> ModelInfo:
        """The first channel's model (each channel has its own: see the heartbeat)."""
        return next(iter(self.channels.values())).model

    @property
    def _retry(self) -> list[Any]:
        return [item for d in self.channels.values() for item in d._retry]

    def request_stop(self, reason: str) -> None:
        """Ask every channel to stop after (or by abandoning) its current unit. Signal-safe."""
        if self._stop_reason is None:
            self._stop_reason = reason
        for daemon in self.channels.values():
            daemon.request_stop(reason)
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT only set the stop flag (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))

    def work(self, burst: bool = False) -> str:
        """Run every channel until stopped (with ``burst``, until each channel's slices are
        done); returns why the loop ended."""
        daemons = list(self.channels.values())
        run_id = daemons[0].start_run()
        reason = "crashed"
        opened: list[Daemon] = []
        try:
            for daemon in daemons:
                daemon.open(run_id, burst)
                opened.append(daemon)
            done: set[str] = set()
            last_beat = 0.0
            while self._stop_reason is None:
                now = time.time()
                self._wake.clear()
                busy = False
                for name, daemon in self.channels.items():
                    if name not in done:
                        channel_busy, finished = daemon.step(now, burst, heartbeat=False)
                        busy = busy or channel_busy
                        if finished:
                            done.add(name)
                if burst and len(done) == len(daemons):
                    self.request_stop("burst complete")
                if now - last_beat >= HEARTBEAT_S:
                    self._heartbeat(run_id)
                    last_beat = now
                elif not busy and self._stop_reason is None:
                    self._wake.wait(IDLE_WAIT_S)
            reason = self._stop_reason or "stopped"
        except NRRNError as exc:
            reason = f"error: {exc}"
            raise
        except BaseException as exc:
            reason = f"crashed: {type(exc).__name__}: {exc}"
            raise
        finally:
            for daemon in opened:
                daemon.close()
            self._heartbeat(run_id)
            self.store.end_run(run_id, reason)
            log.info("stopped: %s", reason)
        return reason

    def heartbeat_state(self) -> dict[str, Any]:
        """The first channel's heartbeat, per-channel counters summed, and each channel's own
        under ``"channels"`` (its model, its pending work)."""
        states = {name: d.heartbeat_state() for name, d in self.channels.items()}
        combined = dict(next(iter(states.values())))
        for key in SUMMED:
            combined[key] = sum(int(s[key]) for s in states.values())
        combined["model"] = ", ".join(f"{name}: {s['model']}" for name, s in states.items())
        combined["channels"] = states
        return combined

    def _heartbeat(self, run_id: int) -> None:
        self.store.heartbeat(run_id, self.heartbeat_state())
        self.on_event("heartbeat", {"state": self.state})


def make_daemon(
    profile: Profile,
    store: Store,
    *,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    finetune_trigger: Any = None,
) -> Daemon | Channels:
    """A :class:`Channels` when the profile names channels (``watch.channels`` or
    ``watch.detectors``), else a plain Daemon."""
    if profile.watch.channel_globs:
        return Channels(profile, store, on_event=on_event, finetune_trigger=finetune_trigger)
    return Daemon(profile, store, on_event=on_event, finetune_trigger=finetune_trigger)
