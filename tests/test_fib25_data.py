"""The real data shipped with the tests is what tests/data/README.md says it is."""

from __future__ import annotations

import hashlib

import numpy as np
import tifffile
from conftest import FIB25, FIB25_SHA256


def test_the_fib25_crop_is_the_documented_file() -> None:
    assert hashlib.sha256(FIB25.read_bytes()).hexdigest() == FIB25_SHA256
    assert FIB25_SHA256 in (FIB25.parent / "README.md").read_text()
    assert FIB25.stat().st_size < 4_000_000, "a few MB at most"
    vol = tifffile.imread(FIB25)
    assert vol.shape == (32, 250, 250) and vol.dtype == np.uint8
    assert 20 < vol.std() < 60, "real EM contrast, not a blank or synthetic stack"
