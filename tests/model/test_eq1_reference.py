"""NRRN against eq. 1 written out independently, from the paper and the stored weights only.

Nothing here is imported from :mod:`nrrn_daemon.model.nrrn` but the class under test: the
reference reads the weights from the state dict by name and writes every step of eq. 1 and
Fig. 1 D–E itself (NAtt: "max pools through all channels to create an attention map that gets
element-wise multiplied to the first channel"; feedback: channel 0 of ĥ becomes the squashed
updated estimate). So a mutation of the module's ``noise_attention``, ``feedback`` or gates
makes the model disagree with it, which the last test shows by making those mutations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import PAPER_BASE

from nrrn_daemon.model import nrrn as nrrn_module
from nrrn_daemon.model.checkpoints import (
    Checkpoint,
    Normalisation,
    load_checkpoint,
)
from nrrn_daemon.model.nrrn import NRRN

TOLERANCE = 1e-10
"""float64 throughout: the fused and unfused convolutions differ by rounding only (~1e-15)."""


def eq1(weights: dict[str, torch.Tensor], centre: torch.Tensor, neighbour: torch.Tensor):
    """One branch (x_j, x_{j±1}) → the final estimate of x_j, from the paper's eq. 1."""
    blocks = len({k.split(".")[1] for k in weights if k.startswith("units.")})
    h = weights["stem.weight"].shape[0]

    def conv(x, name, part=None):
        w, b = weights[f"{name}.weight"], weights[f"{name}.bias"]
        if part is not None:  # the stored W / V hold the u, r (and c) kernels stacked
            w, b = w[part * h : (part + 1) * h], b[part * h : (part + 1) * h]
        return F.conv2d(x, w, b, padding=1)

    def natt(features):  # Fig. 1E
        attention = 1.0 / (1.0 + torch.exp(-features.max(dim=1, keepdim=True).values))
        return attention * features[:, 0:1]

    h_hat = torch.clamp(conv(centre, "stem"), min=0)  # ĥ⁰ = ReLU(W₀ ∗ x_j)
    h_tilde = torch.clamp(conv(neighbour, "stem"), min=0)  # h̃⁰ = ReLU(W₀ ∗ x_{j±1})
    x = centre
    for k in range(blocks):
        unit = f"units.{k}"
        h_tilde = torch.tanh(conv(h_tilde, "w1"))  # W₁ shared by all BUs
        u = torch.sigmoid(conv(h_hat, f"{unit}.w", 0) + conv(h_tilde, f"{unit}.v", 0))
        r = torch.sigmoid(conv(h_hat, f"{unit}.w", 1) + conv(h_tilde, f"{unit}.v", 1))
        c = torch.tanh(conv(h_hat, f"{unit}.w", 2) + conv(r * h_tilde, f"{unit}.v_c"))
        h_hat = (1 - u) * h_tilde + u * c
        x = x - weights[f"{unit}.noise_scale"] * natt(h_hat)  # x'_j: the noise removed
        h_hat = torch.cat([torch.tanh(x), h_hat[:, 1:]], dim=1)  # feedback, Fig. 1D
    h_hat = conv(torch.clamp(h_hat, min=0), "tail")
    return x - weights["tail_scale"] * natt(h_hat)


def inputs(seed: int = 0, shape: tuple[int, int] = (40, 52)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, *shape, generator=gen, dtype=torch.float64) for _ in "abc"]


def both_branches(model: NRRN, centre, prev, nxt):
    with torch.no_grad():
        return model.branches(centre, [prev, nxt])


def weights_of(model: NRRN) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def test_the_shipped_base_checkpoint_computes_eq1() -> None:
    model = load_checkpoint(PAPER_BASE).build_model().double().eval()
    centre, prev, nxt = inputs()
    out_prev, out_next = both_branches(model, centre, prev, nxt)
    weights = weights_of(model)
    torch.testing.assert_close(out_prev, eq1(weights, centre, prev), rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(out_next, eq1(weights, centre, nxt), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(("blocks", "features"), [(1, 4), (3, 8)])
def test_random_models_compute_eq1(blocks: int, features: int) -> None:
    torch.manual_seed(blocks)
    model = NRRN(blocks, features).double().eval()
    centre, prev, _ = inputs(seed=blocks, shape=(23, 31))
    (out, _) = both_branches(model, centre, prev, prev)
    torch.testing.assert_close(out, eq1(weights_of(model), centre, prev), rtol=0, atol=TOLERANCE)


def channel_mean_on_channel_1(h_hat):  # the mutation issue 14 found no test for
    return torch.sigmoid(h_hat.mean(dim=1, keepdim=True)) * h_hat[:, 1:2]


def feedback_without_tanh(h_hat, estimate):
    return torch.cat([estimate, h_hat[:, 1:]], dim=1)


def feedback_dropped(h_hat, estimate):
    return h_hat


@pytest.mark.parametrize(
    ("name", "mutant"),
    [
        ("noise_attention", channel_mean_on_channel_1),
        ("feedback", feedback_without_tanh),
        ("feedback", feedback_dropped),
    ],
)
def test_a_mutated_network_disagrees_with_the_reference(
    monkeypatch: pytest.MonkeyPatch, name: str, mutant
) -> None:
    """The reference catches what the old one (which imported these functions) could not."""
    model = load_checkpoint(PAPER_BASE).build_model().double().eval()
    centre, prev, nxt = inputs()
    reference = eq1(weights_of(model), centre, prev)
    monkeypatch.setattr(nrrn_module, name, mutant)
    out, _ = both_branches(model, centre, prev, nxt)
    assert (out - reference).abs().max().item() > 1000 * TOLERANCE


def test_swapped_gates_disagree_with_the_reference() -> None:
    """u and r exchanged in the stored W and V (a gate wired wrongly) is caught too."""
    model = load_checkpoint(PAPER_BASE).build_model().double().eval()
    centre, prev, _ = inputs()
    weights = weights_of(model)
    h = weights["stem.weight"].shape[0]
    swapped = dict(weights)
    for k in range(len(model.units)):
        for part in ("w", "v"):
            for kind in ("weight", "bias"):
                t = weights[f"units.{k}.{part}.{kind}"]
                swapped[f"units.{k}.{part}.{kind}"] = torch.cat([t[h : 2 * h], t[:h], t[2 * h :]])
    ckpt = Checkpoint.from_model(model.float(), Normalisation("slice"))
    mutated = NRRN(ckpt.config.blocks, ckpt.config.features).double().eval()
    mutated.load_state_dict(swapped)
    out, _ = both_branches(mutated, centre, prev, prev)
    assert (out - eq1(weights, centre, prev)).abs().max().item() > 1000 * TOLERANCE
