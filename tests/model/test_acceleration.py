"""Reduced precision, fused gate convolutions and torch.compile: same results, faster.

* bf16 (autocast on CPUs with AVX512-BF16/AMX) against float32 on the shipped base checkpoint and
  the real FIB-25 volume with the paper's noise: within one grey level;
* the fused V_{u,r}+W_1 convolution against the stored, unfused weights, in float64, and against
  eq. 1 written out with six separate convolutions (so old checkpoints mean what they meant);
* the precision switch (Denoiser, profile, CLI) is honoured and recorded;
* compilation really runs where a compiler is present, and falls back cleanly (logged once) when
  torch.compile is unavailable — simulated by making ``torch.compile`` raise, the one fake here;
* a tiny NRRN trains in bf16 on the CPU.

Speed is measured by ``benchmarks/speed.py`` and ``benchmarks/precision_finetune.py``, not here.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import PAPER_BASE
from typer.testing import CliRunner

from nrrn_daemon.cli.app import app
from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.daemon.loop import Daemon
from nrrn_daemon.errors import InputError
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.imaging.provenance import read_provenance
from nrrn_daemon.model import acceleration
from nrrn_daemon.model.checkpoints import (
    BASE_CHECKPOINT,
    Checkpoint,
    Normalisation,
    load_checkpoint,
)
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.devices import DeviceInfo, cpu_bf16_features, resolve_device
from nrrn_daemon.model.nrrn import NRRN, NRRNConfig, feedback, noise_attention
from nrrn_daemon.sim.noise import PROTOCOL_LEVELS, noisy_stack
from nrrn_daemon.store.store import Store

needs_bf16 = pytest.mark.skipif(
    not cpu_bf16_features(),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX-BF16): precision 'auto' is float32",
)


def max_grey_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def tiny_checkpoint(blocks: int = 2, features: int = 8, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    return Checkpoint.from_model(NRRN(blocks, features), Normalisation("slice"))


def smooth_stack(shape: tuple[int, int] = (70, 90), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    clean = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0)
    return [np.clip(clean + rng.normal(0, 20, shape), 0, 255).astype(np.uint8) for _ in range(3)]


@pytest.fixture(scope="module", autouse=True)
def _compile_in_the_calling_thread():
    """Inductor compiles in a process-wide thread pool that outlives a test: torch's, not a leak
    of ours, but the thread guard in conftest.py would flag it. Compile in the calling thread."""
    import torch._inductor.config as inductor_config

    threads = inductor_config.compile_threads
    inductor_config.compile_threads = 1
    yield
    inductor_config.compile_threads = threads


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each test decides anew whether compilation works (the failure is remembered per process)."""
    acceleration.reset_compile_failure()
    yield
    acceleration.reset_compile_failure()


# -- bf16 against float32 on real data ------------------------------------------------------------
@needs_bf16
@pytest.mark.parametrize("level", PROTOCOL_LEVELS)
def test_bf16_is_within_one_grey_level_of_float32_on_fib25(fib25: np.ndarray, level: str) -> None:
    """Base checkpoint, real FIB-25 slices z = 200–204 with the paper's noise, tiled as in use.

    Triplets (the daemon's normal mode) at every protocol level; pairs at every level but
    Poisson peak 1, whose clipped images are binary (0 or 255): there 1–3 pixels in 62,500 of a
    pair differ by 2 (measured), the others by at most 1.
    """
    ckpt = load_checkpoint(PAPER_BASE)  # the paper network (the blind base is 4x dearer here)
    noisy = noisy_stack(fib25[0:5], level, seed=3)
    f32 = Denoiser(ckpt, device="cpu", tile=128, precision="float32", compile="off")
    bf16 = Denoiser(ckpt, device="cpu", tile=128, precision="bf16", compile="off")
    assert (f32.precision, bf16.precision) == ("float32", "bf16")
    for j in (1, 3):
        triplet = (noisy[j], [noisy[j - 1], noisy[j + 1]])
        a, b = f32.denoise(*triplet), bf16.denoise(*triplet)
        assert max_grey_diff(a, b) <= 1, f"{level}, triplet around z={200 + j}"
        # Most pixels identical (measured with the shipped base: 69–89 %, fewest at Poisson
        # peak 1); the others differ by 1.
        assert (a == b).mean() > 0.6, "most pixels identical"
        if level != "poisson:1":
            pair = (noisy[j], [noisy[j - 1]])
            assert max_grey_diff(f32.denoise(*pair), bf16.denoise(*pair)) <= 1, f"{level}, pair"


@needs_bf16
def test_bf16_tiled_equals_bf16_whole_image_within_one_grey_level() -> None:
    ckpt = tiny_checkpoint(blocks=4)
    centre, *neighbours = smooth_stack((97, 130))
    tiled = Denoiser(ckpt, device="cpu", tile=32, tile_batch=3, precision="bf16", compile="off")
    whole = Denoiser(ckpt, device="cpu", tile=None, precision="bf16", compile="off")
    f32 = Denoiser(ckpt, device="cpu", tile=None, precision="float32", compile="off")
    out = tiled.denoise(centre, neighbours)
    assert max_grey_diff(out, whole.denoise(centre, neighbours)) <= 1
    assert max_grey_diff(out, f32.denoise(centre, neighbours)) <= 1


# -- fused gate convolutions ----------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [1, 2, 4, 5])
def test_fused_gates_equal_unfused_in_float64_forward_and_backward(blocks: int) -> None:
    torch.manual_seed(blocks)
    model = NRRN(blocks, 8).double()
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 1, 23, 31, generator=gen, dtype=torch.float64) for _ in range(3)]
    results = {}
    for fused in (True, False):
        model.fuse_gates = fused
        model.zero_grad()
        out = model(*x)
        out.square().mean().backward()
        results[fused] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-12)
    for name, grad in results[True][1].items():
        torch.testing.assert_close(grad, results[False][1][name], rtol=1e-10, atol=1e-12)
    assert set(model.state_dict()) == set(NRRN(blocks, 8).state_dict()), "weights format unchanged"


def eq1_reference(model: NRRN, centre: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
    """One branch written out from eq. 1 with six separate H→H convs cut from the stored weights."""
    h = model.config.features

    def conv(x: torch.Tensor, layer: torch.nn.Conv2d, part: int | None = None) -> torch.Tensor:
        w, b = layer.weight, layer.bias
        if part is not None:
            w, b = w[part * h : (part + 1) * h], b[part * h : (part + 1) * h]
        return F.conv2d(x, w, b, padding=1)

    h_hat, h_tilde = F.relu(conv(centre, model.stem)), F.relu(conv(neighbour, model.stem))
    estimate = centre
    for unit in model.units:
        h_tilde = torch.tanh(conv(h_tilde, model.w1))
        u = torch.sigmoid(conv(h_hat, unit.w, 0) + conv(h_tilde, unit.v, 0))
        r = torch.sigmoid(conv(h_hat, unit.w, 1) + conv(h_tilde, unit.v, 1))
        c = torch.tanh(conv(h_hat, unit.w, 2) + conv(r * h_tilde, unit.v_c))
        h_hat = (1 - u) * h_tilde + u * c
        estimate = estimate - unit.noise_scale * noise_attention(h_hat)
        h_hat = feedback(h_hat, estimate)
    h_hat = conv(F.relu(h_hat), model.tail)
    return estimate - model.tail_scale * noise_attention(h_hat)


@pytest.mark.parametrize("path", [BASE_CHECKPOINT, PAPER_BASE], ids=["shipped", "paper"])
def test_shipped_checkpoints_load_unchanged(path: Path) -> None:
    """base.pt (and the paper-network base kept for the tests) keep their sha256 and weights."""
    ckpt = load_checkpoint(path)
    recorded = json.loads(path.with_suffix(".json").read_text())
    assert ckpt.content_sha256 == recorded["content_sha256"], "the JSON names the same sha256"
    assert set(ckpt.build_model().state_dict()) == set(ckpt.state_dict)


def test_the_paper_base_computes_eq1_with_the_fused_model() -> None:
    """The paper network's fused forward computes eq. 1 with the stored weights."""
    ckpt = load_checkpoint(PAPER_BASE)
    assert not ckpt.config.blind
    model = ckpt.build_model().double()
    gen = torch.Generator().manual_seed(0)
    centre, prev, nxt = (
        torch.randn(1, 1, 40, 52, generator=gen, dtype=torch.float64) for _ in "abc"
    )
    with torch.no_grad():
        out_prev, out_next = model.branches(centre, [prev, nxt])
        torch.testing.assert_close(out_prev, eq1_reference(model, centre, prev), rtol=0, atol=1e-12)
        torch.testing.assert_close(out_next, eq1_reference(model, centre, nxt), rtol=0, atol=1e-12)


# -- the precision switch -------------------------------------------------------------------------
def test_precision_choices_resolve_and_bad_ones_are_refused() -> None:
    expected = "bf16" if cpu_bf16_features() else "float32"
    assert resolve_device("cpu").precision == expected
    assert resolve_device("cpu", "float32").precision == "float32"
    assert Denoiser(tiny_checkpoint(), device="cpu", precision="float32").precision == "float32"
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        resolve_device("cpu", "fp8")
    if not cpu_bf16_features():
        with pytest.raises(InputError, match="no native bf16.*'auto' or 'float32'"):
            resolve_device("cpu", "bf16")


def test_profile_precision_and_compile_fields_are_validated() -> None:
    prof = load_profile("demo", overrides={"model.precision": "float32", "model.compile": "off"})
    assert (prof.model.precision, prof.model.compile) == ("float32", "off")
    assert load_profile("demo").model.precision == "auto"
    with pytest.raises(Exception, match="model.precision"):
        load_profile("demo", overrides={"model.precision": "half"})


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_daemon_records_the_precision_it_used(
    tmp_path: Path, tiny_checkpoint_path: Path, precision: str
) -> None:
    """A burst run of the real daemon: heartbeat and every output's settings name the precision."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for k, image in enumerate(smooth_stack((48, 40)), start=1):
        tifffile.imwrite(raw / f"slice_{k:04d}.tif", image)
    db = tmp_path / "db.sqlite"
    profile = load_profile(
        "demo",
        overrides={
            "watch.folder": str(raw), "output.folder": str(tmp_path / "out"),
            "store.database": str(db), "model.checkpoint": str(tiny_checkpoint_path),
            "model.device": "cpu", "model.precision": precision, "watch.settle_s": 0.0,
            "watch.glob": "slice_*.tif", "watch.index_regex": r"slice_(?P<index>\d+)\.tif$",
        },
    )  # fmt: skip
    expected = "float32" if precision == "float32" or not cpu_bf16_features() else "bf16"
    with Store(db) as store:
        daemon = Daemon(profile, store)
        assert daemon.denoiser.precision == expected
        daemon.work(burst=True)
        live = store.status()["run"]["live"]
    assert live["precision"] == expected
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    settings = [json.loads(s) for (s,) in con.execute("SELECT settings_json FROM outputs")]
    con.close()
    assert len(settings) == 3 and {s["precision"] for s in settings} == {expected}


@pytest.fixture
def tiny_checkpoint_path(tmp_path: Path) -> Path:
    from nrrn_daemon.model.checkpoints import save_checkpoint

    return save_checkpoint(tiny_checkpoint(blocks=1, features=4), tmp_path / "tiny.pt")


@pytest.mark.parametrize("option", [[], ["--precision", "float32"]])
def test_cli_denoise_precision_is_honoured_and_written_into_the_output(
    tmp_path: Path, tiny_checkpoint_path: Path, option: list[str]
) -> None:
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack(smooth_stack((40, 48))), photometric="minisblack")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["denoise", str(stack), "--output", str(out), "--model", str(tiny_checkpoint_path),
              "--device", "cpu", *option],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = "float32" if option or not cpu_bf16_features() else "bf16"
    assert f"({expected})" in result.output
    with tifffile.TiffFile(out / "stack.tif") as tif:
        description = read_provenance(tif.pages[0].description)
    assert description is not None and description["precision"] == expected


def test_cli_train_precision_is_recorded_in_the_checkpoint(tmp_path: Path) -> None:
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack(smooth_stack((40, 40)) * 2), photometric="minisblack")
    out = tmp_path / "m.pt"
    args = ["train", str(stack), "--out", str(out), "--blocks", "1", "--features", "4",
            "--steps", "2", "--patch", "24", "--batch", "2", "--validation", "0",
            "--device", "cpu", "--precision", "float32"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = load_checkpoint(out).summary
    assert summary["precision"] == "float32" and summary["settings"]["precision"] == "float32"
    assert "float32" in result.output


# -- torch.compile and its fallback ---------------------------------------------------------------
def compiled_or_skip(den: Denoiser) -> None:
    if not den.compiled:
        pytest.skip(f"torch.compile cannot run here: {acceleration.compile_failure()}")


def test_compiled_denoiser_matches_eager_for_every_mode_and_shape_after_one_warm_up() -> None:
    ckpt = tiny_checkpoint(blocks=2)
    compiled = Denoiser(ckpt, device="cpu", tile=40, tile_batch=2, compile="on")
    assert compiled.compiled
    compiled.warm_up()
    compiled_or_skip(compiled)
    eager = Denoiser(ckpt, device="cpu", tile=40, tile_batch=2, compile="off")
    for shape in ((70, 90), (33, 120)):
        centre, *neighbours = smooth_stack(shape)
        for k in (2, 1, 0):
            a = compiled.denoise(centre, neighbours[:k])
            assert max_grey_diff(a, eager.denoise(centre, neighbours[:k])) <= 1, (shape, k)
    # Another model of the same shape reuses the compiled graph with its own weights.
    other_ckpt = tiny_checkpoint(blocks=2, seed=9)
    other = Denoiser(other_ckpt, device="cpu", tile=40, compile="on")
    reference = Denoiser(other_ckpt, device="cpu", tile=40, compile="off")
    centre, *neighbours = smooth_stack((70, 90), seed=4)
    assert (
        max_grey_diff(other.denoise(centre, neighbours), reference.denoise(centre, neighbours)) <= 1
    )


def test_unavailable_compiler_falls_back_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(*args: object, **kwargs: object) -> object:
        raise RuntimeError("Dynamo is not supported on this Python\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    ckpt = tiny_checkpoint()
    centre, *neighbours = smooth_stack()
    reference = Denoiser(ckpt, device="cpu", tile=32, compile="off").denoise(centre, neighbours)
    with caplog.at_level(logging.WARNING, logger="nrrn_daemon.model.acceleration"):
        first = Denoiser(ckpt, device="cpu", tile=32, compile="on")
        second = Denoiser(ckpt, device="cpu", tile=32, compile="on")
        first.warm_up()
        out = second.denoise(centre, neighbours)
    assert not first.compiled and not second.compiled
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert (
        "torch.compile is not available here (RuntimeError: Dynamo is not supported" in warnings[0]
    )
    np.testing.assert_array_equal(out, reference)


def test_compiler_failing_at_the_first_call_falls_back_and_still_denoises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch.compile itself succeeds (it is lazy); the C++ build fails at the first call."""

    def lazy_compile(fn: object, **kwargs: object) -> object:
        def broken(*args: object) -> object:
            raise OSError("CppCompileError: C++ compile error: g++: command not found")

        return broken

    monkeypatch.setattr(torch, "compile", lazy_compile)
    ckpt = tiny_checkpoint()
    centre, *neighbours = smooth_stack()
    reference = Denoiser(ckpt, device="cpu", tile=32, compile="off").denoise(centre, neighbours)
    with caplog.at_level(logging.WARNING, logger="nrrn_daemon.model.acceleration"):
        den = Denoiser(ckpt, device="cpu", tile=32, compile="on")
        assert den.compiled
        out = den.denoise(centre, neighbours)
        again = Denoiser(ckpt, device="cpu", tile=32, compile="on")
    assert not den.compiled and not again.compiled, "a failure is not retried in this process"
    assert len(caplog.records) == 1 and "g++: command not found" in caplog.records[0].getMessage()
    np.testing.assert_array_equal(out, reference)


def test_out_of_memory_is_not_mistaken_for_a_compiler_failure() -> None:
    model = NRRN(1, 4)
    model.compile_branches()

    def oom() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        acceleration.run_with_fallback(model, oom)
    assert model.compiled and acceleration.compile_failure() is None


def test_compile_auto_policy() -> None:
    cpu = resolve_device("cpu")
    assert not acceleration.wants_compile("auto", cpu, 8), "tiny models: nothing to gain"
    assert acceleration.wants_compile("auto", cpu, 32)
    assert not acceleration.wants_compile("auto", cpu, 32, minutes=1, training=True)
    assert acceleration.wants_compile("auto", cpu, 32, minutes=30, training=True)
    assert acceleration.wants_compile("on", cpu, 4) and not acceleration.wants_compile(
        "off", cpu, 64
    )
    with pytest.raises(ValueError, match="compile must be one of"):
        acceleration.wants_compile("yes", cpu, 32)
    gpu = DeviceInfo("cuda:0", "a GPU", "bf16", False)  # the policy only, no GPU needed
    assert acceleration.wants_compile("auto", gpu, 4), "CUDA compiles any model for inference"
    assert not acceleration.wants_compile("auto", gpu, 64, steps=50, training=True)
    assert acceleration.wants_compile("auto", gpu, 4, minutes=30, training=True)


# -- training in bf16 -----------------------------------------------------------------------------
def _training_stack(seed: int = 0, n: int = 10, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    clean = 100 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    return np.clip(clean[None] + rng.normal(0, 20, (n, size, size)), 0, 255).astype(np.uint8)


@needs_bf16
def test_tiny_nrrn_trains_in_bf16_on_the_cpu() -> None:
    settings = TrainSettings(
        steps=40, patch=32, batch=4, device="cpu", precision="bf16", validation_fraction=0.3
    )
    ckpt, report = train([_training_stack()], settings, NRRNConfig(1, 8))
    assert report.precision == "bf16" and ckpt.summary["precision"] == "bf16"
    assert report.val_loss_end < report.val_loss_start
    weights = ckpt.state_dict.values()
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in weights), "plain float32"


@pytest.mark.slow  # compiling forward and backward takes ~15 s on a cold cache
def test_compiled_training_step_trains() -> None:
    settings = TrainSettings(
        steps=4, patch=24, batch=2, device="cpu", compile="on", validation_fraction=0.3
    )
    ckpt, report = train([_training_stack()], settings, NRRNConfig(1, 4))
    if not report.compiled:
        pytest.skip(f"torch.compile cannot run here: {acceleration.compile_failure()}")
    assert report.steps == 4 and all(np.isfinite(loss) for _, loss in report.loss_curve)
    assert ckpt.summary["compiled"] is True
