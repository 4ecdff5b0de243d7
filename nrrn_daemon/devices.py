"""Which device runs the network, what it is called, and at which precision.

``auto`` prefers CUDA and falls back to the CPU (and says so: :attr:`DeviceInfo.cpu_fallback`);
an explicit ``cuda`` on a machine without one is an error, not a silent fallback.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError


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
        ``"float32"`` on the CPU; ``"bf16"`` (where supported) or ``"fp16"`` autocast on CUDA.
    cpu_fallback
        True when ``auto`` found no CUDA device and chose the CPU.
    """

    device: str
    name: str
    precision: str
    cpu_fallback: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype on CUDA, ``None`` for plain float32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), or the best platform guess."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    if match:
        return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_device(request: str = "auto") -> DeviceInfo:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a :class:`DeviceInfo`.

    Raises
    ------
    InputError
        For an unknown device name, or CUDA requested where none is available.
    """
    request = request.strip().lower()
    if request == "cpu":
        return DeviceInfo("cpu", cpu_model(), "float32", cpu_fallback=False)
    if request == "auto":
        if torch.cuda.is_available():
            return _cuda(torch.cuda.current_device())
        return DeviceInfo("cpu", cpu_model(), "float32", cpu_fallback=True)
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
    return _cuda(index)


def _cuda(index: int) -> DeviceInfo:
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), precision, False)
