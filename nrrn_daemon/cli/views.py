"""Rich renderings for the CLI: status, provenance, the daemon's live view, the demo's summary."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

if TYPE_CHECKING:
    from nrrn_daemon.daemon.channels import Channels
    from nrrn_daemon.daemon.loop import Daemon

STATE_STYLE = {"alive": "green", "stale": "red", "ended": "yellow"}


def _s(value: float | None, unit: str = " s", fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value) + unit


def render_status(report: dict[str, Any], console: Console) -> None:
    """``nrrn-daemon status``: the run, then one panel per data set."""
    run = report.get("run")
    if run is None:
        console.print(f"no daemon run recorded yet in {report['database']}")
    else:
        style = STATE_STYLE.get(run["state"], "white")
        line = (
            f"daemon [bold {style}]{run['state']}[/] — run {run['id']} on {run['host']} "
            f"(pid {run['pid']}, v{run['version']}), heartbeat {run['heartbeat_age_s']:.0f} s ago"
        )
        if run["state"] == "stale":
            line += (
                f" [red](older than {run['stale_after_s']:.0f} s: the daemon is probably down)[/]"
            )
        if run["state"] == "ended":
            line += f", ended {run['ended_at']}: {run['end_reason']}"
        console.print(line)
        live = run.get("live") or {}
        if live.get("folder_error"):
            console.print(f"[red]watch folder problem:[/] {live['folder_error']}")
        if live.get("current"):
            console.print(f"now denoising: {live['current']}")
        volume = live.get("live_volume")
        if volume:
            line = f"live volume: {volume['path']} ({volume['written']} slices written)"
            if volume.get("errors"):
                line += f" [red]{volume['errors']} not written, last: {volume['last_error']}[/]"
            console.print(line)
        if live.get("redenoise_pending"):
            console.print(
                f"re-denoising with the new model: {live['redenoise_pending']} slices to go"
            )
    if report.get("profile"):
        console.print(
            f"profile: [bold]{report['profile']['name']}[/]   database: {report['database']}"
        )
    for ds in report.get("datasets", []):
        console.print(_dataset_panel(ds))


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def throughput_text(tp: dict[str, Any]) -> str:
    """The ``throughput_per_h`` report in words, each rate with the window it is measured over."""
    if not tp.get("outputs") and not tp.get("total"):
        return "— (no output yet)"
    window = "—" if tp["window_s"] is None else _span(tp["window_s"])
    span = "—" if tp["span_s"] is None else _span(tp["span_s"])
    return (
        f"{_s(tp['rate'], ' /h', '{:.0f}')} over the last {window} ({tp['outputs']} outputs) · "
        f"{_s(tp['overall'], ' /h', '{:.0f}')} from first start to last output "
        f"({tp['total']} in {span})"
    )


def _dataset_panel(ds: dict[str, Any]) -> Panel:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    c = ds["slices"]
    t.add_row(
        "slices",
        f"seen {sum(c.values())} · denoised {c.get('denoised', 0)} · waiting {ds['waiting']} · "
        f"unusable [yellow]{c.get('unusable', 0)}[/] · failed [red]{c.get('failed', 0)}[/]",
    )
    lat = ds["latency_s"]
    t.add_row(
        "latency", f"median {_s(lat['median'])} · p90 {_s(lat['p90'])} · last {_s(lat['last'])}"
    )
    t.add_row("throughput", throughput_text(ds["throughput_per_h"]))
    model = ds.get("model")
    t.add_row("model", "—" if model is None else f"{model['label']} ({model['sha256'][:12]})")
    device = ds.get("device") or "—"
    if ds.get("precision"):
        device += f" ({ds['precision']})"
    if ds.get("cpu_fallback"):
        device += "  [yellow bold]CPU — no GPU in use, slower[/]"
    t.add_row("device", device)
    t.add_row("next fine-tune", str(ds.get("next_finetune") or "not scheduled"))
    for ft in ds.get("finetunes", [])[:3]:
        losses = ""
        if ft.get("val_loss_candidate") is not None:
            losses = f" · val loss {ft['val_loss_parent']:.4g} → {ft['val_loss_candidate']:.4g}"
        t.add_row("fine-tune", f"{ft['started_at']} {ft['status']} {ft['candidate'] or ''}{losses}")
    if ds.get("last_output"):
        t.add_row("last output", f"{ds['last_output']['path']} at {ds['last_output']['at']}")
    for u in ds.get("unusable", []):
        t.add_row("[yellow]unusable", f"{u['name']}: {u['reason']}")
    for f in ds.get("failed", []):
        t.add_row("[red]failed", f"{f['name']}: {f['reason']}")
    quality = ds.get("quality") or {}
    if quality.get("last"):
        q = quality["last"]
        t.add_row(
            "quality",
            f"noise {q['noise_in']:.1f} → {q['noise_out']:.1f} · flat IQR {q['iqr_in']:.1f} → "
            f"{q['iqr_out']:.1f} (last) · input noise level {quality['noise_in_level']:.1f}",
        )
    for f in quality.get("flagged", [])[:5]:
        t.add_row("[magenta]noise flag", f"{f['name']}: {f['reason']}")
    return Panel(t, title=f"data set {ds['name']}", subtitle=f"profile {ds['profile_name']}")


def render_provenance(report: dict[str, Any], console: Console) -> None:
    """``nrrn-daemon provenance``: each matching output, newest version first."""
    for s in report["slices"]:
        if s["state"] == "failed":
            console.print(f"[red]slice {s['name']} failed:[/] {s['reason']}")
        elif s["state"] == "unusable":
            console.print(
                f"[yellow]slice {s['name']} is no neighbour ({s['reason']}):[/] its output is a "
                "copy of the input or denoised alone"
            )
    for out in report["outputs"]:
        current = "[green]current[/]" if out["is_current"] else "superseded"
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        t.add_row("output", f"{out['path']}  (sha256 {out['sha256'][:16]}…)")
        t.add_row("mode", f"{out['mode']} — {out['reason']}")
        for i in out["inputs"]:
            changed = "  [red]changed on disk since[/]" if i["changed"] else ""
            t.add_row(
                i["role"], f"{i['path']}  (index {i['index']}, sha256 {i['sha256'][:16]}…){changed}"
            )
        m = out["model"] or {}
        t.add_row("model", f"{m.get('label')} sha256 {str(m.get('sha256'))[:16]}… {m.get('path')}")
        t.add_row("settings", ", ".join(f"{k}={v}" for k, v in sorted(out["settings"].items())))
        tm = out["timings"]
        t.add_row("device", out["device"])
        q = out.get("quality")
        if q:
            flag = f"  [magenta]{q['flag_reason']}[/]" if q["flagged"] else ""
            t.add_row(
                "quality",
                f"noise {q['noise_in']:.2f} → {q['noise_out']:.2f} · flat IQR {q['iqr_in']:.1f} → "
                f"{q['iqr_out']:.1f} in {q['flat_box']}{flag}",
            )
        t.add_row(
            "timings",
            f"read {_s(tm['read_s'], ' s', '{:.2f}')} · "
            f"model {_s(tm['model_s'], ' s', '{:.2f}')} · "
            f"write {_s(tm['write_s'], ' s', '{:.2f}')} · latency {_s(tm['latency_s'])}",
        )
        t.add_row("finished", str(tm["finished_at"]))
        t.add_row("re-run", out["rerun"]["command"])
        console.print(Panel(t, title=f"version {out['version']} · {current}"))


def _live_table(daemon: Daemon | Channels, total: int | None) -> Group:
    s = daemon.state
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    done = f"{s.denoised}" + (f" / {total}" if total else "")
    t.add_row("watching", str(daemon.watch_folder))
    t.add_row("writing to", str(daemon.output_folder))
    device = f"{daemon.denoiser.device} ({daemon.denoiser.precision})"
    if daemon.denoiser.cpu_fallback:
        device += "  [yellow bold]no GPU: CPU[/]"
    t.add_row("model", f"{daemon.model.label} on {device}")
    t.add_row(
        "slices",
        f"seen {s.seen} · denoised {done} · unusable {s.unusable} · failed {s.failed} · "
        f"retrying {len(daemon._retry)}",
    )
    t.add_row("now", s.current or "waiting for slices")
    t.add_row("last", f"{s.last_output or '—'} (latency {_s(s.last_latency_s)})")
    if s.folder_error:
        t.add_row("[red]watch folder", s.folder_error)
    for f in s.recent_failures:
        t.add_row("[red]failed", f)
    for u in s.recent_unusable:
        t.add_row("[yellow]unusable", u)
    return Group(Panel(t, title="nrrn-daemon"))


@contextlib.contextmanager
def live_view(
    daemon: Daemon | Channels, console: Console, total: int | None = None
) -> Iterator[None]:
    """Refresh a live panel from the daemon's counters while the block runs (terminal only)."""
    stop = threading.Event()
    with Live(_live_table(daemon, total), console=console, refresh_per_second=4) as live:

        def refresh() -> None:
            while not stop.wait(0.25):
                live.update(_live_table(daemon, total))

        thread = threading.Thread(target=refresh, name="nrrn-live-view", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(2)
            live.update(_live_table(daemon, total))


def render_demo_summary(summary: dict[str, Any], console: Console, seconds: float) -> None:
    """The demo's last word: slices, latency, PSNR/SSIM against the clean volume."""
    t = Table(title="nrrn-daemon demo", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row(
        "slices denoised", f"{summary['denoised']} / {summary['slices']} ({summary['stop_reason']})"
    )
    lat = summary["latency_s"] or {}
    t.add_row(
        "latency (file complete → output)",
        f"median {_s(lat.get('median'))} · p90 {_s(lat.get('p90'))}",
    )
    model = summary.get("model") or {}
    t.add_row("model · device", f"{model.get('label', '—')} · {summary.get('device') or '—'}")
    t.add_row("noise", summary["noise"])
    if summary["psnr_noisy"] is not None:
        t.add_row(
            "PSNR vs clean",
            f"noisy {summary['psnr_noisy']:.2f} dB → "
            f"denoised [green bold]{summary['psnr_denoised']:.2f} dB[/]",
        )
        t.add_row(
            "SSIM vs clean",
            f"noisy {summary['ssim_noisy']:.3f} → denoised {summary['ssim_denoised']:.3f}",
        )
    t.add_row("wall time", f"{seconds:.0f} s")
    if summary.get("folder"):
        t.add_row("files kept in", summary["folder"])
    console.print(t)
