"""Training: the eq. 3 loss, the network's modes and gradients, training runs (budgets, resume,
validation curves), and a tiny NRRN really learning to denoise real FIB-SEM data on the CPU.

Data preparation and sampling are tested in ``test_training_data.py``, held-out blocks and the
validation loss in ``test_validation.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import noisy_test_stack

from nrrn_daemon.errors import InputError
from nrrn_daemon.evaluation.baselines import three_slice_average
from nrrn_daemon.evaluation.metrics import psnr
from nrrn_daemon.finetune.training import TrainSettings, loss_for, train
from nrrn_daemon.finetune.validation import validation_loss
from nrrn_daemon.imaging.stacks import read_stack
from nrrn_daemon.model.checkpoints import Checkpoint, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.nrrn import NRRN, NRRNConfig, n2n_loss, plain_loss

TINY = NRRNConfig(blocks=1, features=4)


def _gaussian(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Gaussian noise on the 0–255 scale (the EPFL protocol), rounded and clipped to uint8."""
    noisy = clean + np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# -- the loss and the network -------------------------------------------------------------------
def test_loss_is_eq3_on_a_hand_computed_example() -> None:
    def t(*values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, len(values))

    out_prev, out_next, prev, next_ = t(1, 2), t(3, 0), t(0, 0), t(1, 3)
    # ½·mean((1−1)², (2−3)²) = ½·0.5 = 0.25   x'_j against x_{j+1}, the neighbour it did not see
    # ½·mean((3−0)², (0−0)²) = ½·4.5 = 2.25   x''_j against x_{j−1}
    # ¼·mean((1−3)², (2−0)²) = ¼·4   = 1.00   agreement of the two branches (subtracted)
    assert n2n_loss(out_prev, out_next, prev, next_).item() == pytest.approx(0.25 + 2.25 - 1.0)
    # Each branch is scored against the *other* neighbour: swapping the targets changes the loss:
    # ½·mean((1−0)², (2−0)²) + ½·mean((3−1)², (0−3)²) − 1 = 1.25 + 3.25 − 1
    assert n2n_loss(out_prev, out_next, next_, prev).item() == pytest.approx(3.5)
    # The plain form is eq. 3 without its last term: 0.25 + 2.25.
    assert plain_loss(out_prev, out_next, prev, next_).item() == pytest.approx(2.5)


def test_loss_choice_reaches_training_validation_and_the_checkpoint() -> None:
    assert loss_for("auto", repeat_scans=False) == "plain"
    assert loss_for("auto", repeat_scans=True) == "eq3"
    assert loss_for("eq3", repeat_scans=False) == "eq3"
    # A blind-spot network is trained for the centre target; forcing another loss still works.
    assert loss_for("auto", repeat_scans=False, blind=True) == "centre"
    assert loss_for("auto", repeat_scans=True, blind=True) == "centre"
    assert loss_for("plain", repeat_scans=False, blind=True) == "plain"
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainSettings(steps=1, loss="l1")
    stack = noisy_test_stack(n=12, size=40)
    runs = {}
    for loss in ("auto", "eq3"):
        settings = TrainSettings(
            steps=2, batch=2, patch=24, device="cpu", validation_fraction=0.25, loss=loss
        )
        runs[loss] = train([stack], settings, NRRNConfig(1, 4))
    (auto_ckpt, auto), eq3 = runs["auto"], runs["eq3"][1]
    assert auto.loss == "plain" and eq3.loss == "eq3"
    assert auto_ckpt.summary["loss"] == "plain" and auto_ckpt.summary["settings"]["loss"] == "auto"
    # Same seed, same start: eq. 3 subtracts ¼‖x' − x''‖² from the plain loss, so it is lower
    # — the validation curve really uses each run's own loss.
    assert eq3.val_loss_start < auto.val_loss_start
    model = NRRN.from_config(auto_ckpt.config)
    model.load_state_dict(auto_ckpt.state_dict)
    held_out = [(stack[i - 1], stack[i], stack[i + 1]) for i in range(1, 11)]
    plain = validation_loss(model, held_out, auto_ckpt.normalisation, patch=32, loss="plain")
    paper = validation_loss(model, held_out, auto_ckpt.normalisation, patch=32, loss="eq3")
    assert paper < plain


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("mode", ["single", "pair", "triplet", "scans"])
def test_modes_shapes_dtypes_gradients(blocks: int, mode: str) -> None:
    torch.manual_seed(blocks)
    model = NRRN(blocks=blocks, features=4)
    centre, a, b, c = (torch.randn(2, 1, 20, 24) for _ in range(4))
    neighbours = {"single": (), "pair": (a,), "triplet": (a, b), "scans": (a, b, c)}[mode]
    out = model(centre, *neighbours)
    assert out.shape == (2, 1, 20, 24) and out.dtype == torch.float32
    out.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), mode
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
    branches = model.branches(centre, list(neighbours) or [centre])
    assert [o.shape for o in branches] == [(2, 1, 20, 24)] * max(1, len(neighbours))


def test_centre_stem_runs_once_per_triplet_batch() -> None:
    model = NRRN(blocks=2, features=4)
    calls: list[int] = []
    model.stem.register_forward_hook(lambda mod, inputs, output: calls.append(inputs[0].shape[0]))
    centre, prev, nxt = (torch.randn(5, 1, 16, 16) for _ in range(3))
    out_prev, out_next = model.branches(centre, [prev, nxt])
    # One stem call on [centre, prev, next] stacked: 3·N images, not 4·N (centre twice).
    assert calls == [15]
    calls.clear()
    model(centre, prev, nxt)
    assert calls == [15]
    # ...and it is the same function as two separate branches.
    torch.testing.assert_close(out_prev, model.branches(centre, [prev])[0])
    torch.testing.assert_close(out_next, model.branches(centre, [nxt])[0])


# -- training runs --------------------------------------------------------------------------------
def test_two_slice_stack_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, noisy_test_stack(n=2, size=32))
    with pytest.raises(InputError, match="need at least 3 adjacent slices to train") as info:
        train([read_stack([path])], TrainSettings(steps=1, device="cpu"), TINY)
    assert f"{path} has 2" in str(info.value)


def test_mismatched_shapes_and_dtypes_are_refused() -> None:
    slices = [np.zeros((32, 32), np.uint8)] * 2 + [np.zeros((32, 30), np.uint8)]
    with pytest.raises(InputError, match="same size"):
        train([slices], TrainSettings(steps=1, device="cpu", validation_fraction=0), TINY)
    mixed = [noisy_test_stack(n=5), noisy_test_stack(n=5).astype(np.uint16)]
    with pytest.raises(InputError, match="mix dtypes"):
        train(mixed, TrainSettings(steps=1, device="cpu", validation_fraction=0), TINY)
    with pytest.raises(ValueError, match="budget"):
        TrainSettings()


def test_repeat_scan_mode_trains_and_needs_three_scans() -> None:
    scans = noisy_test_stack(n=12, size=32)  # 4 slices × 3 scans
    settings = TrainSettings(
        steps=3,
        batch=2,
        patch=24,
        device="cpu",
        repeat_scans=True,
        scans_per_slice=3,
        validation_slices=(3,),
    )
    ckpt, report = train([scans], settings, TINY)
    assert report.steps == 3 and np.isfinite([v for _, v in report.loss_curve]).all()
    assert report.val_triplets == 1 and report.train_triplets == 3
    assert ckpt.summary["data"][0]["scans_per_slice"] == 3
    with pytest.raises(InputError, match="≥ 3 scans"):
        train([scans], TrainSettings(steps=1, repeat_scans=True, scans_per_slice=2), TINY)
    with pytest.raises(InputError, match="groups of 5 scans"):
        train([scans], TrainSettings(steps=1, repeat_scans=True, scans_per_slice=5), TINY)


def test_minutes_budget_uint16_and_progress() -> None:
    stack = noisy_test_stack(n=8, size=32).astype(np.uint16) * 250
    seen: list[tuple[int, int | None]] = []
    settings = TrainSettings(
        minutes=0.02, patch=24, batch=2, device="cpu", normalisation="slice", validation_fraction=0
    )
    ckpt, report = train(
        [stack], settings, TINY, on_progress=lambda s, n, loss, t: seen.append((s, n))
    )
    assert report.stopped_by == "minutes" and report.steps >= 1
    assert seen == [(s, None) for s in range(1, report.steps + 1)]
    assert ckpt.normalisation.mode == "slice" and ckpt.summary["data"][0]["dtype"] == "uint16"
    assert report.val_loss_start is None and report.val_loss_end is None


def test_resume_continues_from_the_parent() -> None:
    stack = noisy_test_stack(n=12, size=40)
    settings = TrainSettings(
        steps=4, batch=2, patch=24, device="cpu", validation_fraction=0.25, validation_every=2
    )
    parent, first = train([stack], settings, NRRNConfig(1, 6))
    assert [step for step, _ in first.val_curve] == [0, 2, 4]
    assert first.val_curve[0][1] == first.val_loss_start and parent.summary["parent_sha256"] is None
    child, second = train([stack], settings, init=parent)
    assert child.summary["parent_sha256"] == parent.content_sha256
    assert child.summary["kind"] == "fine-tune" and child.config == parent.config
    # Same held-out crops, so the child starts exactly where the parent ended.
    assert second.val_loss_start == pytest.approx(first.val_loss_end, rel=1e-6)
    assert child.normalisation == parent.normalisation  # same data: same dataset stats
    with pytest.raises(ValueError, match="differs"):
        train([stack], settings, NRRNConfig(2, 6), init=parent)


def test_validation_every_seconds_marks_wall_time() -> None:
    """Time-based validation (benchmarks compare runs of different speeds at equal times)."""
    stack = noisy_test_stack(n=12, size=40)
    settings = TrainSettings(
        steps=6, batch=2, patch=24, device="cpu", validation_fraction=0.25,
        validation_every_s=1e-4,
    )  # fmt: skip
    _, report = train([stack], settings, NRRNConfig(1, 4))
    steps = [step for step, _ in report.val_curve]
    assert steps == list(range(7)), "every step ends past a mark: validated after each"
    assert len(report.val_seconds) == len(report.val_curve)
    assert report.val_seconds == sorted(report.val_seconds) and report.val_seconds[0] >= 0


def test_tiny_nrrn_learns_to_denoise_real_fib25_better_than_the_3_slice_mean(
    fib25: np.ndarray,
) -> None:
    """16 noisy slices of real FIB-SEM (σ = 25), a 2 BU × 16 NRRN, 70 steps (~1 min of CPU).

    The bar is the 3-slice mean, which sees the same three slices and gives +4.36 dB here: a
    network that only blurred, or only averaged, would not clear it (measured: +4.44 dB)."""
    clean = fib25[0:16, 60:156, 60:156]
    noisy = _gaussian(clean, 25.0, seed=1)
    settings = TrainSettings(steps=70, patch=64, batch=8, device="cpu")
    ckpt, report = train([noisy], settings, NRRNConfig(blocks=2, features=16))
    assert report.val_loss_end < report.val_loss_start
    denoiser = Denoiser(ckpt, device="cpu", tile=None)
    gains, mean3 = [], []
    for j in range(2, 14):
        noisy_psnr = psnr(noisy[j], clean[j])
        out = denoiser.denoise(noisy[j], [noisy[j - 1], noisy[j + 1]])
        gains.append(psnr(out, clean[j]) - noisy_psnr)
        average = np.rint(three_slice_average(noisy, j)).astype(np.uint8)  # uint8, as outputs
        mean3.append(psnr(average, clean[j]) - noisy_psnr)
    assert np.mean(mean3) > 3.0, mean3  # the baseline is a strong one
    assert np.mean(gains) > np.mean(mean3), (np.mean(gains), np.mean(mean3))


def test_on_adjacent_slices_the_plain_loss_beats_eq3_at_light_noise(
    fib25: np.ndarray, paper_base: Checkpoint
) -> None:
    """Why ``loss="auto"`` is ``plain`` for a paper network on adjacent slices (BENCHMARKS §1):
    the paper-network base checkpoint (shipped before the blind-spot one) fine-tuned the same
    way with each loss on real FIB-25 slices (10 nm apart) with
    light noise (σ 25). Eq. 3's last term pays each branch for extrapolating towards the
    neighbour it did not see, which amplifies the noise: its output moves away from the clean
    slice, while without that term it stays where the base was."""
    # Held-out slices (FIB-25 z = 200–215; the base never saw z ≥ 200). Measured with this exact
    # run before neighbour alignment (issue 12): base 29.56, plain 29.28, eq. 3 25.34 dB (−4.22).
    # With alignment in training crops and in the Denoiser (the drift eq. 3's last term feeds on
    # is partly undone) the same run measures base 29.53, plain 29.64 (+0.11), eq. 3 28.50 dB
    # (−1.03; plain − eq. 3 = +1.14). The bounds keep half of each measured margin for another
    # CPU's rounding: eq. 3 loses more than 0.5 dB, the plain loss beats it by more than 0.5 dB
    # and stays within 1 dB of the base.
    clean = fib25[0:16, 40:168, 40:168]
    noisy = _gaussian(clean, 25.0, seed=2)
    base = paper_base

    def score(ckpt: Checkpoint) -> float:
        denoiser = Denoiser(ckpt, device="cpu", tile=None, compile="off")
        return float(np.mean(
            [psnr(denoiser.denoise(noisy[j], [noisy[j - 1], noisy[j + 1]]), clean[j])
             for j in range(2, 14)]
        ))  # fmt: skip

    scores = {"base": score(base)}
    for loss in ("plain", "eq3"):
        settings = TrainSettings(
            steps=80, patch=64, batch=8, device="cpu", validation_fraction=0, loss=loss
        )
        scores[loss] = score(train([noisy], settings, init=base)[0])
    assert scores["eq3"] < scores["base"] - 0.5, scores  # eq. 3 damages a good model
    assert scores["plain"] > scores["eq3"] + 0.5, scores  # the plain loss does not
    assert scores["plain"] > scores["base"] - 1.0, scores


def test_the_centre_objective_takes_the_blind_base_past_the_paper_network(
    fib25: np.ndarray, paper_base: Checkpoint
) -> None:
    """Issue 12: the daemon's default fine-tune (the shipped blind-spot base, ``loss="auto"`` →
    ``centre``) against the previous default (the paper-network base, ``auto`` → ``plain``),
    the same budget on the same held-out noisy FIB-25 slices (σ 25), scored against the clean
    centre; both must also beat the 3-slice mean. Measured: centre 30.27 dB, plain 29.64 dB
    (+0.63), 3-slice mean 24.51 dB; the bound keeps half of the margin (0.3 dB)."""
    clean = fib25[0:16, 40:168, 40:168]
    noisy = _gaussian(clean, 25.0, seed=2)
    inner = range(2, 14)

    def score(ckpt: Checkpoint) -> float:
        denoiser = Denoiser(ckpt, device="cpu", tile=None, compile="off")
        return float(np.mean(
            [psnr(denoiser.denoise(noisy[j], [noisy[j - 1], noisy[j + 1]]), clean[j])
             for j in inner]
        ))  # fmt: skip

    settings = TrainSettings(steps=40, patch=48, batch=8, device="cpu", validation_fraction=0)
    blind, blind_report = train([noisy], settings, init=load_checkpoint(None))
    paper, paper_report = train([noisy], settings, init=paper_base)
    assert (blind_report.loss, paper_report.loss) == ("centre", "plain")
    scores = {"centre": score(blind), "plain": score(paper)}
    mean3 = float(np.mean(
        [psnr(np.rint(three_slice_average(noisy, j)).astype(np.uint8), clean[j]) for j in inner]
    ))  # fmt: skip
    assert scores["plain"] > mean3, (scores, mean3)
    assert scores["centre"] > scores["plain"] + 0.3, (scores, mean3)
