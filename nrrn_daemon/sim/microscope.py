"""A stand-in microscope: writes slices of a volume into a folder, slowly, as an acquisition does.

Used by ``nrrn-daemon demo`` and by the tests. Each slice is encoded as a TIFF in memory and then
written to its final name in chunks with pauses, so a watcher sees a growing, undecodable file
before it is complete, exactly what a real acquisition PC writing to a share looks like.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile


def encode_tiff(
    image: np.ndarray, extratags: Sequence[tuple] = (), description: str | None = None
) -> bytes:
    """Encode one 2-D image as TIFF bytes (uncompressed, like the microscopes write)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, extratags=list(extratags), description=description, metadata=None)
    return buf.getvalue()


def write_slowly(path: Path, data: bytes, chunks: int = 3, pause_s: float = 0.0) -> None:
    """Write ``data`` to ``path`` in ``chunks`` parts with ``pause_s`` between them."""
    step = max(1, -(-len(data) // max(1, chunks)))
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            if pause_s and start + step < len(data):
                time.sleep(pause_s)


@dataclass
class Microscope:
    """Plays an acquisition: slice ``k`` of ``volume`` becomes ``folder / name_pattern.format(k)``.

    Parameters
    ----------
    folder
        The watch folder to write into (created if missing).
    volume
        ``(Z, Y, X)`` uint8 or uint16 slices to write, in acquisition order.
    name_pattern
        File name with one ``{}`` (or ``{index}``) placeholder for the slice number.
    interval_s
        Pause between the starts of two slices.
    chunks, chunk_pause_s
        Each file is written in ``chunks`` parts with ``chunk_pause_s`` between them.
    order
        Slice numbers in the order to write them (default: 0..Z−1); lets tests play
        out-of-order arrival and gaps.
    first_index
        Number of slice 0 in the file names (Auto Slice & View starts at 1).
    encode
        Turns one slice into the bytes of its file (default :func:`encode_tiff`; tests pass a
        vendor's layout: metadata tags, a palette, a databar).
    """

    folder: Path
    volume: np.ndarray
    name_pattern: str = "slice_{:04d}.tif"
    interval_s: float = 0.5
    chunks: int = 3
    chunk_pause_s: float = 0.05
    order: Iterable[int] | None = None
    first_index: int = 0
    encode: Callable[[np.ndarray], bytes] = encode_tiff
    written: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def name(self, k: int) -> str:
        number = k + self.first_index
        return self.name_pattern.format(number, index=number)

    def write(self, k: int) -> Path:
        """Write slice ``k`` now (slowly) and return its path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.name(k)
        write_slowly(path, self.encode(self.volume[k]), self.chunks, self.chunk_pause_s)
        self.written.append(path)
        return path

    def run(self) -> None:
        """Write every slice in order, ``interval_s`` apart (blocking)."""
        order = list(self.order) if self.order is not None else range(len(self.volume))
        for n, k in enumerate(order):
            if self._stop.is_set():
                return
            if n and self.interval_s:
                if self._stop.wait(self.interval_s):
                    return
            self.write(k)

    def start(self) -> Microscope:
        """Run :meth:`run` in a background thread."""
        self._thread = threading.Thread(target=self.run, name="nrrn-microscope", daemon=True)
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
