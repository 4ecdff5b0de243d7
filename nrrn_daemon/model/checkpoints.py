"""Model checkpoints: one file with weights, model config, normalisation, training summary, sha256.

The file is written with :func:`torch.save` and holds only tensors, strings, numbers, lists and
dicts, so it is read back with ``torch.load(weights_only=True)``: loading never unpickles arbitrary
objects. Inside, ``content_sha256`` is the sha256 of the weights' bytes and the canonical JSON of
everything else; loading recomputes it, so a corrupt or edited file is refused. (A file cannot hold
the sha256 of its own bytes; provenance records that one separately, with
:func:`nrrn_daemon.files.sha256_file`.) Writes are atomic: a temporary file in the same
folder, fsync, then rename, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nrrn_daemon.errors import CheckpointError, OutputError
from nrrn_daemon.files import atomic_write
from nrrn_daemon.model.nrrn import NRRN, NRRNConfig

FORMAT = "nrrn-daemon-checkpoint"
FORMAT_VERSION = 1
BASE_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "base.pt"

NormMode = Literal["dataset", "slice"]


@dataclass(frozen=True)
class Normalisation:
    """How raw grey levels become the network's zero-mean, unit-std input, and back.

    ``mode="dataset"``: one mean/std for the whole data set (measured on its training slices);
    ``mode="slice"``: each group is z-scored with its centre slice's own mean/std (used by the
    shipped base checkpoint, which must work on data sets it has never seen). ``mean``/``std``
    are grey levels of the training data in both modes (recorded for provenance).
    """

    mode: NormMode = "dataset"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("dataset", "slice"):
            raise ValueError(f"normalisation mode must be 'dataset' or 'slice', got {self.mode!r}")
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise ValueError(
                f"normalisation needs a finite mean and std > 0, got {self.mean}, {self.std}"
            )

    def stats_for(self, centre: np.ndarray) -> tuple[float, float]:
        """Mean and std to use for a group whose centre slice is ``centre``."""
        if self.mode == "dataset":
            return self.mean, self.std
        return slice_stats(centre)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mean": float(self.mean), "std": float(self.std)}


def slice_stats(image: np.ndarray) -> tuple[float, float]:
    """Mean and std of an image (on a regular 1-in-16 subsample above 1 Mpx, for speed)."""
    sample = image[::4, ::4] if image.size > (1 << 20) else image
    sample = sample.astype(np.float64)
    std = float(sample.std())
    return float(sample.mean()), max(std, 1e-3)


@dataclass
class Checkpoint:
    """An NRRN and everything needed to use it and to know where it came from."""

    config: NRRNConfig
    state_dict: dict[str, torch.Tensor]
    normalisation: Normalisation
    summary: dict[str, Any] = field(default_factory=dict)
    content_sha256: str = ""

    def build_model(self) -> NRRN:
        """A fresh :class:`NRRN` with these weights (on CPU, eval mode)."""
        model = NRRN.from_config(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    @classmethod
    def from_model(
        cls, model: NRRN, normalisation: Normalisation, summary: dict[str, Any] | None = None
    ) -> Checkpoint:
        state = {
            k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()
        }
        ckpt = cls(model.config, state, normalisation, dict(summary or {}))
        ckpt.content_sha256 = _content_sha256(ckpt)
        return ckpt

    @property
    def short_sha(self) -> str:
        return self.content_sha256[:12]


def _metadata(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "config": ckpt.config.to_dict(),
        "normalisation": ckpt.normalisation.to_dict(),
        "summary": ckpt.summary,
    }


def _content_sha256(ckpt: Checkpoint) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(_metadata(ckpt), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(ckpt.state_dict):
        t = ckpt.state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically to ``path``; returns the path.

    Raises
    ------
    CheckpointError
        When the folder is missing or not writable, or the disk is full.
    """
    path = Path(path)
    ckpt.content_sha256 = _content_sha256(ckpt)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        # JSON keeps the metadata free of anything but plain values.
        "metadata_json": json.dumps(_metadata(ckpt), sort_keys=True),
        "content_sha256": ckpt.content_sha256,
        "state_dict": ckpt.state_dict,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        atomic_write(
            path, lambda fh: fh.write(buf.getbuffer()), "the previous file, if any, is unchanged"
        )
    except OutputError as exc:
        raise CheckpointError(f"checkpoint not saved: {exc}") from None
    return path


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Read and verify a checkpoint; ``None`` means the shipped base checkpoint.

    Raises
    ------
    CheckpointError
        Missing file, not a checkpoint of this project, corrupt, or sha256 mismatch.
    """
    path = BASE_CHECKPOINT if path is None else Path(path)
    if not path.is_file():
        hint = (
            "the package's base checkpoint is missing: reinstall nrrn-daemon or run "
            "scripts/train_base.py"
            if path == BASE_CHECKPOINT
            else "check the path, or omit --model to use the shipped base checkpoint"
        )
        raise CheckpointError(f"checkpoint {path} not found — {hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad bytes; all mean the same here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(exc).__name__}) — "
            "use another checkpoint or re-train it"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an nrrn-daemon checkpoint (no '{FORMAT}' marker) — "
            "train one with `nrrn-daemon train`"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('format_version')}, this "
            f"nrrn-daemon reads version {FORMAT_VERSION} — upgrade nrrn-daemon"
        )
    try:
        meta = json.loads(payload["metadata_json"])
        ckpt = Checkpoint(
            config=NRRNConfig.from_dict(meta["config"]),
            state_dict=dict(payload["state_dict"]),
            normalisation=Normalisation(**meta["normalisation"]),
            summary=meta.get("summary", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} has malformed metadata ({exc}) — re-train it"
        ) from exc
    recorded = payload.get("content_sha256", "")
    actual = _content_sha256(ckpt)
    if recorded != actual:
        raise CheckpointError(
            f"checkpoint {path} fails its sha256 check (recorded {str(recorded)[:12]}, "
            f"content {actual[:12]}): the file is corrupt or was edited — use another checkpoint"
        )
    ckpt.content_sha256 = actual
    try:
        ckpt.build_model()
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its config ({exc})") from exc
    return ckpt
