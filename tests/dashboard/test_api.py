"""The dashboard's JSON API, previews and plots over a real finished run; read-only; path-safe."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from urllib.parse import quote

import numpy as np
import pytest
import tifffile
from live_run import MISFIT, NAME, SHAPE, SLICES, burst_run, sha256
from PIL import Image
from starlette.testclient import TestClient

from nrrn_daemon.dashboard.app import Settings, create_app
from nrrn_daemon.dashboard.previews import preview_shape
from nrrn_daemon.dashboard.server import check_bind
from nrrn_daemon.errors import DashboardError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fib25):
    """One real burst run (see live_run.py), shared by this module's tests."""
    return burst_run(tmp_path_factory.mktemp("run"), fib25)


def settings_of(profile, **extra) -> Settings:
    return Settings(database=profile.store.database, output_folder=profile.output.folder, **extra)


@pytest.fixture
def client(finished_run):
    profile, _ = finished_run
    with TestClient(create_app(settings_of(profile))) as c:
        yield c


@pytest.fixture
def ds_url(finished_run) -> str:
    _, root = finished_run
    return "/api/datasets/" + quote(str(root / "raw"), safe="")


def test_health_lists_the_data_set(client, finished_run):
    _, root = finished_run
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json()["readonly"] is True
    assert r.json()["datasets"] == [str(root / "raw")]
    assert r.headers["content-security-policy"].startswith("default-src 'none'")


def recorded_states(db) -> dict[str, str]:
    """What the strip must show, straight from the tables: failed, or denoised (re-denoised
    when the current output is a later version)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT s.name, s.state, o.version FROM slices s LEFT JOIN outputs o "
        "ON o.centre_slice_id = s.id AND o.is_current"
    ).fetchall()
    con.close()
    shown = {"ready": "waiting", "seen": "arriving", "failed": "failed"}
    return {
        n: ("re-denoised" if (v or 1) > 1 else "denoised") if st == "denoised" else shown[st]
        for n, st, v in rows
    }


def test_overview_has_every_slice_with_its_state(client, finished_run, ds_url):
    ov = client.get(ds_url).json()
    states = {s["name"]: s["state"] for s in ov["slices"]}
    assert states == recorded_states(finished_run[0].store.database)
    assert set(states) == {NAME.format(i) for i in [*range(SLICES), MISFIT]}
    assert {states[NAME.format(i)] for i in range(SLICES)} <= {"denoised", "re-denoised"}
    assert states[NAME.format(MISFIT)] == "failed"
    failed = next(s for s in ov["slices"] if s["state"] == "failed")
    assert "64" in failed["reason"] and str(SHAPE[0]) in failed["reason"]
    assert ov["newest"] in states and ov["pace"]["keeping_up"] is True
    assert ov["pace"]["message"] == "keeping up" and ov["pace"]["behind"] == 0
    assert ov["run"]["state"] == "ended" and ov["status"]["device"] == "cpu"
    measured = [s for s in ov["slices"] if s["state"] == "denoised"]
    assert all(s["noise_in"] > s["noise_out"] > 0 for s in measured)  # a real NRRN smooths


def test_status_is_status_json(client, finished_run):
    from nrrn_daemon.store.store import Store

    profile, _ = finished_run
    with Store(profile.store.database, readonly=True) as store:
        expected = store.status()
    got = client.get("/api/status").json()
    assert got["datasets"][0]["slices"] == expected["datasets"][0]["slices"]
    ds = got["datasets"][0]
    assert ds["quality"]["measured"] == ds["outputs"] >= SLICES  # one per output, redos too


def test_slice_shows_its_provenance(client, ds_url):
    info = client.get(ds_url + "/slice", params={"slice": NAME.format(2)}).json()
    assert info["state"] == "denoised" and info["current"]["mode"] == "triplet"
    roles = sorted(i["role"] for i in info["current"]["inputs"])
    assert roles == ["centre", "next", "prev"]
    assert info["current"]["quality"]["noise_in"] > 0
    failed = client.get(ds_url + "/slice", params={"slice": NAME.format(MISFIT)})
    assert failed.json()["state"] == "failed" and failed.json()["reason"]


@pytest.mark.parametrize("kind", ["raw", "denoised"])
def test_previews_are_pngs_of_the_slices(client, finished_run, kind, ds_url):
    profile, root = finished_run
    r = client.get(ds_url + "/preview.png", params={"slice": NAME.format(3), "kind": kind})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(r.content))
    assert png.format == "PNG" and png.mode == "L" and png.size == (SHAPE[1], SHAPE[0])
    folder = root / ("raw" if kind == "raw" else "out")
    expected = tifffile.imread(folder / NAME.format(3))  # uint8: shown as it is
    assert np.array_equal(np.asarray(png), expected)


def test_large_and_16_bit_slices_are_shrunk_and_windowed(tmp_path):
    from nrrn_daemon.dashboard.previews import Previews

    # a 16-bit ramp over a narrow band of grey levels, as a detector gives: the window
    # stretches it over the display's 0..255 instead of showing a flat grey
    image = np.broadcast_to(np.linspace(30000, 31000, 900), (1500, 900)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", image)
    png = Image.open(io.BytesIO(Previews(512).render(tmp_path / "big.tif", tmp_path / "big.tif")))
    assert png.size[::-1] == preview_shape(image.shape, 512) == (500, 300)
    grey = np.asarray(png)
    assert grey.min() <= 2 and grey.max() >= 253
    assert np.all(np.diff(grey[0].astype(int)) >= 0)  # the ramp stays a ramp


@pytest.mark.parametrize("which", ["latency", "throughput", "noise"])
def test_plots_are_svg(client, which, ds_url):
    r = client.get(ds_url + f"/plots/{which}.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.startswith("<svg") and "<polyline" in r.text or "<circle" in r.text


def test_models_and_loss_plot(client, ds_url):
    report = client.get("/api/models").json()
    assert (
        ds_url.endswith(quote(report["datasets"][0]["name"], safe=""))
        and report["datasets"][0]["models"]
    )
    assert client.get(ds_url + "/loss.svg").text.startswith("<svg")


def test_pages_are_served_with_their_assets(client, ds_url):
    for path in ("/", ds_url.replace("/api", ""), "/models", "/static/dashboard.js",
                 "/static/dashboard.css"):  # fmt: skip
        assert client.get(path).status_code == 200, path
    page = client.get(ds_url.replace("/api", "")).text
    assert "http://" not in page and "https://" not in page


def test_nothing_changes_anything(client, finished_run, ds_url):
    """Every endpoint answers; nothing but GET is accepted; the database file is unchanged."""
    profile, _ = finished_run
    db = profile.store.database
    before = sha256(db)
    rows_before = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(
        "SELECT COUNT(*) FROM outputs").fetchone()  # fmt: skip
    urls = ["/", "/models", ds_url.replace("/api", ""), "/api/health", "/api/status", "/api/models",
            ds_url, ds_url + "/series",
            ds_url + f"/slice?slice={NAME.format(1)}",
            ds_url + f"/preview.png?slice={NAME.format(1)}&kind=denoised",
            ds_url + "/plots/noise.svg", ds_url + "/loss.svg"]  # fmt: skip
    for _ in range(3):
        for url in urls:
            assert client.get(url).status_code == 200, url
    for url in urls:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert client.request(method, url).status_code == 405, (method, url)
    assert sha256(db) == before
    assert sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(
        "SELECT COUNT(*) FROM outputs").fetchone() == rows_before  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "..",
        "/etc/passwd",
        f"../raw/{NAME.format(1)}",
        f"{NAME.format(1)}/../../x",
        "a\\..\\b",
    ],  # fmt: skip
)
def test_names_never_escape_the_folders(client, name, ds_url):
    for path in (ds_url + "/preview.png", ds_url + "/slice"):
        r = client.get(path, params={"slice": name, "kind": "raw"})
        assert r.status_code in (400, 404), (path, name, r.status_code)
        assert "root:" not in r.text


def test_a_symlink_out_of_the_watch_folder_is_refused(tmp_path, finished_run, ds_url):
    """A recorded slice whose file is a symlink to a file outside the watch folder is not read."""
    profile, root = finished_run
    db = tmp_path / "db.sqlite"
    shutil.copyfile(profile.store.database, db)
    outside = tmp_path / "secret.tif"
    tifffile.imwrite(outside, np.full((32, 32), 7, np.uint8))
    link = root / "raw" / "slice_0099.tif"
    os.symlink(outside, link)
    try:
        con = sqlite3.connect(db)
        con.execute(
            'INSERT INTO slices (dataset_id, path, name, "index", size, mtime, sha256, state, '
            "first_seen_at, updated_at) "
            "VALUES (1, ?, 'slice_0099.tif', 99, 1, 1, '', 'ready', 1, 1)",
            (str(link),),
        )
        con.commit()
        con.close()
        with TestClient(create_app(settings_of(profile).__class__(
            database=db, output_folder=profile.output.folder))) as c:  # fmt: skip
            for path in (ds_url + "/preview.png", ds_url + "/slice"):
                r = c.get(path, params={"slice": "slice_0099.tif", "kind": "raw"})
                assert r.status_code == 403 and "outside" in r.json()["error"], r.text
    finally:
        link.unlink()


def test_unknown_things_are_clear_errors(client, ds_url):
    assert client.get("/api/datasets/nope").status_code == 404
    r = client.get(ds_url + "/slice", params={"slice": "slice_7777.tif"})
    assert r.status_code == 404 and "slice_7777.tif" in r.json()["error"]
    r = client.get(ds_url + "/preview.png", params={"slice": NAME.format(1), "kind": "x"})
    assert r.status_code == 400


def test_no_database_yet_is_a_503_not_a_crash(tmp_path):
    s = Settings(database=tmp_path / "none.sqlite", output_folder=tmp_path)
    with TestClient(create_app(s)) as c:
        assert c.get("/api/health").json()["datasets"] == []
        assert c.get("/api/status").status_code == 503
        assert not (tmp_path / "none.sqlite").exists()


def test_token(finished_run):
    profile, _ = finished_run
    token = "t" * 20
    with TestClient(create_app(settings_of(profile, token=token))) as c:
        assert c.get("/api/health").status_code == 401
        assert c.get("/api/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        r = c.get(f"/?token={token}")
        assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
        assert c.get("/api/status").status_code == 200  # the cookie it set


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "microscope-pc"])
def test_other_addresses_need_a_token(host):
    with pytest.raises(DashboardError, match="not a loopback address"):
        check_bind(host, 8765, None)
    check_bind(host, 8765, "x" * 16)
    with pytest.raises(DashboardError, match="at least 16"):
        check_bind(host, 8765, "short")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    check_bind(host, 8765, None)


def test_models_show_each_gate_decision_and_the_losses(tmp_path):
    from nrrn_daemon.states import FinetuneStatus
    from nrrn_daemon.store.store import Store

    db = tmp_path / "models.sqlite"
    with Store(db) as store:
        ds = store.ensure_dataset("/raw/run7", "/raw/run7", "test")
        base = store.ensure_model(sha256="a" * 64, path="/m/base.pt", label="base-aaaa",
                                  kind="base", config={})  # fmt: skip
        good = store.ensure_model(sha256="b" * 64, path="/m/b.pt", label="model-bbbb",
                                  kind="finetuned", config={}, dataset_id=ds,
                                  parent_sha256="a" * 64)  # fmt: skip
        bad = store.ensure_model(sha256="c" * 64, path="/m/c.pt", label="model-cccc",
                                 kind="finetuned", config={}, dataset_id=ds,
                                 parent_sha256="b" * 64)  # fmt: skip
        first = store.start_finetune(ds, base, {})
        store.end_finetune(first, FinetuneStatus.PROMOTED, good, {
            "parent_metrics": {"val_loss": 0.031}, "candidate_metrics": {"val_loss": 0.024},
            "reasons": ["validation loss 0.024 < 0.031"]})  # fmt: skip
        store.set_current_model(ds, good, promoted=True)
        second = store.start_finetune(ds, good, {})
        store.end_finetune(second, FinetuneStatus.REJECTED, bad, {
            "parent_metrics": {"val_loss": 0.024}, "candidate_metrics": {"val_loss": 0.027},
            "reasons": ["validation loss 0.027 is not below 0.024"]})  # fmt: skip
    with TestClient(create_app(Settings(database=db, output_folder=tmp_path))) as c:
        report = c.get("/api/models").json()["datasets"][0]
        assert report["current"] == "model-bbbb"
        assert [m["label"] for m in report["models"]] == ["base-aaaa", "model-bbbb", "model-cccc"]
        decisions = [(f["status"], f["promoted"], f["reasons"]) for f in report["finetunes"]]
        assert decisions == [
            ("rejected", False, ["validation loss 0.027 is not below 0.024"]),
            ("promoted", True, ["validation loss 0.024 < 0.031"]),
        ]
        svg = c.get("/api/datasets/" + quote("/raw/run7", safe="") + "/loss.svg").text
        assert "parent" in svg and "candidate" in svg and svg.count("<circle") == 4
