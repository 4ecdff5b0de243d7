"""The command line: offline commands on real files, the daemon's read commands, clear errors."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from nrrn_daemon.cli.app import app
from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.model.checkpoints import load_checkpoint
from nrrn_daemon.sim.microscope import Microscope, encode_tiff
from nrrn_daemon.store.store import Store

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_clear_line(result, *needles: str) -> None:
    """Exit code 1 and a message (no traceback) containing each needle."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture
def crop(fib25) -> np.ndarray:
    return np.ascontiguousarray(fib25[:5, :64, :64])


def test_denoise_multipage_keeps_shape_and_dtype(tmp_path, tiny_checkpoint, crop):
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, crop, photometric="minisblack")
    result = invoke(
        "denoise", src, "--output", tmp_path / "out", "--model", tiny_checkpoint, "--tile", 32
    )
    assert result.exit_code == 0, result.output
    out = tifffile.imread(tmp_path / "out" / "stack.tif")
    assert out.shape == crop.shape and out.dtype == np.uint8


def test_denoise_folder_gives_one_file_per_slice_with_its_name_and_tags(
    tmp_path, tiny_checkpoint, crop
):
    raw = tmp_path / "raw"
    raw.mkdir()
    for k in range(len(crop)):
        tifffile.imwrite(
            raw / f"s_{k + 1}.tif",
            crop[k],
            software="SmartSEM",
            extratags=[(34118, "s", 0, f"AP_WD\r\nWD = {k}", True)],
        )
    result = invoke(
        "denoise", raw, "--output", tmp_path / "out", "--model", tiny_checkpoint, "--inputs", 3
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(p.name for p in raw.iterdir())
    with tifffile.TiffFile(tmp_path / "out" / "s_2.tif") as tif:
        page = tif.pages[0]
        assert page.shape == (64, 64) and page.dtype == np.uint8
        zeiss = page.tags[34118].value
        assert "NRRN" in page.description
    with tifffile.TiffFile(raw / "s_2.tif") as tif:
        assert tif.pages[0].tags[34118].value == zeiss


def test_denoise_refuses_to_write_into_the_input_folder(tmp_path, tiny_checkpoint, crop):
    for k in range(3):
        tifffile.imwrite(tmp_path / f"s_{k}.tif", crop[k])
    one_clear_line(
        invoke("denoise", tmp_path, "--output", tmp_path, "--model", tiny_checkpoint), "overwrite"
    )


def test_bad_inputs_give_one_clear_line(tmp_path, tiny_checkpoint, crop):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, crop, photometric="minisblack")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:5000])
    one_clear_line(
        invoke("denoise", cut, "--output", tmp_path / "o", "--model", tiny_checkpoint), "cut.tif"
    )
    one_clear_line(
        invoke(
            "denoise", tmp_path / "nope.tif", "--output", tmp_path / "o", "--model", tiny_checkpoint
        ),
        "nope.tif",
    )
    bad_model = tmp_path / "bad.pt"
    bad_model.write_bytes(tiny_checkpoint.read_bytes()[:-100])
    one_clear_line(
        invoke("denoise", good, "--output", tmp_path / "o", "--model", bad_model),
        "bad.pt",
        "corrupt",
    )
    # Mismatched slice shapes.
    odd = tmp_path / "odd"
    odd.mkdir()
    tifffile.imwrite(odd / "a_1.tif", crop[0])
    tifffile.imwrite(odd / "a_2.tif", crop[1, :32])
    one_clear_line(
        invoke("denoise", odd, "--output", tmp_path / "o", "--model", tiny_checkpoint), "a_2.tif"
    )
    # Two slices cannot train the triplet loss.
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, crop[:2], photometric="minisblack")
    one_clear_line(invoke("train", two, "--out", tmp_path / "m.pt", "--steps", 1), "two.tif", "3")


def test_train_writes_a_checkpoint_that_denoise_uses(tmp_path, crop):
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, crop, photometric="minisblack")
    model = tmp_path / "m.pt"
    result = invoke(
        "train",
        src,
        "--out",
        model,
        "--blocks",
        1,
        "--features",
        4,
        "--steps",
        3,
        "--patch",
        32,
        "--batch",
        2,
        "--validation",
        0.0,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(model)
    assert ckpt.config.blocks == 1 and ckpt.summary["steps"] == 3
    result = invoke("denoise", src, "--output", tmp_path / "out", "--model", model)
    assert result.exit_code == 0, result.output


def test_evaluate_and_metrics(tmp_path, crop):
    clean = tmp_path / "clean.tif"
    noisy = tmp_path / "noisy.tif"
    tifffile.imwrite(clean, crop, photometric="minisblack")
    tifffile.imwrite(
        noisy, np.clip(crop.astype(int) + 10, 0, 255).astype(np.uint8), photometric="minisblack"
    )
    result = invoke("evaluate", noisy, clean, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["psnr"]) == len(crop) and 20 < report["psnr_mean"] < 40
    result = invoke("metrics", clean, "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert m["noise_sigma"] > 0 and len(m["flat_region"]) == 4 and m["iqr_region"] >= 0
    one_clear_line(invoke("evaluate", noisy, tmp_path / "missing.tif"), "missing.tif")


def test_profiles_lists_the_shipped_ones():
    result = invoke("profiles")
    assert result.exit_code == 0, result.output
    for name in ("helios", "atlas", "generic", "demo"):
        assert name in result.output
    result = invoke("profiles", "--validate", "helios")
    assert result.exit_code == 0 and '"databar": "fei"' in result.output


def test_unknown_profile_field_stops_start_naming_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[watch]\nfolder = "/tmp"\nsetle_s = 3\n')
    one_clear_line(invoke("start", "--profile", bad), "setle_s", "settle_s")
    one_clear_line(invoke("start", "--profile", "no-such-profile"), "no-such-profile", "helios")
    one_clear_line(
        invoke("status", "--db", tmp_path / "none.sqlite"), "none.sqlite", "start the daemon"
    )


def test_status_provenance_and_an_exact_rerun(tmp_path, tiny_checkpoint, crop):
    raw, out, db = tmp_path / "raw", tmp_path / "out", tmp_path / "db.sqlite"
    Microscope(raw, crop, "SEM Image - SliceImage - {:03d}.tif", interval_s=0, first_index=1).run()
    # A databar below each image, cropped off before denoising and copied through.
    fei = "[Image]\r\nResolutionX=64\r\nResolutionY=56\r\n"
    for p in sorted(raw.iterdir()):
        img = tifffile.imread(p)
        img[56:] = 255
        p.write_bytes(encode_tiff(img, extratags=[(34682, "s", 0, fei, True)]))
    profile = load_profile(
        "helios",
        overrides={
            "watch.folder": str(raw),
            "output.folder": str(out),
            "store.database": str(db),
            "model.checkpoint": str(tiny_checkpoint),
            "model.device": "cpu",
            "watch.settle_s": 0.1,
        },
    )
    with Store(db) as store:
        assert Daemon(profile, store).work(burst=True) == "burst complete"
    result = invoke("status", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    ds = json.loads(result.output)["datasets"][0]
    assert ds["slices"]["denoised"] == len(crop) and ds["cpu_fallback"] is True
    assert ds["precision"] in ("bf16", "float32")
    text = invoke("status", "--db", db)
    assert text.exit_code == 0 and f"cpu ({ds['precision']})" in text.output
    # One short run: the text states each rate's window, and says what --json says.
    tp = ds["throughput_per_h"]
    assert tp["total"] == tp["outputs"] == len(crop)
    words = " ".join(text.output.replace("│", " ").split())
    assert f"{tp['overall']:.0f} /h from first start to last output ({len(crop)} in" in words
    assert f"({len(crop)} outputs)" in words and "over the last" in words
    target = out / "SEM Image - SliceImage - 003.tif"
    result = invoke("provenance", target, "--db", db, "--json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.output)["outputs"]
    assert record["mode"] == "triplet" and [i["role"] for i in record["inputs"]] == [
        "prev",
        "centre",
        "next",
    ]
    argv = record["rerun"]["argv"]
    assert argv[:2] == ["nrrn-daemon", "denoise"] and "--databar" in argv
    # The precision and compilation the daemon used (both change the rounding).
    assert argv[argv.index("--precision") + 1] == ds["precision"]
    assert argv[argv.index("--compile") + 1] == "off", "a tiny model is not compiled"
    result = invoke(*argv[1:])
    assert result.exit_code == 0, result.output
    again = tifffile.imread(record["rerun"]["expected_output"])
    daemon_out = tifffile.imread(target)
    np.testing.assert_array_equal(again, daemon_out)
    assert (daemon_out[56:] == 255).all()  # the databar went through untouched
    assert shlex.split(record["rerun"]["command"]) == argv
    assert invoke("provenance", target, "--db", db).exit_code == 0
    one_clear_line(invoke("provenance", "nothing.tif", "--db", db), "nothing.tif")
