"""The model commands: ``finetune`` (one fine-tune by hand), ``models`` (list, promote, rollback).

The database has one writer: while a daemon is alive on it, ``finetune`` asks the daemon (a
request file beside the database, :func:`nrrn_daemon.finetune.runner.request_file`) instead of
writing, and
``finetune --now`` refuses. ``models promote|rollback`` is a single short transaction; a running
daemon with ``model.checkpoint = "dataset"`` switches to the new current model within a heartbeat.
"""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from nrrn_daemon.cli.common import DbOpt, ProfileOpt, console, daemon_alive, database_path, edge
from nrrn_daemon.errors import NRRNError, StoreError

DatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset", help="Data set name (default: the profile's watch folder, or the only one)."
    ),
]


class ModelsAction(str, Enum):
    list = "list"
    promote = "promote"
    rollback = "rollback"


def _pick_dataset(names: list[str], wanted: str | None, profile_watch: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise StoreError(
                f"no data set {wanted!r} (known: {', '.join(sorted(names)) or 'none'})"
            )
        return wanted
    watch = str(Path(profile_watch).expanduser().resolve())
    if watch in names:
        return watch
    if len(names) == 1:
        return names[0]
    raise StoreError(
        f"pass --dataset: the database holds {len(names)} data sets "
        f"({', '.join(sorted(names)) or 'none'})"
    )


@edge
def finetune(
    profile: ProfileOpt,
    db: DbOpt = None,
    dataset: DatasetOpt = None,
    minutes: Annotated[
        float | None,
        typer.Option(min=0.01, help="Time budget in minutes (default: the profile's)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Also stop after this many training steps.")
    ] = None,
    now: Annotated[
        bool, typer.Option("--now", help="Run here and now, not through a running daemon.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Fine-tune a data set's model once, by hand; promote it if it passes the gate."""
    from nrrn_daemon.config.loading import load_profile
    from nrrn_daemon.finetune.run import begin, failed_result, record_result, run_finetune
    from nrrn_daemon.finetune.runner import job_for, pid_alive, request_file
    from nrrn_daemon.registry import profile_checkpoint
    from nrrn_daemon.store.store import Store

    overrides = {"store.database": str(db)} if db is not None else None
    prof = load_profile(profile, overrides=overrides)
    db_path = Path(prof.store.database).expanduser().absolute()
    run = daemon_alive(db_path)
    if run is not None:
        if now:
            raise NRRNError(
                f"a daemon is running on {db_path} (pid {run['pid']} on {run['host']}): it is the "
                "database's one writer — run `nrrn-daemon finetune` without --now to ask it"
            )
        request = {"dataset": dataset, "minutes": minutes, "steps": steps, "at": time.time()}
        request_file(db_path).write_text(json.dumps(request))
        console.print(f"asked the running daemon (pid {run['pid']}) to fine-tune")
        return
    with Store(db_path) as store:
        store.close_dead_finetunes(pid_alive)
        name = _pick_dataset(list(store.dataset_ids()), dataset, prof.watch.folder)
        parent = profile_checkpoint(prof.model.checkpoint, store, store.dataset_ids()[name])
        job = job_for(
            prof, db=db_path, dataset=name, parent=str(parent),
            models_dir=db_path.parent / "models", minutes=minutes, steps=steps,
        )  # fmt: skip
        ft_id = begin(store, job, os.getpid(), "cli")
        if not as_json:
            console.print(f"fine-tuning {name} from {parent.name} for ≤ {job.minutes:g} min …")
        try:
            result = run_finetune(job)
        except NRRNError as exc:
            record_result(store, ft_id, failed_result(job, str(exc)))
            raise
        record_result(store, ft_id, result)
    if as_json:
        console.print_json(result.to_json())
        return
    c, p = result.candidate_metrics, result.parent_metrics
    console.print(
        f"[bold]{result.status}[/]: {result.steps} steps in {result.seconds:.0f} s on "
        f"{result.device}; validation loss {p.get('val_loss', float('nan')):.4g} → "
        f"{c.get('val_loss', float('nan')):.4g}; {'; '.join(result.reasons)}"
    )
    console.print(f"candidate: {result.candidate_path}")


@edge
def models(
    action: Annotated[
        ModelsAction, typer.Argument(help="list, promote VERSION, or rollback.")
    ] = ModelsAction.list,
    version: Annotated[
        str | None, typer.Argument(help="promote: a model label, sha256 prefix or id.")
    ] = None,
    profile: ProfileOpt = "generic",
    db: DbOpt = None,
    dataset: DatasetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (list).")] = False,
) -> None:
    """List a data set's model versions, or switch its current model by hand."""
    from nrrn_daemon.config.loading import load_profile
    from nrrn_daemon.store.store import Store

    db_path = database_path(profile, db)
    if action == ModelsAction.list:  # without --dataset: every data set
        with Store(db_path, readonly=True) as store:
            report = store.models(dataset)
        if as_json:
            console.print_json(json.dumps(report, default=str))
        else:
            _render_models(report)
        return
    if action == ModelsAction.promote and not version:
        raise NRRNError("`models promote` needs a VERSION (a label, sha256 prefix or id)")
    watch = load_profile(profile).watch.folder
    with Store(db_path) as store:
        name = _pick_dataset(list(store.dataset_ids()), dataset, watch)
        ds_id = store.dataset_ids()[name]
        if action == ModelsAction.promote:
            assert version is not None
            target = store.find_model(ds_id, version)
        else:
            current = store.current_model_id(ds_id)
            target_or_none = None if current is None else store.model_parent(current)
            if target_or_none is None:
                raise NRRNError(
                    f"data set {name} has no current fine-tuned model with a recorded parent "
                    "to roll back to — use `models promote VERSION`"
                )
            target = target_or_none
        store.set_current_model(ds_id, target, promoted=action == ModelsAction.promote)
        label = store.model_label(target)
    console.print(f"data set {name}: current model is now {label}")


def _render_models(report: dict[str, Any]) -> None:
    for ds in report["datasets"]:
        table = Table(
            title=f"data set {ds['name']} — current: {ds['current'] or 'profile default'}"
        )
        for col in ("", "label", "sha256", "kind", "parent", "created", "promoted", "val loss"):
            table.add_column(col)
        for m in ds["models"]:
            metrics = m["metrics"] or {}
            loss = metrics.get("val_loss")
            table.add_row(
                "*" if m["current"] else "", m["label"], m["sha256"][:12], m["kind"],
                m["parent"] or "—", str(m["created_at"]), str(m["promoted_at"] or "—"),
                "—" if loss is None else f"{loss:.4g}",
            )  # fmt: skip
        console.print(table)
        for ft in ds["finetunes"][:10]:
            console.print(
                f"  fine-tune {ft['id']} {ft['started_at']}: [bold]{ft['status']}[/] "
                f"{ft['candidate'] or ''} {'; '.join(ft['reasons'] or []) or ft['error'] or ''}"
            )
