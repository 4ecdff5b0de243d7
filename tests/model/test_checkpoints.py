"""Checkpoints: a bit-exact round trip; every way a file is refused (corrupt, foreign, hostile,
edited); atomic writes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from nrrn_daemon.errors import CheckpointError
from nrrn_daemon.model.checkpoints import (
    Checkpoint,
    Normalisation,
    load_checkpoint,
    save_checkpoint,
)
from nrrn_daemon.model.nrrn import NRRN, NRRNConfig


@pytest.fixture
def ckpt() -> Checkpoint:
    torch.manual_seed(3)
    model = NRRN(blocks=2, features=8)
    summary = {"steps": 12, "loss_curve": [[1, 0.5], [12, 0.25]], "note": "ünïcode"}
    return Checkpoint.from_model(model, Normalisation("dataset", 117.25, 31.5), summary)


def test_round_trip_is_bit_exact(ckpt: Checkpoint, tmp_path: Path) -> None:
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    back = load_checkpoint(path)
    assert back.config == NRRNConfig(blocks=2, features=8)
    assert back.normalisation == Normalisation("dataset", 117.25, 31.5)
    assert back.summary == ckpt.summary
    assert back.content_sha256 == ckpt.content_sha256 and len(back.content_sha256) == 64
    assert back.state_dict.keys() == ckpt.state_dict.keys()
    for name, tensor in ckpt.state_dict.items():
        assert back.state_dict[name].dtype == tensor.dtype
        assert torch.equal(back.state_dict[name], tensor), name
    # The rebuilt network computes exactly what the original weights compute.
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(back.build_model()(x, x), ckpt.build_model()(x, x))


def test_sha_depends_on_weights_and_metadata(ckpt: Checkpoint) -> None:
    model = ckpt.build_model()
    same = Checkpoint.from_model(model, ckpt.normalisation, ckpt.summary)
    assert same.content_sha256 == ckpt.content_sha256
    other_norm = Checkpoint.from_model(model, Normalisation("slice", 117.25, 31.5), ckpt.summary)
    assert other_norm.content_sha256 != ckpt.content_sha256
    with torch.no_grad():
        model.stem.bias[0] += 1e-6
    assert Checkpoint.from_model(model, ckpt.normalisation, ckpt.summary).content_sha256 != (
        ckpt.content_sha256
    )


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_file_is_refused_with_its_path(
    ckpt: Checkpoint, tmp_path: Path, damage: str
) -> None:
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    data = bytearray(path.read_bytes())
    if damage == "flip":  # flip a run of bytes in the middle (tensor data or zip structure)
        mid = len(data) // 2
        data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_foreign_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match="not an nrrn-daemon checkpoint"):
        load_checkpoint(path)
    torch.save(NRRN(1, 4).state_dict(), path)  # a bare state_dict is foreign too
    with pytest.raises(CheckpointError, match="not an nrrn-daemon checkpoint"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would create ``marker`` — the stand-in for ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_hostile_pickle_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "nrrn-daemon-checkpoint", "format_version": 1, "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "loading executed code from the file"


def test_os_system_reduce_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "nrrn-daemon-checkpoint", "evil": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_edited_metadata_fails_the_sha_check(ckpt: Checkpoint, tmp_path: Path) -> None:
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["metadata_json"])
    meta["normalisation"]["std"] = 1.0  # a plausible edit that would silently change outputs
    payload["metadata_json"] = json.dumps(meta, sort_keys=True)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="sha256") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_edited_weights_fail_the_sha_check(ckpt: Checkpoint, tmp_path: Path) -> None:
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["tail_scale"] = payload["state_dict"]["tail_scale"] * 2
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_atomic_save_leaves_no_part_file(ckpt: Checkpoint, tmp_path: Path) -> None:
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    save_checkpoint(ckpt, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_failed_save_keeps_the_old_file_and_no_part(
    ckpt: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    before = path.read_bytes()

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    other = Checkpoint.from_model(NRRN(1, 4), Normalisation())
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(other, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing")):
        save_checkpoint(ckpt, tmp_path / "missing" / "model.pt")
