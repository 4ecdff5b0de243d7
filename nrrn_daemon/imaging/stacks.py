"""Whole stacks for the offline command and training: one multi-page TIFF, or per-slice TIFFs.

:func:`read_stack` checks every input up front (headers only: page count, shape, dtype, truncation)
so a bad slice is reported before hours of work, then decodes slices on demand (``stack[i]``), so a
folder of thousands of 24 MB slices is never held in memory. A multi-page TIFF is decoded once, as
one 3-D array.

Ordering of a folder: by the last integer in each file name (``slice_2`` before ``slice_10``).
Two files with the same number (a second detector, ``SEM Image 2 - SliceImage - 001.tif``) or a
file without one make the order ambiguous and are refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from nrrn_daemon.errors import InputError
from nrrn_daemon.imaging.tiff import check_grey, decode_page, open_tiff
from nrrn_daemon.slices import last_number

SourceKind = Literal["multipage", "files"]
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})


@dataclass(frozen=True, eq=False)
class Stack:
    """An ordered stack of equally shaped 2-D slices, decoded on demand.

    Attributes
    ----------
    paths : tuple of Path
        The input file(s): one per slice, or the one multi-page file.
    names : tuple of str
        One output file name per slice: the input file name for per-slice inputs,
        ``<stem>_<index>.tif`` for a multi-page input.
    stem : str
        Name for a stack-shaped output: the multi-page file's stem, or the folder's name.
    shape : tuple of int
        Shape of one slice, ``(height, width)``.
    dtype : numpy.dtype
        Pixel type of every slice.
    source_kind : {"multipage", "files"}
        A single-page file is a stack of one slice file ("files").
    colormap : numpy.ndarray or None
        The grey-ramp palette of a multi-page palette stack (photometric 3), to write back.
    """

    paths: tuple[Path, ...]
    names: tuple[str, ...]
    stem: str
    shape: tuple[int, int]
    dtype: np.dtype
    source_kind: SourceKind
    allow_float: bool = False
    colormap: np.ndarray | None = None
    _volume: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        """Slice ``index`` as a 2-D array (read from disk for per-slice inputs)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"slice {index} out of range for a stack of {n}")
        index %= n
        if self._volume is not None:
            return self._volume[index]
        path = self.paths[index]
        with open_tiff(path) as tif:
            dtype = check_grey(tif.pages[0], path, allow_float=self.allow_float)
            array = decode_page(tif, 0, path)
        _check_same(path, array.shape, dtype, self.shape, self.dtype, self.paths[0])
        return array

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index]

    @property
    def slices(self) -> list[np.ndarray]:
        """Every slice, decoded (for per-slice inputs this reads them all)."""
        return list(self)

    def to_array(self) -> np.ndarray:
        """The whole stack as one ``(z, y, x)`` array."""
        if self._volume is not None:
            return self._volume
        return np.stack(list(self))


def read_stack(inputs: Sequence[Path], *, allow_float: bool = False) -> Stack:
    """Open a stack: one multi-page TIFF, one folder of slice TIFFs, or a list of slice files.

    Parameters
    ----------
    inputs : sequence of Path
        ``[stack.tif]``, ``[folder]`` (its ``*.tif``/``*.tiff``, in natural order of the last number
        in the name), or several slice files (order as given).
    allow_float : bool
        Also accept float32 slices (for metrics on already denoised data; not for denoising).

    Returns
    -------
    Stack

    Raises
    ------
    InputError
        No input, a missing or unreadable file, not a TIFF, truncated, RGB, unsupported dtype,
        slices of different shapes or dtypes, or an ambiguous folder order.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input given — pass a multi-page TIFF, a folder of slices, or files")
    if len(paths) == 1 and paths[0].is_dir():
        return _from_files(folder_slices(paths[0]), paths[0].name, allow_float)
    if len(paths) == 1 and _pages(paths[0]) == 1:
        return _from_files(paths, paths[0].stem, allow_float)  # one slice file
    if len(paths) == 1:
        return _from_multipage(paths[0], allow_float)
    return _from_files(paths, paths[0].parent.name or paths[0].stem, allow_float)


def _pages(path: Path) -> int:
    with open_tiff(path) as tif:
        return len(tif.pages)


def _from_multipage(path: Path, allow_float: bool) -> Stack:
    with open_tiff(path) as tif:
        pages = tif.pages
        first = pages[0]
        dtype = check_grey(first, path, allow_float=allow_float)
        shape = (int(first.shape[0]), int(first.shape[1])) if len(first.shape) == 2 else (0, 0)
        volume = np.empty((len(pages), *shape), dtype=dtype)
        for index in range(len(pages)):
            page = pages[index]
            if tuple(page.shape) != shape or np.dtype(page.dtype) != dtype:
                raise InputError(
                    f"cannot use {path}: page {index} is {tuple(page.shape)} {page.dtype}, page 0"
                    f" is {shape} {dtype} — every slice of a stack must have the same shape"
                    " and type"
                )
            volume[index] = decode_page(tif, index, path)
    volume.setflags(write=False)
    width = max(4, len(str(len(volume) - 1)))
    names = tuple(f"{path.stem}_{i:0{width}d}.tif" for i in range(len(volume)))
    return Stack(
        paths=(path,),
        names=names,
        stem=path.stem,
        shape=shape,
        dtype=dtype,
        source_kind="multipage",
        allow_float=allow_float,
        colormap=np.array(first.colormap, np.uint16) if int(first.photometric) == 3 else None,
        _volume=volume,
    )


def _from_files(paths: list[Path], stem: str, allow_float: bool) -> Stack:
    shape: tuple[int, int] = (0, 0)
    dtype = np.dtype(np.uint8)
    for number, path in enumerate(paths):
        if path.is_dir():
            raise InputError(
                f"cannot use {path}: it is a folder — pass one folder alone, or slice files"
            )
        with open_tiff(path) as tif:
            if len(tif.pages) != 1:
                raise InputError(
                    f"cannot use {path} as one slice: it has {len(tif.pages)} pages — pass a"
                    " multi-page stack on its own, or per-slice files"
                )
            page = tif.pages[0]
            page_dtype = check_grey(page, path, allow_float=allow_float)
            page_shape = (int(page.shape[0]), int(page.shape[1]))
        if number == 0:
            shape, dtype = page_shape, page_dtype
        _check_same(path, page_shape, page_dtype, shape, dtype, paths[0])
    return Stack(
        paths=tuple(paths),
        names=tuple(p.name for p in paths),
        stem=stem,
        shape=shape,
        dtype=dtype,
        source_kind="files",
        allow_float=allow_float,
    )


def folder_slices(folder: Path) -> list[Path]:
    """The TIFF slices of a folder, ordered by the last number in their names.

    Raises
    ------
    InputError
        No slice, a name without a number, or two slices with one number.
    """
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise InputError(f"no .tif/.tiff slices in {folder} — check the folder")
    if len(files) == 1:
        return files
    numbered: dict[int, Path] = {}
    for path in files:
        number = last_number(path.stem)
        if number is None:
            raise InputError(
                f"cannot order the slices of {folder}: {path.name} has no number in its name —"
                " move it out of the folder, or pass the slice files in order"
            )
        if number in numbered:
            raise InputError(
                f"cannot order the slices of {folder}: {numbered[number].name} and {path.name} both"
                f" have number {number} (a second detector?) — put each series in its own folder"
            )
        numbered[number] = path
    return [numbered[n] for n in sorted(numbered)]


def _check_same(
    path: Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    want_shape: tuple[int, ...],
    want_dtype: np.dtype,
    first: Path,
) -> None:
    if tuple(shape) != tuple(want_shape) or dtype != want_dtype:
        raise InputError(
            f"cannot use {path}: it is {tuple(shape)} {dtype}, but {first.name} is"
            f" {tuple(want_shape)} {want_dtype} — every slice of a stack must have the same shape"
            " and type"
        )
