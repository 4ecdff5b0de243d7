"""String enums and constants shared by the store, the daemon and the CLI.

Every state is a ``str`` enum whose *value* is what the provenance database stores as text, so the
database stays readable with the ``sqlite3`` shell and a new member never needs a migration.
"""

from __future__ import annotations

from enum import Enum


class SliceState(str, Enum):
    """Where a raw slice file is in its life.

    There is no separate "pending" state for output-write retries: a slice whose output write
    failed and will be retried stays :attr:`READY` (with a ``reason``); it becomes :attr:`FAILED`
    only when the daemon gives up on it.
    """

    SEEN = "seen"
    """The file appeared in the watch folder but is not known to be complete yet."""
    READY = "ready"
    """The file is complete and decodable; it waits for its neighbours or for the worker."""
    DENOISED = "denoised"
    """A current output exists for this slice (see ``outputs.is_current``)."""
    FAILED = "failed"
    """The daemon gave up on the slice; ``reason`` says why (unreadable, wrong shape...)."""
    UNUSABLE = "unusable"
    """The slice carries no usable signal (``reason``: ``unusable: blank frame``...,
    :mod:`nrrn_daemon.frames`): never a neighbour nor a fine-tune target. Its output exists (a
    copy of the input, or denoised alone); a re-acquired frame under its index replaces it."""


class OutputMode(str, Enum):
    """Which inputs produced an output (the NRRN forward mode, see ``nrrn.py``)."""

    TRIPLET = "triplet"
    """Previous, centre and next slice: the mean of the two branches."""
    PAIR = "pair"
    """The centre and one neighbour (the first or last slice, or a gap)."""
    SINGLE = "single"
    """The centre alone, standing in for its own neighbour; weaker, re-done when possible."""
    REPEAT = "repeat"
    """Repeated scans of the same slice index used as the neighbours."""
    COPY = "copy"
    """An unusable slice without signal: a copy of the input, not denoised (its description
    says why)."""


class InputRole(str, Enum):
    """The part a slice played in an output."""

    PREV = "prev"
    """The neighbour before the centre (index - 1)."""
    CENTRE = "centre"
    """The slice being denoised; the output carries its name."""
    NEXT = "next"
    """The neighbour after the centre (index + 1)."""
    SCAN = "scan"
    """Another scan of the centre's index (``repeat`` mode)."""


class OutputReason(str, Enum):
    """Why an output (version) was written."""

    FIRST = "first"
    """The first output for this slice."""
    REDO_AS_TRIPLET = "redo-as-triplet"
    """A pair or single output redone once both neighbours existed."""
    NEW_MODEL = "new-model"
    """Redone with a newly promoted model."""
    INPUT_CHANGED = "input-changed"
    """An input file changed on disk (its sha256 differs from the recorded one)."""
    MANUAL = "manual"
    """Asked for by a person."""


class ModelKind(str, Enum):
    """Where a model checkpoint came from."""

    BASE = "base"
    """The shipped, global checkpoint (no data set)."""
    FINETUNED = "finetuned"
    """Fine-tuned on one data set from a parent checkpoint."""


class FinetuneStatus(str, Enum):
    """Outcome of a fine-tune run."""

    RUNNING = "running"
    """Started and not ended (or the process died; compare with the run's heartbeat)."""
    PROMOTED = "promoted"
    """The candidate beat its parent on validation and became the data set's model."""
    REJECTED = "rejected"
    """The candidate did not beat its parent; the parent stays."""
    FAILED = "failed"
    """The run stopped with an error; ``summary_json`` says why."""


class RunLiveness(str, Enum):
    """How ``status`` judges the latest daemon run from its row (never from the process)."""

    ALIVE = "alive"
    """Not ended and the heartbeat is recent."""
    STALE = "stale"
    """Not ended but the heartbeat is older than the stale limit: the daemon likely died."""
    ENDED = "ended"
    """Ended cleanly; ``end_reason`` says why."""


ROLE_ORDER: tuple[InputRole, ...] = (
    InputRole.PREV,
    InputRole.CENTRE,
    InputRole.NEXT,
    InputRole.SCAN,
)
"""Order in which inputs are listed in reports and passed on a re-run command line."""

STALE_AFTER_S: float = 30.0
"""Default heartbeat age (seconds) after which ``status`` calls a run stale."""

FAILED_LIST_LIMIT: int = 10
"""How many of the latest failed slices ``status`` lists per data set."""
