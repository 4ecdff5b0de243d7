"""The model in service: which checkpoint a profile asks for, its Denoiser and provenance name.

The daemon starts with the profile's checkpoint (:func:`~nrrn_daemon.registry.profile_checkpoint`);
with ``model.checkpoint = "dataset"`` it switches (:meth:`Serving.switch`) to the data set's
current model after a fine-tune is promoted or a model is promoted/rolled back by hand. The
pipeline's model thread reads the Denoiser and its :class:`~nrrn_daemon.registry.ModelInfo`
together (:meth:`Serving.get`), so a unit is always recorded with the model that denoised it.
"""

from __future__ import annotations

import threading

from nrrn_daemon.config.profiles import Profile
from nrrn_daemon.model.checkpoints import Checkpoint
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.registry import ModelInfo, current_checkpoint, load_in_service, profile_checkpoint
from nrrn_daemon.store.store import Store


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
        path = profile_checkpoint(profile.model.checkpoint, store, dataset_id)
        ckpt, self.model = load_in_service(store, path, dataset_id)
        self.denoiser = denoiser_for(profile, ckpt)

    def get(self) -> tuple[Denoiser, ModelInfo]:
        """The model in service and its provenance name, read together (by the model thread)."""
        with self._lock:
            return self.denoiser, self.model

    def current_path(self) -> str | None:
        """With ``model.checkpoint = "dataset"``: the data set's current model (else None)."""
        if self.profile.model.checkpoint != "dataset":
            return None
        return str(current_checkpoint(self.store, self.dataset_id))

    def switch(self, path: str) -> None:
        """Serve the checkpoint at ``path`` (the data set's current model) from the next unit on.

        Raises
        ------
        NRRNError
            The checkpoint cannot be loaded (the model in service stays).
        """
        ckpt, model = load_in_service(self.store, path, self.dataset_id)
        denoiser = denoiser_for(self.profile, ckpt)
        with self._lock:  # units that start from now on use the new model
            self.denoiser, self.model = denoiser, model
