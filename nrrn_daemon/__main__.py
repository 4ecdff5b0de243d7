"""``python -m nrrn_daemon`` is the ``nrrn-daemon`` command."""

from __future__ import annotations

from .cli import main

main()
