"""The Denoiser: a checkpoint's NRRN on a device, applied to whole slices tile by tile.

Arrays in, arrays out; no file I/O. A slice (uint8 or uint16, up to 6144×4096) is cut by
:mod:`nrrn_daemon.model.tiling` into tiles whose halo is the network's receptive radius, so the
stitched result equals whole-image inference (up to float rounding: ≤ 1 grey level, tested).

Memory: the slice is never copied to float as a whole. One mean/std is computed on the centre
slice before tiling (:meth:`Normalisation.stats_for`) and applied to each batch of windows on
the device, so the host holds the integer inputs, the integer output and one batch of windows.

Speed (:mod:`nrrn_daemon.model.acceleration`): the model runs in channels-last layout, under bf16
autocast where the hardware has it (CUDA, fp16 on GPUs without bf16; CPUs with AVX512-BF16 or
AMX), float32 elsewhere or when asked, and compiled with ``torch.compile`` where that pays.
bf16 outputs are within one grey level of float32 (tested on the base checkpoint and FIB-25).
Compilation happens at the first call; :meth:`Denoiser.warm_up` does it up front (the daemon
calls it at start) so that no slice waits for it.

On CUDA an out-of-memory error halves the batch, then the tile, down to one 64-px tile, and only
then fails. The reduced settings are kept for later calls.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nrrn_daemon.errors import Abandoned, InputError, NRRNError
from nrrn_daemon.imaging.alignment import align_neighbours
from nrrn_daemon.model import acceleration
from nrrn_daemon.model.checkpoints import Checkpoint
from nrrn_daemon.model.devices import resolve_device
from nrrn_daemon.model.nrrn import unit_estimates
from nrrn_daemon.model.posterior import fit_noise_model, posterior_mean, prior_variance
from nrrn_daemon.model.tiling import Tile, paste, plan_tiles

MIN_TILE = 64
"""Smallest core side the out-of-memory fallback goes down to."""

WARM_UP_SHAPE = (72, 88)
"""Window of the warm-up passes: small (compiling, not computing, is what takes time) and not
square, so that the compiled graph does not specialise on height == width."""

log = logging.getLogger("nrrn_daemon.model.denoise")
_OOM_ERRORS = acceleration.OOM_ERRORS
_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


class Denoiser:
    """Denoise slices with a checkpoint's NRRN.

    Parameters
    ----------
    checkpoint
        The model and its normalisation.
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    tile
        Largest core side in pixels (cores are balanced, see :mod:`nrrn_daemon.model.tiling`);
        ``None`` runs the whole image in one pass.
    tile_batch
        Tiles per forward pass (all windows share one shape). ``None``: 4 on CUDA, 1 on the
        CPU, where batching gains ~10 % but multiplies the peak memory (measured with
        ``benchmarks/speed.py``: ~8.6 GB for 512-px tiles × 4 or one 1024-px tile, 4 BUs, 64
        channels, a triplet).
    precision
        ``"auto"`` (bf16 where native, see :mod:`nrrn_daemon.model.devices`), ``"float32"`` or
        ``"bf16"``.
    compile
        ``"auto"``, ``"on"`` or ``"off"``: run the network through ``torch.compile`` (see
        :mod:`nrrn_daemon.model.acceleration`; falls back to eager, logged once, where it cannot).
    channels_last
        Memory layout; False only for the speed benchmark's baseline (it is slower).
    align
        Resample each neighbour onto the centre's grid first
        (:func:`~nrrn_daemon.imaging.alignment.align_neighbours`: sub-pixel drift between
        slices); False only to measure what alignment buys.

    A blind-spot checkpoint (:attr:`~nrrn_daemon.model.nrrn.NRRNConfig.blind`) is followed by
    the posterior step (:mod:`nrrn_daemon.model.posterior`): the noise model is fitted on the
    raw centre slice, and the blind estimate and the noisy pixel are combined, on the whole
    slice after the tiles are stitched (so tiling does not change the output).

    Attributes
    ----------
    device, device_name, precision, cpu_fallback
        The resolved device (``"cpu"``/``"cuda:0"``), its CPU model or GPU name, ``"float32"``
        or ``"bf16"``/``"fp16"``, and whether ``auto`` fell back to the CPU.
    precision_reason
        Why that precision ("CPU has amx_bf16, avx512_bf16", "float32 forced"...).
    halo
        Context pixels around each core: the model's :attr:`NRRNConfig.halo`.
    last_alignment, last_posterior
        Of the last :meth:`denoise` call: each neighbour's ``(dy, dx)`` shift in px, and the
        posterior step's noise model ``a``, ``b`` and prior variance (None for a paper-network
        checkpoint); :meth:`provenance` gives both as recorded with every output.
    last_timing
        Of the last :meth:`denoise` call: ``normalise_s``, ``model_s``, ``total_s`` (seconds),
        ``tiles``, ``tile`` (0 = whole image), ``tile_batch``, ``oom_retries``.

    Raises
    ------
    InputError
        Unknown device or precision, CUDA requested where none is available, or bf16 where
        the hardware has none.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "auto",
        tile: int | None = 512,
        tile_batch: int | None = None,
        *,
        precision: str = "auto",
        compile: str = "auto",
        channels_last: bool = True,
        align: bool = True,
    ) -> None:
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be ≥ 1 or None, got {tile}")
        if tile_batch is not None and tile_batch < 1:
            raise ValueError(f"tile_batch must be ≥ 1 or None, got {tile_batch}")
        info = resolve_device(device, precision)
        if tile_batch is None:
            tile_batch = 4 if info.device.startswith("cuda") else 1
        self.checkpoint = checkpoint
        self._info = info
        self.device = info.device
        self.device_name = info.name
        self.precision = info.precision
        self.precision_reason = info.precision_reason
        self.cpu_fallback = info.cpu_fallback
        self.tile = tile
        self.tile_batch = tile_batch
        self.halo = checkpoint.config.halo
        self.channels_last = channels_last
        self.align = align
        self.last_alignment: list[tuple[float, float]] = []
        self.last_posterior: dict[str, float] | None = None
        wanted = acceleration.wants_compile(compile, info, checkpoint.config.features)
        model = acceleration.prepare(
            checkpoint.build_model(), info, wanted, channels_last=channels_last
        )
        self.model: nn.Module = model.eval()
        self.last_timing: dict[str, float] = {}

    @property
    def _on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def compiled(self) -> bool:
        """Whether the network runs compiled (False after a fallback to eager execution)."""
        return bool(getattr(self.model, "compiled", False))

    def warm_up(self) -> float:
        """Compile now what the first slices would otherwise compile; returns the seconds taken.

        Runs a triplet and a pair (a batch of one window and, with ``tile_batch`` > 1, of two)
        on small :data:`WARM_UP_SHAPE` windows: compiled graphs have dynamic shapes, so these
        cover every slice size, the single-image mode and the batches of any plan. Without
        compilation it only initialises the kernels (well under a second). A compiler failure
        falls back to eager execution here (logged once), not on the first slice.
        """
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 255, WARM_UP_SHAPE, dtype=np.uint8) for _ in "abc"]
        plan = plan_tiles(*WARM_UP_SHAPE, max(WARM_UP_SHAPE), 0)
        mean, std = 127.0, 64.0
        batches = (1, 2) if self.tile_batch > 1 else (1,)
        for neighbours in (images[1:], images[1:2]):
            for batch in batches:
                self._run(plan * batch, batch, images[0], neighbours, mean, std)
        seconds = time.perf_counter() - start
        log.info(
            "model ready on %s (%s): %s (%s), %s, %s; warm-up %.1f s",
            self.device,
            self.device_name,
            self.precision,
            self.precision_reason,
            "compiled" if self.compiled else "not compiled",
            "channels-last" if self.channels_last else "contiguous",
            seconds,
        )
        return seconds

    def denoise(
        self,
        centre: np.ndarray,
        neighbours: Sequence[np.ndarray] = (),
        *,
        tiles: Sequence[Tile] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Denoise one slice with 0, 1, 2 (or more, for repeat scans) neighbours.

        Two neighbours: the mean of the two branches (a triplet); one: that branch; none: the
        single-image fallback; more: the mean of all branches (see :class:`NRRN.forward`).

        Parameters
        ----------
        centre
            2-D uint8 or uint16 slice.
        neighbours
            Slices of the same shape and dtype (x_{j−1}, x_{j+1}, or repeat scans).
        tiles
            An explicit plan from :func:`plan_tiles` for this shape, instead of the Denoiser's
            own (benchmarks compare tilings with it); the OOM fallback then only shrinks the batch.
        should_stop
            Checked between forward passes; when it returns True the slice is given up with
            :class:`Abandoned` (a big slice on the CPU takes minutes, a stop must not).

        Returns
        -------
        numpy.ndarray
            The denoised slice, same shape and dtype, rounded and clipped to the dtype's range.

        Raises
        ------
        InputError
            Not a 2-D uint8/uint16 array, or neighbours of another shape or dtype.
        NRRNError
            Out of GPU memory even for one tile of ``MIN_TILE`` px per pass.
        Abandoned
            ``should_stop`` returned True.
        """
        start = time.perf_counter()
        _check_inputs(centre, neighbours)
        self.last_alignment, self.last_posterior = [], None
        if self.align and neighbours:
            neighbours, self.last_alignment = align_neighbours(centre, neighbours)
        height, width = centre.shape
        mean, std = self.checkpoint.normalisation.stats_for(centre)
        stats_s = time.perf_counter() - start
        if tiles is not None:
            _check_plan(tiles, height, width)
        tile, batch, retries = self.tile, self.tile_batch, 0
        while True:
            plan = list(tiles) if tiles is not None else self._plan(height, width, tile)
            try:
                out, timing = self._run(plan, batch, centre, neighbours, mean, std, should_stop)
                break
            except _OOM_ERRORS as exc:  # only raised on CUDA (and by the tests' fake)
                failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # Outside the except block: the traceback's tensors are gone before emptying the cache.
            retries += 1
            self._release_memory()
            if min(batch, len(plan)) > 1:  # a batch larger than the plan is no batch at all
                batch = min(batch, len(plan)) // 2
            elif tiles is None and (tile or max(height, width)) > MIN_TILE:
                tile = max(MIN_TILE, (tile or max(height, width)) // 2)
            else:
                h, w = plan[0].window_shape
                raise NRRNError(
                    f"out of memory on {self.device} ({self.device_name}) denoising a "
                    f"{height}×{width} slice even with one {h}×{w} window per pass "
                    f"({failure}) — free the GPU or use device 'cpu'"
                )
        self.tile, self.tile_batch = tile, batch  # keep what fitted for the next slices
        if self.checkpoint.config.blind and neighbours:  # single mode is not blind (nrrn.py)
            out = self._posterior(centre, out)
        top = float(np.iinfo(centre.dtype).max)
        out = np.clip(np.rint(out), 0.0, top).astype(centre.dtype)
        timing["normalise_s"] += stats_s
        self.last_timing = {
            **timing,
            "total_s": time.perf_counter() - start,
            "tiles": len(plan),
            "tile": tile or 0,
            "tile_batch": batch,
            "oom_retries": retries,
        }
        return out

    def _posterior(self, centre: np.ndarray, blind: np.ndarray) -> np.ndarray:
        """The blind estimate combined with the noisy centre (see :mod:`.posterior`)."""
        noise = fit_noise_model([centre])
        prior = prior_variance(centre, blind, noise)
        self.last_posterior = {**noise.to_dict(), "prior_variance": prior}
        return posterior_mean(centre, blind, noise, prior)

    def provenance(self) -> dict[str, object]:
        """What the last :meth:`denoise` did beyond the network, for the output's provenance."""
        return {
            "alignment_shifts_px": [list(s) for s in self.last_alignment],
            "posterior": self.last_posterior,
        }

    def unit_estimates(
        self, centre: np.ndarray, neighbours: Sequence[np.ndarray] = ()
    ) -> list[np.ndarray]:
        """The estimate after every building unit, then the output, as images of the slice's
        dtype (paper 2.2.4, Fig. 5): whole image, float32, neighbours aligned as in
        :meth:`denoise`, network estimates only (no posterior step)."""
        _check_inputs(centre, neighbours)
        if self.align and neighbours:
            neighbours, _ = align_neighbours(centre, neighbours)
        mean, std = self.checkpoint.normalisation.stats_for(centre)
        plan = plan_tiles(*centre.shape, max(centre.shape), 0)
        inputs = [self._windows(image, plan, mean, std) for image in (centre, *neighbours)]
        top = float(np.iinfo(centre.dtype).max)
        model = self.model
        with torch.inference_mode(), model.eager():  # type: ignore[operator]
            steps = unit_estimates(model, *inputs)  # type: ignore[arg-type]
        return [
            np.clip(np.rint(t[0, 0].float().cpu().numpy() * std + mean), 0, top).astype(
                centre.dtype
            )
            for t in steps
        ]

    def denoise_whole(
        self, centre: np.ndarray, neighbours: Sequence[np.ndarray] = ()
    ) -> np.ndarray:
        """Whole-image inference, one pass, no tiling (the reference for exactness tests)."""
        return self.denoise(
            centre, neighbours, tiles=plan_tiles(*centre.shape, max(centre.shape), 0)
        )

    def _plan(self, height: int, width: int, tile: int | None) -> list[Tile]:
        return plan_tiles(height, width, tile or max(height, width), self.halo)

    def _release_memory(self) -> None:
        gc.collect()
        if self._on_cuda:
            torch.cuda.empty_cache()

    def _run(
        self,
        plan: Sequence[Tile],
        batch: int,
        centre: np.ndarray,
        neighbours: Sequence[np.ndarray],
        mean: float,
        std: float,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Run ``plan`` in batches of same-shape windows; returns the float output and timings."""
        out = np.empty(centre.shape, dtype=np.float32)
        groups: dict[tuple[int, int], list[Tile]] = {}
        for t in plan:
            groups.setdefault(t.window_shape, []).append(t)
        normalise_s = model_s = 0.0
        with torch.inference_mode():
            for group in groups.values():
                for i in range(0, len(group), batch):
                    if should_stop is not None and should_stop():
                        raise Abandoned("denoising given up: the daemon is stopping")
                    chunk = group[i : i + batch]
                    t0 = time.perf_counter()
                    inputs = [
                        self._windows(image, chunk, mean, std) for image in (centre, *neighbours)
                    ]
                    t1 = time.perf_counter()
                    result = self._forward(inputs)
                    if self._on_cuda:
                        torch.cuda.synchronize(self.device)
                    t2 = time.perf_counter()
                    normalise_s += t1 - t0
                    model_s += t2 - t1
                    # Undo the normalisation (:meth:`denoise` rounds and clips at the end).
                    levels_np = (result[:, 0].float() * std + mean).cpu().numpy()
                    for t, window in zip(chunk, levels_np, strict=True):
                        paste(out, t, window)
        return out, {"normalise_s": normalise_s, "model_s": model_s}

    def _windows(self, image: np.ndarray, chunk: Sequence[Tile], mean: float, std: float) -> Tensor:
        """``(N, 1, h, w)`` normalised float32 windows of ``image`` on the device."""
        stacked = np.stack([image[t.window_slices] for t in chunk])[:, None]
        if stacked.dtype == np.uint16:  # torch has few uint16 kernels: widen on the host
            stacked = stacked.astype(np.int32)
        x = torch.from_numpy(stacked).to(self.device, non_blocking=True)
        return acceleration.to_layout((x.to(torch.float32) - mean) / std, self.channels_last)

    def _forward(self, inputs: list[Tensor]) -> Tensor:
        return acceleration.run_with_fallback(self.model, self._call, inputs)

    def _call(self, inputs: list[Tensor]) -> Tensor:
        with acceleration.autocast(self._info):
            return self.model(*inputs)


def _check_plan(tiles: Sequence[Tile], height: int, width: int) -> None:
    """Cheap sanity check of an explicit plan: windows inside the image, core areas add up."""
    area = 0
    for t in tiles:
        y0, y1, x0, x1 = t.window
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"tile window {t.window} lies outside the {height}×{width} slice")
        cy0, cy1, cx0, cx1 = t.core
        area += (cy1 - cy0) * (cx1 - cx0)
    if area != height * width:
        raise ValueError(f"the tile plan's cores cover {area} px, the slice has {height * width}")


def _check_inputs(centre: np.ndarray, neighbours: Sequence[np.ndarray]) -> None:
    for role, image in (("centre", centre), *(("neighbour", n) for n in neighbours)):
        if not isinstance(image, np.ndarray):
            raise InputError(f"the {role} slice must be a numpy array, got {type(image).__name__}")
        if image.ndim != 2 or 0 in image.shape:
            raise InputError(
                f"the {role} slice must be a non-empty 2-D greyscale image, got shape {image.shape}"
            )
        if image.dtype not in _DTYPES:
            raise InputError(
                f"the {role} slice has dtype {image.dtype}; NRRN denoises uint8 or uint16 slices "
                "(float images are not accepted: convert them to integers first)"
            )
    for k, n in enumerate(neighbours):
        if n.shape != centre.shape:
            raise InputError(
                f"neighbour {k} has shape {n.shape} but the centre slice has shape "
                f"{centre.shape} — slices of one stack must have the same size"
            )
        if n.dtype != centre.dtype:
            raise InputError(
                f"neighbour {k} has dtype {n.dtype} but the centre slice has dtype "
                f"{centre.dtype} — slices of one stack must have the same bit depth"
            )
