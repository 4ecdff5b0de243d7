"""The Denoiser: tiled == whole-image inference, dtypes, normalisation, errors, OOM fallback.

Tiny random-weight NRRNs (8 features) in float32 on the CPU (reduced precision and compilation
are tested in ``tests/test_precision.py``); the only fake is a model that raises CUDA's
out-of-memory error, since no GPU can be had here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from nrrn_daemon.errors import InputError, NRRNError
from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation
from nrrn_daemon.model.denoise import MIN_TILE, Denoiser
from nrrn_daemon.model.devices import cpu_bf16_features
from nrrn_daemon.model.nrrn import NRRN
from nrrn_daemon.model.tiling import plan_tiles, stitch


def make_checkpoint(
    blocks: int = 2,
    features: int = 8,
    seed: int = 0,
    noise_scale: float | None = None,
    normalisation: Normalisation | None = None,
) -> Checkpoint:
    """A random-weight checkpoint; ``noise_scale`` sets every learned noise scale (0 = identity)."""
    torch.manual_seed(seed)
    model = NRRN(blocks=blocks, features=features)
    if noise_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("noise_scale", "tail_scale")):
                    p.fill_(noise_scale)
    return Checkpoint.from_model(model, normalisation or Normalisation(mode="slice"))


def noisy_stack(shape: tuple[int, int], count: int = 3, seed: int = 0) -> list[np.ndarray]:
    """``count`` uint8 slices: one smooth structure plus independent noise each."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    clean = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0)
    return [
        np.clip(clean + rng.normal(0, 20, shape), 0, 255).astype(np.uint8) for _ in range(count)
    ]


def float_levels(ckpt: Checkpoint, stack: list[np.ndarray]) -> np.ndarray:
    """Whole-image model output in grey levels, before clipping and rounding (by hand)."""
    mean, std = ckpt.normalisation.stats_for(stack[0])
    x = [torch.from_numpy((a.astype(np.float32) - mean) / std)[None, None] for a in stack]
    with torch.inference_mode():
        return ckpt.build_model()(*x)[0, 0].numpy() * std + mean


MODES = {"single": 0, "pair": 1, "triplet": 2}
FP32 = {"device": "cpu", "precision": "float32", "align": False}
"""Exactness is checked in float32 (bf16 is within 1 grey level: tests/test_precision.py), against
hand-computed outputs of unaligned inputs (alignment: tests/imaging/test_alignment.py)."""


def split(stack: list[np.ndarray], mode: str) -> tuple[np.ndarray, list[np.ndarray]]:
    centre, *others = stack
    return centre, others[: MODES[mode]]


def assert_nearly_equal(a: np.ndarray, b: np.ndarray) -> None:
    """≤ 1 grey level everywhere, identical almost everywhere (float rounding only)."""
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
    assert diff.max() <= 1, f"max difference {diff.max()} grey levels"
    assert (diff == 0).mean() > 0.99


# -- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize(
    ("shape", "tile", "tile_batch"),
    [((97, 130), 32, 4), ((64, 64), 24, 3), ((200, 33), 50, 1), ((97, 130), 512, 4)],
)
@pytest.mark.parametrize("mode", list(MODES))
def test_tiled_equals_whole_image(
    blocks: int, shape: tuple[int, int], tile: int, tile_batch: int, mode: str
) -> None:
    ckpt = make_checkpoint(blocks=blocks)
    centre, neighbours = split(noisy_stack(shape), mode)
    tiled = Denoiser(ckpt, **FP32, tile=tile, tile_batch=tile_batch)
    whole = Denoiser(ckpt, **FP32, tile=None)
    out = tiled.denoise(centre, neighbours)
    ref = whole.denoise(centre, neighbours)
    assert out.shape == shape and out.dtype == np.uint8
    assert_nearly_equal(out, ref)
    np.testing.assert_array_equal(whole.denoise_whole(centre, neighbours), ref)
    assert tiled.last_timing["tiles"] == len(plan_tiles(*shape, tile, ckpt.config.halo))


def test_repeat_scans_tiled_equals_whole_image() -> None:
    ckpt = make_checkpoint(blocks=2)
    centre, *scans = noisy_stack((70, 90), count=4)
    out = Denoiser(ckpt, **FP32, tile=20).denoise(centre, scans)
    assert_nearly_equal(out, Denoiser(ckpt, **FP32, tile=None).denoise(centre, scans))


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5])
def test_halo_is_the_exact_minimum(blocks: int) -> None:
    """Tiles with halo = receptive radius reproduce whole-image inference; one pixel less does not.

    In float64, so that the far edge of the receptive field (whose weight shrinks quickly with
    depth in a random network: ~1e-7 at 4 BUs) stands far above rounding (~1e-16).
    """
    torch.manual_seed(3)
    model = NRRN(blocks=blocks, features=8).double().eval()
    radius = model.config.receptive_radius
    assert model.config.halo == radius
    gen = torch.Generator().manual_seed(0)
    stack = [torch.randn(1, 1, 90, 75, generator=gen, dtype=torch.float64) for _ in range(3)]

    def tiled(halo: int) -> np.ndarray:
        plan = plan_tiles(90, 75, 16, halo)
        outs = [model(*(x[(..., *t.window_slices)] for x in stack))[0, 0].numpy() for t in plan]
        return stitch(plan, outs, (90, 75))

    with torch.inference_mode():
        whole = model(*stack)[0, 0].numpy()
        assert np.abs(tiled(radius) - whole).max() <= 1e-12
        assert np.abs(tiled(radius - 1) - whole).max() > 1e-10


# -- normalisation and dtypes ---------------------------------------------------------------
@pytest.mark.parametrize(
    "normalisation", [Normalisation(mode="slice"), Normalisation(mode="dataset", mean=90, std=30)]
)
def test_one_mean_and_std_for_all_slices(normalisation: Normalisation) -> None:
    """The centre's stats normalise the neighbours too (a brighter neighbour stays brighter)."""
    ckpt = make_checkpoint(blocks=1, normalisation=normalisation)
    centre, prev, next_ = noisy_stack((40, 50))
    next_ = (next_ // 2 + 100).astype(np.uint8)
    out = Denoiser(ckpt, **FP32, tile=16).denoise(centre, [prev, next_])
    expected = float_levels(ckpt, [centre, prev, next_]).clip(0, 255).round()
    assert_nearly_equal(out, expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_identity_model_round_trips_exactly(dtype: type) -> None:
    ckpt = make_checkpoint(blocks=2, noise_scale=0.0)
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(2)
    centre, prev, next_ = (
        rng.integers(0, top, (60, 70), endpoint=True, dtype=dtype) for _ in range(3)
    )
    out = Denoiser(ckpt, **FP32, tile=32).denoise(centre, [prev, next_])
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, centre)


def test_uint16_ramp_keeps_its_levels() -> None:
    ckpt = make_checkpoint(blocks=2, noise_scale=0.05, seed=4)
    ramp = np.linspace(1000, 60000, 200 * 180).reshape(200, 180).round().astype(np.uint16)
    rng = np.random.default_rng(5)
    noisy = [
        np.clip(ramp + rng.normal(0, 500, ramp.shape), 0, 65535).astype(np.uint16) for _ in range(3)
    ]
    out = Denoiser(ckpt, **FP32, tile=64).denoise(noisy[0], noisy[1:])
    assert out.dtype == np.uint16
    assert out.min() >= 0 and out.max() <= 65535
    assert np.corrcoef(out.ravel().astype(np.float64), ramp.ravel())[0, 1] > 0.99
    assert len(np.unique(out)) >= 1000, "no banding: 16-bit levels survive"


def test_out_of_range_outputs_are_clipped_not_wrapped() -> None:
    ckpt = make_checkpoint(blocks=1, noise_scale=30.0, seed=6)
    centre, prev, next_ = noisy_stack((40, 40))
    out = Denoiser(ckpt, **FP32, tile=16).denoise(centre, [prev, next_])
    levels = float_levels(ckpt, [centre, prev, next_])
    assert levels.min() < -100 and levels.max() > 355, "the test needs outputs beyond 0..255"
    assert out.dtype == np.uint8
    assert_nearly_equal(out, levels.clip(0, 255).round())


# -- errors ---------------------------------------------------------------------------------
def test_neighbour_shape_mismatch_names_both_shapes() -> None:
    den = Denoiser(make_checkpoint(blocks=1), **FP32)
    with pytest.raises(InputError, match=r"\(40, 50\).*\(40, 49\)|\(40, 49\).*\(40, 50\)"):
        den.denoise(np.zeros((40, 50), np.uint8), [np.zeros((40, 49), np.uint8)])


@pytest.mark.parametrize(
    ("centre", "neighbours", "message"),
    [
        (np.zeros((10, 10), np.float32), [], "float"),
        (np.zeros((10, 10), np.int16), [], "uint8 or uint16"),
        (np.zeros((10, 10, 3), np.uint8), [], "2-D"),
        (np.zeros((0, 10), np.uint8), [], "non-empty"),
        (np.zeros((10, 10), np.uint8), [np.zeros((10, 10), np.uint16)], "bit depth"),
    ],
)
def test_bad_inputs_are_refused(
    centre: np.ndarray, neighbours: list[np.ndarray], message: str
) -> None:
    den = Denoiser(make_checkpoint(blocks=1), **FP32)
    with pytest.raises(InputError, match=message):
        den.denoise(centre, neighbours)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="CUDA is not available.*use device 'auto' or 'cpu'"):
        Denoiser(make_checkpoint(blocks=1), device="cuda")


def test_unknown_device_is_refused() -> None:
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        Denoiser(make_checkpoint(blocks=1), device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_falls_back_to_the_cpu_and_says_so() -> None:
    den = Denoiser(make_checkpoint(blocks=1))
    expected = "bf16" if cpu_bf16_features() else "float32"
    assert (den.device, den.precision, den.cpu_fallback) == ("cpu", expected, True)
    assert den.device_name
    assert (den.tile, den.tile_batch) == (512, 1), "no batching by default on the CPU"
    explicit = Denoiser(make_checkpoint(blocks=1), device="cpu")
    assert explicit.cpu_fallback is False


def test_timing_is_recorded() -> None:
    den = Denoiser(make_checkpoint(blocks=1), **FP32, tile=32)
    centre, prev, next_ = noisy_stack((70, 70))
    den.denoise(centre, [prev, next_])
    t = den.last_timing
    assert t["tiles"] == 9 and t["tile"] == 32 and t["oom_retries"] == 0
    assert 0 < t["model_s"] <= t["total_s"] and 0 <= t["normalise_s"] <= t["total_s"]


# -- CUDA out of memory (faked: no GPU here) ------------------------------------------------
class OutOfMemoryAbove(nn.Module):
    """Wraps a model; raises CUDA's OOM error when a pass holds more than ``limit`` pixels."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model = model
        self.limit = limit
        self.calls: list[tuple[int, int, int]] = []

    def forward(self, centre: Tensor, *neighbours: Tensor) -> Tensor:
        n, _, h, w = centre.shape
        self.calls.append((n, h, w))
        if n * h * w > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(centre, *neighbours)


def test_out_of_memory_halves_the_batch_first() -> None:
    ckpt = make_checkpoint(blocks=1)
    centre, prev, next_ = noisy_stack((100, 100))
    den = Denoiser(ckpt, **FP32, tile=32, tile_batch=8)
    fake = OutOfMemoryAbove(den.model, limit=2 * 35 * 35)  # 35-px windows
    den.model = fake
    out = den.denoise(centre, [prev, next_])
    assert (den.tile, den.tile_batch) == (32, 2), "the batch that fitted is kept"
    assert den.last_timing["oom_retries"] == 2
    assert_nearly_equal(out, Denoiser(ckpt, **FP32, tile=None).denoise(centre, [prev, next_]))


def test_out_of_memory_then_halves_the_tile_down_to_the_floor() -> None:
    ckpt = make_checkpoint(blocks=1)
    centre, prev, next_ = noisy_stack((150, 130))
    den = Denoiser(ckpt, **FP32, tile=None, tile_batch=4)
    den.model = OutOfMemoryAbove(den.model, limit=5000)
    out = den.denoise(centre, [prev, next_])
    assert den.tile == MIN_TILE and den.tile_batch == 1
    assert_nearly_equal(out, Denoiser(ckpt, **FP32, tile=None).denoise(centre, [prev, next_]))


def test_out_of_memory_at_the_floor_is_a_clear_error() -> None:
    den = Denoiser(make_checkpoint(blocks=1), **FP32, tile=256, tile_batch=2)
    den.model = OutOfMemoryAbove(den.model, limit=0)
    with pytest.raises(NRRNError, match=r"out of memory on cpu .* one 60×60 window per pass"):
        den.denoise(*split(noisy_stack((200, 200)), "pair"))


def test_an_explicit_plan_for_another_size_is_refused() -> None:
    den = Denoiser(make_checkpoint(blocks=1), **FP32)
    with pytest.raises(ValueError, match="outside the 40×40 slice"):
        den.denoise(np.zeros((40, 40), np.uint8), tiles=plan_tiles(50, 50, 16, 5))
    with pytest.raises(ValueError, match="cores cover 900 px"):
        den.denoise(np.zeros((40, 40), np.uint8), tiles=plan_tiles(30, 30, 16, 5))
