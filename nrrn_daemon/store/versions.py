"""Model versions and fine-tune runs in the provenance store: part of :class:`Store`.

Checkpoints are recorded by sha256 (one row per distinct file, whatever its path), with their
parent and the data set they were fine-tuned on; a fine-tune run is recorded when it starts
(``running``) and when it ends (promoted, rejected, failed), so an interrupted one can be closed
after a crash. :class:`ModelVersions` holds these methods; :class:`nrrn_daemon.store.store.Store`
inherits them, so every caller still uses one store object.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from nrrn_daemon.errors import StoreError
from nrrn_daemon.states import FinetuneStatus, ModelKind, SliceState
from nrrn_daemon.store.engine import StoreCore
from nrrn_daemon.store.queries import models_report
from nrrn_daemon.store.tables import Dataset, FinetuneRun, ModelVersion, Slice

__all__ = ["ModelVersions"]


class ModelVersions(StoreCore):
    """The model-version and fine-tune records of :class:`nrrn_daemon.store.store.Store`."""

    # -- models -------------------------------------------------------------------------------

    def ensure_model(
        self,
        *,
        sha256: str,
        path: str,
        label: str,
        kind: ModelKind | str,
        config: dict[str, Any],
        parent_sha256: str | None = None,
        metrics: dict[str, Any] | None = None,
        dataset_id: int | None = None,
    ) -> int:
        """Return the id of the checkpoint with this sha256, recording it when new.

        A checkpoint is identified by its sha256 alone: recording it again (from another path)
        returns the first row unchanged.
        """
        with self._unit(f"record model {label}") as session:
            found = session.scalar(select(ModelVersion.id).where(ModelVersion.sha256 == sha256))
            if found is not None:
                return found
            row = ModelVersion(
                sha256=sha256, path=str(path), label=label, kind=ModelKind(kind),
                config_json=config, parent_sha256=parent_sha256, metrics_json=metrics,
                dataset_id=dataset_id, created_at=self._clock(),
            )  # fmt: skip
            session.add(row)
            session.flush()
            return row.id

    def set_current_model(self, dataset_id: int, model_id: int, *, promoted: bool = False) -> None:
        """Make ``model_id`` the data set's model; ``promoted`` stamps its ``promoted_at``."""
        with self._unit(f"set the model of data set {dataset_id}") as session:
            dataset = session.get(Dataset, dataset_id)
            model = session.get(ModelVersion, model_id)
            if dataset is None or model is None:
                raise StoreError(f"no data set {dataset_id} or model {model_id} in {self.path}")
            dataset.current_model_id = model_id
            if promoted:
                model.promoted_at = self._clock()

    def model_label(self, model_id: int) -> str:
        """The label of a recorded model (``"base-1a2b3c4d"``, ``"ds3-v2"``)."""
        with self._unit("read a model", write=False) as session:
            label = session.scalar(select(ModelVersion.label).where(ModelVersion.id == model_id))
        if label is None:
            raise StoreError(f"no model {model_id} in database {self.path}")
        return label

    def model_path(self, model_id: int) -> str:
        """The checkpoint path recorded for a model."""
        with self._unit("read a model", write=False) as session:
            path = session.scalar(select(ModelVersion.path).where(ModelVersion.id == model_id))
        if path is None:
            raise StoreError(f"no model {model_id} in database {self.path}")
        return path

    def current_model_path(self, dataset_id: int) -> str | None:
        """The checkpoint path of the data set's current (promoted) model, if it has one."""
        with self._unit("read the current model", write=False) as session:
            return session.scalar(
                select(ModelVersion.path)
                .join(Dataset, Dataset.current_model_id == ModelVersion.id)
                .where(Dataset.id == dataset_id)
            )

    # -- fine-tunes and model versions -------------------------------------------------------

    def start_finetune(self, dataset_id: int, parent_model_id: int, summary: dict[str, Any]) -> int:
        """Record a fine-tune as :attr:`FinetuneStatus.RUNNING`; return its id."""
        with self._unit(f"record a fine-tune of data set {dataset_id}") as session:
            row = FinetuneRun(
                dataset_id=dataset_id, started_at=self._clock(), status=FinetuneStatus.RUNNING,
                parent_model_id=parent_model_id, promoted=False, summary_json=summary,
            )  # fmt: skip
            session.add(row)
            session.flush()
            return row.id

    def end_finetune(
        self,
        finetune_id: int,
        status: FinetuneStatus,
        candidate_model_id: int | None,
        summary: dict[str, Any],
    ) -> None:
        """Record how a fine-tune ended (``summary`` is merged into the recorded one)."""
        with self._unit(f"record the end of fine-tune {finetune_id}") as session:
            row = session.get(FinetuneRun, finetune_id)
            if row is None:
                raise StoreError(f"no fine-tune {finetune_id} in database {self.path}")
            row.ended_at, row.status = self._clock(), FinetuneStatus(status)
            row.candidate_model_id = candidate_model_id
            row.promoted = status == FinetuneStatus.PROMOTED
            row.summary_json = {**row.summary_json, **summary}

    def finetune_counts(self, dataset_id: int) -> tuple[int, int]:
        """The data set's denoised slices and fine-tune runs (for the early trigger)."""
        with self._unit("count slices and fine-tunes", write=False) as session:
            denoised = session.scalar(
                select(func.count())
                .select_from(Slice)
                .where(Slice.dataset_id == dataset_id, Slice.state == SliceState.DENOISED)
            )
            runs = session.scalar(
                select(func.count())
                .select_from(FinetuneRun)
                .where(FinetuneRun.dataset_id == dataset_id)
            )
            return int(denoised or 0), int(runs or 0)

    def close_dead_finetunes(self, alive: Callable[[int], bool]) -> int:
        """Mark ``running`` fine-tunes of this host whose process is gone as failed.

        ``alive(pid)`` says whether a process still runs. Returns how many were closed.
        """
        host = socket.gethostname()
        closed = 0
        with self._unit("close interrupted fine-tunes") as session:
            for row in session.scalars(
                select(FinetuneRun).where(FinetuneRun.status == FinetuneStatus.RUNNING)
            ):
                info = row.summary_json or {}
                if info.get("host") == host and not alive(int(info.get("pid", -1))):
                    row.status, row.ended_at = FinetuneStatus.FAILED, self._clock()
                    row.summary_json = {**info, "error": "the fine-tune process died"}
                    closed += 1
        return closed

    def models(self, dataset: str | None = None) -> dict[str, Any]:
        """Model versions and fine-tunes, per data set; see :func:`models_report`."""
        with self._unit("read the models", write=False) as session:
            return models_report(session, dataset=dataset, where=str(self.path))

    def find_model(self, dataset_id: int, version: str) -> int:
        """The id of a model by label, sha256 (prefix of ≥ 6) or id, among the data set's own
        models and the base models.

        Raises
        ------
        StoreError
            No such model, or the prefix matches several.
        """
        with self._unit("find a model", write=False) as session:
            rows = list(
                session.scalars(
                    select(ModelVersion).where(
                        (ModelVersion.dataset_id == dataset_id) | ModelVersion.dataset_id.is_(None)
                    )
                )
            )
        hits = [
            m for m in rows
            if version in (m.label, str(m.id), m.sha256)
            or (len(version) >= 6 and m.sha256.startswith(version))
        ]  # fmt: skip
        if len(hits) != 1:
            known = ", ".join(m.label for m in rows) or "none"
            what = "no model" if not hits else "several models"
            raise StoreError(f"{what} match {version!r} in {self.path} (known: {known})")
        return hits[0].id

    def model_parent(self, model_id: int) -> int | None:
        """The id of a model's parent (by its recorded parent sha256), if recorded."""
        with self._unit("read a model", write=False) as session:
            model = session.get(ModelVersion, model_id)
            if model is None or model.parent_sha256 is None:
                return None
            return session.scalar(
                select(ModelVersion.id).where(ModelVersion.sha256 == model.parent_sha256)
            )

    def current_model_id(self, dataset_id: int) -> int | None:
        """The data set's current model id (``None``: the profile's model.checkpoint)."""
        with self._unit("read the current model", write=False) as session:
            return session.scalar(select(Dataset.current_model_id).where(Dataset.id == dataset_id))
