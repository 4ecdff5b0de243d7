"""``nrrn-daemon demo --dashboard``: the dashboard runs beside the demo and its URL is printed."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request

import pytest
from live_run import free_port, wait_until
from rich.console import Console

from nrrn_daemon.cli.demo import run_demo


def test_the_demo_serves_the_dashboard_while_it_runs(tmp_path):
    port = free_port()
    out = io.StringIO()
    result: dict = {}
    seen: list[dict] = []

    def demo() -> None:
        console = Console(file=out, width=200)
        result.update(run_demo(slices=4, size=64, interval=0.5, keep=tmp_path / "demo",
                               console=console, dashboard_port=port))  # fmt: skip

    thread = threading.Thread(target=demo, name="nrrn-test-demo")
    thread.start()

    def health():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                body = json.loads(r.read())
        except OSError:
            return None
        if body["datasets"]:
            seen.append(body)
        return body["datasets"] or None

    try:
        wait_until(lambda: health() or not thread.is_alive(), "the demo's dashboard", 120)
    finally:
        thread.join(300)
    assert not thread.is_alive() and result["denoised"] == 4
    assert seen and seen[0]["datasets"] == [str(tmp_path / "demo" / "watch")]
    assert f"dashboard: http://127.0.0.1:{port}/" in out.getvalue()
    with pytest.raises(urllib.error.URLError):  # it stopped with the demo
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
