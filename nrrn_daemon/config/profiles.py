"""Instrument profiles: strict pydantic models of one TOML file per microscope set-up.

A profile says where the microscope writes its slices, how to read an index out of a file name,
how to group slices, where outputs and the provenance database go, which model to run and when to
fine-tune it. Every model forbids unknown fields, bounds its numbers and documents each field with
the docstring under it (``use_attribute_docstrings``);
:func:`~nrrn_daemon.config.loading.profile_field_docs` exposes those docstrings so the README can
be checked against them.

This module is the schema (its ``[watch]`` table: :mod:`nrrn_daemon.config.watch`). Finding,
reading and listing profile files (:func:`load_profile`, :func:`list_profiles`,
:func:`profile_search_path`) is :mod:`nrrn_daemon.config.loading`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from nrrn_daemon.config import naming
from nrrn_daemon.config.naming import naming_fields
from nrrn_daemon.config.watch import STRICT, WatchSettings, expand_path
from nrrn_daemon.files import resolve_soon

__all__ = [
    "FinetuneSettings",
    "FrameSettings",
    "GroupingSettings",
    "ImageSettings",
    "ModelSettings",
    "OutputSettings",
    "Profile",
    "StoreSettings",
]

PROFILE_NAME = re.compile(r"^[a-z0-9_-]+$")
"""What a profile name may look like: it doubles as a file name, so it cannot escape a folder."""


def _is_within(inner: Path, outer: Path, timeout_s: float) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it, after resolving both against the CWD
    (only made absolute where the file system does not answer within ``timeout_s``: a profile
    naming a hung share still loads)."""
    inner, outer = resolve_soon(inner, timeout_s), resolve_soon(outer, timeout_s)
    return inner == outer or outer in inner.parents


class GroupingSettings(BaseModel):
    """How slices are grouped into units of work."""

    model_config = STRICT

    mode: Literal["adjacent", "repeat-scans"] = "adjacent"
    """"adjacent": slice j is denoised with slices j-1 and j+1 as Noise2Noise targets;
    "repeat-scans": the scans of one slice (group `scan` of `watch.index_regex`) form the group."""

    neighbour_wait_s: float = Field(default=600.0, ge=0, le=86400)
    """Seconds a ready slice waits for a missing neighbour (or scan) before it is denoised with
    what it has (pair mode, or single at a stack edge)."""

    redo_as_triplet: bool = True
    """When a late neighbour arrives, denoise again as a full triplet a slice that was done in
    pair or single mode."""

    scans_per_slice: int = Field(default=2, ge=2, le=16)
    """Repeat-scans mode: the number of scans that completes one slice's group."""


class ImageSettings(BaseModel):
    """How to read a slice before denoising."""

    model_config = STRICT

    databar: Literal["auto", "none", "fei", "rows"] = "auto"
    """The information strip below the image, cropped before denoising and copied through
    unchanged: "auto" (where the file's metadata says the image ends: FEI [Image] ResolutionY
    smaller than the image; else every row is image: ZEISS metadata says nothing of its data
    zone, crop that with "rows"); "none" (every row is image); "fei"
    (require the FEI metadata, keep [Image] ResolutionY rows); "rows" (`databar_rows` rows)."""

    databar_rows: int = Field(default=0, ge=0, le=65535)
    """For `databar` = "rows": the fixed height in pixels of the strip at the bottom."""

    @model_validator(mode="after")
    def _rows_match_databar(self) -> ImageSettings:
        if self.databar == "rows" and self.databar_rows < 1:
            raise ValueError(
                f"image.databar = 'rows' needs image.databar_rows >= 1; got {self.databar_rows}"
            )
        if self.databar != "rows" and self.databar_rows:
            raise ValueError(
                f"image.databar_rows = {self.databar_rows} is only used with "
                f"image.databar = 'rows'; got databar = {self.databar!r}"
            )
        return self


class OutputSettings(BaseModel):
    """Where denoised slices are written and how they are named."""

    model_config = STRICT

    folder: Path = Path("/data/fibsem/denoised")
    """Folder of the denoised TIFFs. Must not be the watch folder nor lie inside it."""

    naming: str = "{name}"
    """Output file name template with the placeholders {name} (input file name), {stem} (name
    without suffix), {suffix} (e.g. ".tif") and {index} (slice number; format specs such as
    {index:05d} work). The result must be a plain file name."""

    zarr: Path | None = None
    """Also write every denoised slice into this live OME-Zarr volume (z = slice index), so the
    growing stack can be viewed in napari or neuroglancer during acquisition; a relative path is
    taken inside output.folder. Unset (the default): TIFFs only."""

    @field_validator("folder", "zarr", mode="before")
    @classmethod
    def _expand_folder(cls, value: Any) -> Any:
        return None if value is None or value == "" else expand_path(value)

    @property
    def zarr_path(self) -> Path | None:
        """:attr:`zarr`, made absolute (inside :attr:`folder` when relative)."""
        if self.zarr is None:
            return None
        return self.zarr if self.zarr.is_absolute() else self.folder / self.zarr

    @field_validator("naming")
    @classmethod
    def _naming_is_a_safe_template(cls, value: str) -> str:
        return naming.check_template(value)


class StoreSettings(BaseModel):
    """The provenance database."""

    model_config = STRICT

    database: Path = Path("/var/lib/nrrn-daemon/nrrn.sqlite")
    """SQLite file recording every slice, output, model and fine-tune run."""

    @field_validator("database", mode="before")
    @classmethod
    def _expand_database(cls, value: Any) -> Any:
        return expand_path(value)


class DashboardSettings(BaseModel):
    """The read-only web dashboard (``nrrn-daemon dashboard``)."""

    model_config = STRICT

    host: str = "127.0.0.1"
    """Address it listens on; anything but a loopback address needs a token."""

    port: int = Field(default=8765, ge=1, le=65535)
    """TCP port it listens on."""

    token: str | None = Field(default=None, min_length=16)
    """Shared secret (16+ characters) that browsers must present (``?token=`` once, then a
    cookie); required when ``host`` is not a loopback address. None: no token."""

    preview_px: int = Field(default=1024, ge=64, le=8192)
    """Longest side (px) of the slice previews; larger slices are downsampled by block means."""


class ModelSettings(BaseModel):
    """Which network runs, where, and how the image is tiled."""

    model_config = STRICT

    checkpoint: str = "base"
    """"base" (the shipped base checkpoint), "dataset" (the data set's promoted fine-tuned model,
    else base) or a path to a .pt checkpoint."""

    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""

    tile: int = Field(default=512, ge=64, le=8192)
    """Tile (output core) size in pixels; each tile is read with a halo that covers the
    network's receptive field, so the stitched slice equals whole-image inference."""

    tile_batch: int | None = Field(default=None, ge=1, le=64)
    """Tiles per forward pass; unset: 4 on CUDA, 1 on the CPU (where batching gains ~10 % for
    about 4× the memory)."""

    precision: Literal["auto", "float32", "bf16"] = "auto"
    """"auto": bf16 autocast where the hardware computes it natively (CUDA — fp16 on GPUs
    without bf16 —, CPUs with AVX512-BF16 or AMX-BF16; outputs within 1 grey level of float32),
    float32 elsewhere; "float32" forces full precision; "bf16" insists on it (refused where it
    is not native). Used for denoising and fine-tuning."""

    compile: Literal["auto", "on", "off"] = "auto"
    """Run the network through torch.compile: "auto" on CUDA, and on the CPU for models of ≥ 32
    channels (1.7–2× faster; fine-tunes only with ≥ 5-minute budgets); compiled once at start
    (tens of seconds on a CPU), falls back to eager, logged once, where no compiler works."""

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint_choice(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or value in ("base", "dataset"):
            return value
        expanded = os.path.expandvars(os.path.expanduser(value))
        if not expanded.endswith(".pt"):
            raise ValueError("expected 'base', 'dataset' or a path to a .pt checkpoint")
        return expanded

    @field_validator("device")
    @classmethod
    def _device_choice(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint file when `checkpoint` is a path; None for "base" and "dataset"."""
        return None if self.checkpoint in ("base", "dataset") else Path(self.checkpoint)


class FinetuneSettings(BaseModel):
    """When and how the model is fine-tuned on the data set being acquired."""

    model_config = STRICT

    enabled: bool = True
    """Run scheduled fine-tunes at all."""

    cron: str = "0 2 * * *"
    """When to fine-tune: a 5-field crontab expression (minute hour day month weekday)."""

    early_after_slices: int = Field(default=200, ge=0, le=10_000_000)
    """Run a first fine-tune once this many slices are denoised, without waiting for `cron`;
    0 disables it."""

    minutes: float = Field(default=30.0, ge=0.5, le=1440)
    """Time budget of one fine-tune run in minutes."""

    validation_fraction: float = Field(default=0.1, ge=0.02, le=0.5)
    """Fraction of the triplets held out to decide whether the fine-tuned model is promoted."""

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(
                f"expected 5 fields (minute hour day month weekday), got {len(fields)}"
            )
        try:
            from apscheduler.triggers.cron import CronTrigger
        except ImportError:  # pragma: no cover - apscheduler is a dependency
            return value
        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"not a valid crontab expression ({exc})") from None
        return value


class FrameSettings(BaseModel):
    """How a slice is judged before it may serve as a neighbour (:mod:`nrrn_daemon.frames`)."""

    model_config = STRICT

    enabled: bool = True
    """Judge every slice; false uses any slice that decodes as a neighbour (the old behaviour)."""

    blank_std: float = Field(default=0.5, ge=0, le=1e6)
    """A slice whose standard deviation (in grey levels of its own dtype) is below this is a
    blank frame (an all-zero or constant image: a blanked beam, a detector dropout)."""

    saturated_fraction: float = Field(default=0.5, gt=0, le=1)
    """A slice with more than this fraction of its pixels at the dtype's maximum is a saturated
    frame (integer dtypes only)."""

    empty_fraction: float = Field(default=0.25, gt=0, le=1)
    """A slice with more than this fraction of its rows (or of its columns) constant is a frame
    cut short (a partial scan padded with one value)."""

    ncc_block: int = Field(default=8, ge=1, le=256)
    """Block size of the block-mean thumbnail on which the normalised cross-correlation (NCC)
    with the neighbours is measured (averaging lifts it above the noise)."""

    unrelated_ratio: float = Field(default=0.5, ge=0, le=1)
    """A slice is unrelated to its neighbours when its NCC with both is below this fraction of the
    data set's level (the median NCC of adjacent usable slices, learned from the data set)."""

    ncc_min_level: float = Field(default=0.2, ge=-1, le=1)
    """Below this level adjacent slices are not similar enough for the NCC test to mean anything:
    it is skipped for the data set (the other tests still apply)."""

    ncc_warmup: int = Field(default=4, ge=1, le=100_000)
    """How many adjacent pairs the level must be learned from before the NCC test applies."""

    ncc_window: int = Field(default=64, ge=1, le=100_000)
    """The daemon's running level is the median of the last this-many adjacent NCCs."""


class Profile(BaseModel):
    """One microscope set-up: the top of a profile TOML file."""

    model_config = STRICT

    name: str = Field(pattern=PROFILE_NAME.pattern)
    """Profile name (lower-case letters, digits, '_' and '-'); also its file name without .toml."""

    description: str = ""
    """Free text: the instrument, its software and its file naming."""

    watch: WatchSettings = WatchSettings()
    """[watch]: the microscope's output folder and its file names."""

    grouping: GroupingSettings = GroupingSettings()
    """[grouping]: how slices form units of work."""

    image: ImageSettings = ImageSettings()
    """[image]: how a slice is read (databar)."""

    output: OutputSettings = OutputSettings()
    """[output]: where denoised slices go."""

    store: StoreSettings = StoreSettings()
    """[store]: the provenance database."""

    model: ModelSettings = ModelSettings()
    """[model]: the network, device and tiling."""

    finetune: FinetuneSettings = FinetuneSettings()
    """[finetune]: scheduled fine-tuning."""

    dashboard: DashboardSettings = DashboardSettings()
    """[dashboard]: the read-only web dashboard."""
    frames: FrameSettings = FrameSettings()
    """[frames]: which slices carry too little signal to serve as a neighbour."""

    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        watch, wait = self.watch.folder, self.watch.answer_timeout_s
        if _is_within(self.output.folder, watch, wait):
            raise ValueError(
                f"output.folder ({self.output.folder}) is the watch folder or inside it "
                f"({watch}); the watch folder is read-only to the daemon, choose another folder"
            )
        zarr = self.output.zarr_path
        if zarr is not None and _is_within(zarr, watch, wait):
            raise ValueError(
                f"output.zarr ({zarr}) is inside the watch folder ({watch}); the watch folder is "
                "read-only to the daemon, choose another place"
            )
        if _is_within(self.store.database, watch, wait):
            raise ValueError(
                f"store.database ({self.store.database}) is inside the watch folder ({watch}); "
                "the watch folder is read-only to the daemon, choose another place"
            )
        if len(self.watch.channel_globs) > 1 and not {"name", "stem"} & naming_fields(
            self.output.naming
        ):
            raise ValueError(
                f"output.naming = {self.output.naming!r} would give the channels' slices the same"
                " output names; use {name} or {stem} with several watch.channels or detectors"
            )
        if (
            self.grouping.mode == "repeat-scans"
            and "scan" not in re.compile(self.watch.index_regex).groupindex
        ):
            raise ValueError(
                "grouping.mode = 'repeat-scans' needs a named group `scan` in watch.index_regex; "
                f"got {self.watch.index_regex!r}"
            )
        return self

    @property
    def source(self) -> Path | None:
        """The file this profile was loaded from, or None when built in code."""
        return self._source

    def for_channel(self, channel: str) -> Profile:
        """This profile for one of its channels (`watch.channels` or `watch.detectors`): its glob,
        and its own live volume (``<zarr stem>-<channel>.zarr``, spaces as '_')."""
        glob = self.watch.channel_globs[channel]
        watch = self.watch.model_copy(update={"glob": glob, "channels": {}, "detectors": []})
        output = self.output
        if output.zarr is not None:
            slug = channel.replace(" ", "_")
            zarr = output.zarr.with_name(f"{output.zarr.stem}-{slug}{output.zarr.suffix}")
            output = output.model_copy(update={"zarr": zarr})
        copy = self.model_copy(update={"watch": watch, "output": output})
        copy._source = self._source
        return copy

    def output_name(self, input_name: str, index: int | None) -> str:
        """Apply the `output.naming` template to one input file.

        Parameters
        ----------
        input_name
            The input file name (no folder).
        index
            The slice index, or None when unknown.

        Returns
        -------
        str
            The output file name, checked to be a plain file name.

        Raises
        ------
        InputError
            When the template needs {index} and none is given, or the result is not a plain name.
        """
        return naming.output_name(self.output.naming, input_name, index)
