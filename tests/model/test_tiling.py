"""Tiling: property tests on plans of any size, and stitch(tile(x)) == x."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nrrn_daemon.model.tiling import Tile, paste, plan_axis, plan_tiles, stitch

sizes = st.integers(min_value=1, max_value=300)
tiles = st.integers(min_value=1, max_value=128)
halos = st.integers(min_value=0, max_value=40)


@settings(max_examples=300, deadline=None)
@given(height=sizes, width=sizes, tile=tiles, halo=halos, balanced=st.booleans())
def test_every_pixel_in_exactly_one_core(
    height: int, width: int, tile: int, halo: int, balanced: bool
) -> None:
    count = np.zeros((height, width), dtype=np.int32)
    for t in plan_tiles(height, width, tile, halo, balanced=balanced):
        count[t.core_slices] += 1
    assert (count == 1).all()


@settings(max_examples=300, deadline=None)
@given(height=sizes, width=sizes, tile=tiles, halo=halos, balanced=st.booleans())
def test_windows_in_bounds_and_cores_have_halo(
    height: int, width: int, tile: int, halo: int, balanced: bool
) -> None:
    plan = plan_tiles(height, width, tile, halo, balanced=balanced)
    shapes = {t.window_shape for t in plan}
    assert len(shapes) == 1, "all windows share one shape (for batching)"
    for t in plan:
        wy0, wy1, wx0, wx1 = t.window
        cy0, cy1, cx0, cx1 = t.core
        assert 0 <= wy0 <= cy0 < cy1 <= wy1 <= height
        assert 0 <= wx0 <= cx0 < cx1 <= wx1 <= width
        assert cy1 - cy0 <= tile and cx1 - cx0 <= tile
        # At least `halo` px of context on every side, unless the window reaches the border.
        assert cy0 - wy0 >= halo or wy0 == 0
        assert wy1 - cy1 >= halo or wy1 == height
        assert cx0 - wx0 >= halo or wx0 == 0
        assert wx1 - cx1 >= halo or wx1 == width
        iy0, iy1, ix0, ix1 = t.inner
        assert (iy1 - iy0, ix1 - ix0) == (cy1 - cy0, cx1 - cx0)


@settings(max_examples=200, deadline=None)
@given(height=sizes, width=sizes, tile=tiles, halo=halos, balanced=st.booleans())
def test_stitch_of_identity_windows_is_the_image(
    height: int, width: int, tile: int, halo: int, balanced: bool
) -> None:
    x = np.arange(height * width, dtype=np.int64).reshape(height, width)
    plan = plan_tiles(height, width, tile, halo, balanced=balanced)
    out = stitch(plan, (x[t.window_slices].copy() for t in plan), x.shape)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, x)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), tile=st.integers(1, 1024), halo=halos)
def test_balanced_cores_differ_by_little(n: int, tile: int, halo: int) -> None:
    spans = plan_axis(n, tile, halo)
    cores = [c1 - c0 for _, (c0, c1) in spans]
    assert len(cores) == -(-n // tile), "no more cores than the plain grid"
    assert max(cores) <= tile
    assert max(cores) - min(cores) < len(cores)


def test_plain_grid_matches_paper_patching() -> None:
    # 256-px patches with 20 px cut from each side: 216-px cores, every window 256 px.
    plan = plan_tiles(1024, 1000, 216, 20, balanced=False)
    assert {t.window_shape for t in plan} == {(256, 256)}
    assert [c0 for _, (c0, _) in plan_axis(1024, 216, 20, balanced=False)] == [
        0,
        216,
        432,
        648,
        864,
    ]


def test_small_image_is_one_tile() -> None:
    assert plan_tiles(64, 33, 512, 11) == [Tile(window=(0, 64, 0, 33), core=(0, 64, 0, 33))]


def test_paste_checks_the_window_shape() -> None:
    t = plan_tiles(10, 10, 4, 2)[0]
    with pytest.raises(ValueError, match="does not match window"):
        paste(np.zeros((10, 10)), t, np.zeros((3, 3)))


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 5, 4, 1), "axis length"), ((5, 5, 0, 1), "tile"), ((5, 5, 4, -1), "halo")],
)
def test_bad_arguments(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_tiles(*args)
