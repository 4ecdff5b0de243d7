"""Files on disk: atomic writes, safe output names, sha256 of a file. No image knowledge.

Every file this package writes goes through :func:`atomic_write`: rendered to a hidden temporary
file ``.<name>.<rand>.part`` beside the destination (ignored by ``*.tif`` globs and watchers),
flushed, ``os.fsync``-ed, renamed onto the final name with ``os.replace`` and the folder fsync-ed,
so a crash never leaves a half-written file under the final name (the daemon removes its own
leftover ``.*.part`` files at start).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from nrrn_daemon.errors import InputError, OutputError

CHUNK = 1 << 20
T = TypeVar("T")


def atomic_write(path: Path, render: Callable[[BinaryIO], None], hint: str) -> str:
    """Write through ``render`` to a hidden temp file beside ``path``, fsync, rename; return sha256.

    On any failure the temp file is removed; an :class:`OSError` becomes :class:`OutputError`
    whose message ends with ``hint``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
    try:
        with open(tmp, "xb") as fh:  # mode 0o666 & ~umask, unlike mkstemp's private 0o600
            render(fh)
            fh.flush()
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(
                f"cannot write {path}: {os_reason(exc)} — free space or fix permissions; {hint}"
            ) from None
        raise
    return digest


def safe_join(folder: Path, name: str) -> Path:
    """``folder / name``, refusing a name that is empty, absolute, ``..`` or holds a separator.

    Raises
    ------
    OutputError
        ``name`` would escape ``folder``.
    """
    bad = (
        not name
        or name in (".", "..")
        or "\x00" in name
        or any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/"))
        or Path(name).is_absolute()
        or Path(name).drive
    )
    if bad:
        raise OutputError(
            f"cannot write {name!r} into {folder}: not a plain file name (absolute, '..' or a"
            " path separator) — use a file name without folders"
        )
    return Path(folder) / name


def sha256_file(path: Path) -> str:
    """sha256 (hex) of the file at ``path``, read in 1 MiB chunks.

    Raises
    ------
    InputError
        The file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        reason = os_reason(exc)
        raise InputError(f"cannot read {path} to hash it: {reason} — check the file") from None
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows: folders cannot be opened for fsync
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_reason(exc: OSError) -> str:
    """A short, user-facing reason for an OSError ("disk full", "permission denied"...)."""
    reasons = {
        errno.ENOSPC: "disk full",
        getattr(errno, "EDQUOT", -1): "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOENT: "folder does not exist",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


class Background(Generic[T]):
    """``call(*args)`` in a daemon thread of its own: its caller never waits on a hung file system.

    A network share whose server stopped answering blocks ``stat``, ``open`` and ``read``
    uninterruptibly, for minutes. The caller waits for the answer as long as it chooses
    (:meth:`wait`), goes on with its work when it is late, and picks the answer up later
    (:attr:`done`, :meth:`result`). A call that never returns leaves only its thread behind (a
    daemon thread: it does not keep the process alive).

    Parameters
    ----------
    call, args
        What to run.
    name
        The thread's name.
    on_done
        Called from the thread once ``call`` has returned or raised (e.g. to wake a loop).
    clock
        Monotonic seconds, for :attr:`age`.
    """

    def __init__(
        self,
        call: Callable[..., T],
        *args: object,
        name: str = "nrrn-background",
        on_done: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.args = args
        self._call = call
        self._on_done = on_done
        self._clock = clock
        self._finished = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self.started = clock()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._call(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc
        self._finished.set()
        if self._on_done is not None:
            self._on_done()

    def wait(self, timeout_s: float | None) -> bool:
        """Wait at most ``timeout_s`` for the call to end; whether it has."""
        return self._finished.wait(timeout_s)

    @property
    def done(self) -> bool:
        """Whether the call has returned or raised."""
        return self._finished.is_set()

    @property
    def age(self) -> float:
        """Seconds since the call began."""
        return self._clock() - self.started

    def result(self) -> T:
        """What the call returned (it must be :attr:`done`).

        Raises
        ------
        BaseException
            What the call raised.
        """
        assert self.done, "result() of a call still running"
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def resolve_soon(path: str | os.PathLike[str], timeout_s: float) -> Path:
    """``path`` made absolute with its links resolved, or only made absolute when the file
    system does not answer within ``timeout_s`` (a hung share: resolving stats each part)."""
    path = Path(path).expanduser()
    job = Background(path.resolve, name="nrrn-resolve")
    if job.wait(timeout_s):
        return job.result()
    return Path(os.path.abspath(path))
