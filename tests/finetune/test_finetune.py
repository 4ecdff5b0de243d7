"""Fine-tuning on a data set's raw slices: the run, the promotion gate, crash safety, the daemon."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from apscheduler.triggers.interval import IntervalTrigger
from helpers import make_dataset, one_thread, tiny_parent, write_profile  # noqa: F401

from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.finetune.promotion import judge, residual_structure
from nrrn_daemon.finetune.run import (
    FinetuneJob,
    begin,
    held_out_triplets,
    raw_runs,
    record_result,
    run_finetune,
)
from nrrn_daemon.finetune.runner import request_file
from nrrn_daemon.finetune.validation import validation_blocks
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.store.store import Store

SLICES, SIDE, FRACTION = 24, 64, 0.2
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fib_crop(fib25: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clean = np.ascontiguousarray(fib25[:SLICES, 60 : 60 + SIDE, 60 : 60 + SIDE])
    return clean, noisy_stack(clean, "poisson:4", seed=1)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, fib_crop) -> dict:
    """One real short fine-tune on the noisy FIB-25 crop, recorded like the CLI does."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ft")
    parent = tiny_parent(folder / "parent.pt")
    db = make_dataset(folder, fib_crop[1], parent)
    job = FinetuneJob(
        db=str(db), dataset="ds", parent=str(parent), models_dir=str(folder / "models"),
        minutes=1.0, steps=80, device="cpu", patch=48, batch=4, validation_fraction=FRACTION,
    )  # fmt: skip
    with Store(db) as store:
        ft_id = begin(store, job, os.getpid(), "test")
        result = run_finetune(job)
        record_result(store, ft_id, result)
    return {"db": db, "parent": parent, "job": job, "result": result, "folder": folder}


def test_a_short_finetune_on_fib25_improves_validation_loss_and_psnr(finetuned, fib_crop) -> None:
    result = finetuned["result"]
    assert result.status == "promoted", result.reasons
    assert result.candidate_metrics["val_loss"] < result.parent_metrics["val_loss"]
    assert result.steps == 80 and result.device == "cpu" and result.validation_triplets >= 1
    # Against the clean volume, on a held-out slice (never trained on).
    clean, noisy = fib_crop
    held = validation_blocks(SLICES, FRACTION, 3)
    j = held[len(held) // 2]
    scores = {}
    for name, path in (("parent", result.parent_path), ("candidate", result.candidate_path)):
        out = Denoiser(load_checkpoint(path), device="cpu", tile=None).denoise(
            noisy[j], [noisy[j - 1], noisy[j + 1]]
        )
        scores[name] = psnr(out, clean[j])
    assert scores["candidate"] > scores["parent"] + 1.0, scores
    assert scores["candidate"] > psnr(noisy[j], clean[j]), "the fine-tuned model denoises"


def test_the_run_is_recorded_and_every_version_kept(finetuned) -> None:
    result = finetuned["result"]
    candidate = Path(result.candidate_path)
    assert candidate.parent == finetuned["folder"] / "models" / "ds"
    assert candidate.name == f"{result.candidate_sha256[:12]}.pt"
    assert not list(candidate.parent.glob(".*.part"))
    with Store(finetuned["db"], readonly=True) as store:
        report = store.models("ds")["datasets"][0]
        status = store.status("ds")["datasets"][0]
    labels = {m["label"]: m for m in report["models"]}
    cand = labels[f"ft-{result.candidate_sha256[:8]}"]
    assert cand["current"] and cand["kind"] == "finetuned" and cand["promoted_at"]
    assert cand["metrics"]["val_loss"] == pytest.approx(result.candidate_metrics["val_loss"])
    assert cand["parent"] == f"model-{result.parent_sha256[:12]}"
    assert report["current"] == cand["label"]
    (ft,) = report["finetunes"]
    assert ft["status"] == "promoted" and ft["steps"] == 80 and ft["device"] == "cpu"
    assert ft["val_loss_candidate"] < ft["val_loss_parent"] and ft["ended_at"]
    assert status["finetunes"][0]["id"] == ft["id"]


def test_the_gate_rejects_a_worse_candidate(finetuned) -> None:
    job = finetuned["job"]
    with Store(job.db, readonly=True) as store:
        runs = raw_runs(store, store.dataset_ids()["ds"], FRACTION)
    from nrrn_daemon.finetune.run import SliceStack

    triplets = held_out_triplets([SliceStack(r, "none", 0) for r in runs], FRACTION)
    good = load_checkpoint(finetuned["result"].candidate_path)
    random = load_checkpoint(tiny_parent(finetuned["folder"] / "random.pt", seed=5))
    verdict = judge(good, random, triplets, device="cpu")
    assert not verdict.promote
    assert any("validation loss" in r for r in verdict.reasons)
    assert judge(random, good, triplets, device="cpu").promote


def test_residual_structure_tells_noise_from_removed_edges() -> None:
    rng = np.random.default_rng(0)
    assert abs(residual_structure(rng.normal(size=(64, 64)))) < 0.05
    ramp = np.add.outer(np.arange(64.0), np.arange(64.0))
    edges = np.where(ramp % 16 < 8, 10.0, -10.0) + rng.normal(size=(64, 64))
    assert residual_structure(edges) > 0.5


def finetune_rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, status, candidate_model_id FROM finetune_runs").fetchall()
    finally:
        con.close()


def test_kill_9_during_a_finetune_keeps_the_current_model(tmp_path: Path, fib_crop) -> None:
    parent = tiny_parent(tmp_path / "parent.pt")
    db = make_dataset(tmp_path, fib_crop[1], parent)
    profile = write_profile(tmp_path, parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nrrn_daemon", "finetune", "--now", "--profile", str(profile),
         "--dataset", "ds", "--minutes", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not finetune_rows(db):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2.0)  # training
        assert proc.poll() is None, "the fine-tune ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    models = tmp_path / "state" / "models"
    leftovers = [p.name for p in models.rglob("*")] if models.exists() else []
    assert not [n for n in leftovers if n.endswith((".pt", ".part"))], leftovers
    with Store(db) as store:
        ds = store.dataset_ids()["ds"]
        assert store.current_model_id(ds) is None, "the model in service is unchanged"
        assert store.close_dead_finetunes(lambda pid: pid != proc.pid) == 1
    ((_, status, candidate),) = finetune_rows(db)
    assert status == "failed" and candidate is None


def test_the_daemon_finetunes_in_a_subprocess_while_denoising(
    tmp_path: Path, fib_crop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from nrrn_daemon.config.loading import load_profile

    parent = tiny_parent(tmp_path / "parent.pt")
    noisy = fib_crop[1]
    (tmp_path / "raw").mkdir()
    for i in range(16):
        tifffile.imwrite(tmp_path / "raw" / f"slice_{i:04d}.tif", noisy[i])
    profile = load_profile(write_profile(tmp_path, parent, enabled=True, early_after_slices=0))
    store = Store(profile.store.database)
    outputs: list[tuple[float, str]] = []
    daemon = Daemon(
        profile, store, finetune_trigger=IntervalTrigger(hours=12),
        on_event=lambda kind, data: outputs.append((time.monotonic(), kind)),
    )  # fmt: skip
    thread = threading.Thread(target=daemon.work, name="nrrn-test-daemon")
    thread.start()
    db = Path(profile.store.database)
    try:
        deadline = time.monotonic() + 60
        while sum(k == "output" for _, k in outputs) < 14:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        assert daemon.finetuning.next_run() is not None  # the schedule's next run
        request_file(db).write_text(json.dumps({"steps": 10}))
        while not finetune_rows(db):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        for i in range(16, SLICES):  # live slices arrive during the fine-tune
            tifffile.imwrite(tmp_path / "raw" / f"slice_{i:04d}.tif", noisy[i])
        deadline = time.monotonic() + 90
        while finetune_rows(db)[0][1] == "running":
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)
        ended = time.monotonic()
    finally:
        daemon.request_stop("test over")
        thread.join(30)
        store.close()
    assert not thread.is_alive()
    ((_, status, candidate),) = finetune_rows(db)
    assert status in ("promoted", "rejected") and candidate is not None
    live = [t for t, k in outputs if k == "output" and started <= t <= ended]
    assert live, "slices were denoised while the fine-tune ran"


def test_the_finetune_waits_between_steps_while_a_live_slice_is_denoised(tmp_path: Path) -> None:
    import os
    import threading
    import time

    from nrrn_daemon.finetune.run import live_flag, wait_while_live

    flag = live_flag(tmp_path / "db.sqlite")
    assert wait_while_live(flag) == 0.0  # nothing live: no wait
    flag.touch()
    remover = threading.Timer(0.4, flag.unlink)
    remover.start()
    started = time.monotonic()
    waited = wait_while_live(flag, poll_s=0.02)
    remover.join()
    assert waited >= 0.3 and time.monotonic() - started >= 0.35
    # A flag left by a daemon killed mid-slice does not block a fine-tune forever.
    flag.touch()
    os.utime(flag, (time.time() - 3600, time.time() - 3600))
    assert wait_while_live(flag) == 0.0


# -- repeat-scan data sets ------------------------------------------------------------------------
SCAN_SLICES = 10


def make_scan_dataset(folder: Path, scans: list[np.ndarray]) -> Path:
    """``scans[s][i]``: scan ``s`` of slice ``i``, recorded as the daemon records repeat scans."""
    (folder / "raw").mkdir(parents=True)
    db = folder / "state" / "db.sqlite"
    with Store(db) as store:
        ds = store.ensure_dataset("ds", str(folder / "raw"), "test")
        for s, stack in enumerate(scans):
            for i, image in enumerate(stack):
                path = folder / "raw" / f"slice_{i:04d}_scan{s}.tif"
                tifffile.imwrite(path, image)
                store.upsert_slice(ds, path=str(path), name=path.name, index=i, scan=s,
                                   size=path.stat().st_size, mtime=path.stat().st_mtime,
                                   sha256="x", state="ready")  # fmt: skip
    return db


def test_a_repeat_scan_dataset_finetunes_on_scan_triplets(tmp_path: Path, fib25) -> None:
    """Three scans of one slice carry the same signal: the fine-tune trains on scan triplets."""
    clean = np.ascontiguousarray(fib25[:SCAN_SLICES, 60 : 60 + SIDE, 60 : 60 + SIDE])
    scans = [noisy_stack(clean, "poisson:4", seed=10 + s) for s in range(3)]
    # Slice 9's third scan is still being acquired: its group is incomplete and left out.
    db = make_scan_dataset(tmp_path, [scans[0], scans[1], scans[2][:-1]])
    parent = tiny_parent(tmp_path / "parent.pt")
    job = FinetuneJob(
        db=str(db), dataset="ds", parent=str(parent), models_dir=str(tmp_path / "models"),
        minutes=1.0, steps=80, device="cpu", patch=48, batch=4, validation_fraction=FRACTION,
        scans_per_slice=3,
    )  # fmt: skip
    from nrrn_daemon.finetune.run import raw_scan_groups

    with Store(db, readonly=True) as store:
        paths = raw_scan_groups(store, store.dataset_ids()["ds"], FRACTION, 3)
    assert [p.name for p in paths[:3]] == [f"slice_0000_scan{s}.tif" for s in range(3)]
    assert len(paths) == 3 * (SCAN_SLICES - 1), "the incomplete scan group is not used"

    result = run_finetune(job)
    assert result.status == "promoted", result.reasons
    held = validation_blocks(SCAN_SLICES - 1, FRACTION, 1)
    assert result.validation_triplets == len(held) and result.train_slices == len(paths)
    # On a held-out slice, denoised from its three scans, against the clean volume.
    j = held[0]
    scores = {}
    for name, path in (("parent", result.parent_path), ("candidate", result.candidate_path)):
        out = Denoiser(load_checkpoint(path), device="cpu", tile=None).denoise(
            scans[0][j], [scans[1][j], scans[2][j]]
        )
        scores[name] = psnr(out, clean[j])
    assert scores["candidate"] > scores["parent"] + 1.0, scores
    assert scores["candidate"] > psnr(scans[0][j], clean[j])


def test_repeat_scan_jobs_follow_the_profile(tmp_path: Path) -> None:
    from nrrn_daemon.config.loading import load_profile
    from nrrn_daemon.finetune.runner import job_for

    def job(mode: str, scans: int) -> FinetuneJob:
        overrides = {"grouping.mode": mode, "grouping.scans_per_slice": scans,
                     "watch.index_regex": r"s(?P<index>\d+)_(?P<scan>\d+)\.tif$"}  # fmt: skip
        prof = load_profile("demo", overrides=overrides)
        return job_for(prof, db=tmp_path / "db", dataset="ds", parent="p.pt", models_dir=tmp_path)

    assert job("repeat-scans", 3).scans_per_slice == 3
    assert job("repeat-scans", 2).scans_per_slice == 1, "2 scans: adjacent first scans"
    assert job("adjacent", 3).scans_per_slice == 1


def test_too_few_complete_scan_groups_say_so(tmp_path: Path, fib25) -> None:
    from nrrn_daemon.errors import InputError
    from nrrn_daemon.finetune.run import raw_scan_groups

    clean = np.ascontiguousarray(fib25[0:2, :32, :32])
    db = make_scan_dataset(tmp_path, [noisy_stack(clean, "poisson:4", seed=s) for s in range(2)])
    with Store(db, readonly=True) as store, pytest.raises(InputError, match="≥ 3 scans"):
        raw_scan_groups(store, store.dataset_ids()["ds"], FRACTION, 3)


def test_a_full_models_disk_fails_the_finetune_and_keeps_the_model(
    tmp_path: Path, small_disk
) -> None:
    """The models folder on a real, full tmpfs: the candidate cannot be saved; the run is
    recorded failed with the reason, no partial checkpoint is left, the model in service stays;
    once space is freed the next run saves its candidate."""
    from conftest import fill_disk, noisy_test_stack

    from nrrn_daemon.finetune.run import FinetuneResult, child_main

    parent = tiny_parent(tmp_path / "parent.pt")
    db = make_dataset(tmp_path, noisy_test_stack(n=8, size=40), parent)
    models = small_disk("models", "1m")
    filler = fill_disk(models)
    job = FinetuneJob(
        db=str(db), dataset="ds", parent=str(parent), models_dir=str(models), minutes=None, steps=3,
        device="cpu", patch=24, batch=2, validation_fraction=0.3,
    )  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(asdict(job)))
    assert child_main([str(tmp_path / "job.json"), str(tmp_path / "result.json")]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and "disk full" in result["error"], result
    assert sorted(p.name for p in models.rglob("*") if p.is_file()) == ["filler.bin"]
    with Store(db) as store:
        ft_id = begin(store, job, os.getpid(), "test")
        record_result(store, ft_id, FinetuneResult.from_json(json.dumps(result)))
        assert store.current_model_id(store.dataset_ids()["ds"]) is None, "model unchanged"
    filler.unlink()
    saved = run_finetune(job)
    assert Path(saved.candidate_path).parent.parent == models
    assert load_checkpoint(saved.candidate_path).content_sha256 == saved.candidate_sha256
