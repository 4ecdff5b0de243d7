"""The daemon's live OME-Zarr volume: every denoised slice also goes into one growing volume.

With ``output.zarr`` set, the pipeline's writer thread calls :meth:`LiveZarr.write` after each
output TIFF is written, so napari or neuroglancer can show the stack while it is acquired. Slice
``index`` goes to ``z = index`` (any order; a later output version of a slice, a redo as a
triplet or a re-denoise with a new model, overwrites its z-slice, so the volume shows the current
outputs). The volume is created at the first slice, with that slice's shape, dtype and voxel size
(:func:`~nrrn_daemon.imaging.voxels.voxel_size_from_tiff`), and reopened after a restart.

The TIFF outputs are the record; the volume is a view. A slice that cannot be written into it
(full disk, a volume of another shape at that path...) is logged with the reason and counted,
and never fails its slice: ``nrrn-daemon reprocess --zarr`` rebuilds a volume from the outputs'
data set. One writer: only the pipeline's writer thread calls :meth:`LiveZarr.write`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nrrn_daemon.daemon.units import Denoised
from nrrn_daemon.errors import NRRNError
from nrrn_daemon.imaging.omezarr import LiveVolume
from nrrn_daemon.imaging.voxels import voxel_size_from_tiff

log = logging.getLogger("nrrn_daemon")


class LiveZarr:
    """Writes denoised slices into the live volume at ``path`` (created at the first slice)."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.written = 0
        self.errors = 0
        self.last_error: str | None = None
        self._volume: LiveVolume | None = None

    def write(self, denoised: Denoised) -> None:
        """Put ``denoised``'s pixels at its slice index. Logs (never raises) on failure."""
        centre = denoised.work.centre
        try:
            if self._volume is None:
                self._volume = LiveVolume(
                    self.path, slice_shape=denoised.pixels.shape, dtype=denoised.pixels.dtype,
                    voxel_size=voxel_size_from_tiff(centre.path), name=self.name,
                )  # fmt: skip
            self._volume.write_slice(centre.index, denoised.pixels)
            self.written += 1
        except (NRRNError, OSError, ValueError) as exc:
            self.errors += 1
            self.last_error = f"{centre.name}: {exc}"
            log.error(
                "%s not written into the live volume %s: %s — its TIFF output is written; "
                "rebuild the volume with `nrrn-daemon reprocess --zarr`",
                centre.name, self.path, exc,
            )  # fmt: skip
