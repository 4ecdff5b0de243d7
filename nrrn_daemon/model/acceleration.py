"""How the network runs fast: memory layout, autocast and ``torch.compile`` with a clean fallback.

Shared by inference (:mod:`nrrn_daemon.model.denoise`) and training
(:mod:`nrrn_daemon.finetune.training`).
Measured on a 2-core Xeon with AMX-BF16 (``BENCHMARKS.md`` §7, 4 BUs × 64 channels):

* **channels-last** layout: ×1.1 in float32 and what makes bf16 fast (oneDNN's bf16/AMX
  convolutions want it); always used, on the CPU and on CUDA;
* **bf16 autocast** (where native, see :mod:`nrrn_daemon.model.devices`): convolutions in bf16,
  ×2.5 over float32 for inference and ×3 for training;
* **torch.compile** (inductor): fuses the GRU's element-wise work (gates, tanh, attention, the
  bf16 casts) into a few C++ loops, another ×1.7–2 on top of bf16 on the CPU; it costs 10–30 s
  of compilation once per process (less with inductor's on-disk cache), which
  :meth:`Denoiser.warm_up <nrrn_daemon.model.denoise.Denoiser.warm_up>` pays at daemon start.

``compile="auto"`` compiles on CUDA, and on the CPU for models of at least
:data:`COMPILE_MIN_FEATURES` channels (the base and the paper's models): for the tiny test models
compilation costs seconds and gains nothing (measured: 3.6 ms per pass either way). Training
(on either device) compiles under ``auto`` only when the budget is long enough to repay the
compilation (:data:`COMPILE_MIN_MINUTES`, :data:`COMPILE_MIN_STEPS`).

Where compilation is impossible (no C++ compiler, an unsupported Python, a backend error), the
model falls back to eager execution, logged once per process, and the call is re-run: results
are the same, only slower.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from nrrn_daemon.model.devices import DeviceInfo
from nrrn_daemon.model.nrrn import NRRN

log = logging.getLogger("nrrn_daemon.model.acceleration")

COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_MIN_FEATURES = 32
"""``auto`` compiles on the CPU only models at least this wide."""
COMPILE_MIN_MINUTES = 5.0
COMPILE_MIN_STEPS = 500
"""``auto`` compiles a CPU training run whose budget reaches either (compilation ~½ min)."""

T = TypeVar("T")
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)
_compile_failure: str | None = None
"""Why compilation failed in this process, once it has: later models do not retry or re-log."""


def wants_compile(
    request: str,
    device: DeviceInfo,
    features: int,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    training: bool = False,
) -> bool:
    """Resolve ``"auto"``, ``"on"`` or ``"off"`` (see the module docstring).

    Raises
    ------
    ValueError
        For another request.
    """
    if request not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {request!r}")
    if request != "auto":
        return request == "on"
    if device.device_type != "cuda" and features < COMPILE_MIN_FEATURES:
        return False
    if not training:
        return True
    return (minutes or 0.0) >= COMPILE_MIN_MINUTES or (steps or 0) >= COMPILE_MIN_STEPS


def prepare(
    model: NRRN, device: DeviceInfo, compile_model: bool, *, channels_last: bool = True
) -> NRRN:
    """Move ``model`` to the device in channels-last layout; compile it if asked and possible.

    ``channels_last=False`` keeps the plain layout (only the speed benchmark's baseline).
    """
    model = model.to(device.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        if _compile_failure is not None:
            log.debug("not compiling: compilation already failed here (%s)", _compile_failure)
        else:
            try:
                model.compile_branches()
            except Exception as exc:  # noqa: BLE001 - any failure means "run eagerly"
                _give_up_compiling(model, exc)
    return model


def to_layout(x: Tensor, channels_last: bool = True) -> Tensor:
    """``x`` in the model's (channels-last) layout."""
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def autocast(device: DeviceInfo) -> contextlib.AbstractContextManager[None]:
    """Autocast to the device's reduced precision, or nothing for float32."""
    dtype = device.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.device_type, dtype=dtype)


def run_with_fallback(model: object, call: Callable[..., T], *args: object) -> T:
    """``call(*args)``; if ``model`` is compiled and compilation fails, uncompile it and call again.

    Compilation happens lazily, at the first call of each graph, so its errors surface here.
    Out-of-memory errors are not compilation failures: they propagate (the Denoiser retries
    with smaller tiles). An error of the eager re-run propagates too: it is a real one.
    """
    if not (isinstance(model, NRRN) and model.compiled):
        return call(*args)
    try:
        return call(*args)
    except OOM_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - logged once, then eager; a real error re-raises
        _give_up_compiling(model, exc)
    return call(*args)


def _give_up_compiling(model: NRRN, exc: BaseException) -> None:
    global _compile_failure
    model.uncompile()
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    reason = f"{type(exc).__name__}: {first_line}".rstrip(": ")
    if _compile_failure is None:
        log.warning(
            "torch.compile is not available here (%s): running the network eagerly (same "
            "results, slower); install a C++ compiler (gcc) to compile it",
            reason,
        )
    _compile_failure = reason


def compile_failure() -> str | None:
    """Why compilation failed in this process, or ``None`` (it has not, or was never tried)."""
    return _compile_failure


def reset_compile_failure() -> None:
    """Forget an earlier failure, so the next model tries to compile again (tests)."""
    global _compile_failure
    _compile_failure = None
