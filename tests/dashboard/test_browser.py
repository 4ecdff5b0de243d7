"""The dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by Selenium), over a real daemon denoising what the microscope fixture writes, served by a real
``nrrn-daemon dashboard`` process on a free loopback port.

Skipped, with the reason, where Chromium or its driver is not installed (``.ci/run`` installs
them from Debian's packages); the API tests (``test_api.py``) run regardless. Screenshots are
kept under the test's tmp folder; their paths are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from live_run import MISFIT, NAME, SHAPE, fib25_noisy, free_port, run_profile, wait_until
from PIL import Image

from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.store.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no headless Chromium here: install Debian's `chromium` and `chromium-driver` "
    "(`apt-get install -y chromium chromium-driver`; .ci/run does) to run the browser tests",
)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


class LiveDaemon:
    """The daemon's loop in a thread over a real folder."""

    def __init__(self, profile) -> None:
        self.store = Store(profile.store.database)
        self.daemon = Daemon(profile, self.store)
        self.thread = threading.Thread(target=self.daemon.work, name="nrrn-test-daemon")

    def __enter__(self) -> LiveDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop("test over")
        self.thread.join(30)
        self.store.close()
        assert not self.thread.is_alive()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-default-apps", "--window-size=1400,1500",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard_process(tmp_path):
    procs = []

    def start(db: Path, out: Path) -> str:
        port = free_port()
        cmd = [sys.executable, "-c", "from nrrn_daemon.cli.app import main; main()",
               "dashboard", "--profile", "demo", "--db", str(db), "--output", str(out),
               "--port", str(port)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: get(base + "/api/health")[0] == 200, "the dashboard", proc=proc)
        return base

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(15)


def strip_states(driver) -> dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#strip .cell')]"
        ".map(c => [c.dataset.name, c.dataset.state]))"
    )


def test_the_dashboard_in_chromium(tmp_path, fib25, browser, dashboard_process):
    from selenium.webdriver.common.by import By

    root = tmp_path / "run"
    profile = run_profile(root)
    volume = fib25_noisy(fib25, 7)
    scope = Microscope(root / "raw", volume, NAME, interval_s=0)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with LiveDaemon(profile) as live:
        for k in range(5):
            scope.write(k)
        Microscope(root / "raw", volume[:1, :64, :64], NAME, first_index=MISFIT).write(0)
        db = profile.store.database
        wait_until(lambda: db.exists(), "the database")
        base = dashboard_process(db, profile.output.folder)
        dataset = str(root / "raw")
        browser.get(f"{base}/datasets/{quote(dataset, safe='')}")

        def settled():
            with Store(db, readonly=True) as store:
                counts = store.status()["datasets"][0]["slices"] if store.status()["datasets"] \
                    else {}  # fmt: skip
            return counts.get("failed") == 1 and counts.get("denoised", 0) >= 4

        wait_until(settled, "the first slices to be denoised")

        # the overview lists the slices with the states the database records
        def states_match():
            shown = strip_states(browser)
            ov = json.loads(get(f"{base}/api/datasets/{quote(dataset, safe='')}")[1] or b"{}")
            truth = {s["name"]: s["state"] for s in ov.get("slices", [])}
            return shown == truth and len(shown) == 6 and shown

        shown = wait_until(states_match, "the strip to show the recorded states")
        assert shown[NAME.format(MISFIT)] == "failed"
        assert sum(v.endswith("denoised") for v in shown.values()) >= 4
        browser.execute_script("window.__sameDocument = 'yes'")

        # a failed slice shows its reason (on hover and in the list under the strip)
        cell = browser.find_element(
            By.CSS_SELECTOR, f'#strip .cell[data-name="{NAME.format(MISFIT)}"]'
        )
        assert "64×64" in cell.get_attribute("title") and "96×128" in cell.get_attribute("title")
        listed = browser.find_element(By.CSS_SELECTOR, "#failed .failed-slice").text
        assert NAME.format(MISFIT) in listed and "not denoised" in listed

        # the newest slice's before/after images load, as real PNGs of the slice's size
        def images_loaded():
            return browser.execute_script(
                "const r = document.getElementById('img-raw');"
                "const d = document.getElementById('img-den');"
                "return r.complete && d.complete && r.naturalWidth > 0 && d.naturalWidth > 0"
                " ? [r.src, d.src, r.naturalWidth, r.naturalHeight, d.naturalWidth,"
                "    d.naturalHeight] : null"
            )

        raw_src, den_src, *sizes = wait_until(images_loaded, "the before/after images")
        assert sizes == [SHAPE[1], SHAPE[0], SHAPE[1], SHAPE[0]]
        for src in (raw_src, den_src):
            assert src.startswith(base)
            status, body = get(src)
            png = Image.open(io.BytesIO(body))
            assert status == 200 and png.format == "PNG" and png.size == (SHAPE[1], SHAPE[0])
        newest = browser.find_element(By.ID, "viewer-name").text
        assert newest.split(" ")[0] in {NAME.format(k) for k in range(5)}
        browser.save_screenshot(str(shots / "dashboard-overview.png"))

        # zoom (wheel) and pan (drag) move both panes; the swipe overlays denoised on raw
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

        frame = browser.find_element(By.CSS_SELECTOR, "#pane-raw .frame")
        origin = ScrollOrigin.from_element(frame)
        ActionChains(browser).scroll_from_origin(origin, 0, -300).perform()
        ActionChains(browser).drag_and_drop_by_offset(frame, 30, 20).perform()
        transforms = browser.execute_script(
            "return ['img-raw', 'img-den'].map(i => document.getElementById(i).style.transform)"
        )
        assert transforms[0] == transforms[1] and "scale(" in transforms[0]
        assert "scale(1)" not in transforms[0] and "translate(" in transforms[0]
        browser.find_element(By.ID, "swipe").click()
        assert "swipe" in browser.find_element(By.ID, "viewer").get_attribute("class")
        clip = browser.execute_script("return document.getElementById('pane-den').style.clipPath")
        assert clip.startswith("inset(")
        browser.save_screenshot(str(shots / "dashboard-swipe.png"))
        browser.find_element(By.ID, "swipe").click()

        # a new slice written by the microscope appears without a reload
        scope.write(5)
        scope.write(6)
        wait_until(lambda: strip_states(browser).get(NAME.format(6), "").endswith("denoised")
                   and strip_states(browser).get(NAME.format(5), "").endswith("denoised"),
                   "the new slices on the strip")  # fmt: skip
        assert browser.execute_script("return window.__sameDocument") == "yes"
        wait_until(lambda: NAME.format(6) in browser.find_element(By.ID, "viewer-name").text
                   or NAME.format(5) in browser.find_element(By.ID, "viewer-name").text,
                   "the viewer to follow the newest slice")  # fmt: skip
        wait_until(images_loaded, "the new images")
        browser.save_screenshot(str(shots / "dashboard-live.png"))

        browser.get(f"{base}/models")
        wait_until(lambda: "current" in browser.find_element(By.ID, "models").text, "models")
        browser.save_screenshot(str(shots / "dashboard-models.png"))

        # the pages made no request outside the server
        urls = []
        for entry in browser.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        # (chrome:// pages are the browser's own start page, data: never leaves the page)
        network = [u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")]
        assert any(u.startswith(base + "/api/") for u in network)
        assert all(u.startswith(base + "/") for u in network), [
            u for u in network if not u.startswith(base + "/")
        ]
        assert live.thread.is_alive()
    for shot in sorted(shots.iterdir()):
        assert Image.open(shot).format == "PNG"
        print(f"screenshot: {shot}")
