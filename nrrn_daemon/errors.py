"""The project's errors.

Library code raises subclasses of :class:`NRRNError`; the CLI (``cli.py``) is the only place that
catches them, prints their message as one line and exits with code 1. Every message says what went
wrong, which file, and what to do.
"""

from __future__ import annotations


class NRRNError(Exception):
    """Base of every expected failure (bad input, bad configuration, a full disk...)."""


class InputError(NRRNError):
    """An input image or stack cannot be used (missing, unreadable, truncated, wrong shape)."""


class CheckpointError(NRRNError):
    """A model checkpoint is missing, corrupt, foreign, or does not match its recorded sha256."""


class ProfileError(NRRNError):
    """A profile is missing, not valid TOML, or has an unknown or invalid field."""


class OutputError(NRRNError):
    """An output cannot be written (folder missing, not writable, disk full)."""


class StoreError(NRRNError):
    """The provenance database cannot be opened or has an unexpected schema."""


class Abandoned(NRRNError):
    """A unit of work was given up because the daemon was asked to stop (nothing was written)."""


class DashboardError(NRRNError):
    """The dashboard cannot serve as asked (an address without a token, a path outside a data
    set's folders)."""
