"""The ``provenance`` report: every output version of a slice, its inputs, model and settings.

Takes an open :class:`~sqlalchemy.orm.Session` (one read transaction) and returns a plain
JSON-able dict, with the ``nrrn-daemon denoise`` command that reproduces each output
(:func:`rerun_command`); :meth:`nrrn_daemon.store.store.Store.provenance` calls it.
"""

from __future__ import annotations

import shlex
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from nrrn_daemon.errors import StoreError
from nrrn_daemon.states import (
    ROLE_ORDER,
    InputRole,
    SliceState,
)
from nrrn_daemon.store.queries import has_quality, iso, quality_of
from nrrn_daemon.store.tables import (
    Dataset,
    ModelVersion,
    Output,
    OutputInput,
    OutputQuality,
    Run,
    Slice,
)


def provenance_report(session: Session, query: str, *, where: str) -> dict[str, Any]:
    """Everything recorded about how the output(s) matching ``query`` were made.

    ``query`` is tried as an output path, then as an input slice path (giving the outputs
    centred on that slice, every version), then as a bare file name of a slice or an output.

    Returns
    -------
    dict
        ``query``, ``matched`` (``"output path"``, ``"input path"`` or ``"name"``), ``slices``
        (matching input slices with their state and reason; empty for an output path) and
        ``outputs``, newest version first, each with its path, sha256, version, ``is_current``,
        mode, reason, ``inputs`` (role, path, index, the sha256 recorded when read and the one
        last recorded for the file, ``changed``), ``model``, ``settings``, ``device``,
        ``timings``, ``run``, ``quality`` (input and output noise, flat-region IQR, flag; None when
        not measured) and ``rerun`` (an ``nrrn-daemon denoise`` command line).

    Raises
    ------
    StoreError
        Nothing matches.
    """
    variants = {query}
    if query:
        variants |= {
            str(Path(query).expanduser().absolute()),
            str(Path(query).expanduser().resolve()),
        }
    matched = "output path"
    outputs = list(session.scalars(select(Output).where(Output.path.in_(variants))))
    slices: list[Slice] = []
    if not outputs:
        matched = "input path"
        slices = list(session.scalars(select(Slice).where(Slice.path.in_(variants))))
    if not outputs and not slices and PurePath(query).name == query and query:
        matched = "name"
        slices = list(session.scalars(select(Slice).where(Slice.name == query)))
        if not slices:  # an output renamed away from its slice's name
            for sep in {"/", "\\"}:
                outputs += session.scalars(
                    select(Output).where(Output.path.endswith(sep + query, autoescape=True))
                )
    if slices:
        ids = [s.id for s in slices]
        outputs = list(session.scalars(select(Output).where(Output.centre_slice_id.in_(ids))))
    if not outputs and not slices:
        raise StoreError(
            f"nothing in {where} matches {query!r}: give an output path, an input slice path "
            "or a slice file name as the daemon recorded it"
        )
    names = {i: n for i, n in session.execute(select(Dataset.id, Dataset.name))}
    outputs.sort(key=lambda o: (o.dataset_id, o.centre_slice_id, -o.version))
    return {
        "query": query,
        "matched": matched,
        "slices": [
            {
                "dataset": names.get(s.dataset_id),
                "path": s.path,
                "name": s.name,
                "index": s.index,
                "scan": s.scan,
                "state": SliceState(s.state).value,
                "reason": s.reason,
                "sha256": s.sha256,
            }
            for s in slices
        ],
        "outputs": [_output_report(session, o, names) for o in outputs],
    }


def _output_report(session: Session, out: Output, names: dict[int, str]) -> dict[str, Any]:
    """One output row with its inputs, model, run and a re-run command."""
    rows = session.execute(
        select(OutputInput.role, OutputInput.sha256, Slice)
        .join(Slice, Slice.id == OutputInput.slice_id)
        .where(OutputInput.output_id == out.id)
    ).all()
    rows.sort(key=lambda r: (ROLE_ORDER.index(InputRole(r[0])), r[2].scan or 0, r[2].index))
    inputs = [
        {"role": InputRole(role).value, "path": s.path, "name": s.name, "index": s.index,
         "scan": s.scan, "sha256": sha, "sha256_latest": s.sha256, "changed": sha != s.sha256}
        for role, sha, s in rows
    ]  # fmt: skip
    model = session.get(ModelVersion, out.model_version_id)
    run = session.get(Run, out.run_id) if out.run_id is not None else None
    centre = next(i for i in inputs if i["role"] == InputRole.CENTRE.value)
    quality = session.get(OutputQuality, out.id) if has_quality(session) else None
    return {
        "id": out.id,
        "dataset": names.get(out.dataset_id),
        "path": out.path,
        "sha256": out.sha256,
        "version": out.version,
        "is_current": out.is_current,
        "reason": out.reason,
        "mode": out.mode.value,
        "created_at": iso(out.created_at),
        "centre": {k: centre[k] for k in ("path", "name", "index", "scan")},
        "inputs": inputs,
        "model": None if model is None else {
            "label": model.label, "sha256": model.sha256, "path": model.path,
            "kind": model.kind.value, "config": model.config_json,
            "parent_sha256": model.parent_sha256, "metrics": model.metrics_json,
            "created_at": iso(model.created_at), "promoted_at": iso(model.promoted_at),
        },
        "settings": out.settings_json,
        "device": out.device,
        "timings": {
            "ready_at": iso(out.ready_at), "started_at": iso(out.started_at),
            "finished_at": iso(out.finished_at), "read_s": out.read_s, "model_s": out.model_s,
            "write_s": out.write_s,
            "latency_s": None if out.ready_at is None else out.finished_at - out.ready_at,
        },
        "run": None if run is None else {
            "id": run.id, "host": run.host, "pid": run.pid, "version": run.version,
            "profile_name": run.profile_name, "started_at": iso(run.started_at),
        },
        "quality": quality_of(quality),
        "rerun": rerun_command(out, [i["path"] for i in inputs], centre["name"], model),
    }  # fmt: skip


def rerun_command(
    out: Output, inputs: list[str], centre_name: str, model: ModelVersion | None
) -> dict[str, Any]:
    """The ``nrrn-daemon denoise`` call that reproduces an output, as argv and one shell line.

    The offline command denoises every file it is given (one output per file, same name), so
    for a triplet it writes three files; the one named like the centre slice is this output. It
    writes into a ``rerun`` folder beside the output, so the daemon's file is not overwritten.
    The device is the recorded one's type (``cuda:1`` → ``cuda``), as the command takes it.
    """
    out_dir = PurePath(out.path).parent / "rerun"
    settings = out.settings_json
    argv = ["nrrn-daemon", "denoise", *inputs, "--output", str(out_dir)]
    if model is not None:
        argv += ["--model", model.path]
    argv += ["--inputs", str(min(len(inputs), 3))]
    for key in ("tile", "tile_batch"):
        if key in settings:
            argv += ["--" + key.replace("_", "-"), str(settings[key])]
    if settings.get("databar", "none") != "none":
        argv += ["--databar", str(settings["databar"])]
        if settings["databar"] == "rows":
            argv += ["--databar-rows", str(settings.get("databar_rows", 0))]
    kind = out.device.split(":")[0]
    argv += ["--device", kind if kind in ("cpu", "cuda") else "auto"]
    if settings.get("precision") in ("float32", "bf16"):  # fp16 (CUDA without bf16) is auto's
        argv += ["--precision", settings["precision"]]
    if "compiled" in settings:  # compiled kernels round differently from eager ones
        argv += ["--compile", "on" if settings["compiled"] else "off"]
    return {
        "command": shlex.join(argv),
        "argv": argv,
        "inputs": inputs,
        "expected_output": str(out_dir / centre_name),
        "daemon_sha256": out.sha256,
    }
