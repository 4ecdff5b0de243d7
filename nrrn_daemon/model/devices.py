"""Which device runs the network, what it is called, and at which precision.

``auto`` prefers CUDA and falls back to the CPU (and says so: :attr:`DeviceInfo.cpu_fallback`);
an explicit ``cuda`` on a machine without one is an error, not a silent fallback.

Precision (``auto``, ``float32`` or ``bf16``): ``auto`` uses reduced precision where the hardware
computes it natively — bf16 autocast on CUDA (fp16 on GPUs without bf16) and on CPUs with bf16
instructions (AVX512-BF16 or AMX-BF16, detected at start-up), where the convolutions run 2–3×
faster with outputs within one grey level of float32 (``BENCHMARKS.md`` §7); float32 elsewhere.
An emulated bf16 would be slower than float32, so ``bf16`` on a CPU without it is refused.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nrrn_daemon.errors import InputError

PRECISIONS = ("auto", "float32", "bf16")
"""What a user may ask for; :attr:`DeviceInfo.precision` is what it resolved to."""
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU features that compute bf16 natively (``/proc/cpuinfo`` and ``torch.cpu`` names)."""


@dataclass(frozen=True)
class DeviceInfo:
    """A resolved device.

    Attributes
    ----------
    device
        ``"cpu"`` or ``"cuda:N"``.
    name
        CPU model or GPU name, for provenance.
    precision
        ``"float32"``, or the autocast dtype: ``"bf16"`` (CUDA where supported, CPUs with
        native bf16) or ``"fp16"`` (CUDA without bf16).
    cpu_fallback
        True when ``auto`` found no CUDA device and chose the CPU.
    precision_reason
        Why this precision, for the logs ("CPU has amx_bf16, avx512_bf16", "forced"...).
    """

    device: str
    name: str
    precision: str
    cpu_fallback: bool
    precision_reason: str = ""

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"`` (what :class:`torch.autocast` takes)."""
        return self.device.split(":")[0]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, ``None`` for plain float32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), or the best platform guess."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), flags=re.MULTILINE)
    if match:
        return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The native bf16 features of this CPU (subset of :data:`CPU_BF16_FLAGS`); empty if none.

    Asks ``torch.cpu.get_capabilities()`` (torch ≥ 2.6, any OS), else the ``flags`` line of
    ``/proc/cpuinfo``. Detected once per process.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        try:
            caps = get_capabilities()
        except Exception:  # noqa: BLE001 - an introspection helper; /proc/cpuinfo is the fallback
            caps = {}
        if caps:
            return tuple(f for f in CPU_BF16_FLAGS if caps.get(f))
    match = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), flags=re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def resolve_device(
    request: str = "auto", precision: str = "auto", *, allow_fp16: bool = True
) -> DeviceInfo:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` and a precision into a :class:`DeviceInfo`.

    Parameters
    ----------
    request
        The device asked for.
    precision
        ``"auto"`` (reduced where native, see the module docstring), ``"float32"`` or ``"bf16"``.
    allow_fp16
        False for training: a GPU without bf16 then trains in float32 (fp16 training would need
        loss scaling, which this project does not do).

    Raises
    ------
    InputError
        For an unknown device or precision, CUDA requested where none is available, or bf16
        requested where the hardware has none.
    """
    request = request.strip().lower()
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r} — use 'auto', 'float32' or 'bf16'")
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        chosen, reason = _cpu_precision(precision)
        return DeviceInfo("cpu", cpu_model(), chosen, request == "auto", reason)
    if request == "auto":
        return _cuda(torch.cuda.current_device(), precision, allow_fp16)
    match = re.fullmatch(r"cuda(?::(\d+))?", request)
    if match is None:
        raise InputError(f"unknown device {request!r} — use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise InputError(
            f"device {request!r} was requested but CUDA is not available (torch "
            f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA) — "
            "use device 'auto' or 'cpu', or install a CUDA build of torch"
        )
    index = int(match.group(1) or torch.cuda.current_device())
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(
            f"device {request!r} does not exist: this machine has {count} CUDA device(s)"
        )
    return _cuda(index, precision, allow_fp16)


def _cpu_precision(precision: str) -> tuple[str, str]:
    if precision == "float32":
        return "float32", "float32 forced"
    features = cpu_bf16_features()
    if features:
        return "bf16", f"CPU has {', '.join(features)}"
    if precision == "bf16":
        raise InputError(
            f"precision 'bf16' was requested but this CPU ({cpu_model()}) has no native bf16 "
            f"({' or '.join(CPU_BF16_FLAGS)}): emulated it is slower than float32 — use "
            "precision 'auto' or 'float32'"
        )
    return "float32", "CPU has no native bf16"


def _cuda(index: int, precision: str, allow_fp16: bool) -> DeviceInfo:
    name = torch.cuda.get_device_name(index)
    if precision == "float32":
        return DeviceInfo(f"cuda:{index}", name, "float32", False, "float32 forced")
    if torch.cuda.is_bf16_supported():
        return DeviceInfo(f"cuda:{index}", name, "bf16", False, "GPU supports bf16")
    if precision == "bf16":
        raise InputError(
            f"precision 'bf16' was requested but {name} does not support it — use precision "
            "'auto' (fp16 autocast) or 'float32'"
        )
    if not allow_fp16:
        return DeviceInfo(f"cuda:{index}", name, "float32", False, "no bf16 on this GPU")
    return DeviceInfo(f"cuda:{index}", name, "fp16", False, "GPU has no bf16")
