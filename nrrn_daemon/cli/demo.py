"""``nrrn-daemon demo``: a microscope, the daemon and a summary, on embedded defaults.

A :class:`~nrrn_daemon.sim.microscope.Microscope` writes noisy slices of the project's phantom (or a
clean volume given with ``--volume``) into a temporary watch folder at a set pace; the daemon
runs on the ``demo`` profile with its own SQLite file; the demo ends once every slice has its
output, and reports latency and PSNR against the clean volume.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.metrics import psnr, ssim
from nrrn_daemon.imaging.tiff import read_slice
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.sim.phantom import make_phantom
from nrrn_daemon.store.store import Store

NAME_PATTERN = "SEM Image - SliceImage - {:03d}.tif"
"""Slice names as Thermo Auto Slice & View writes them (the ``demo`` profile's glob)."""
TIMEOUT_PER_SLICE_S = 120.0
"""Give up (with a clear message) if the daemon is this far behind per slice."""


def load_clean_volume(volume: Path | None, slices: int, size: int, seed: int) -> np.ndarray:
    """The clean volume to play: the phantom, or a crop of ``volume``."""
    if volume is None:
        return make_phantom((slices, size, size), seed=seed)
    import tifffile

    try:
        vol = tifffile.imread(volume)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read --volume {volume}: {exc} — give a multi-page TIFF") from exc
    if vol.ndim != 3 or vol.dtype != np.uint8:
        raise InputError(
            f"--volume {volume} is {vol.shape} {vol.dtype}; the demo needs a (Z, Y, X) uint8 stack"
        )
    return np.ascontiguousarray(vol[:slices, :size, :size])


def run_demo(
    *,
    slices: int = 16,
    size: int = 256,
    interval: float = 1.0,
    noise: str = "poisson:4",
    volume: Path | None = None,
    keep: Path | None = None,
    seed: int = 0,
    console: Console | None = None,
    dashboard_port: int | None = None,
) -> dict[str, Any]:
    """Run the whole demo; returns the summary (slices, latency, PSNR, paths).

    With ``dashboard_port``, ``nrrn-daemon dashboard`` runs beside it as a process of its own on
    127.0.0.1 at that port (its URL printed) from the moment the database exists until the demo
    ends.
    """
    clean = load_clean_volume(volume, slices, size, seed)
    noisy = noisy_stack(clean, noise, seed=seed + 1)
    n = len(clean)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="nrrn-demo-"))
    watch, out, db = root / "watch", root / "denoised", root / "demo.sqlite"
    for folder in (watch, out):
        if folder.exists() and keep:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(watch),
            "output.folder": str(out),
            "store.database": str(db),
        },
    )
    microscope = Microscope(
        watch, noisy, name_pattern=NAME_PATTERN, interval_s=interval, first_index=1
    )
    done: set[str] = set()
    lock = threading.Lock()

    with Store(db) as store, _dashboard(dashboard_port, db, out, console):
        daemon: Daemon

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "output":
                with lock:
                    done.add(data["name"])
                    if len(done) >= n and microscope.done:
                        daemon.request_stop("demo complete")

        daemon = Daemon(profile, store, on_event=on_event)
        deadline = time.time() + n * (interval + TIMEOUT_PER_SLICE_S)

        def watchdog_timer() -> None:
            while not daemon_stopped.wait(1.0):
                if microscope.done and len(done) >= n:
                    daemon.request_stop("demo complete")
                elif time.time() > deadline:
                    daemon.request_stop("demo timed out")

        daemon_stopped = threading.Event()
        timer = threading.Thread(target=watchdog_timer, name="nrrn-demo-timer", daemon=True)
        microscope.start()
        timer.start()
        live = (
            _live(daemon, console, n)
            if console is not None and console.is_terminal
            else contextlib.nullcontext()
        )
        try:
            with live:
                reason = daemon.work()
        finally:
            daemon_stopped.set()
            microscope.stop()
            timer.join(5)
        report = store.status()
    names = [microscope.name(k) for k in range(n)]
    return _summary(clean, noisy, out, report, reason, root, names, noise, keep is not None)


@contextlib.contextmanager
def _dashboard(port: int | None, db: Path, out: Path, console: Console | None) -> Iterator[None]:
    """``nrrn-daemon dashboard`` on the demo's database, in a process of its own."""
    if port is None:
        yield
        return
    from nrrn_daemon.dashboard.server import check_bind, url

    check_bind("127.0.0.1", port, None)
    cmd = [sys.executable, "-c", "from nrrn_daemon.cli.app import main; main()",
           "dashboard", "--profile", "demo", "--db", str(db), "--output", str(out),
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if console is not None:
            console.print(f"dashboard: {url('127.0.0.1', port)} (read-only; stops with the demo)",
                          highlight=False)  # fmt: skip
        yield
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGTERM) and console is not None:
            console.print(f"[red]the dashboard ended with {proc.returncode}:[/] {err.strip()}")


def _live(daemon: Daemon, console: Console, n: int) -> Any:
    from nrrn_daemon.cli.views import live_view

    return live_view(daemon, console, total=n)


def _summary(
    clean: np.ndarray,
    noisy: np.ndarray,
    out: Path,
    report: dict[str, Any],
    reason: str,
    root: Path,
    names: list[str],
    noise: str,
    kept: bool,
) -> dict[str, Any]:
    n = len(names)
    noisy_psnr, den_psnr, den_ssim, noisy_ssim = [], [], [], []
    denoised = 0
    for k, name in enumerate(names):
        path = out / name
        if not path.exists():
            continue
        denoised += 1
        den = read_slice(path).pixels
        noisy_psnr.append(psnr(noisy[k], clean[k]))
        den_psnr.append(psnr(den, clean[k]))
        noisy_ssim.append(ssim(noisy[k], clean[k]))
        den_ssim.append(ssim(den, clean[k]))
    ds = report["datasets"][0] if report["datasets"] else {}
    summary = {
        "slices": n,
        "denoised": denoised,
        "noise": noise,
        "stop_reason": reason,
        "latency_s": ds.get("latency_s", {}),
        "modes": ds.get("modes", {}),
        "device": ds.get("device"),
        "model": ds.get("model"),
        "psnr_noisy": float(np.mean(noisy_psnr)) if noisy_psnr else None,
        "psnr_denoised": float(np.mean(den_psnr)) if den_psnr else None,
        "ssim_noisy": float(np.mean(noisy_ssim)) if noisy_ssim else None,
        "ssim_denoised": float(np.mean(den_ssim)) if den_ssim else None,
        "folder": str(root),
    }
    if not kept:
        shutil.rmtree(root, ignore_errors=True)
        summary["folder"] = None
    return summary
