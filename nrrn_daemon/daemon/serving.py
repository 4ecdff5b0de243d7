"""The model in service: which checkpoint a profile asks for, its Denoiser and provenance name.

The daemon starts with :func:`resolve_checkpoint`; with ``model.checkpoint = "dataset"`` it
switches (:meth:`Serving.switch`) to the data set's current model after a fine-tune is promoted
or a model is promoted/rolled back by hand. The pipeline's model thread reads the Denoiser and its
:class:`~nrrn_daemon.daemon.units.ModelInfo` together (:meth:`Serving.get`), so a unit is always
recorded with the model that denoised it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.daemon.units import ModelInfo
from nrrn_daemon.model.checkpoints import BASE_CHECKPOINT, Checkpoint, load_checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.states import ModelKind
from nrrn_daemon.store.store import Store


def resolve_checkpoint(profile: Profile, store: Store, dataset_id: int) -> tuple[Path, Checkpoint]:
    """The checkpoint the profile asks for: ``base``, ``dataset`` (its promoted model) or a path."""
    choice = profile.model.checkpoint
    if choice == "base":
        path = BASE_CHECKPOINT
    elif choice == "dataset":
        current = store.current_model_path(dataset_id)
        path = Path(current) if current else BASE_CHECKPOINT
    else:
        path = Path(choice).expanduser()
    return path, load_checkpoint(path)


def record_model(store: Store, path: Path, ckpt: Checkpoint, dataset_id: int) -> int:
    """The checkpoint's id in the store, recording it when new: the shipped base checkpoint as
    ``base-<sha12>``, any other as ``model-<sha12>`` of this data set (unless it names itself)."""
    base = path.resolve() == BASE_CHECKPOINT.resolve()
    return store.ensure_model(
        sha256=ckpt.content_sha256, path=str(path),
        label=ckpt.summary.get("label") or f"{'base' if base else 'model'}-{ckpt.short_sha}",
        kind=ModelKind.BASE if base else ModelKind.FINETUNED, config=ckpt.config.to_dict(),
        parent_sha256=ckpt.summary.get("parent_sha256"),
        dataset_id=None if base else dataset_id,
    )  # fmt: skip


def denoiser_for(profile: Profile, ckpt: Checkpoint) -> Denoiser:
    """A Denoiser for ``ckpt`` with the profile's device, tiling, precision and compilation."""
    m = profile.model
    return Denoiser(
        ckpt, device=m.device, tile=m.tile, tile_batch=m.tile_batch, precision=m.precision,
        compile=m.compile,
    )  # fmt: skip


class Serving:
    """The Denoiser in service and its provenance name, swapped together under a lock.

    Raises
    ------
    NRRNError
        (from the constructor) The profile's checkpoint cannot be loaded.
    """

    def __init__(self, profile: Profile, store: Store, dataset_id: int) -> None:
        self.profile, self.store, self.dataset_id = profile, store, dataset_id
        self._lock = threading.Lock()
        path, ckpt = resolve_checkpoint(profile, store, dataset_id)
        model_id = record_model(store, path, ckpt, dataset_id)
        self.denoiser = denoiser_for(profile, ckpt)
        self.model = ModelInfo(
            label=store.model_label(model_id), sha256=ckpt.content_sha256, path=str(path),
            store_id=model_id,
        )  # fmt: skip

    def get(self) -> tuple[Denoiser, ModelInfo]:
        """The model in service and its provenance name, read together (by the model thread)."""
        with self._lock:
            return self.denoiser, self.model

    def current_path(self) -> str | None:
        """With ``model.checkpoint = "dataset"``: the data set's current model (else None)."""
        if self.profile.model.checkpoint != "dataset":
            return None
        return self.store.current_model_path(self.dataset_id) or str(BASE_CHECKPOINT)

    def switch(self, path: str) -> None:
        """Serve the checkpoint at ``path`` (the data set's current model) from the next unit on.

        Raises
        ------
        NRRNError
            The checkpoint cannot be loaded (the model in service stays).
        """
        ckpt = load_checkpoint(Path(path))
        denoiser = denoiser_for(self.profile, ckpt)
        model_id = self.store.current_model_id(self.dataset_id)
        if model_id is None:  # rolled back to the base checkpoint
            model_id = self.store.ensure_model(
                sha256=ckpt.content_sha256, path=path, label=f"base-{ckpt.short_sha}",
                kind=ModelKind.BASE, config=ckpt.config.to_dict(),
            )  # fmt: skip
        model = ModelInfo(
            label=self.store.model_label(model_id), sha256=ckpt.content_sha256, path=path,
            store_id=model_id,
        )  # fmt: skip
        with self._lock:  # units that start from now on use the new model
            self.denoiser, self.model = denoiser, model
