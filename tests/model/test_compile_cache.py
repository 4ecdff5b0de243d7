"""The compile cache heals: a kill during the warm-up's compilation does not slow every later start.

The fault (issue 14): the daemon killed while inductor built its kernels left a zero-byte
``main.so`` in the cache; every later start then failed to load it ("file too short") and ran
eagerly, advising to install a compiler that was there. Here a real process compiles into a real
cache folder, the artefacts the kill leaves are written (every kernel library cut to zero bytes,
or to half), and a new process starts on that cache: it compiles, and its pixels are the first
process's. The libraries are real ones built by the system's C compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nrrn_daemon.model import acceleration

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler on this machine: torch.compile cannot build kernels here",
)

START = r"""
import json, logging, sys
import numpy as np, torch
from nrrn_daemon.model import acceleration
from nrrn_daemon.model.checkpoints import Checkpoint, Normalisation
from nrrn_daemon.model.denoise import Denoiser
from nrrn_daemon.model.nrrn import NRRN

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
torch.set_num_threads(1)
torch.manual_seed(0)
ckpt = Checkpoint.from_model(NRRN(1, 4), Normalisation("slice"))
den = Denoiser(ckpt, device="cpu", tile=None, precision="float32", compile="on")
den.warm_up()
rng = np.random.default_rng(1)
images = [rng.integers(0, 255, (40, 48), dtype=np.uint8) for _ in range(3)]
out = den.denoise(images[0], images[1:])
np.save(sys.argv[1], out)
print(json.dumps({"compiled": den.compiled, "failure": acceleration.compile_failure(),
                  "cache": str(acceleration.compile_cache_dir())}))
"""


def start(cache_parent: Path, out: Path) -> tuple[dict, str]:
    """One daemon-like start in a fresh process: compile, warm up, denoise one fixed triplet."""
    env = dict(os.environ, NRRN_COMPILE_CACHE=str(cache_parent), OMP_NUM_THREADS="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", START, str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def start_eager(out: Path):
    """The same start without compiling: the pixels a compiled start must give."""
    import numpy as np

    done = subprocess.run(
        [sys.executable, "-c", START.replace('compile="on"', 'compile="off"'), str(out)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def only_tables(data: bytes) -> bytes:
    """A 64-bit ELF library whose header, program and section tables were written, nothing else
    (the pages a linker that maps its output had not filled when it was killed)."""
    import struct

    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<4H", data, 0x36)
    out = bytearray(len(data))
    for start, end in (
        (0, 64),
        (phoff, phoff + phentsize * phnum),
        (shoff, shoff + shentsize * shnum),
    ):
        out[start:end] = data[start:end]
    return bytes(out)


def libraries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.so") if p.is_file())


def build_library(folder: Path, name: str) -> Path:
    """A real shared library from the system's C compiler."""
    source = folder / f"{name}.c"
    source.write_text("int answer(void) { return 42; }\n")
    lib = folder / f"{name}.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", "-o", lib, source], check=True)
    return lib


@needs_cc
def test_heal_removes_only_libraries_a_kill_cut_short(tmp_path: Path) -> None:
    whole = build_library(tmp_path, "whole")
    data = whole.read_bytes()
    empty = tmp_path / "sub" / "empty.so"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    half = tmp_path / "sub" / "half.so"
    half.write_bytes(data[: len(data) // 2])
    short = tmp_path / "short.so"
    short.write_bytes(data[:-1])  # one byte missing: the section table is cut
    unwritten = tmp_path / "unwritten.so"  # a mapping linker killed: full length, zeros
    unwritten.write_bytes(data[:64] + bytes(len(data) - 64))
    bodiless = tmp_path / "bodiless.so"  # its tables written, not its contents: looks whole
    bodiless.write_bytes(only_tables(data))
    assert acceleration.elf_is_whole(whole) and acceleration.elf_is_whole(bodiless)
    assert not any(acceleration.elf_is_whole(p) for p in (empty, half, short, unwritten))
    removed = acceleration.heal_compile_cache(tmp_path)
    assert sorted(removed) == sorted([empty, half, short, unwritten])
    bodiless.unlink()
    assert libraries(tmp_path) == [whole]
    assert acceleration.heal_compile_cache(tmp_path / "absent") == []


def test_the_cache_folder_is_the_daemons_own_and_versioned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setenv(acceleration.CACHE_ENV, str(tmp_path))
    folder = acceleration.compile_cache_dir()
    assert folder.parent == tmp_path
    assert torch.__version__.replace("+", "_") in folder.name
    assert f"py{sys.version_info.major}.{sys.version_info.minor}" in folder.name
    monkeypatch.delenv(acceleration.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert acceleration.compile_cache_dir().parent == tmp_path / "xdg" / "nrrn-daemon" / "inductor"


def test_a_damaged_cache_entry_is_told_from_a_missing_compiler(tmp_path: Path) -> None:
    cache = tmp_path / "torch-x-py3"
    lib = cache / "ab" / "main.so"
    try:  # the real error of loading a cut library
        lib.parent.mkdir(parents=True)
        lib.write_bytes(b"")
        import ctypes

        ctypes.CDLL(str(lib))
    except OSError as exc:
        load_error = ImportError(str(exc))
    else:  # pragma: no cover - a loader that accepts an empty file
        pytest.fail("an empty library loaded")
    assert "too short" in str(load_error) or "header" in str(load_error).lower()
    assert acceleration.is_cache_damage(load_error, cache)
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = load_error
    assert acceleration.is_cache_damage(wrapped, cache), "inductor wraps the import error"
    missing = OSError("CppCompileError: C++ compile error: g++: command not found")
    assert not acceleration.is_cache_damage(missing, cache)
    assert not acceleration.is_cache_damage(ImportError("no module named x"), cache)


@needs_cc
@pytest.mark.parametrize("cut", ["empty", "half"])
def test_a_start_after_a_kill_mid_compile_compiles_with_the_same_pixels(
    tmp_path: Path, cut: str
) -> None:
    first, _ = start(tmp_path / "cache", tmp_path / "first.npy")
    if not first["compiled"]:
        pytest.skip(f"torch.compile cannot run here: {first['failure']}")
    built = libraries(Path(first["cache"]))
    assert built, "the compiled kernels are cached in the daemon's folder"
    for lib in built:  # what a kill of the linker leaves
        data = lib.read_bytes()
        lib.write_bytes(b"" if cut == "empty" else data[: len(data) // 2])

    second, log = start(tmp_path / "cache", tmp_path / "second.npy")
    assert second["compiled"] and second["failure"] is None, log
    assert "install a C++ compiler" not in log
    assert f"removed {len(built)} damaged compiled kernel" in log, log
    import numpy as np

    np.testing.assert_array_equal(np.load(tmp_path / "second.npy"), np.load(tmp_path / "first.npy"))
    assert all(acceleration.elf_is_whole(p) for p in libraries(Path(first["cache"])))


@needs_cc
def test_a_damaged_entry_the_heal_cannot_see_is_cleared_and_compiled_again(tmp_path: Path) -> None:
    """The second line of defence: kernel libraries whose tables were written, not their contents.

    A linker that maps its output (gold, lld, mold) sizes the file first and fills it in; killed
    after writing the ELF header, program and section tables, it leaves a file the start-up heal
    keeps (it looks whole). Inductor then fails on it: a C++ compile error where the damaged one
    is its CPU probe, an import error for a kernel. The compile must clear the cache, compile once
    more, say why, and give the first process's pixels (and the eager ones, within the float
    rounding of fused kernels). The damage is done between two processes: damaging a library the
    running process has mapped kills it (SIGBUS).
    """
    first, _ = start(tmp_path / "cache", tmp_path / "first.npy")
    if not first["compiled"]:
        pytest.skip(f"torch.compile cannot run here: {first['failure']}")
    cache = Path(first["cache"])
    built = libraries(cache)
    assert built, "the compiled kernels are cached in the daemon's folder"
    for lib in built:
        lib.write_bytes(only_tables(lib.read_bytes()))
        assert acceleration.elf_is_whole(lib), "the heal cannot tell this damage"

    second, log = start(tmp_path / "cache", tmp_path / "second.npy")
    assert second["compiled"] and second["failure"] is None, log
    assert f"compiling failed with the compile cache {cache}" in log, log
    assert "cleared it, compiling again" in log
    assert "damaged compiled kernel" not in log, "the heal did not act: the retry did"
    assert "install a C++ compiler" not in log and "not available here" not in log, log
    import numpy as np

    eager = start_eager(tmp_path / "eager.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "second.npy"), np.load(tmp_path / "first.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "second.npy"), eager, atol=1)
    rebuilt = libraries(cache)
    assert rebuilt and all(lib.read_bytes()[64:128] != bytes(64) for lib in rebuilt)
    assert not list(cache.parent.glob("*.cleared-*")), "the cleared cache is not left beside it"
