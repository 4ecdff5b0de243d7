"""Slice output: write a denoised slice (or a stack) as a TIFF, atomically.

:func:`write_slice_atomic` renders the full-size image (denoised pixels above the untouched
databar) in the input's dtype, byte order and photometric interpretation (a grey-ramp palette is
kept as it is), with the input's tags, EXIF and GPS IFDs (as read into a
:class:`~nrrn_daemon.imaging.tiff.SliceImage`), to a hidden temporary file ``.<name>.<rand>.part``
in the destination folder (ignored by ``*.tif`` globs and watchers), then flush, ``os.fsync``,
``os.replace`` onto the final name and fsync the folder: a crash never leaves a half-written file
under the final name. Output is uncompressed. :func:`write_stack` does the same for a 3-D stack.

Which metadata is kept, and as which bytes: :mod:`nrrn_daemon.imaging.tiffmeta`; the description
written: :mod:`nrrn_daemon.imaging.provenance`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from nrrn_daemon.files import atomic_write
from nrrn_daemon.imaging.provenance import SOFTWARE, compose
from nrrn_daemon.imaging.tiff import SliceImage
from nrrn_daemon.imaging.tiffifd import append_ifds, placeholder_codes
from nrrn_daemon.imaging.tiffmeta import placeholders, split_resolution

__all__ = ["write_slice_atomic", "write_stack"]


def write_slice_atomic(
    path: Path, image: SliceImage, denoised: np.ndarray, description: str
) -> str:
    """Write ``denoised`` above ``image``'s databar, with its metadata, atomically to ``path``.

    Parameters
    ----------
    path : Path
        Final file name; its folder must exist.
    image : SliceImage
        The slice as read by :func:`~nrrn_daemon.imaging.tiff.read_slice`.
    denoised : numpy.ndarray
        Denoised pixels, same shape and dtype as ``image.pixels`` (convert before: no float).
    description : str
        ASCII text saying what was done (:mod:`~nrrn_daemon.imaging.provenance`); becomes the
        ImageDescription, the input's own description kept after it.

    Returns
    -------
    str
        sha256 of the written file.

    Raises
    ------
    OutputError
        The file cannot be written (disk full, permission denied, read-only, missing folder).
    """
    if denoised.dtype != image.dtype:
        raise ValueError(f"denoised pixels are {denoised.dtype}, expected {image.dtype}")
    if denoised.shape != image.pixels.shape:
        raise ValueError(f"denoised pixels are {denoised.shape}, expected {image.pixels.shape}")
    if image.databar is None:
        full = denoised  # no databar: nothing to put together, no copy
    else:
        full = np.empty(image.full_shape, dtype=image.dtype)
        full[: denoised.shape[0]] = denoised
        full[denoised.shape[0] :] = image.databar
    text = compose(description, image.description, image.software)
    extratags, resolution, unit = split_resolution(image.tags)
    codes = placeholder_codes(image.ifds, {t[0] for t in extratags})
    extratags += placeholders(codes)

    def render(fh: BinaryIO) -> None:
        buffer = io.BytesIO()
        tifffile.imwrite(
            buffer,
            full,
            byteorder=image.byteorder,
            photometric=image.photometric,
            colormap=image.colormap,
            description=text,
            metadata=None,
            software=SOFTWARE,
            datetime=False,
            resolution=resolution,
            resolutionunit=unit,
            extratags=extratags,
            bigtiff=False,
        )
        data = buffer.getvalue()
        fh.write(append_ifds(data, image.ifds, codes, image.byteorder) if image.ifds else data)

    hint = "the slice stays pending and will be retried"
    return atomic_write(path, render, hint)


def write_stack(
    path: Path, array: np.ndarray, description: str | None = None, colormap: Any = None
) -> str:
    """Write a 3-D (z, y, x) array as a multi-page TIFF, atomically; return its sha256.

    With ``colormap`` (a grey-ramp palette), the pages are written as palette images with it.

    Raises
    ------
    OutputError
        The file cannot be written.
    """
    if array.ndim != 3:
        raise ValueError(f"write_stack needs a 3-D (z, y, x) array, got shape {array.shape}")

    def render(fh: BinaryIO) -> None:
        tifffile.imwrite(
            fh,
            array,
            description=description,
            metadata=None,
            software=SOFTWARE,
            photometric="minisblack" if colormap is None else "palette",
            colormap=colormap,
            bigtiff=array.nbytes > 2**32 - 2**25,
        )

    return atomic_write(path, render, "nothing was written; run the command again")
