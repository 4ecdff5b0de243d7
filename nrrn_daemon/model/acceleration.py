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
model falls back to eager execution, logged once per process with the cause, and the call is
re-run: results are the same, only slower.

**The compile cache heals.** Compiled kernels are cached on disk in the daemon's own folder,
versioned by torch and Python (:func:`compile_cache_dir`; ``NRRN_COMPILE_CACHE`` sets its
parent). A process killed while compiling (power cut, OOM kill, ``kill -9`` during the warm-up)
can leave a truncated kernel library behind, which inductor would load at every later start and
fail on ("main.so: file too short"). So the first compilation of each process first removes
kernel libraries that are not whole (:func:`heal_compile_cache`: an ELF file shorter than its
own section table says, or whose program and section tables were never written), and a
compilation that still fails, with a compiler present, on a cache inherited from earlier
processes (or on an entry that names itself damaged: an ``ImportError``/``EOFError``/unpickling
error naming a file in the cache) clears the cache and compiles once more before giving up.
Not every damaged entry names itself: a damaged library of the CPU probe inductor builds in the
cache shows as a C++ compile error of good kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
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
CACHE_ENV = "NRRN_COMPILE_CACHE"
"""Environment variable naming the parent of the daemon's compile cache folder."""
_cache_dir: Path | None = None
"""The cache folder this process compiles into, once chosen (and healed) by the first compile."""
_cache_inherited = False
"""Whether that folder held entries of earlier processes when this one first compiled."""
_cache_cleared = False
"""Whether this process has cleared the cache and compiled again already (done at most once)."""


def compile_cache_dir() -> Path:
    """The daemon's own compile cache: ``<parent>/torch-<version>-py<major.minor>``.

    The parent is ``$NRRN_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/nrrn-daemon/inductor``
    (``~/.cache/nrrn-daemon/inductor``). One folder per torch and Python version, so that an
    upgrade never meets kernels of another build; nothing else writes there.
    """
    parent = os.environ.get(CACHE_ENV)
    if not parent:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        parent = os.path.join(xdg, "nrrn-daemon", "inductor")
    version = torch.__version__.replace("+", "_")
    return Path(parent) / f"torch-{version}-py{sys.version_info.major}.{sys.version_info.minor}"


def _use_compile_cache() -> Path:
    """Point inductor at :func:`compile_cache_dir` and heal it, once per process."""
    global _cache_dir
    if _cache_dir is None:
        folder = compile_cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by inductor at each use
        heal_compile_cache(folder)
        global _cache_inherited
        _cache_inherited = folder.is_dir() and any(folder.iterdir())
        _cache_dir = folder
    return _cache_dir


def elf_is_whole(path: Path) -> bool:
    """Whether an ELF file is as long as its header says and its tables were written.

    A linker killed mid-write leaves an empty or short file (``dlopen`` then fails with "file
    too short"), or, where it sized the file first and maps it (gold, lld, mold), a file of full
    length whose unwritten pages are zeros: then the program header table has no loadable
    segment, or the section naming the sections is not a string table. Anything that is not ELF
    at all counts as damaged too.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit
        if len(data) < 64:
            return False
        phoff, shoff = struct.unpack_from(order + "QQ", data, 0x20)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(order + "5H", data, 0x36)
    else:
        phoff, shoff = struct.unpack_from(order + "II", data, 0x1C)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(order + "5H", data, 0x2A)
    if shoff + shentsize * shnum > len(data) or phoff + phentsize * phnum > len(data):
        return False
    pt_load = 1
    segments = (
        struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] for i in range(phnum)
    )
    if phentsize < 4 or pt_load not in segments:
        return False
    sht_strtab = 3
    if shnum and (shstrndx >= shnum or shentsize < 8):
        return False
    return not shnum or (
        struct.unpack_from(order + "I", data, shoff + shstrndx * shentsize + 4)[0] == sht_strtab
    )


def heal_compile_cache(folder: Path) -> list[Path]:
    """Remove kernel libraries (``*.so``) under ``folder`` that are not whole; return them.

    Inductor compiles a missing library again, so removing a damaged one is enough. Libraries
    being written by a live process are only ever missing, never short: inductor's builds run
    under a per-kernel file lock and the library is whole once the lock is released; a short
    one was left by a killed process.
    """
    if not folder.is_dir():
        return []
    damaged = [p for p in folder.rglob("*.so") if p.is_file() and not elf_is_whole(p)]
    for path in damaged:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if damaged:
        log.warning(
            "removed %d damaged compiled kernel(s) from %s, left by a compilation that was "
            "interrupted (a kill or power cut at start-up); they are compiled again",
            len(damaged),
            folder,
        )
    return damaged


def clear_compile_cache(folder: Path) -> None:
    """Delete the compile cache folder and inductor's in-memory caches (compiled again later).

    The in-memory ones include inductor's verdicts on the CPU's vector instructions: it decides
    them by building and loading a small library in the cache, so a damaged one makes it believe
    the CPU has none, and the kernels cached for it then fail to compile ("'at::vec' has not
    been declared") until that verdict is taken again.
    """
    from torch._inductor import cpu_vec_isa  # late: inductor is heavy to import
    from torch._inductor.utils import clear_caches

    aside = folder.with_name(f"{folder.name}.cleared-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        folder.rename(aside)  # atomic: no process sees a half-deleted cache
    shutil.rmtree(aside, ignore_errors=True)
    clear_caches()
    for owner in [cpu_vec_isa, *(v for v in vars(cpu_vec_isa).values() if isinstance(v, type))]:
        for value in vars(owner).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
    torch._dynamo.reset()


CACHE_DAMAGE_ERRORS = ("file too short", "invalid elf header", "ran out of input", "truncated")
"""Error texts of a damaged cache entry (a short library, a cut pickle), as opposed to a compiler
that is missing or fails on good input."""


def is_cache_damage(exc: BaseException, folder: Path | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) comes from a damaged cache entry."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        names_cache = folder is not None and str(folder).lower() in text
        if isinstance(exc, ImportError | EOFError) and names_cache:
            return True
        if type(exc).__name__ == "UnpicklingError" or (
            names_cache and any(marker in text for marker in CACHE_DAMAGE_ERRORS)
        ):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


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
                _use_compile_cache()
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
    A failure caused by a damaged cache entry clears the cache and compiles once more (see the
    module docstring). Out-of-memory errors are not compilation failures: they propagate (the
    Denoiser retries with smaller tiles). An error of the eager re-run propagates too: it is a
    real one.
    """
    global _cache_cleared
    if not (isinstance(model, NRRN) and model.compiled):
        return call(*args)
    try:
        return call(*args)
    except OOM_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - logged once, then eager; a real error re-raises
        if not _worth_clearing(exc):
            _give_up_compiling(model, exc)
            return call(*args)
        assert _cache_dir is not None  # set by the compile that failed
        log.warning(
            "compiling failed with the compile cache %s %s (%s): cleared it, compiling again",
            _cache_dir,
            "damaged" if is_cache_damage(exc, _cache_dir) else "left by earlier runs",
            _reason(exc),
        )
        _cache_cleared = True
        clear_compile_cache(_cache_dir)
        model.compile_branches()
    try:
        return call(*args)
    except OOM_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - second failure: eager, with the real cause
        _give_up_compiling(model, exc)
    return call(*args)


def _worth_clearing(exc: BaseException) -> bool:
    """Whether a compile failure may come from the cache: clear it and compile once more.

    A damaged entry says so in some failures (a short library, a cut pickle), not in all: a
    damaged library inductor uses to probe the CPU turns into a C++ compile error. So any
    failure with a compiler present and a cache inherited from earlier processes is worth one
    more compile on a cleared cache (once per process); without a compiler, nothing is.
    """
    if _cache_cleared or _cache_dir is None or _missing_compiler(exc):
        return False
    return _cache_inherited or is_cache_damage(exc, _cache_dir)


def _missing_compiler(exc: BaseException) -> bool:
    text = str(exc).lower()
    missing = ("command not found", "no such file or directory: 'g++'", "invalidcxxcompiler")
    return any(m in text for m in missing) or not (shutil.which("g++") or shutil.which("c++"))


def _reason(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first_line}".rstrip(": ")


def _advice(exc: BaseException) -> str:
    """What to do about a compilation failure, from its cause."""
    if _missing_compiler(exc):
        return "install a C++ compiler (gcc) to compile it"
    if is_cache_damage(exc, _cache_dir):
        return f"the compile cache stays damaged after clearing it once; delete {_cache_dir}"
    if _cache_cleared:
        return (
            "it failed again on a cleared compile cache, and a C++ compiler is installed, so "
            "this is a torch/inductor error: report it with the log"
        )
    return "a C++ compiler is installed, so this is a torch/inductor error: report it with the log"


def _give_up_compiling(model: NRRN, exc: BaseException) -> None:
    global _compile_failure
    model.uncompile()
    reason = _reason(exc)
    if _compile_failure is None:
        log.warning(
            "torch.compile is not available here (%s): running the network eagerly (same "
            "results, slower); %s",
            reason,
            _advice(exc),
        )
    _compile_failure = reason


def compile_failure() -> str | None:
    """Why compilation failed in this process, or ``None`` (it has not, or was never tried)."""
    return _compile_failure


def reset_compile_failure() -> None:
    """Forget an earlier failure and clearing: the next model compiles again (tests)."""
    global _compile_failure, _cache_cleared
    _compile_failure = None
    _cache_cleared = False
