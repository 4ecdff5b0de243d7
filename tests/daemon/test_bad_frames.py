"""Bad frames in a live acquisition: never a neighbour, recorded with why, still written, and a
re-acquired frame replaces them. A real FIB-25 crop with noise, a real watched folder, the real
SQLite file and a real (tiny) NRRN on the CPU."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import tifffile
from test_daemon import NAME, Running, current_outputs, make_profile
from typer.testing import CliRunner

from nrrn_daemon.cli.app import app
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.imaging.provenance import read_provenance
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.microscope import Microscope
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.store.store import Store

BLANK, CUT, UNRELATED = 4, 7, 10
BAD = {BLANK: "blank frame", CUT: "frame cut short", UNRELATED: "unrelated to its neighbours"}


@pytest.fixture
def acquisition(fib25) -> tuple[np.ndarray, np.ndarray]:
    """(noisy stack with three bad frames, a good re-acquisition of the blank one)."""
    clean = fib25[:24, :64, :64].copy()
    clean[UNRELATED] = fib25[28, 150:214, 150:214]
    stack = noisy_stack(clean, "poisson:4", seed=1)
    retake = stack[BLANK].copy()
    stack[BLANK] = 0
    stack[CUT, 32:] = 0
    return stack, retake


def slice_rows(db) -> dict[str, tuple[str, str | None]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = dict(
        (name, (state, reason))
        for name, state, reason in con.execute("SELECT name, state, reason FROM slices")
    )
    con.close()
    return rows


def burst(profile) -> None:
    with Store(profile.store.database) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"


def test_bad_frames_are_never_neighbours_and_are_still_written(
    tmp_path, tiny_checkpoint, acquisition
):
    stack, _ = acquisition
    profile = make_profile(tmp_path, tiny_checkpoint, **{"grouping.neighbour_wait_s": 30.0})
    Microscope(tmp_path / "raw", stack, NAME, interval_s=0.0, chunks=1).run()
    burst(profile)
    rows = slice_rows(profile.store.database)
    outs = current_outputs(profile.store.database)
    assert sorted(outs) == [NAME.format(k) for k in range(len(stack))]  # nothing skipped
    for k, why in BAD.items():
        state, reason = rows[NAME.format(k)]
        assert state == "unusable" and reason.startswith(f"unusable: {why}"), (k, reason)
    good = [k for k in range(len(stack)) if k not in BAD]
    assert all(rows[NAME.format(k)] == ("denoised", None) for k in good)

    denoiser = Denoiser(load_checkpoint(tiny_checkpoint), device="cpu", tile=64)
    con = sqlite3.connect(f"file:{profile.store.database}?mode=ro", uri=True)
    used = {i for (i,) in con.execute("SELECT slice_id FROM output_inputs WHERE role != 'centre'")}
    bad_ids = {i for (i,) in con.execute("SELECT id FROM slices WHERE state = 'unusable'")}
    con.close()
    assert used and not used & bad_ids, "an unusable slice served as a neighbour"
    for k in good:
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(stack) and j not in BAD]
        rec = outs[NAME.format(k)]
        assert rec["mode"] == ("triplet" if len(neighbours) == 2 else "pair"), (k, rec)
        if len(neighbours) == 1 and 0 < k < len(stack) - 1:  # beside a bad frame
            expected = denoiser.denoise(stack[k], [stack[j] for j in neighbours])
            got = tifffile.imread(rec["path"])
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, k

    blank = outs[NAME.format(BLANK)]
    assert blank["mode"] == "copy"
    np.testing.assert_array_equal(tifffile.imread(blank["path"]), stack[BLANK])
    with tifffile.TiffFile(blank["path"]) as tif:
        described = read_provenance(tif.pages[0].description)
    assert described["unusable"].startswith("blank frame")
    assert "not denoised" in described["what"]
    for k in (CUT, UNRELATED):  # they have signal: denoised alone
        assert outs[NAME.format(k)]["mode"] == "single"

    with Store(profile.store.database, readonly=True) as store:
        report = store.provenance(NAME.format(UNRELATED))
        status = store.status()
    assert report["slices"][0]["state"] == "unusable"
    assert report["slices"][0]["reason"].startswith("unusable: unrelated")
    (ds,) = status["datasets"]
    assert ds["slices"]["unusable"] == 3
    assert {u["name"] for u in ds["unusable"]} == {NAME.format(k) for k in BAD}
    # What a person reads: `status` and `provenance` say which slices and why.
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "--db", str(profile.store.database)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert f"{NAME.format(BLANK)}: unusable: blank frame" in shown.output
    shown = runner.invoke(
        app, ["provenance", NAME.format(CUT), "--db", str(profile.store.database)],
        terminal_width=200,
    )  # fmt: skip
    assert shown.exit_code == 0 and "unusable: frame cut short" in shown.output


def test_bad_frames_never_train_a_finetune(tmp_path, tiny_checkpoint, acquisition):
    from nrrn_daemon.finetune.run import raw_runs

    stack, _ = acquisition
    profile = make_profile(tmp_path, tiny_checkpoint, **{"grouping.neighbour_wait_s": 30.0})
    Microscope(tmp_path / "raw", stack, NAME, interval_s=0.0, chunks=1).run()
    burst(profile)
    with Store(profile.store.database, readonly=True) as store:
        (dataset_id,) = store.dataset_ids().values()
        runs = raw_runs(store, dataset_id, 0.1)
    trained = {p.name for run in runs for p in run}
    assert trained and not trained & {NAME.format(k) for k in BAD}


def test_a_reacquired_frame_replaces_the_bad_one_and_its_neighbours_are_redone(
    tmp_path, tiny_checkpoint, acquisition
):
    stack, retake = acquisition
    profile = make_profile(tmp_path, tiny_checkpoint, **{"grouping.neighbour_wait_s": 30.0})
    scope = Microscope(tmp_path / "raw", stack[: BLANK + 3], NAME, interval_s=0.0, chunks=1)
    name = NAME.format
    with Running(profile) as run:
        scope.run()
        run.wait_for(lambda: {name(k) for k in (BLANK - 1, BLANK, BLANK + 1)} <= set(run.outputs))
        outs = current_outputs(profile.store.database)
        assert outs[name(BLANK - 1)]["mode"] == "pair" and outs[name(BLANK)]["mode"] == "copy"
        retaken = Microscope(tmp_path / "raw", np.stack([retake]), NAME, chunks=1,
                             first_index=BLANK)  # fmt: skip
        retaken.write(0)  # the same name, a good frame
        run.wait_for(
            lambda: (
                run.outputs.count(name(BLANK - 1)) == 2
                and run.outputs.count(name(BLANK + 1)) == 2
                and run.outputs.count(name(BLANK)) == 2
            )
        )
    outs = current_outputs(profile.store.database)
    for k in (BLANK - 1, BLANK, BLANK + 1):
        assert outs[name(k)]["mode"] == "triplet" and outs[name(k)]["version"] == 2, k
    assert slice_rows(profile.store.database)[name(BLANK)] == ("denoised", None)
