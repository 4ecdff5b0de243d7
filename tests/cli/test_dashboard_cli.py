"""The CLI side of issue 15: quality in ``status`` / ``provenance`` text, and ``dashboard``'s
refusals (each one clear line, exit code 1)."""

from __future__ import annotations

from typer.testing import CliRunner

from nrrn_daemon.cli.app import app
from nrrn_daemon.evaluation.quality import Quality
from nrrn_daemon.store.store import Store

runner = CliRunner()


def _db_with_a_flag(path):
    with Store(path) as store:
        ds = store.ensure_dataset("ds", "/raw", "test")
        model = store.ensure_model(sha256="a" * 64, path="/m.pt", label="base", kind="base",
                                   config={})  # fmt: skip
        for i, noise in enumerate([5.0, 5.1, 4.9, 5.2, 5.0, 15.0]):
            sid = store.upsert_slice(ds, path=f"/raw/s_{i}.tif", name=f"s_{i}.tif", index=i,
                                     scan=None, size=1, mtime=1.0, sha256="0" * 64,
                                     state="ready", ready_at=float(i))  # fmt: skip
            store.record_output(
                dataset_id=ds, centre_slice_id=sid, inputs=[(sid, "centre", "0" * 64)],
                path=f"/out/s_{i}.tif", sha256="1" * 64, mode="single", model_id=model,
                settings={}, device="cpu", ready_at=float(i), started_at=i + 0.1,
                finished_at=i + 0.5, read_s=0.1, model_s=0.2, write_s=0.1, reason="first",
                quality=Quality(noise, noise / 5, 2 * noise, 1.0, (0, 8, 0, 8)),
            )  # fmt: skip
    return path


def test_status_and_provenance_show_quality_and_flags(tmp_path):
    db = _db_with_a_flag(tmp_path / "q.sqlite")
    status = runner.invoke(app, ["status", "--db", str(db)], catch_exceptions=False)
    assert status.exit_code == 0
    assert "noise flag" in status.output and "s_5.tif" in status.output
    prov = runner.invoke(app, ["provenance", "s_5.tif", "--db", str(db)], catch_exceptions=False)
    assert prov.exit_code == 0 and "15.00 → 3.00" in prov.output and "detector" in prov.output


def test_dashboard_refuses_a_network_address_without_a_token(tmp_path):
    result = runner.invoke(
        app, ["dashboard", "--db", str(tmp_path / "x.sqlite"), "--host", "0.0.0.0"]
    )
    assert result.exit_code == 1
    assert "not a loopback address" in result.output and "--token" in result.output
    short = runner.invoke(app, ["dashboard", "--host", "0.0.0.0", "--token", "abc"])
    assert short.exit_code == 1 and "at least 16" in short.output
