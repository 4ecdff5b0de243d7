"""``reprocess`` on a real Dask ``LocalCluster`` (2 worker processes, CPU) and real files.

The data is a noisy crop of the real FIB-25 volume (the paper's Poisson protocol, peak 4), one
ImageJ TIFF per slice with its 10 nm voxel size; the model is a small NRRN really running. The
reference is the single-process offline command (``denoise_stack``) with the same checkpoint,
on one torch thread like each worker, so results must be equal to the grey level.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import random_checkpoint
from helpers import zarr_io_threads  # noqa: F401
from typer.testing import CliRunner

from nrrn_daemon.batch.offline import denoise_stack
from nrrn_daemon.batch.reprocess import dask_cluster, plan_reprocess, run_plan
from nrrn_daemon.cli.app import app
from nrrn_daemon.files import sha256_file
from nrrn_daemon.imaging.omezarr import OmeZarrVolume
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.states import SliceState
from nrrn_daemon.store.store import Store

pytestmark = pytest.mark.usefixtures("zarr_io_threads")

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_logging():
    """The command configures logging on the runner's stream; later cluster logs must not go
    to that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def cluster():
    """One real LocalCluster of 2 worker processes for the module (it takes seconds to start)."""
    with dask_cluster(local_workers=2) as started:
        yield started


def connect_to(cluster):
    return lambda: nullcontext(cluster)


def no_cluster():
    raise AssertionError("a cluster was started although there was nothing to do")


def write_slices(folder: Path, stack: np.ndarray, first: int = 1) -> list[Path]:
    """One ImageJ TIFF per slice (10 nm pixels, 10 nm spacing), named ``slice_001.tif``..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, plane in enumerate(stack):
        path = folder / f"slice_{k + first:03d}.tif"
        tifffile.imwrite(
            path, plane, imagej=True, resolution=(100, 100),
            metadata={"spacing": 0.01, "unit": "um"},
        )  # fmt: skip
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def noisy(fib25) -> np.ndarray:
    """32 noisy 160×200 slices of FIB-25 (Poisson, peak 4)."""
    return noisy_stack(fib25[:32, :160, :200], "poisson:4", seed=5)


def reference(paths: list[Path], ckpt: Path, out: Path) -> np.ndarray:
    """The single-process result (offline command) on one torch thread, as a (z, y, x) array."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        denoiser = Denoiser(load_checkpoint(ckpt), device="cpu", tile=512)
        written = denoise_stack(paths, out, denoiser)
    finally:
        torch.set_num_threads(before)
    return np.stack([tifffile.imread(p) for p in written])


def outputs(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT s.name, o.version, o.is_current, o.mode, o.reason, o.path FROM outputs o "
            'JOIN slices s ON s.id = o.centre_slice_id ORDER BY s."index", o.version'
        ).fetchall()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, noisy, cluster):
    """A complete reprocess of 12 slices into TIFFs and a 2-level volume, with its reference."""
    root = tmp_path_factory.mktemp("finished")
    paths = write_slices(root / "raw", noisy[:12])
    ckpt = random_checkpoint(root / "tiny.pt")
    db = root / "nrrn.sqlite"
    with Store(db) as store:
        plan = plan_reprocess(
            str(root / "raw"), store, model=str(ckpt), output=root / "out",
            zarr=root / "vol.zarr", device="cpu", zarr_levels=2,
        )  # fmt: skip
        summary = run_plan(plan, store, connect_to(cluster))
    ref = reference(paths, ckpt, root / "ref")
    return {"root": root, "paths": paths, "ckpt": ckpt, "db": db, "summary": summary, "ref": ref}


def test_distributed_result_equals_the_single_process_result(finished):
    root, summary = finished["root"], finished["summary"]
    assert (summary.total, summary.submitted, summary.recorded, summary.failed) == (12, 12, 12, [])
    assert summary.workers == 2
    got = np.stack([tifffile.imread(root / "out" / p.name) for p in finished["paths"]])
    np.testing.assert_array_equal(got, finished["ref"])
    volume = OmeZarrVolume.open(root / "vol.zarr")
    np.testing.assert_array_equal(volume.read(0), finished["ref"])
    assert volume.voxel_size.zyx() == pytest.approx([10.0, 10.0, 10.0])  # from ImageJ metadata
    assert not list((root / "out").glob(".*"))


def test_each_slice_is_recorded_once_with_its_inputs(finished):
    rows = outputs(finished["db"])
    assert [r[0] for r in rows] == [p.name for p in finished["paths"]]
    assert {(r[1], r[2], r[4]) for r in rows} == {(1, 1, "reprocess")}
    assert [r[3] for r in rows] == ["pair"] + ["triplet"] * 10 + ["pair"]
    with Store(finished["db"], readonly=True) as store:
        report = store.provenance(str(finished["root"] / "out" / "slice_005.tif"))
    (out,) = report["outputs"]
    assert [(i["role"], i["name"]) for i in out["inputs"]] == [
        ("prev", "slice_004.tif"), ("centre", "slice_005.tif"), ("next", "slice_006.tif")
    ]  # fmt: skip
    assert all(i["sha256"] == sha256_file(Path(i["path"])) for i in out["inputs"])
    assert out["sha256"] == sha256_file(finished["root"] / "out" / "slice_005.tif")
    assert out["settings"]["zarr"]["z"] == 4 and out["model"]["sha256"]


def test_rerunning_a_finished_reprocess_does_nothing(finished):
    root = finished["root"]
    before = outputs(finished["db"])
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "out").iterdir()}
    with Store(finished["db"]) as store:
        plan = plan_reprocess(
            str(root / "raw"), store, model=str(finished["ckpt"]), output=root / "out",
            zarr=root / "vol.zarr", device="cpu",
        )  # fmt: skip
        summary = run_plan(plan, store, no_cluster)
    assert (len(plan.todo), summary.submitted, summary.skipped) == (0, 0, 12)
    assert outputs(finished["db"]) == before
    assert {p: p.stat().st_mtime_ns for p in (root / "out").iterdir()} == mtimes


def test_a_changed_or_missing_output_is_redone_alone(finished, tmp_path):
    """A deleted TIFF is planned again; nothing else is (the zarr record still holds)."""
    root = finished["root"]
    with Store(finished["db"]) as store:
        (root / "out" / "slice_007.tif").rename(tmp_path / "moved.tif")
        try:
            plan = plan_reprocess(
                str(root / "raw"), store, model=str(finished["ckpt"]), output=root / "out",
                zarr=root / "vol.zarr", device="cpu",
            )  # fmt: skip
        finally:
            (tmp_path / "moved.tif").rename(root / "out" / "slice_007.tif")
    assert [t.centre.name for t in plan.todo] == ["slice_007.tif"]


def test_killing_a_worker_mid_run_still_gives_the_complete_volume(tmp_path, noisy, cluster):
    paths = write_slices(tmp_path / "raw", noisy)
    # ~0.1 s a slice: slow enough to be killed mid-task, too small to be compiled (< 16 channels)
    ckpt = random_checkpoint(tmp_path / "slow.pt", blocks=4, features=12)
    client = cluster.client
    killed: dict[str, object] = {}
    ran_on: dict[int, str] = {}

    def kill_one(result, summary) -> None:
        ran_on[result.z] = result.worker
        if killed:
            return
        processing = {w: keys for w, keys in client.processing().items() if keys}
        victim, keys = next(iter(processing.items()))
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        killed.update(address=victim, keys=list(keys), pid=pid)

    db = tmp_path / "nrrn.sqlite"
    with Store(db) as store:
        plan = plan_reprocess(
            str(tmp_path / "raw"), store, model=str(ckpt), output=tmp_path / "out",
            zarr=tmp_path / "vol.zarr", device="cpu",
        )  # fmt: skip
        summary = run_plan(plan, store, connect_to(cluster), on_result=kill_one)
    assert killed["keys"], "the killed worker was running a task"
    for key in killed["keys"]:  # its task ran again on another worker
        assert ran_on[int(str(key).rsplit("-z", 1)[1])] != killed["address"]
    assert (summary.recorded, summary.failed) == (32, [])
    rows = outputs(db)
    assert [r[0] for r in rows] == [p.name for p in paths]  # each slice once, version 1
    assert {r[1] for r in rows} == {1}
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
    assert killed["pid"] not in client.run(os.getpid).values()
    ref = reference(paths, ckpt, tmp_path / "ref")
    np.testing.assert_array_equal(OmeZarrVolume.open(tmp_path / "vol.zarr").read(0), ref)
    got = np.stack([tifffile.imread(tmp_path / "out" / p.name) for p in paths])
    np.testing.assert_array_equal(got, ref)
    assert not list((tmp_path / "out").glob(".*.part"))
    assert not list((tmp_path / "vol.zarr").rglob("*.partial"))


def test_an_interrupted_run_resumes_with_the_rest_only(tmp_path, noisy, cluster):
    paths = write_slices(tmp_path / "raw", noisy[:16], first=0)
    ckpt = random_checkpoint(tmp_path / "tiny.pt")
    db = tmp_path / "nrrn.sqlite"
    args = dict(model=str(ckpt), zarr=tmp_path / "vol.zarr", device="cpu", zarr_levels=2)
    with Store(db) as store:
        first = run_plan(
            plan_reprocess(str(tmp_path / "raw"), store, **args), store, connect_to(cluster),
            should_stop=lambda: True,  # stop after the first result
        )  # fmt: skip
        assert first.interrupted and first.recorded == 1
        done = {r[0] for r in outputs(db)}
        plan = plan_reprocess(str(tmp_path / "raw"), store, **args)
        assert {t.centre.name for t in plan.todo} == {p.name for p in paths} - done
        second = run_plan(plan, store, connect_to(cluster), batch=4)
    assert (second.submitted, second.recorded, second.interrupted) == (15, 15, False)
    assert [r[0] for r in outputs(db)] == [p.name for p in paths]
    ref = reference(paths, ckpt, tmp_path / "ref")
    volume = OmeZarrVolume.open(tmp_path / "vol.zarr")
    np.testing.assert_array_equal(volume.read(0), ref)
    assert all(volume.has_slice(z) for z in range(16))


def test_a_multipage_stack_into_a_volume(tmp_path, noisy, cluster):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, noisy[:8], imagej=True, metadata={"spacing": 0.02, "unit": "um"},
                     resolution=(100, 100))  # fmt: skip
    ckpt = random_checkpoint(tmp_path / "tiny.pt")
    with Store(tmp_path / "nrrn.sqlite") as store:
        plan = plan_reprocess(str(stack), store, model=str(ckpt), zarr=tmp_path / "v.zarr",
                              output=tmp_path / "out", device="cpu")  # fmt: skip
        run_plan(plan, store, connect_to(cluster), batch=3)
    ref = reference([stack], ckpt, tmp_path / "ref")[0]
    volume = OmeZarrVolume.open(tmp_path / "v.zarr")
    np.testing.assert_array_equal(volume.read(0), ref)
    assert volume.voxel_size.zyx() == pytest.approx([20.0, 10.0, 10.0])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"stack_{i:04d}.tif" for i in range(8)
    ]


def test_cli_reprocesses_a_known_data_set_by_name_with_its_profile_and_model_label(
    tmp_path, noisy, cluster
):
    write_slices(tmp_path / "raw", noisy[:5])
    ckpt = load_checkpoint(random_checkpoint(tmp_path / "v2.pt", seed=3))
    db = tmp_path / "nrrn.sqlite"
    profile = tmp_path / "lab.toml"
    profile.write_text(
        'name = "lab"\n[output]\nnaming = "{stem}_nrrn{suffix}"\n'
        f'[store]\ndatabase = "{db}"\n[model]\ndevice = "cpu"\n'
    )
    with Store(db) as store:
        ds = store.ensure_dataset("run42", str(tmp_path / "raw"), "lab")
        store.ensure_model(
            sha256=ckpt.content_sha256, path=str(tmp_path / "v2.pt"), label="run42-v2",
            kind="finetuned", config={}, dataset_id=ds,
        )  # fmt: skip
    address = cluster.client.scheduler.address
    args = ["reprocess", "run42", "--profile", str(profile), "--model", "run42-v2",
            "--output", str(tmp_path / "out"), "--scheduler", address]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"slice_{i:03d}_nrrn.tif" for i in range(1, 6)
    ]
    assert "5 slices denoised" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    rows = outputs(db)
    assert len(rows) == 5 and {r[5] for r in rows} == {
        str(tmp_path / "out" / f"slice_{i:03d}_nrrn.tif") for i in range(1, 6)
    }


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model", "nope-v9", "-o", "{tmp}/out"], "no model match 'nope-v9'"),
        (["--zarr", "{tmp}/plain"], "is not a Zarr v3 group"),
        (["--zarr", "{tmp}/other.zarr"], "holds 8×8 uint8 slices, these are 32×32 uint8"),
        (["--scheduler", "tcp://127.0.0.1:1", "--local-workers", "2"], "not both"),
        ([], "nothing to write"),
        (["--output", "{tmp}/raw"], "is the input folder"),
        (["--zarr", "{tmp}/v.zarr", "--voxel-size", "10,5"], "three comma-separated numbers"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, extra, expected):
    write_slices(tmp_path / "raw", np.zeros((3, 32, 32), np.uint8))
    (tmp_path / "plain").mkdir()
    OmeZarrVolume.create(tmp_path / "other.zarr", depth=3, slice_shape=(8, 8), dtype=np.uint8)
    argv = ["reprocess", str(tmp_path / "raw"), "--db", str(tmp_path / "db.sqlite")]
    result = runner.invoke(app, argv + [a.format(tmp=tmp_path) for a in extra])
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    if (tmp_path / "db.sqlite").exists():  # checked before anything is recorded
        with sqlite3.connect(tmp_path / "db.sqlite") as con:
            assert con.execute("SELECT count(*) FROM datasets").fetchone() == (0,)


def test_refuses_while_a_daemon_writes_the_database(tmp_path):
    write_slices(tmp_path / "raw", np.zeros((3, 32, 32), np.uint8))
    with Store(tmp_path / "db.sqlite") as store:
        store.start_run(profile_name="generic", profile_json={}, device="cpu")  # alive now
    result = runner.invoke(
        app, ["reprocess", str(tmp_path / "raw"), "--db", str(tmp_path / "db.sqlite"),
              "--output", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1 and "a daemon is running on" in result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_folder_is_one_clear_line(tmp_path):
    result = runner.invoke(
        app, ["reprocess", str(tmp_path / "gone"), "--db", str(tmp_path / "db.sqlite"),
              "--output", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "is not a folder, a TIFF stack or a data set" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_frames_are_no_neighbours_in_a_reprocess(tmp_path, fib25, cluster):
    stack = noisy_stack(fib25[:12, :64, :64], "poisson:4", seed=5)
    stack[4] = 0  # blank
    stack[8, 32:] = 0  # cut short
    paths = write_slices(tmp_path / "raw", stack)
    ckpt = random_checkpoint(tmp_path / "tiny.pt")
    db = tmp_path / "nrrn.sqlite"
    with Store(db) as store:
        plan = plan_reprocess(
            str(tmp_path / "raw"), store, model=str(ckpt), output=tmp_path / "out", device="cpu"
        )
        by_name = {t.centre.name: t for t in plan.tasks}
        assert [n.name for n in by_name["slice_004.tif"].neighbours] == ["slice_003.tif"]
        assert [n.name for n in by_name["slice_006.tif"].neighbours] == ["slice_007.tif"]
        assert by_name["slice_005.tif"].mode == "copy" and not by_name["slice_005.tif"].neighbours
        assert by_name["slice_005.tif"].unusable.startswith("blank frame")
        assert by_name["slice_009.tif"].mode == "single" and not by_name["slice_009.tif"].neighbours
        summary = run_plan(plan, store, connect_to(cluster))
        assert summary.recorded == 12 and not summary.failed
        rows = {r.name: r for r in store.slices_in_state(plan.dataset_id, list(SliceState))}
    assert rows["slice_005.tif"].state == SliceState.UNUSABLE
    assert rows["slice_009.tif"].reason.startswith("unusable: frame cut short")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "slice_005.tif"), stack[4])
    assert len(paths) == 12
