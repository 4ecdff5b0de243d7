"""Offline ``denoise`` on a real FIB-25 crop with bad frames: their neighbours get exactly their
pair-mode result (the shipped base checkpoint), the bad frames are still written."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from nrrn_daemon.batch.offline import denoise_stack
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.imaging.provenance import read_provenance
from nrrn_daemon.model.checkpoints import BASE_CHECKPOINT, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.sim.noise import noisy_stack
from nrrn_daemon.triplets import neighbour_indices

BLANK, CUT, UNRELATED = 3, 6, 9


@pytest.mark.parametrize(
    ("i", "inputs", "unusable", "expected"),
    [
        (4, 3, {3}, [5]),
        (4, 3, {3, 5}, []),
        (3, 3, {3}, []),
        (4, 2, {3}, [5]),
        (0, 2, {1}, []),
        (4, 3, set(), [3, 5]),
    ],
)
def test_neighbour_rule_skips_unusable_slices(i, inputs, unusable, expected):
    assert neighbour_indices(i, range(10), inputs, unusable) == expected


def test_neighbours_of_bad_frames_get_their_pair_mode_result(tmp_path, fib25):
    clean = fib25[0:12, :64, :64].copy()
    stack = noisy_stack(clean, "poisson:4", seed=3)
    stack[BLANK] = 0
    stack[CUT, 32:] = 0
    stack[UNRELATED] = noisy_stack(fib25[20:21, -64:, -64:], "poisson:4", seed=4)[0]
    folder = tmp_path / "raw"
    folder.mkdir()
    for k, page in enumerate(stack):
        tifffile.imwrite(folder / f"s{k:03d}.tif", page, metadata=None)
    denoiser = Denoiser(load_checkpoint(BASE_CHECKPOINT), device="cpu", compile="off")
    told = []
    written = denoise_stack(
        sorted(folder.glob("*.tif")), tmp_path / "out", denoiser,
        on_unusable=lambda name, why: told.append((name, why.split(" (")[0])),
    )  # fmt: skip
    assert told == [
        ("s003.tif", "blank frame"),
        ("s006.tif", "frame cut short"),
        ("s009.tif", "unrelated to its neighbours"),
    ]
    assert [p.name for p in written] == [f"s{k:03d}.tif" for k in range(len(stack))]
    out = {k: tifffile.imread(p) for k, p in enumerate(written)}
    for bad in (BLANK, CUT, UNRELATED):
        for k, other in ((bad - 1, bad - 2), (bad + 1, bad + 2)):
            pair = denoiser.denoise(stack[k], [stack[other]])
            assert np.abs(out[k].astype(int) - pair.astype(int)).max() <= 1, k
            assert abs(psnr(out[k], clean[k]) - psnr(pair, clean[k])) <= 0.3, k
    np.testing.assert_array_equal(out[BLANK], stack[BLANK])  # no signal: a copy
    with tifffile.TiffFile(written[BLANK]) as tif:
        described = read_provenance(tif.pages[0].description)
    assert described["unusable"].startswith("blank frame") and "not denoised" in described["what"]
    with tifffile.TiffFile(written[CUT]) as tif:
        assert read_provenance(tif.pages[0].description)["what"].startswith("denoised alone")
