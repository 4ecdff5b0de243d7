"""A read-only FUSE pass-through file system that stops answering on demand: a hung share.

``python stallfs.py SOURCE MOUNTPOINT CONTROL`` mounts SOURCE at MOUNTPOINT (foreground, in its
own process, so libfuse's signal handlers stay out of the test process). While the file CONTROL
exists, every call into the file system (stat, listing, open, read) blocks, as on an SMB/NFS
share whose server stopped answering; deleting CONTROL lets them all go on. While the file
CONTROL.reads exists, holding ``NAME N``, only the reads of file NAME through its (N+1)-th and
later opens block (a read that hangs after the file was found complete). Unmount with
``fusermount3 -u MOUNTPOINT`` (or ``umount -l``). Used by the tests of the watch worker through
:class:`StalledShare`.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


class StalledShare:
    """Mount ``source`` at ``mountpoint`` through :mod:`stallfs`; :meth:`stall`/:meth:`answer`."""

    def __init__(self, source: Path, mountpoint: Path, control: Path) -> None:
        self.source, self.mountpoint, self.control = source, mountpoint, control
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why a FUSE mount cannot be made here, or ``None``."""
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse on this machine (FUSE kernel module absent)"
        if os.geteuid() != 0:
            return "mounting FUSE here needs root"
        try:
            import mfusepy  # noqa: F401
        except (ImportError, OSError) as exc:  # OSError: libfuse not installed
            return f"no FUSE library ({exc}): apt-get install fuse3; pip install mfusepy"
        if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
            return "no fusermount3 (apt-get install fuse3)"
        return None

    def mount(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "ignore",
                __file__,
                str(self.source),
                str(self.mountpoint),
                str(self.control),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        lines = []
        for raw in self.proc.stdout:  # "mounted" from init(), or the reason it did not
            lines.append(raw.decode().strip())
            if lines[-1] == "mounted":
                break
        line = " ".join(lines)
        if not lines or lines[-1] != "mounted":
            rest = self.proc.stdout.read().decode() if self.proc.poll() is not None else ""
            self.unmount()
            raise OSError(f"stallfs did not mount: {line} {rest}")

    @property
    def reads_control(self) -> Path:
        return self.control.with_name(self.control.name + ".reads")

    def stall(self) -> None:
        self.control.touch()

    def stall_reads(self, name: str, after_opens: int) -> None:
        """Make the reads of file ``name`` hang from its ``after_opens + 1``-th open on."""
        self.reads_control.write_text(f"{name} {after_opens}\n")

    def answer(self) -> None:
        self.control.unlink(missing_ok=True)
        self.reads_control.unlink(missing_ok=True)

    def unmount(self) -> None:
        self.answer()
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        subprocess.run([tool, "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


def main(source: str, mountpoint: str, control: str) -> None:
    import mfusepy as fuse

    reads_control = control + ".reads"
    opens: dict[str, int] = {}  # per file name: how many times it was opened
    nth_open: dict[int, tuple[str, int]] = {}  # per handle: (file name, which open it was)

    def wait_while_stalled() -> None:
        while os.path.exists(control):
            time.sleep(0.02)

    def read_stalled(fh: int) -> bool:
        name, nth = nth_open.get(fh, ("", 0))
        try:
            with open(reads_control) as spec:
                stalled, after = spec.read().split()
        except (OSError, ValueError):
            return False
        return name == stalled and nth > int(after)

    class Stall(fuse.Operations):
        def _real(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def init(self, path: str) -> None:
            print("mounted", flush=True)

        def getattr(self, path: str, fh: int | None = None) -> dict:
            wait_while_stalled()
            try:
                st = os.lstat(self._real(path))
            except FileNotFoundError:
                raise fuse.FuseOSError(errno.ENOENT) from None
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid")
            out = {k: getattr(st, k) for k in keys}
            out.update(st_atime=st.st_atime, st_mtime=st.st_mtime, st_ctime=st.st_ctime)
            return out

        def readdir(self, path: str, fh: int) -> list[str]:
            wait_while_stalled()
            return [".", "..", *os.listdir(self._real(path))]

        def open(self, path: str, flags: int) -> int:
            wait_while_stalled()
            fh = os.open(self._real(path), os.O_RDONLY)
            name = os.path.basename(path)
            opens[name] = opens.get(name, 0) + 1
            nth_open[fh] = (name, opens[name])
            return fh

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            wait_while_stalled()
            while read_stalled(fh):
                time.sleep(0.02)
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> int:
            nth_open.pop(fh, None)
            os.close(fh)
            return 0

    # no attribute or name caching: every stat and lookup reaches this process
    fuse.FUSE(Stall(), mountpoint, foreground=True, ro=True, attr_timeout=0, entry_timeout=0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
