"""NRRN: the Noise Reconstruction and Removal Network, in pure PyTorch.

Paper: "Noise Reconstruction and Removal Network: a new way to denoise FIB-SEM images",
section 2.1.1 (architecture, eq. 1, Fig. 1) and 2.1.2 (the loss, eq. 3). This module holds the
network, its config and the loss; it imports torch and the standard library only.

One *branch* maps a pair (neighbour x_{j±1}, centre x_j) to an estimate of the clean centre:

* stem: one shared 3×3 conv 1→H + ReLU (W_0), applied to both images (eq. 1, h̃⁰ and ĥ⁰);
* L+1 = ``blocks`` building units (BU, Fig. 1C), each a convolutional GRU:
  the neighbour stream is advanced by one 3×3 conv W_1 **shared by all BUs**, then tanh;
  update gate u and reset gate r from convs of ĥ and h̃; candidate c from ĥ and r∘h̃;
  ĥ ← (1−u)∘h̃ + u∘c;
* after each BU, noise attention (NAtt, Fig. 1E): max over channels → sigmoid → a spatial map
  that multiplies channel 0 of ĥ, giving one noise channel n; the running estimate (which starts
  as the centre image) becomes x' = x' − s·n (the paper removes the noise; the learned per-step
  scale s — initialised to 1 — is the authors' released "learned residual", and lets a
  z-scored image lose more than the ±1 a tanh-bounded channel can carry);
* feedback block (Fig. 1D): channel 0 of ĥ is replaced by tanh(x'), so the next BU sees the
  cleaner image;
* tail: one 3×3 H→H conv on ReLU(ĥ), then a last NAtt step into the estimate, which is the output.

Choices where the paper is open (see ``shared/paper/NOTES.md``):

* the six H→H convs of a BU (W_u, W_r, W_c on ĥ; V_u, V_r, V_c on h̃) are stored as two wider
  convs (W_{u,r,c}: H→3H on ĥ, V_{u,r}: H→2H on h̃) plus V_c; this is the same function with
  fewer kernel launches. At run time (:attr:`NRRN.fuse_gates`, on by default) V_{u,r} of a BU
  and the shared W_1 that advances h̃ for the next BU, which read the same h̃, run as one H→3H
  conv whose weight is concatenated from the stored ones on every call (so training updates
  both, and checkpoints keep their format): three convs per BU instead of four;
* orthogonal initialisation with the sigmoid/tanh gains, as in the authors' release;
* forward modes: a **triplet** is the mean of the two branches (x̂_j = ½(x'_j + x''_j)); a
  **pair** is one branch; a **single** image (no neighbour at all) runs one branch with the
  centre standing in for its own neighbour. That fallback keeps the network's input shape and
  gives a usable, weaker estimate (the neighbour no longer carries independent noise, so the
  synthesizer cannot tell signal from noise as well); the daemon records the mode of every
  output so such slices can be re-done when neighbours exist;
* in a triplet the stem on the centre image is computed once and shared by both branches, and
  the two branches run as one batch (same weights, eq. 3).

**Blind-spot mode** (:attr:`NRRNConfig.blind`, trained with :func:`centre_loss`). Training
targets that are *neighbour* slices can at best teach the neighbours' signal, while outputs are
scored against the centre. A blind model has the centre itself as target, which needs
J-invariance (Batson & Royer 2019): the estimate at pixel p must not depend on centre[p]. The
construction is Laine et al. 2019's ("High-Quality Self-Supervised Deep Image Denoising"):
every conv that reads the centre stream (the stem on the centre, W_{u,r,c}, V_c — it reads
r∘h̃ and r depends on ĥ — and the tail) has its kernel's bottom row zeroed, so a stack of them
sees only its own row and those above; the centre enters shifted down by one pixel, so that
half-plane excludes p's row; four such streams, the same weights rotated by 0/90/180/270°, run
side by side as a grouped conv, and a 1×1 conv (``combine``) mixes their four estimates, each
blind to p but jointly seeing every other centre pixel. Chosen over masking (Noise2Void /
Noise2Self), which scores ~2 % of the pixels a step, because it scores *every* pixel every step,
the sample efficiency a 2-core CPU needs; it is SUPPORT's setting (Eom et al. 2023: blind spot
in the centre frame, neighbour frames in full). NRRN's structure stays: the neighbour stream h̃
(stem, the shared W_1, V_{u,r}) is the paper's, computed once per branch and shared by the four
directions; the GRU update, NAtt (per direction) and feedback are pointwise, so they keep the
blind spot. What has to change is the running estimate's start: the paper starts it at the
centre, which would give p away, so a blind branch starts at its neighbour and removes noise
from there. The centre pixel's own information is added back after the network by the
Denoiser's posterior step (:mod:`nrrn_daemon.model.posterior`). The blind network costs ~2.7×
the paper network per pixel (the centre-stream convs run four times, a third of each kernel
zero). Old checkpoints (``blind`` absent) run the paper's forward unchanged.

Speed (``nrrn_daemon/acceleration.py`` decides when): :meth:`NRRN.compile_branches` puts the
branch computation (everything after the stem: the BUs, NAtt, feedback, tail), which is the
same for every mode, through ``torch.compile`` with dynamic shapes, so one compiled graph serves
triplets, pairs and single images of any window size and batch (one more for a batch of one).

Receptive field: each BU widens the centre path by 2 px per side (a gate conv, then V_c), the
first one by 3 (the neighbour stream's W_1 comes first), the stem and tail by 1 each, so the radius
is 2·blocks + 3 px (measured in the tests); :attr:`NRRNConfig.halo` is exactly that, the
smallest margin for which tiled inference equals whole-image inference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_BLOCKS, MAX_BLOCKS = 1, 5


@dataclass(frozen=True)
class NRRNConfig:
    """Shape of an NRRN.

    Parameters
    ----------
    blocks
        Number of building units (the paper's L+1), 1–5; the paper's default is 4.
    features
        Channels H of every feature map; the paper uses 64, the authors' CLI 32.
    blind
        Blind-spot centre stream (:meth:`NRRN.blind_branches`): the output at a pixel does not
        depend on that pixel of the centre slice, so the centre itself can be the training
        target (the ``centre`` loss). False: the paper's network.
    """

    blocks: int = 4
    features: int = 64
    blind: bool = False

    def __post_init__(self) -> None:
        if not MIN_BLOCKS <= self.blocks <= MAX_BLOCKS:
            raise ValueError(f"blocks must be {MIN_BLOCKS}–{MAX_BLOCKS}, got {self.blocks}")
        if not 2 <= self.features <= 512:
            raise ValueError(f"features must be 2–512, got {self.features}")

    @property
    def receptive_radius(self) -> int:
        """Pixels on each side that can influence an output pixel.

        Stem 1; the first BU reaches 3 px further through the neighbour stream (W_1, V_r, V_c),
        each later one 2 (a gate conv on ĥ, then V_c); tail 1: 2·blocks + 3.
        """
        return 2 * self.blocks + 3

    @property
    def halo(self) -> int:
        """Tile margin that makes tiled inference identical to whole-image inference.

        The exact minimum, the receptive radius: ``tests/test_denoise.py`` shows tiles with this
        halo match whole-image inference and tiles with one pixel less do not.
        """
        return self.receptive_radius

    def to_dict(self) -> dict[str, int]:
        """``blind`` only when set, so the paper network's checkpoints keep their sha256."""
        data = asdict(self)
        if not self.blind:
            del data["blind"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> NRRNConfig:
        unknown = set(data) - {"blocks", "features", "blind"}
        if unknown:
            raise ValueError(f"unknown NRRN config keys: {sorted(unknown)}")
        blind = bool(data.get("blind", False))
        sizes = {k: int(v) for k, v in data.items() if k != "blind"}  # type: ignore[call-overload]
        return cls(**sizes, blind=blind)


def _wide(x: Tensor) -> Tensor:
    """A conv output back in float32 under bf16/fp16 autocast (any other dtype unchanged).

    Only the convolutions run in reduced precision: the GRU's gates, the noise attention and the
    running estimate stay in float32. Rounding them to bf16 as well drifts the estimate by up to
    2–3 grey levels (measured on FIB-25, pair mode); this way outputs stay within one of float32.
    """
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


def _orthogonal_(conv: nn.Conv2d, gain: float) -> None:
    nn.init.orthogonal_(conv.weight, gain=gain)
    assert conv.bias is not None
    nn.init.zeros_(conv.bias)


class BuildingUnit(nn.Module):
    """One GRU-style building unit (eq. 1, Fig. 1C) with its noise attention step.

    ``w`` holds W_u, W_r, W_c (on the centre stream ĥ); ``v`` holds V_u, V_r (on the neighbour
    stream h̃); ``v_c`` is V_c, applied to r∘h̃.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.w = _conv(features, 3 * features)
        self.v = _conv(features, 2 * features)
        self.v_c = _conv(features, features)
        # Learned scale of the removed noise component (the released code's learned residual).
        self.noise_scale = nn.Parameter(torch.ones(()))
        h = features
        with torch.no_grad():
            for conv, gains in ((self.w, (1.0, 1.0, 5 / 3)), (self.v, (1.0, 1.0))):
                for k, gain in enumerate(gains):
                    part = conv.weight[k * h : (k + 1) * h]
                    nn.init.orthogonal_(part, gain=gain)
                assert conv.bias is not None
                nn.init.zeros_(conv.bias)
        _orthogonal_(self.v_c, 5 / 3)

    def forward(self, h_hat: Tensor, h_tilde: Tensor) -> Tensor:
        """Return ĥ^{l+1} from ĥ^l and the already advanced neighbour stream h̃^{l+1}."""
        vu, vr = _wide(self.v(h_tilde)).chunk(2, dim=1)
        return self.update(h_hat, h_tilde, vu, vr)

    def update(self, h_hat: Tensor, h_tilde: Tensor, vu: Tensor, vr: Tensor) -> Tensor:
        """The GRU update given V_u h̃ and V_r h̃ (computed here or by a fused conv)."""
        wu, wr, wc = _wide(self.w(h_hat)).chunk(3, dim=1)
        u = torch.sigmoid(wu + vu)
        r = torch.sigmoid(wr + vr)
        c = torch.tanh(wc + _wide(self.v_c(r * h_tilde)))
        return (1 - u) * h_tilde + u * c


def noise_attention(h_hat: Tensor) -> Tensor:
    """NAtt (Fig. 1E): sigmoid(max over channels) ∘ channel 0 → one noise channel."""
    attention = torch.sigmoid(h_hat.amax(dim=1, keepdim=True))
    return attention * h_hat[:, :1]


def feedback(h_hat: Tensor, estimate: Tensor) -> Tensor:
    """Feedback block (Fig. 1D): channel 0 of ĥ becomes the (squashed) updated estimate."""
    return torch.cat([torch.tanh(estimate), h_hat[:, 1:]], dim=1)


DIRECTIONS = 4
"""Half-plane directions of the blind-spot centre stream (Laine et al. 2019: four rotations)."""


def _directional_weight(weight: Tensor) -> Tensor:
    """``(C_out, C_in, 3, 3)`` → ``(4·C_out, C_in, 3, 3)``: the kernel with its bottom row zeroed
    (it sees its own row and the row above, nothing below), rotated by 0°, 90°, 180°, 270°.

    A stack of such convs sees only a half-plane; :data:`_SHIFTS` moves the centre one pixel
    so that half-plane excludes the pixel's own row (column).
    """
    masked = torch.cat([weight[:, :, :2], torch.zeros_like(weight[:, :, 2:])], dim=2)
    return torch.cat([torch.rot90(masked, k, dims=(2, 3)) for k in range(DIRECTIONS)])


def _open_side(k: int) -> tuple[int, int]:
    """(dy, dx) that moves the centre so direction ``k``'s half-plane excludes the pixel."""
    mask = _directional_weight(torch.ones(1, 1, 3, 3))[k, 0]
    if not mask[2].any():
        return 1, 0  # sees rows above: shift down by one (output row y reads row y − 1)
    if not mask[0].any():
        return -1, 0
    if not mask[:, 2].any():
        return 0, 1
    return 0, -1


_SHIFTS = tuple(_open_side(k) for k in range(DIRECTIONS))


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """``out[y, x] = x[y − dy, x − dx]``, zero outside (as the convs pad)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return padded[..., y0 : y0 + h, x0 : x0 + w]


def _gconv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv`` applied per direction: ``x`` is ``(N, 4·C_in, H, W)``, one group per direction."""
    assert conv.bias is not None
    weight = _directional_weight(conv.weight)
    return _wide(F.conv2d(x, weight, conv.bias.repeat(DIRECTIONS), padding=1, groups=DIRECTIONS))


def _directional_attention(h_hat: Tensor) -> Tensor:
    """NAtt per direction: ``(N, D, H, h, w)`` features → ``(N, D, h, w)`` noise channels."""
    return torch.sigmoid(h_hat.amax(dim=2)) * h_hat[:, :, 0]


def _directional_update(
    unit: BuildingUnit, h_hat: Tensor, h_tilde: Tensor, vu: Tensor, vr: Tensor
) -> Tensor:
    """:meth:`BuildingUnit.update` per direction: ``h_hat`` ``(N, D·H, h, w)`` (the centre
    stream, one group per direction), the neighbour stream ``h_tilde`` and its gate terms
    ``vu``, ``vr`` ``(N, H, h, w)`` shared by all directions; ``(N, D, H, h, w)`` out."""
    b, _, height, width = h_hat.shape
    d, h = DIRECTIONS, h_tilde.shape[1]
    wu, wr, wc = _gconv(h_hat, unit.w).reshape(b, d, 3 * h, height, width).chunk(3, dim=2)
    u = torch.sigmoid(wu + vu[:, None])
    r = torch.sigmoid(wr + vr[:, None])
    gated = (r * h_tilde[:, None]).reshape(b, d * h, height, width)
    c = torch.tanh(wc + _gconv(gated, unit.v_c).reshape(b, d, h, height, width))
    return (1 - u) * h_tilde[:, None] + u * c


def _directional_feedback(h_hat: Tensor, estimate: Tensor) -> Tensor:
    """:func:`feedback` per direction: ``(N, D, H, h, w)`` features, ``(N, D, h, w)`` estimates."""
    return torch.cat([torch.tanh(estimate)[:, :, None], h_hat[:, :, 1:]], dim=2)


class NRRN(nn.Module):
    """The Noise Reconstruction and Removal Network.

    Inputs are ``(N, 1, H, W)`` float tensors, normalised (zero mean, unit std) by the caller.

    Parameters
    ----------
    blocks, features
        See :class:`NRRNConfig`.
    """

    def __init__(self, blocks: int = 4, features: int = 64, blind: bool = False) -> None:
        super().__init__()
        self.config = NRRNConfig(blocks=blocks, features=features, blind=blind)
        self.stem = _conv(1, features)  # W_0, shared by centre and neighbour
        self.w1 = _conv(features, features)  # W_1, shared by all BUs
        self.units = nn.ModuleList(BuildingUnit(features) for _ in range(blocks))
        self.tail = _conv(features, features)
        self.tail_scale = nn.Parameter(torch.ones(()))
        _orthogonal_(self.stem, math.sqrt(2.0))
        _orthogonal_(self.w1, 5 / 3)
        _orthogonal_(self.tail, 1.0)
        if blind:
            # Blind-spot mode: the four directions' estimates → one (starts as their mean).
            self.combine = nn.Conv2d(DIRECTIONS, 1, kernel_size=1)
            with torch.no_grad():
                self.combine.weight.fill_(1 / DIRECTIONS)
                self.combine.bias.zero_()  # type: ignore[union-attr]
        # Run V_{u,r} of a BU and the next W_1 as one conv (same function; not in the weights).
        self.fuse_gates = True
        self._compiled_branch: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    @classmethod
    def from_config(cls, config: NRRNConfig) -> NRRN:
        return cls(blocks=config.blocks, features=config.features, blind=config.blind)

    @property
    def blind(self) -> bool:
        """Whether the output at a pixel is independent of that pixel of the centre slice."""
        return self.config.blind

    # -- compilation (see nrrn_daemon/acceleration.py) -----------------------------------------
    def compile_branches(self) -> None:
        """Run the branches through ``torch.compile`` from the next call on (compiled lazily).

        Dynamic shapes: the window size and batch may change without recompiling (a batch of
        one gets its own graph). Weights are inputs of the graph, so another model of the same
        shape reuses it. Nothing is stored in the weights; :meth:`uncompile` undoes it.
        """
        branch = self._blind_branch if self.blind else self._branch
        self._compiled_branch = torch.compile(branch, dynamic=True)

    def uncompile(self) -> None:
        """Back to eager execution (e.g. after a compiler failure)."""
        self._compiled_branch = None

    @property
    def compiled(self) -> bool:
        return self._compiled_branch is not None

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run uncompiled inside the block (a few validation passes are not worth a graph)."""
        compiled, self._compiled_branch = self._compiled_branch, None
        try:
            yield
        finally:
            self._compiled_branch = compiled

    # -- one branch -------------------------------------------------------------------------
    def _branch(
        self, centre: Tensor, h_hat: Tensor, h_tilde: Tensor, trace: list[Tensor] | None = None
    ) -> Tensor:
        """Run BUs + NAtt + feedback + tail on stem features; returns the branch estimate.

        ``trace``, when given, receives the running estimate after every BU (paper 2.2.4).
        """
        estimate = centre
        h_tilde = torch.tanh(_wide(self.w1(h_tilde)))
        last = len(self.units) - 1
        for k, unit in enumerate(self.units):
            ahead = None
            if self.fuse_gates and k < last:
                # V_u, V_r of this BU and W_1 of the next one all read h̃^{k+1}: one conv.
                weight = torch.cat([unit.v.weight, self.w1.weight])
                bias = torch.cat([unit.v.bias, self.w1.bias])  # type: ignore[list-item]
                fused = _wide(F.conv2d(h_tilde, weight, bias, padding=1))
                vu, vr, ahead = fused.chunk(3, dim=1)
            else:
                vu, vr = _wide(unit.v(h_tilde)).chunk(2, dim=1)
            h_hat = unit.update(h_hat, h_tilde, vu, vr)
            estimate = estimate - unit.noise_scale * noise_attention(h_hat)
            if trace is not None:
                trace.append(estimate)
            h_hat = feedback(h_hat, estimate)
            if k < last:
                h_tilde = torch.tanh(ahead if ahead is not None else _wide(self.w1(h_tilde)))
        h_hat = _wide(self.tail(F.relu(h_hat)))
        return estimate - self.tail_scale * noise_attention(h_hat)

    def _blind_branch(
        self, start: Tensor, centre: Tensor, h_tilde: Tensor, trace: list[Tensor] | None = None
    ) -> Tensor:
        """The blind-spot branch: the centre stream in four half-plane directions.

        ``start`` ``(B, 1, H, W)`` is the neighbour (where the running estimate starts),
        ``centre`` ``(B, 4, H, W)`` the centre shifted once per direction (:data:`_SHIFTS`),
        ``h_tilde`` the neighbour's stem features. Every conv that reads the centre stream is
        a :func:`_directional_weight` conv, per direction; the neighbour stream (W_1, V_u, V_r)
        is the paper's, computed once; everything else (the GRU update, NAtt, feedback) is
        pointwise. So direction k's estimate at a pixel depends on the centre only through its
        half-plane, which excludes the pixel, and :attr:`combine` (1×1) mixes the four.
        """
        b, _, height, width = start.shape
        d, h = DIRECTIONS, self.config.features
        h_hat = F.relu(_gconv(centre, self.stem))
        estimate = start.expand(b, d, height, width)
        h_tilde = torch.tanh(_wide(self.w1(h_tilde)))
        last = len(self.units) - 1
        for k, unit in enumerate(self.units):
            ahead = None
            if self.fuse_gates and k < last:
                weight = torch.cat([unit.v.weight, self.w1.weight])
                bias = torch.cat([unit.v.bias, self.w1.bias])  # type: ignore[list-item]
                vu, vr, ahead = _wide(F.conv2d(h_tilde, weight, bias, padding=1)).chunk(3, dim=1)
            else:
                vu, vr = _wide(unit.v(h_tilde)).chunk(2, dim=1)
            hh = _directional_update(unit, h_hat, h_tilde, vu, vr)
            estimate = estimate - unit.noise_scale * _directional_attention(hh)
            if trace is not None:
                trace.append(_wide(self.combine(estimate)))
            hh = _directional_feedback(hh, estimate)
            h_hat = hh.reshape(b, d * h, height, width)
            if k < last:
                h_tilde = torch.tanh(ahead if ahead is not None else _wide(self.w1(h_tilde)))
        tail = _gconv(F.relu(h_hat), self.tail).reshape(b, d, h, height, width)
        estimate = estimate - self.tail_scale * _directional_attention(tail)
        return _wide(self.combine(estimate))

    def blind_branches(
        self, centre: Tensor, neighbours: Sequence[Tensor], trace: list[Tensor] | None = None
    ) -> list[Tensor]:
        """:meth:`branches` of a blind model: the estimate at a pixel never sees that pixel of
        the centre (it sees the neighbours in full and the rest of the centre).

        With no neighbour (the single-image mode) the centre is its own neighbour, as in the
        paper network: that estimate is **not** blind (the neighbour stream sees the pixel), so
        the Denoiser skips the posterior step for it. Measured on held-out FIB-25 with the
        shipped base: 29.1 dB at Gaussian σ 25 and 22.3 dB at Poisson peak 4, against 23.7 and
        21.3 dB from a zero neighbour plus the posterior step (BENCHMARKS §1b).
        """
        if not neighbours:
            neighbours = (centre,)
        k = len(neighbours)
        n = centre.shape[0]
        starts = torch.cat(list(neighbours), dim=0)
        h_tilde0 = F.relu(self.stem(starts))
        shifted = torch.cat([_shift(centre, dy, dx) for dy, dx in _SHIFTS], dim=1)
        shifted = torch.cat([shifted] * k) if k > 1 else shifted
        if trace is not None:
            out = self._blind_branch(starts, shifted, h_tilde0, trace)
        else:
            out = (self._compiled_branch or self._blind_branch)(starts, shifted, h_tilde0)
        return list(out.split(n, dim=0))

    def branches(
        self, centre: Tensor, neighbours: Sequence[Tensor], trace: list[Tensor] | None = None
    ) -> list[Tensor]:
        """One estimate of the centre per neighbour, all branches sharing weights.

        The stem on the centre is computed once; the branches run as one batch.

        Parameters
        ----------
        centre
            ``(N, 1, H, W)`` normalised centre slice x_j.
        neighbours
            One or more ``(N, 1, H, W)`` neighbours (x_{j−1}, x_{j+1}, or repeat scans).

        Returns
        -------
        list of Tensor
            ``len(neighbours)`` estimates, each ``(N, 1, H, W)``, in the neighbours' order.
        """
        if self.blind:
            return self.blind_branches(centre, neighbours, trace)
        if not neighbours:
            raise ValueError("branches() needs at least one neighbour")
        k = len(neighbours)
        n = centre.shape[0]
        stems = F.relu(self.stem(torch.cat([centre, *neighbours], dim=0)))
        h_hat0, h_tilde0 = stems[:n], stems[n:]
        # cat (not repeat) keeps the memory layout (channels-last): one compiled graph for all k.
        h_hat = torch.cat([h_hat0] * k) if k > 1 else h_hat0
        x = torch.cat([centre] * k) if k > 1 else centre
        if trace is not None:  # eager: the compiled graph has no trace
            out = self._branch(x, h_hat, h_tilde0, trace)
        else:
            out = (self._compiled_branch or self._branch)(x, h_hat, h_tilde0)
        return list(out.split(n, dim=0))

    def forward(self, centre: Tensor, *neighbours: Tensor) -> Tensor:
        """Denoise ``centre`` with 0, 1 or more neighbours.

        * two neighbours (triplet): the mean of the two branch estimates (paper, eq. 3 inference);
        * one neighbour (pair): that branch's estimate;
        * none (single): one branch with the centre as its own neighbour (a documented fallback).
        """
        if not neighbours and not self.blind:
            neighbours = (centre,)
        outs = self.branches(centre, neighbours)
        if len(outs) == 1:
            return outs[0]
        return torch.stack(outs, dim=0).mean(dim=0)


def unit_estimates(model: NRRN, centre: Tensor, *neighbours: Tensor) -> list[Tensor]:
    """The estimate after every building unit, then the output (paper 2.2.4, Fig. 5).

    ``blocks + 1`` tensors like :meth:`NRRN.forward`'s output (the mean over branches in a
    triplet); the last is the output itself (after the tail).
    """
    if not neighbours and not model.blind:
        neighbours = (centre,)
    trace: list[Tensor] = []
    outs = model.branches(centre, neighbours, trace)
    n = centre.shape[0]
    steps = [*trace, torch.cat(outs)]
    return [torch.stack(t.split(n, dim=0)).mean(dim=0) for t in steps]


def n2n_loss(
    out_prev: Tensor, out_next: Tensor, prev: Tensor, next_: Tensor, centre: Tensor | None = None
) -> Tensor:
    """The triplet Noise2Noise loss of eq. 3 (means over pixels and batch; ``centre`` unused).

    ``out_prev`` = x'_j = f(x_{j−1}, x_j) is scored against x_{j+1}, the neighbour it did not
    see; ``out_next`` = x''_j = f(x_{j+1}, x_j) against x_{j−1}; the last term rewards the two
    estimates for *differing*:

        ½‖x'_j − x_{j+1}‖² + ½‖x''_j − x_{j−1}‖² − ¼‖x'_j − x''_j‖²

    Written with the mean m = ½(x' + x'') and half-difference d = ½(x' − x''), this is
    ½‖m − x_{j+1}‖² + ½‖m − x_{j−1}‖² + ⟨d, x_{j−1} − x_{j+1}⟩: quadratic in m but only linear
    in d. The linear term does **not** average to zero, even for repeat scans (one signal s,
    noise n_{j±1}): x' contains n_{j−1} and x'' contains n_{j+1}, so its expectation is
    ½(E⟨x', n_{j−1}⟩ + E⟨x'', n_{j+1}⟩). That is what cancels the reward for fitting the noise
    hidden in the two quadratic terms (−E⟨m, n_{j±1}⟩), which gives Wu et al.'s
    E[eq. 3] = E‖m − s‖² + σ² for repeat scans. Between adjacent slices the signals differ and
    the linear term also pays each branch for extrapolating towards the neighbour it did not see
    (s_{j±1} − s_j), which is why :func:`plain_loss` is the default for adjacent slices without
    a blind-spot model (see :mod:`nrrn_daemon.finetune.training`).
    """
    return (
        0.5 * F.mse_loss(out_prev, next_)
        + 0.5 * F.mse_loss(out_next, prev)
        - 0.25 * F.mse_loss(out_prev, out_next)
    )


def plain_loss(
    out_prev: Tensor, out_next: Tensor, prev: Tensor, next_: Tensor, centre: Tensor | None = None
) -> Tensor:
    """Eq. 3 without its last term: plain Noise2Noise per branch (``centre`` unused).

        ½‖x'_j − x_{j+1}‖² + ½‖x''_j − x_{j−1}‖²  =  eq. 3 + ‖d‖²,  d = ½(x' − x'')

    Each branch is still scored against the neighbour it did not see, whose noise is independent
    of its inputs, so the expected loss is the loss against the clean neighbours plus the noise
    variance: its minimiser predicts the *neighbours'* signal, not the centre's (the mean of the
    clean neighbours is only ~31 dB from the clean centre on FIB-25), with no reward for the two
    branches to differ.
    """
    return 0.5 * F.mse_loss(out_prev, next_) + 0.5 * F.mse_loss(out_next, prev)


def centre_loss(
    out_prev: Tensor, out_next: Tensor, prev: Tensor, next_: Tensor, centre: Tensor | None = None
) -> Tensor:
    """The blind-spot centre target: both branches and their mean scored against x_j itself.

        ½‖m − x_j‖² + ¼‖x'_j − x_j‖² + ¼‖x''_j − x_j‖²,  m = ½(x' + x'')

    Only for a blind model (:attr:`NRRNConfig.blind`): its estimate at a pixel does not depend
    on that pixel of x_j, whose noise is independent of everything else it sees, so each term's
    expectation is the MSE to the clean *centre* plus the noise variance — an unbiased target
    for the slice that is scored, for any blind model. The mean m is what a triplet outputs;
    the single branches keep the pair mode (stack ends) trained.
    """
    if centre is None:
        raise ValueError("centre_loss needs the centre slice")
    m = 0.5 * (out_prev + out_next)
    return (
        0.5 * F.mse_loss(m, centre)
        + 0.25 * F.mse_loss(out_prev, centre)
        + 0.25 * F.mse_loss(out_next, centre)
    )


LOSSES: dict[str, Callable[..., Tensor]] = {
    "eq3": n2n_loss,
    "plain": plain_loss,
    "centre": centre_loss,
}
"""Training losses by name, each ``loss(out_prev, out_next, prev, next, centre)``: ``eq3`` (the
paper's), ``plain`` (eq. 3 without its last term) and ``centre`` (blind-spot models only)."""
