"""The blind-spot NRRN: J-invariance (exact zero gradient), tiling, the paper network unchanged.

Random weights are right here: J-invariance and tiling are properties of the architecture, which
must hold for *every* weight; a trained model could hide a leak behind small weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.nrrn import LOSSES, NRRN, NRRNConfig
from nrrn_daemon.model.tiling import plan_tiles, stitch

PIXELS = [(0, 0), (7, 11), (31, 29), (15, 0)]
"""Corners, an edge and the interior of a 32×30 image."""


def blind_model(blocks: int, seed: int = 0) -> NRRN:
    torch.manual_seed(seed)
    model = NRRN(blocks=blocks, features=6, blind=True).double()
    with torch.no_grad():  # non-trivial scales so that every path carries signal
        for name, p in model.named_parameters():
            if name.endswith(("noise_scale", "tail_scale")):
                p.fill_(0.7)
    return model


def inputs(shape: tuple[int, int] = (32, 30), batch: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 1, *shape, generator=gen, dtype=torch.float64) for _ in range(3)]


def gradient(
    out: torch.Tensor, centre: torch.Tensor, y: int, x: int, b: int = 0, of: int | None = None
) -> np.ndarray:
    """d out[b, 0, y, x] / d centre[of] (``of`` defaults to ``b``: the same image)."""
    (g,) = torch.autograd.grad(out[b, 0, y, x], centre, retain_graph=True)
    return g[b if of is None else of, 0].numpy()


def assert_blind_at(g: np.ndarray, y: int, x: int) -> None:
    """Exactly zero at the pixel itself, non-zero at its four neighbours (one blind pixel)."""
    assert g[y, x] == 0.0
    h, w = g.shape
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        if 0 <= y + dy < h and 0 <= x + dx < w:
            assert g[y + dy, x + dx] != 0.0, f"({y + dy}, {x + dx}) does not reach ({y}, {x})"


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("neighbours", [2, 1])
def test_inference_output_ignores_its_own_centre_pixel(blocks: int, neighbours: int) -> None:
    model = blind_model(blocks).eval()
    prev, centre, nxt = inputs()
    centre.requires_grad_(True)
    out = model(centre, *[prev, nxt][:neighbours])
    for y, x in PIXELS:
        assert_blind_at(gradient(out, centre, y, x), y, x)


def test_the_single_image_mode_sees_the_pixel_and_skips_the_posterior_step(
    fib25: np.ndarray,
) -> None:
    """With no neighbour the centre is its own neighbour (as in the paper network): the
    estimate depends on the pixel, so the Denoiser must not add the pixel again."""
    model = blind_model(2).eval()
    _prev, centre, _nxt = inputs()
    centre.requires_grad_(True)
    y, x = PIXELS[0]
    assert gradient(model(centre), centre, y, x)[y, x] != 0.0
    den = Denoiser(Checkpoint.from_model(model.float(), Normalisation(mode="slice")), "cpu", None)
    den.denoise(fib25[5, :48, :48])
    assert den.provenance()["posterior"] is None
    den.denoise(fib25[5, :48, :48], [fib25[4, :48, :48]])
    assert den.provenance()["posterior"] is not None


@pytest.mark.parametrize("blocks", [1, 5])
def test_training_branches_ignore_their_own_centre_pixel(blocks: int) -> None:
    """Training form: train mode, a batch of two, both branches the centre loss scores."""
    model = blind_model(blocks).train()
    prev, centre, nxt = inputs(batch=2)
    centre.requires_grad_(True)
    out_prev, out_next = model.branches(centre, [prev, nxt])
    for out in (out_prev, out_next):
        for b in (0, 1):
            for y, x in PIXELS:
                g = gradient(out, centre, y, x, b)
                assert_blind_at(g, y, x)
                other = gradient(out, centre, y, x, b, of=1 - b)  # nor across the batch
                assert not other.any()


@pytest.mark.parametrize("blocks", [1, 4])
def test_tiled_windows_ignore_their_own_centre_pixel(blocks: int) -> None:
    """Inference as the Denoiser runs it, window by window: still blind in every core."""
    model = blind_model(blocks).eval()
    prev, centre, nxt = inputs((40, 36))
    for tile in plan_tiles(40, 36, 16, model.config.halo):
        window = centre[(..., *tile.window_slices)].clone().requires_grad_(True)
        out = model(window, *(x[(..., *tile.window_slices)] for x in (prev, nxt)))
        (y0, _, x0, _), (wy0, _, wx0, _) = tile.core, tile.window
        for y, x in ((y0, x0), (y0 + 3, x0 + 5)):
            assert_blind_at(gradient(out, window, y - wy0, x - wx0), y - wy0, x - wx0)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5])
def test_halo_covers_the_blind_receptive_field(blocks: int) -> None:
    """Tiles with the config's halo reproduce whole-image inference (float64)."""
    model = blind_model(blocks).eval()
    stack = inputs((90, 75))

    with torch.inference_mode():
        whole = model(stack[1], stack[0], stack[2])[0, 0].numpy()
        plan = plan_tiles(90, 75, 16, model.config.halo)
        outs = [
            model(*(x[(..., *t.window_slices)] for x in (stack[1], stack[0], stack[2])))[0, 0]
            for t in plan
        ]
        tiled = stitch(plan, [o.numpy() for o in outs], (90, 75))
    assert np.abs(tiled - whole).max() <= 1e-12


def blind_checkpoint(blocks: int = 2) -> Checkpoint:
    model = blind_model(blocks).float()
    return Checkpoint.from_model(model, Normalisation(mode="slice"))


def fib25_triplet(fib25: np.ndarray, z: int = 10) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    noisy = [
        np.clip(fib25[k].astype(np.float64) + rng.normal(0, 25, fib25[k].shape), 0, 255)
        .round()
        .astype(np.uint8)
        for k in (z, z - 1, z + 1)
    ]
    return noisy[0][:120, :150], [n[:120, :150] for n in noisy[1:]]


@pytest.mark.parametrize("neighbours", [2, 1, 0])
def test_tiled_equals_whole_with_the_posterior_step(fib25: np.ndarray, neighbours: int) -> None:
    ckpt = blind_checkpoint()
    centre, others = fib25_triplet(fib25)
    tiled = Denoiser(ckpt, device="cpu", precision="float32", tile=40, tile_batch=3)
    whole = Denoiser(ckpt, device="cpu", precision="float32", tile=None)
    out = tiled.denoise(centre, others[:neighbours])
    ref = whole.denoise(centre, others[:neighbours])
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    if not neighbours:  # the single-image mode is not blind: no posterior step
        assert tiled.last_posterior is None and whole.last_posterior is None
        return
    assert tiled.last_posterior is not None and whole.last_posterior is not None
    assert tiled.last_posterior["b"] == whole.last_posterior["b"]  # fitted on the raw slice
    assert tiled.provenance()["posterior"] == tiled.last_posterior


def test_paper_network_keeps_its_config_and_forward() -> None:
    """Old checkpoints: no ``blind`` key in their config (their sha256 is unchanged), and the
    paper network's output at a pixel does depend on that pixel."""
    assert NRRNConfig(blocks=2, features=8).to_dict() == {"blocks": 2, "features": 8}
    assert NRRNConfig.from_dict({"blocks": 2, "features": 8}).blind is False
    assert NRRNConfig.from_dict(NRRNConfig(2, 8, blind=True).to_dict()).blind is True
    torch.manual_seed(0)
    model = NRRN(blocks=2, features=6).double().eval()
    prev, centre, nxt = inputs()
    centre.requires_grad_(True)
    g = gradient(model(centre, prev, nxt), centre, 7, 11)
    assert g[7, 11] != 0.0


def test_centre_loss_scores_against_the_centre() -> None:
    prev, centre, nxt = inputs()
    loss = LOSSES["centre"]
    assert loss(centre, centre, prev, nxt, centre).item() == 0.0
    assert loss(prev, nxt, prev, nxt, centre).item() > 0.0
    with pytest.raises(ValueError, match="centre"):
        loss(prev, nxt, prev, nxt)
