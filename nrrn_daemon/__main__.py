"""``python -m nrrn_daemon`` is the ``nrrn-daemon`` command."""

from __future__ import annotations

from nrrn_daemon.cli.app import main

main()
