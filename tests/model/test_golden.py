"""Golden values: the network's output on a fixed small input is pinned, on both of its paths.

* the shipped base checkpoint (``nrrn_daemon/assets/base.pt``: the blind-spot network), the
  paper-network base shipped before it (``tests/data/paper-base.pt``), and
* a seeded 2 BU × 8 network of each kind — the paper network and the blind-spot network
  (:attr:`~nrrn_daemon.model.nrrn.NRRNConfig.blind`) — so that the path the base does not use is
  pinned too (their weights come from ``torch.manual_seed``: stable for the pinned torch).

Any change to NAtt, the feedback block, the gates (or the weights) moves these values by grey
levels; float rounding across CPUs moves them by ~1e-4. The tests also prove that the tolerance
bites: with NAtt, feedback or the reset gate mutated (monkeypatched), on either path, the same
comparison fails. Re-pin (``python tests/model/test_golden.py`` prints the values) only when the
base checkpoint is deliberately retrained or the network deliberately changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import PAPER_BASE

from nrrn_daemon.model import nrrn
from nrrn_daemon.model.checkpoints import load_checkpoint

TOLERANCE = 0.02
"""Grey levels; the smallest mutation below moves a pinned value by far more."""

GOLDEN: dict[str, tuple[list[list[float]], float]] = {
    # name: (output[::8, ::8], output mean)
    "base": (
        [
            [132.66, 178.253, 120.801, 81.763, 160.753],
            [125.012, 148.435, 115.169, 127.701, 154.347],
            [113.025, 75.163, 128.597, 194.048, 142.192],
            [108.384, 52.394, 126.299, 212.053, 143.43],
            [117.474, 108.046, 110.153, 165.563, 154.402],
        ],
        133.0425,
    ),
    "paper-base": (  # pinned when it was the shipped base; unchanged since
        [
            [129.465, 184.147, 108.764, 90.668, 153.384],
            [126.056, 134.994, 108.474, 129.516, 155.687],
            [122.412, 73.032, 134.981, 194.423, 143.11],
            [117.636, 62.188, 123.331, 204.318, 129.177],
            [119.182, 111.749, 116.245, 160.297, 148.048],
        ],
        132.5414,
    ),
    "paper": (
        [
            [167.266, 188.876, 132.318, 131.13, 147.109],
            [173.424, 136.307, 60.817, 113.994, 128.596],
            [108.658, 41.34, 120.299, 180.072, 161.358],
            [83.152, 68.524, 89.51, 213.578, 112.574],
            [158.218, 94.541, 152.935, 181.121, 127.202],
        ],
        130.3352,
    ),
    "blind": (
        [
            [127.612, 172.952, 147.727, 90.781, 167.342],
            [111.812, 129.339, 118.303, 141.896, 169.268],
            [109.354, 57.416, 135.594, 227.308, 168.916],
            [99.652, 41.111, 132.251, 209.222, 116.801],
            [100.507, 109.268, 128.559, 148.089, 147.119],
        ],
        134.0685,
    ),
}
NAMES = list(GOLDEN)


def fixed_input() -> list[np.ndarray]:
    """prev, centre, next: a 40×40 pattern with an edge, Gaussian noise σ 25, uint8."""
    rng = np.random.default_rng(12)
    y, x = np.mgrid[:40, :40]
    clean = 120 + 70 * np.sin(x / 5.0) * np.cos(y / 7.0) + 30 * (x > 20)
    return [
        np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8) for _ in range(3)
    ]


def network(name: str) -> nrrn.NRRN:
    """``base`` (the shipped checkpoint), ``paper-base`` (the paper-network base shipped before
    it, ``tests/data/paper-base.pt``), ``paper`` or ``blind`` (seeded 2 BU × 8)."""
    if name == "base":
        return load_checkpoint(None).build_model()
    if name == "paper-base":
        return load_checkpoint(PAPER_BASE).build_model()
    torch.manual_seed(2024)
    return nrrn.NRRN(blocks=2, features=8, blind=name == "blind").eval()


def output(name: str) -> np.ndarray:
    """The float output (grey levels) in triplet mode, slice-normalised as at inference."""
    prev, centre, nxt = fixed_input()
    model = network(name)
    mean, std = centre.mean(), max(centre.std(), 1e-3)
    x = [
        torch.from_numpy(((a - mean) / std).astype(np.float32))[None, None]
        for a in (centre, prev, nxt)
    ]
    with torch.no_grad():
        return model(*x)[0, 0].double().numpy() * std + mean


def matches_golden(name: str, out: np.ndarray) -> bool:
    values, mean = GOLDEN[name]
    return bool(
        np.abs(out[::8, ::8] - np.array(values)).max() <= TOLERANCE
        and abs(out.mean() - mean) <= TOLERANCE
    )


def path_of(name: str) -> str:
    """Which forward a network runs: ``paper`` or ``blind``."""
    if name in ("paper", "blind"):
        return name
    return "blind" if network(name).blind else "paper"


@pytest.mark.parametrize("name", NAMES)
def test_the_output_is_pinned(name: str) -> None:
    out = output(name)
    assert matches_golden(name, out), np.round(out[::8, ::8], 3).tolist()


def _mean_attention(h_hat: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(h_hat.mean(dim=1, keepdim=True)) * h_hat[:, :1]


def _no_feedback(h_hat: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    return h_hat


def _reset_gate_without_neighbour(self, h_hat, h_tilde, vu, vr):  # type: ignore[no-untyped-def]
    wu, wr, wc = self.w(h_hat).chunk(3, dim=1)
    u, r = torch.sigmoid(wu + vu), torch.sigmoid(wr)
    return (1 - u) * h_tilde + u * torch.tanh(wc + self.v_c(r * h_tilde))


def _directional_mean_attention(h_hat: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(h_hat.mean(dim=2)) * h_hat[:, :, 0]


def _directional_no_feedback(h_hat: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    return h_hat


_real_update = nrrn._directional_update


def _directional_reset_gate_without_neighbour(unit, h_hat, h_tilde, vu, vr):  # type: ignore[no-untyped-def]
    return _real_update(unit, h_hat, h_tilde, vu, torch.zeros_like(vr))


MUTANTS: dict[str, list[tuple[str, Callable[..., object]]]] = {
    "paper": [
        ("noise_attention", _mean_attention),
        ("feedback", _no_feedback),
        ("BuildingUnit.update", _reset_gate_without_neighbour),
    ],
    "blind": [
        ("_directional_attention", _directional_mean_attention),
        ("_directional_feedback", _directional_no_feedback),
        ("_directional_update", _directional_reset_gate_without_neighbour),
    ],
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mutant", range(3))
def test_a_mutated_network_fails_the_golden_values(
    monkeypatch: pytest.MonkeyPatch, name: str, mutant: int
) -> None:
    target, replacement = MUTANTS[path_of(name)][mutant]
    owner, _, attr = target.rpartition(".")
    monkeypatch.setattr(getattr(nrrn, owner) if owner else nrrn, attr, replacement)
    assert not matches_golden(name, output(name))


if __name__ == "__main__":
    for name in NAMES:
        out = output(name)
        print(f'    "{name}": (')
        print(f"        {np.round(out[::8, ::8], 3).tolist()},")
        print(f"        {round(float(out.mean()), 4)},")
        print("    ),")
