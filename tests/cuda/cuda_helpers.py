"""Shared by the ``cuda`` tests (tests/cuda/): precision switches and comparisons.

Every test module here is marked ``cuda`` (``pytestmark``); ``tests/conftest.py`` skips them
where torch sees no CUDA device. Nothing here is faked except, for fp16, the answer to "does
this GPU have bf16?": forcing it to "no" sends the Denoiser down the exact path a GPU without
bf16 takes (fp16 autocast), on a GPU that has both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from nrrn_daemon.model import acceleration

GPU_PRECISIONS = ("float32", "bf16", "fp16")
"""What the product can run on CUDA: float32 (forced), bf16 (auto), fp16 (auto without bf16)."""


def max_grey_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


@contextlib.contextmanager
def gpu_precision(precision: str) -> Iterator[str]:
    """The Denoiser/train ``precision`` argument that gives ``precision`` on this GPU.

    ``fp16``: inside the block the GPU reports no bf16, so ``auto`` resolves to fp16 autocast.
    """
    if precision == "float32":
        yield "float32"
    elif precision == "bf16":
        if not torch.cuda.is_bf16_supported():
            pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
        yield "bf16"
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
            yield "auto"


@pytest.fixture
def compile_in_the_calling_thread():
    """Inductor compiles in a process-wide pool that outlives a test (torch's threads, not a
    leak of ours, but conftest's thread guard would flag them); compile in the calling thread,
    and let each test decide anew whether compilation works."""
    import torch._inductor.config as inductor_config

    threads = inductor_config.compile_threads
    inductor_config.compile_threads = 1
    acceleration.reset_compile_failure()
    yield
    acceleration.reset_compile_failure()
    inductor_config.compile_threads = threads
