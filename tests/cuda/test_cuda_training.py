"""Fine-tuning on CUDA (``cuda`` marker): a tiny NRRN trains there, its checkpoint is saved and
reloaded on the CPU, where it gives the GPU's pixels; the compiled training step trains too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_helpers import compile_in_the_calling_thread, max_grey_diff  # noqa: F401 - a fixture

from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.model import acceleration
from nrrn_daemon.model.checkpoints import (
    BASE_CHECKPOINT,
    load_checkpoint,
    save_checkpoint,
)
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.nrrn import NRRNConfig
from nrrn_daemon.sim.noise import noisy_stack

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def stack(fib25: np.ndarray) -> np.ndarray:
    """24 noisy FIB-25 slices (Gaussian σ 25), 160² crops: training data with no clean target."""
    return noisy_stack(fib25[:24, :160, :160], "gaussian:25", seed=2)


def test_a_tiny_nrrn_trains_on_cuda_and_its_checkpoint_runs_on_the_cpu(
    stack: np.ndarray, tmp_path: Path
) -> None:
    settings = TrainSettings(steps=60, patch=64, batch=8, device="cuda", compile="off",
                             validation_fraction=0.3)  # fmt: skip
    ckpt, report = train([stack], settings, NRRNConfig(1, 8))
    assert report.device.startswith("cuda:") and report.steps == 60
    expected = "bf16" if torch.cuda.is_bf16_supported() else "float32"  # no fp16 training
    assert report.precision == expected == ckpt.summary["precision"]
    assert report.val_loss_end < report.val_loss_start, "it learned"
    assert all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in ckpt.state_dict.values()
    )

    path = save_checkpoint(ckpt, tmp_path / "ft.pt")
    loaded = load_checkpoint(path)  # weights_only, map_location="cpu", sha256 checked
    assert loaded.content_sha256 == ckpt.content_sha256
    on_cpu = Denoiser(loaded, device="cpu", tile=None, precision="float32", compile="off")
    on_gpu = Denoiser(loaded, device="cuda", tile=None, precision="float32", compile="off")
    centre, neighbours = stack[10], [stack[9], stack[11]]
    assert (
        max_grey_diff(on_cpu.denoise(centre, neighbours), on_gpu.denoise(centre, neighbours)) <= 1
    )


def test_fine_tuning_the_base_on_cuda_keeps_its_shape_and_parent(stack: np.ndarray) -> None:
    base = load_checkpoint(BASE_CHECKPOINT)
    settings = TrainSettings(steps=10, patch=96, batch=8, device="cuda", compile="off",
                             normalisation="slice", validation_fraction=0.3)  # fmt: skip
    ckpt, report = train([stack], settings, init=base)
    assert ckpt.config == base.config and ckpt.summary["parent_sha256"] == base.content_sha256
    assert report.steps == 10 and all(np.isfinite(loss) for _, loss in report.loss_curve)
    assert any(not torch.equal(ckpt.state_dict[k], base.state_dict[k]) for k in base.state_dict), (
        "the weights moved"
    )


@pytest.mark.usefixtures("compile_in_the_calling_thread")
def test_the_compiled_training_step_trains_on_cuda(stack: np.ndarray) -> None:
    settings = TrainSettings(steps=30, patch=64, batch=8, device="cuda", compile="on",
                             validation_fraction=0.3)  # fmt: skip
    ckpt, report = train([stack], settings, NRRNConfig(1, 8))
    assert report.compiled, f"torch.compile failed on CUDA: {acceleration.compile_failure()}"
    assert report.val_loss_end < report.val_loss_start
    assert ckpt.summary["compiled"] is True
