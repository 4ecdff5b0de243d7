"""The model registry: which checkpoint is in service, and how a checkpoint becomes a model row.

One home for three rules that the daemon, ``reprocess``, ``finetune`` and the CLI all follow:

* **current, else base** (:func:`current_checkpoint`): a data set's model is the checkpoint it
  promoted last (by a fine-tune or ``nrrn-daemon models promote``), else the shipped base
  checkpoint;
* **the profile's choice** (:func:`profile_checkpoint`): ``model.checkpoint`` is ``base``,
  ``dataset`` (current, else base) or a path; ``reprocess --model`` may also name a model row
  (:func:`find_checkpoint`);
* **one row per checkpoint** (:func:`record_model`): a checkpoint is identified by its sha256; the
  shipped base checkpoint (recognised by its resolved path) is recorded as ``base-<sha12>`` and
  belongs to no data set, any other as ``model-<sha12>`` of its data set, unless its summary or
  the caller names it.

:class:`ModelInfo` is how provenance names the model that made an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrrn_daemon.errors import StoreError
from nrrn_daemon.model.checkpoints import BASE_CHECKPOINT, Checkpoint, load_checkpoint
from nrrn_daemon.states import ModelKind
from nrrn_daemon.store.store import Store


@dataclass(frozen=True)
class ModelInfo:
    """The model in service, as provenance names it."""

    label: str
    sha256: str
    path: str
    store_id: int


def is_base(path: str | Path) -> bool:
    """Whether ``path`` is the shipped base checkpoint (compared by resolved path)."""
    return Path(path).expanduser().resolve() == BASE_CHECKPOINT.resolve()


def current_checkpoint(store: Store, dataset_id: int | None) -> Path:
    """The data set's current model, else the shipped base checkpoint (``None``: no data set)."""
    current = store.current_model_path(dataset_id) if dataset_id is not None else None
    return Path(current) if current else BASE_CHECKPOINT


def profile_checkpoint(choice: str, store: Store, dataset_id: int | None) -> Path:
    """The checkpoint a profile's ``model.checkpoint`` names: ``base``, ``dataset`` or a path."""
    if choice == "base":
        return BASE_CHECKPOINT
    if choice == "dataset":
        return current_checkpoint(store, dataset_id)
    return Path(choice).expanduser()


def find_checkpoint(store: Store, dataset_id: int | None, model: str | None) -> Path:
    """The checkpoint file of ``model``: a file, a label / sha256 prefix / id in the store, or
    (``None``) the data set's current model, else the base checkpoint. Reads only.

    Raises
    ------
    StoreError
        ``model`` is neither a file nor a model of the data set.
    """
    if model is None:
        path = current_checkpoint(store, dataset_id)
    elif Path(model).expanduser().is_file():
        path = Path(model)
    else:
        try:
            found = store.find_model(-1 if dataset_id is None else dataset_id, model)
        except StoreError as exc:
            raise StoreError(f"{exc} — or give a checkpoint file") from None
        path = Path(store.model_path(found))
    return path.expanduser().absolute()


def record_model(
    store: Store, path: str | Path, *, sha256: str, config: dict[str, Any],
    dataset_id: int | None, label: str | None = None, parent_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> int:  # fmt: skip
    """The checkpoint's row id, recording it when new (see the module docstring for labels)."""
    base = is_base(path)
    return store.ensure_model(
        sha256=sha256, path=str(path),
        label=label or f"{'base' if base else 'model'}-{sha256[:12]}",
        kind=ModelKind.BASE if base else ModelKind.FINETUNED, config=config,
        parent_sha256=parent_sha256, metrics=metrics, dataset_id=None if base else dataset_id,
    )  # fmt: skip


def record_checkpoint(store: Store, path: str | Path, ckpt: Checkpoint, dataset_id: int) -> int:
    """:func:`record_model` for a loaded checkpoint (its summary may name it)."""
    return record_model(
        store, path, sha256=ckpt.content_sha256, config=ckpt.config.to_dict(),
        dataset_id=dataset_id, label=ckpt.summary.get("label"),
        parent_sha256=ckpt.summary.get("parent_sha256"),
    )  # fmt: skip


def model_info(store: Store, model_id: int, sha256: str, path: str | Path) -> ModelInfo:
    """How provenance names the model row ``model_id``."""
    return ModelInfo(
        label=store.model_label(model_id), sha256=sha256, path=str(path), store_id=model_id
    )


def load_in_service(
    store: Store, path: str | Path, dataset_id: int
) -> tuple[Checkpoint, ModelInfo]:
    """Load the checkpoint at ``path``, record it, and name it for provenance.

    Raises
    ------
    NRRNError
        The checkpoint cannot be loaded.
    """
    ckpt = load_checkpoint(Path(path))
    model_id = record_checkpoint(store, path, ckpt, dataset_id)
    return ckpt, model_info(store, model_id, ckpt.content_sha256, path)
