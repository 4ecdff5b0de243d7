"""The ``nrrn-daemon`` command line: one Typer app, its commands registered from their modules.

Offline commands (``train``, ``denoise``, ``evaluate``, ``metrics``) are in :mod:`.offline`;
the daemon's (``start``, ``status``, ``provenance``, ``profiles``, ``demo``) in :mod:`.daemon`;
``finetune`` and ``models`` in :mod:`.models`; ``reprocess`` in :mod:`.reprocess`;
``dashboard`` in :mod:`.dashboard`. Command modules never import this one, so there is no cycle.
"""

from __future__ import annotations

import typer

from nrrn_daemon.cli import daemon, dashboard, models, offline, reprocess

app = typer.Typer(
    name="nrrn-daemon",
    help="Denoise FIB-SEM slices as they are acquired, with an unsupervised NRRN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for command in (
    offline.train, offline.denoise, offline.evaluate, offline.metrics,
    daemon.start, daemon.status, daemon.provenance, daemon.profiles, daemon.demo,
    models.finetune, models.models, reprocess.reprocess, dashboard.dashboard,
):  # fmt: skip
    app.command()(command)


def main() -> None:
    """Console-script entry point."""
    app()
