"""The supervised ceiling: the same network trained on clean centres (benchmarks only).

No self-supervised objective can beat the same network, from the same start, trained for the same
steps on the same noisy block with the *clean* centre as its target: that is the ceiling the
issue-12 benchmark measures the shipped objective against. It needs clean data, which a user
never has, so it lives here and not in :mod:`nrrn_daemon.finetune`.

The crops, normalisation and model are those of the product: random ``patch``² crops of whole
triplets (z−1, z, z+1) of the noisy block with the same flips and rotations on all three and on
the clean centre, z-scored with the noisy centre slice's mean/std (the checkpoint's
:class:`~nrrn_daemon.model.checkpoints.Normalisation`), the network's triplet output (the mean of
its two branches), MSE to the clean centre, Adam with a cosine decay to ``lr_floor`` (no
warm-up, unlike the fine-tune's schedule).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nrrn_daemon.model.checkpoints import Checkpoint


def train_supervised(
    init: Checkpoint,
    noisy: np.ndarray,
    clean: np.ndarray,
    *,
    steps: int,
    patch: int = 96,
    batch: int = 8,
    lr: float = 1e-3,
    lr_floor: float = 0.05,
    seed: int = 0,
) -> tuple[Checkpoint, dict[str, float]]:
    """``init`` trained ``steps`` steps on (noisy triplet → clean centre) crops of one block.

    ``noisy`` and ``clean`` are ``(Z, Y, X)`` blocks of the same shape; every interior slice is a
    training centre. Returns the checkpoint and a record (steps, seconds, first/last loss).
    """
    import time

    if noisy.shape != clean.shape or noisy.ndim != 3 or len(noisy) < 3:
        raise ValueError(f"noisy {noisy.shape} and clean {clean.shape}: need equal (Z≥3, Y, X)")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = init.build_model().train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    stats = [init.normalisation.stats_for(noisy[z]) for z in range(len(noisy))]
    z_max, height, width = len(noisy) - 2, noisy.shape[1], noisy.shape[2]
    side = min(patch, height, width)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimiser.param_groups:  # cosine decay to lr_floor · lr
            t = step / max(steps - 1, 1)
            group["lr"] = lr * (lr_floor + (1 - lr_floor) * 0.5 * (1 + math.cos(math.pi * t)))
        crops = []
        for _ in range(batch):
            z = int(rng.integers(1, z_max + 1))
            y = int(rng.integers(0, height - side + 1))
            x = int(rng.integers(0, width - side + 1))
            mean, std = stats[z]
            stack = np.concatenate(
                [
                    noisy[z - 1 : z + 2, y : y + side, x : x + side],
                    clean[z : z + 1, y : y + side, x : x + side],
                ]
            ).astype(np.float32)
            stack = (stack - mean) / std
            stack = np.rot90(stack, int(rng.integers(4)), axes=(1, 2))
            if rng.integers(2):
                stack = stack[:, :, ::-1]
            crops.append(np.ascontiguousarray(stack))
        data = torch.from_numpy(np.stack(crops))[:, :, None]  # (B, 4, 1, s, s)
        prev, centre, nxt, target = data.unbind(dim=1)
        out = model(centre, prev, nxt)
        loss = torch.mean((out - target) ** 2)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    ckpt = Checkpoint.from_model(
        model,
        init.normalisation,
        {"supervised_ceiling": {"steps": steps, "parent": init.content_sha256}},
    )
    record = {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "loss_first": float(np.mean(losses[:10])) if losses else math.nan,
        "loss_last": float(np.mean(losses[-10:])) if losses else math.nan,
    }
    return ckpt, record
