#!/usr/bin/env bash
# The GPU check in one command (issue 16): install what this machine lacks from the repository's
# own files, run the `cuda` tests, then benchmarks/gpu.py, and leave every result in one folder.
#
#   scripts/gpu_check.sh [RESULTS_DIR]        (default: gpu-results/ in the repository)
#   scripts/gpu_check.sh --download-wheels DIR [PYTHON_VERSION]
#       beforehand, on a machine with network: the wheels of every dependency but torch, for
#       Linux x86-64 and PYTHON_VERSION (default 3.12), into DIR; then NRRN_WHEELS=DIR there.
#
# Environment:
#   PYTHON        the interpreter to start from (default python3). If it already has a CUDA
#                 build of torch, a venv is made on top of it (--system-site-packages) so that
#                 torch is kept; otherwise `pip install torch==2.13.0` takes PyPI's CUDA build.
#   NRRN_WHEELS   a folder of wheels for a machine without network: pip then installs from it
#                 only (--no-index), never from a registry.
#   NRRN_FIB25    the FIB-25 volume, when ../shared/data/fib25/ is not beside the repository;
#                 most `cuda` tests need it and skip (loudly, below) without it.
#   NRRN_TESTS_TIMEOUT, NRRN_BENCH_TIMEOUT   seconds for each part (default 600 and 540).
#   NRRN_DRY_RUN=1   check the script itself on a machine without a GPU: the cuda tests skip and
#                 the benchmark runs with --dry-run (its numbers mean nothing).
#
# Files left in RESULTS_DIR: machine.txt (nvidia-smi, python, pip freeze), install.log,
# cuda-tests.log, cuda-tests.xml (JUnit), gpu-bench.log, gpu.json, gpu.md, summary.txt.
# Exit status: 0 when the install, every cuda test and the benchmark passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ "${1:-}" = "--download-wheels" ]; then
    dir=${2:?"usage: $0 --download-wheels DIR [PYTHON_VERSION]"}
    mapfile -t reqs < <(python3 -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("torch")))')
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
        manylinux_2_5_x86_64 manylinux1_x86_64 linux_x86_64 any; do
        platforms+=(--platform "$p")
    done
    exec python3 -m pip download -d "$dir" --only-binary=:all: --python-version "${3:-3.12}" \
        "${platforms[@]}" "${reqs[@]}" pytest setuptools wheel
fi
RESULTS=$(realpath -m "${1:-gpu-results}")
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
VENV="$REPO/.venv-gpu"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

say() { echo "[gpu_check] $*" | tee -a "$RESULTS/summary.txt"; }
: >"$RESULTS/summary.txt"
say "results in $RESULTS; started $(date -u +%FT%TZ)"

{
    echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "(nvidia-smi not found)"
    echo "== $PY"; "$PY" --version 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"available", torch.cuda.is_available())' 2>&1 || echo "(no torch in $PY)"
} >"$RESULTS/machine.txt"

# -- install -----------------------------------------------------------------------------------
pip_args=(--retries 2 --timeout 30)
if [ -n "${NRRN_WHEELS:-}" ]; then
    pip_args=(--no-index --find-links "$NRRN_WHEELS" --no-build-isolation)
    say "installing from $NRRN_WHEELS only (no registry)"
fi
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    say "$PY has a CUDA torch: venv $VENV on top of it (its torch is kept)"
    venv_args=(--system-site-packages)
    torch_req=()
else
    say "$PY has no CUDA torch: installing torch==2.13.0 (PyPI's Linux wheel is the CUDA build)"
    venv_args=()
    torch_req=(torch==2.13.0)
fi
{
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "${venv_args[@]}" "$VENV"
    # The package itself, its dependencies, and pytest: the cuda tests and the benchmark need
    # nothing of the test extras (bm3d, ome-zarr, ruff).
    "$VENV/bin/python" -m pip install "${pip_args[@]}" "${torch_req[@]}" -e . pytest
} >"$RESULTS/install.log" 2>&1
install_rc=$?
PYV="$VENV/bin/python"
if [ $install_rc -ne 0 ] || ! "$PYV" -c 'import nrrn_daemon, torch, pytest' >>"$RESULTS/install.log" 2>&1; then
    say "INSTALL FAILED (rc $install_rc): see install.log; last lines:"
    tail -n 15 "$RESULTS/install.log" | tee -a "$RESULTS/summary.txt"
    exit 1
fi
"$PYV" -m pip freeze >>"$RESULTS/machine.txt" 2>&1
DRY=${NRRN_DRY_RUN:-0}
bench_args=()
if [ "$DRY" = 1 ]; then
    say "DRY RUN (NRRN_DRY_RUN=1): no GPU needed, nothing measured"
    bench_args=(--dry-run)
elif ! "$PYV" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    say "torch in $VENV sees no CUDA device: nothing to check here (the cuda tests would skip)"
    exit 1
fi
say "$("$PYV" -c 'import torch; c = torch.cuda.is_available(); print("torch", torch.__version__,
"on", torch.cuda.get_device_name(0) if c else "no GPU", "x", torch.cuda.device_count())')"

fib25=${NRRN_FIB25:-"$REPO/../shared/data/fib25/fib25_sample1_250.tif"}
if [ ! -f "$fib25" ]; then
    say "WARNING: FIB-25 volume not found at $fib25 (set NRRN_FIB25): most cuda tests will SKIP"
fi

# -- the cuda tests ----------------------------------------------------------------------------
say "cuda tests ..."
timeout "${NRRN_TESTS_TIMEOUT:-600}" "$PYV" -m pytest tests/cuda -m cuda -v -rA \
    -p no:cacheprovider --junitxml="$RESULTS/cuda-tests.xml" >"$RESULTS/cuda-tests.log" 2>&1
tests_rc=$?
say "cuda tests: rc $tests_rc; $(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' \
    "$RESULTS/cuda-tests.log" | tail -n 1)"

# -- the benchmark -----------------------------------------------------------------------------
say "benchmarks/gpu.py ..."
timeout "${NRRN_BENCH_TIMEOUT:-540}" "$PYV" benchmarks/gpu.py "${bench_args[@]}" --out "$RESULTS" \
    >"$RESULTS/gpu-bench.log" 2>&1
bench_rc=$?
say "benchmark: rc $bench_rc (gpu.md, gpu.json)"
[ -f "$RESULTS/gpu.md" ] && cat "$RESULTS/gpu.md"

say "finished $(date -u +%FT%TZ): install 0, tests $tests_rc, benchmark $bench_rc"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
