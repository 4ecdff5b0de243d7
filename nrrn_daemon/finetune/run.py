"""One fine-tune of a data set's model on its own raw slices.

Flow (``nrrn-daemon finetune``, or the daemon's nightly job, which runs :func:`child_main` in a
subprocess): :func:`run_finetune` reads the data set's slices from the store (read-only), trains
from the parent checkpoint with :func:`nrrn_daemon.finetune.training.train` within a time budget,
saves the candidate atomically as ``models/<data set>/<sha12>.pt`` beside the database, and
:func:`~nrrn_daemon.finetune.promotion.judge` compares candidate and parent (the promotion gate).
The result is a plain JSON-able :class:`FinetuneResult`; whoever owns the database (the daemon, or
the CLI when no daemon runs) records it with :func:`record_result`. A crash or ``kill -9`` at any
point leaves no half-written checkpoint (atomic write) and the current model untouched (only
:func:`record_result` changes it).

Data: only **raw** slices (state ``ready`` or ``denoised``, never outputs), by index. Slices are
split into runs of consecutive indices (a gap breaks a triplet); runs too short to leave a training
triplet outside their validation blocks are skipped. At most :data:`MAX_SLICES` slices (the newest)
are loaded. Validation slices are :func:`~nrrn_daemon.finetune.validation.validation_blocks` of
each run, exactly as ``train`` holds them out.

Repeat-scan data sets (``FinetuneJob.scans_per_slice`` ≥ 3) train on **scan triplets**: three
scans of one slice carry the same signal with independent noise (no slice-to-slice change at
all), so every index with that many scans is a training unit, gaps do not matter, and whole
indices are held out for validation (:func:`raw_scan_groups`). With 2 scans per slice no scan
triplet exists: the first scan of each index is used as an adjacent-slice stack, as above.

"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nrrn_daemon.config.profiles import FrameSettings
from nrrn_daemon.errors import InputError, NRRNError
from nrrn_daemon.files import atomic_write
from nrrn_daemon.finetune.promotion import judge
from nrrn_daemon.finetune.training import TrainSettings, train
from nrrn_daemon.finetune.validation import Triplet, validation_blocks
from nrrn_daemon.imaging.tiff import DatabarMode, read_slice
from nrrn_daemon.model.checkpoints import load_checkpoint, save_checkpoint
from nrrn_daemon.registry import record_model
from nrrn_daemon.states import FinetuneStatus, SliceState
from nrrn_daemon.store.store import Store

log = logging.getLogger("nrrn_daemon.finetune.run")

MAX_SLICES = 400
"""At most this many (newest) raw slices are loaded for one fine-tune."""


@dataclass(frozen=True)
class FinetuneJob:
    """Everything one fine-tune needs; JSON-able, so the daemon can hand it to a subprocess."""

    db: str
    dataset: str
    parent: str
    models_dir: str
    minutes: float
    validation_fraction: float = 0.1
    steps: int | None = None
    device: str = "auto"
    databar: str = "none"
    databar_rows: int = 0
    patch: int = 96
    batch: int = 8
    seed: int = 0
    scans_per_slice: int = 1
    """≥ 3: a repeat-scan data set trained on scan triplets; 1 (or 2): adjacent-slice triplets."""
    precision: str = "auto"
    """The profile's ``model.precision`` (training; validation is always in float32)."""
    compile: str = "auto"
    """The profile's ``model.compile`` (training only: the gate's few passes run eagerly)."""
    frames: dict[str, Any] | None = None
    """The profile's ``[frames]`` settings (the frame judgement of the training slices);
    ``None``: their defaults."""


@dataclass
class FinetuneResult:
    """What a fine-tune did (JSON-able). ``status`` is ``promoted``, ``rejected`` or ``failed``."""

    status: str
    dataset: str
    parent_path: str
    parent_sha256: str | None = None
    candidate_path: str | None = None
    candidate_sha256: str | None = None
    candidate_config: dict[str, Any] | None = None
    reasons: list[str] = field(default_factory=list)
    parent_metrics: dict[str, float] = field(default_factory=dict)
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    device: str = ""
    train_slices: int = 0
    validation_triplets: int = 0
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FinetuneResult:
        return cls(**json.loads(text))


# -- data ---------------------------------------------------------------------------------------
class SliceStack:
    """Raw slice files of consecutive indices, read lazily (databar cropped), for ``train``."""

    def __init__(self, paths: Sequence[Path], databar: DatabarMode, databar_rows: int) -> None:
        self.paths = list(paths)
        self._databar, self._rows = databar, databar_rows

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_slice(self.paths[index], self._databar, self._rows).pixels


def _trainable(n: int, fraction: float) -> bool:
    """Does a run of ``n`` slices keep a training triplet outside its validation blocks?"""
    held = set(validation_blocks(n, fraction, 3))
    return any(held.isdisjoint((j - 1, j, j + 1)) for j in range(1, n - 1))


def raw_runs(store: Store, dataset_id: int, fraction: float) -> list[list[Path]]:
    """The data set's raw slice paths in runs of consecutive indices that can train.

    Raises
    ------
    InputError
        No run of consecutive slices is long enough.
    """
    rows = store.slices_in_state(dataset_id, [SliceState.READY, SliceState.DENOISED])
    by_index: dict[int, Path] = {}
    for row in rows:  # ordered by index then scan: the first scan of each index
        if row.index >= 0 and Path(row.path).is_file():
            by_index.setdefault(row.index, Path(row.path))
    indices = sorted(by_index)[-MAX_SLICES:]
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    usable = [[by_index[i] for i in run] for run in runs if _trainable(len(run), fraction)]
    if not usable:
        raise InputError(
            f"data set {dataset_id} has {len(indices)} raw slices but no run of consecutive "
            "indices long enough to train and validate on — wait for more slices"
        )
    return usable


def raw_scan_groups(
    store: Store, dataset_id: int, fraction: float, scans_per_slice: int
) -> list[Path]:
    """Repeat-scan data sets: the first ``scans_per_slice`` scans of each index that has them.

    Returned as one flat list, index by index (consecutive groups of ``scans_per_slice`` paths
    are scans of one slice, as :class:`~nrrn_daemon.finetune.training.TrainSettings`
    ``repeat_scans`` expects). Indices with fewer scans (still being acquired) are left out.

    Raises
    ------
    InputError
        Too few complete scan groups to train on one and validate on another.
    """
    rows = store.slices_in_state(dataset_id, [SliceState.READY, SliceState.DENOISED])
    by_index: dict[int, list[Path]] = {}
    for row in rows:  # ordered by index then scan
        if row.index >= 0 and Path(row.path).is_file():
            by_index.setdefault(row.index, []).append(Path(row.path))
    complete = [i for i in sorted(by_index) if len(by_index[i]) >= scans_per_slice]
    complete = complete[-max(1, MAX_SLICES // scans_per_slice) :]
    held = set(validation_blocks(len(complete), fraction, 1))
    if len(complete) < 2 or len(held) >= len(complete):
        raise InputError(
            f"data set {dataset_id} has {len(complete)} slices with ≥ {scans_per_slice} scans; "
            "fine-tuning on scan triplets needs at least 2 (one to train, one to validate) — "
            "wait for more slices"
        )
    return [p for i in complete for p in by_index[i][:scans_per_slice]]


def held_out_triplets(
    stacks: Sequence[SliceStack], fraction: float, scans_per_slice: int = 1
) -> list[Triplet]:
    """The validation triplets ``train`` holds out (whole triplets inside validation blocks).

    With ``scans_per_slice`` ≥ 3, the first three scans of each held-out slice (as ``train``).
    """
    out: list[Triplet] = []
    for stack in stacks:
        if scans_per_slice >= 3:
            units = len(stack) // scans_per_slice
            for g in validation_blocks(units, fraction, 1):
                first = g * scans_per_slice
                out.append((stack[first], stack[first + 1], stack[first + 2]))
            continue
        held = set(validation_blocks(len(stack), fraction, 3))
        for j in range(1, len(stack) - 1):
            if held.issuperset((j - 1, j, j + 1)):
                out.append((stack[j - 1], stack[j], stack[j + 1]))
    if len(out) > 16:  # as train(): evenly chosen, validation stays cheap
        pick = np.linspace(0, len(out) - 1, 16).round().astype(int)
        out = [out[i] for i in pick]
    return out


# -- the run ------------------------------------------------------------------------------------
def slug(name: str) -> str:
    """A folder-safe name for a data set (its name is usually its watch folder's path)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[-80:] or "dataset"


LIVE_SUFFIX = ".live"
"""``<database>`` + this: exists while the daemon denoises a live slice during a fine-tune."""
LIVE_FLAG_MAX_AGE_S = 600.0
"""An older flag is stale (a daemon killed mid-slice): the fine-tune no longer waits for it."""


def live_flag(db: Path) -> Path:
    """The file by which the daemon tells a running fine-tune that live slices come first."""
    return Path(str(db) + LIVE_SUFFIX)


def wait_while_live(flag: Path, poll_s: float = 0.05) -> float:
    """Between training steps: wait while the daemon denoises a live slice; returns seconds waited.

    Live slices come first: the fine-tune gives the GPU (or the CPU cores) back while the flag
    exists. The wait counts against the fine-tune's time budget.
    """
    waited = 0.0
    while True:
        try:
            age = time.time() - flag.stat().st_mtime
        except FileNotFoundError:
            return waited
        if age > LIVE_FLAG_MAX_AGE_S:
            return waited
        time.sleep(poll_s)
        waited += poll_s


def run_finetune(job: FinetuneJob) -> FinetuneResult:
    """Fine-tune ``job.parent`` on the data set's raw slices and judge the candidate.

    Reads the database read-only; writes only the candidate checkpoint (atomically).

    Raises
    ------
    NRRNError
        Unknown data set, too few slices, unreadable checkpoint or slice, training diverged.
    """
    with Store(job.db, readonly=True) as store:
        ids = store.dataset_ids()
        if job.dataset not in ids:
            known = ", ".join(sorted(ids)) or "none"
            raise InputError(f"no data set {job.dataset!r} in {job.db} (known: {known})")
        repeat = job.scans_per_slice >= 3
        if repeat:
            runs = [raw_scan_groups(store, ids[job.dataset], job.validation_fraction,
                                    job.scans_per_slice)]  # fmt: skip
        else:
            runs = raw_runs(store, ids[job.dataset], job.validation_fraction)
    databar: DatabarMode = job.databar  # type: ignore[assignment]
    stacks = [SliceStack(run, databar, job.databar_rows) for run in runs]
    parent = load_checkpoint(Path(job.parent))
    settings = TrainSettings(
        steps=job.steps, minutes=job.minutes, patch=job.patch, batch=job.batch, seed=job.seed,
        device=job.device, validation_fraction=job.validation_fraction,
        repeat_scans=repeat, scans_per_slice=job.scans_per_slice if repeat else 3,
        precision=job.precision, compile=job.compile,
        frames=FrameSettings(**job.frames) if job.frames is not None else FrameSettings(),
    )  # fmt: skip
    flag = live_flag(Path(job.db))
    ckpt, report = train(
        stacks, settings, init=parent, on_progress=lambda *_: wait_while_live(flag)
    )
    triplets = held_out_triplets(stacks, job.validation_fraction, job.scans_per_slice)
    verdict = judge(
        parent, ckpt, triplets, device=job.device, seed=job.seed, precision=job.precision,
        loss=report.loss,
    )  # fmt: skip
    out = Path(job.models_dir) / slug(job.dataset)
    out.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(ckpt, out / f"{ckpt.content_sha256[:12]}.pt")
    return FinetuneResult(
        status=(FinetuneStatus.PROMOTED if verdict.promote else FinetuneStatus.REJECTED).value,
        dataset=job.dataset,
        parent_path=job.parent,
        parent_sha256=parent.content_sha256,
        candidate_path=str(path),
        candidate_sha256=ckpt.content_sha256,
        candidate_config=ckpt.config.to_dict(),
        reasons=verdict.reasons,
        parent_metrics=verdict.parent,
        candidate_metrics=verdict.candidate,
        steps=report.steps,
        seconds=report.seconds,
        device=report.device,
        train_slices=sum(len(s) for s in stacks),
        validation_triplets=len(triplets),
    )


def failed_result(job: FinetuneJob, error: str) -> FinetuneResult:
    """The result of a run that stopped with an error (or whose process died)."""
    return FinetuneResult(
        status=FinetuneStatus.FAILED.value, dataset=job.dataset, parent_path=job.parent,
        error=error,
    )  # fmt: skip


# -- recording (by the database's one writer) ---------------------------------------------------
def begin(store: Store, job: FinetuneJob, pid: int, requested_by: str) -> int:
    """Record a fine-tune as running (with the parent model); return its id."""
    ids = store.dataset_ids()
    if job.dataset not in ids:
        raise InputError(f"no data set {job.dataset!r} in {store.path}")
    parent = load_checkpoint(Path(job.parent))
    parent_id = record_model(
        store, job.parent, sha256=parent.content_sha256, config=parent.config.to_dict(),
        dataset_id=None, parent_sha256=parent.summary.get("parent_sha256"),
    )  # fmt: skip
    summary = {"pid": pid, "host": socket.gethostname(), "requested_by": requested_by,
               "job": asdict(job)}  # fmt: skip
    return store.start_finetune(ids[job.dataset], parent_id, summary)


def record_result(store: Store, finetune_id: int, result: FinetuneResult) -> int | None:
    """Record a fine-tune's result; on promotion make the candidate the data set's model.

    Returns
    -------
    int or None
        The candidate's model id (``None`` when the run failed before saving one).
    """
    dataset_id = store.dataset_ids()[result.dataset]
    candidate_id = None
    if result.candidate_path and result.candidate_sha256:
        candidate_id = record_model(
            store, result.candidate_path, sha256=result.candidate_sha256,
            config=result.candidate_config or {},
            label=f"ft-{result.candidate_sha256[:8]}", parent_sha256=result.parent_sha256,
            metrics={**result.candidate_metrics, "parent": result.parent_metrics,
                     "steps": result.steps, "seconds": result.seconds},
            dataset_id=dataset_id,
        )  # fmt: skip
    promoted = result.status == FinetuneStatus.PROMOTED.value and candidate_id is not None
    store.end_finetune(finetune_id, FinetuneStatus(result.status), candidate_id, asdict(result))
    if promoted:
        assert candidate_id is not None
        store.set_current_model(dataset_id, candidate_id, promoted=True)
    return candidate_id


# -- the subprocess -----------------------------------------------------------------------------
def child_main(argv: Sequence[str]) -> int:
    """``python -m nrrn_daemon.finetune.run JOB.json RESULT.json``: run a job, write its result.

    The result file is written atomically; it holds a ``failed`` result when the run raised an
    expected error. Exit code 0 when a result was written.
    """
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = FinetuneJob(**json.loads(job_path.read_text()))
    try:
        result = run_finetune(job)
    except NRRNError as exc:
        result = failed_result(job, str(exc))
    data = result.to_json().encode()
    atomic_write(result_path, lambda fh: fh.write(data), "no result written")
    return 0


if __name__ == "__main__":  # pragma: no cover - run by the daemon as a subprocess
    logging.basicConfig(level=logging.INFO, format="%(asctime)s finetune %(message)s")
    sys.exit(child_main(sys.argv[1:]))
