"""``benchmarks/gpu.py`` cannot rot: its dry run (every part, on the CPU, small sizes) runs here.

GPU time is rare and short (issue 16): the script must work the first time a GPU is at hand.
The dry run goes through the same code as the GPU run — the slice table, the daemon overhead,
fine-tuning, live latency during a fine-tune, the reports — with 1-BU models; its numbers mean
nothing and nothing is judged. The FLOP count it reports for the network's convolutions is
checked against the count written out by hand from the architecture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nrrn_daemon.model.nrrn import NRRNConfig

REPO = Path(__file__).resolve().parents[1]


def conv_flops_per_pixel(blocks: int, features: int) -> int:
    """By hand: a 3×3 conv from cin to cout costs 2·9·cin·cout FLOPs per pixel. A triplet runs
    the 1→H stem on three images; each of its two branches runs W_1 once, then per BU but the
    last W_{u,r,c} (H→3H), the fused V_{u,r}+W_1 (H→3H) and V_c (H→H), in the last BU V_{u,r}
    (H→2H), W_{u,r,c} and V_c, and the tail (H→H): 7·blocks + 1 H→H convs a branch."""
    h = features
    return 3 * 2 * 9 * h + 2 * (7 * blocks + 1) * 2 * 9 * h * h


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), done.stdout


def test_the_dry_run_measures_every_part_without_failing(dry_run) -> None:
    report, _, stdout = dry_run
    assert report["dry_run"] and report["machine"]["device"] == "cpu"
    assert stdout.startswith("[gpu.py] device: "), "the device is named before anything runs"
    assert report["failures"] == [] and report["not_run"] == []
    assert {r["model"] for r in report["rows"]} == {"paper", "base"}
    for row in report["rows"]:
        for part in ("read_s", "transfer_s", "model_s", "write_s"):
            assert row[part] > 0, (row["label"], part)
        assert row["slice_s"] >= row["read_s"] + row["model_s"] + row["write_s"]
        assert row["tflop_per_slice"] >= 0 and row["oom_retries"] == 0
    overhead = report["daemon_overhead"]
    assert overhead["outputs"] == overhead["slices"] and overhead["stop"] == "benchmark complete"
    assert overhead["alone_s"] > 0 and overhead["daemon_s"] > 0
    (finetune,) = report["finetune"]
    assert finetune["steps"] > 0 and finetune["steps_per_s"] > 0
    latency = report["live_latency"]
    assert latency["idle"] and latency["busy"], "slices were denoised idle and during a fine-tune"
    assert all(t["met"] is None for t in report["targets"]), "a dry run judges nothing"


def test_the_flops_are_those_of_the_networks_convolutions(dry_run) -> None:
    report, _, _ = dry_run
    for model in report["models"].values():
        expected = conv_flops_per_pixel(model["blocks"], model["features"])
        assert model["conv_flop_per_pixel"] == expected
    # The shapes the GPU run measures: the paper's 4 × 64 and the base's 4 × 32.
    gpu = import_gpu()
    for blocks, features in ((4, 64), (4, 32), (5, 16)):
        counted = gpu.conv_flops_per_pixel(NRRNConfig(blocks, features))
        assert counted == conv_flops_per_pixel(blocks, features), (blocks, features)
        assert gpu.conv_flops_per_pixel(NRRNConfig(blocks, features), neighbours=1) < counted


def test_the_markdown_says_it_is_a_dry_run_and_names_every_part(dry_run) -> None:
    _, text, _ = dry_run
    assert "dry run on the CPU: the numbers mean nothing" in text
    for part in ("| setting |", "Daemon overhead", "Fine-tune", "Live latency", "| target |"):
        assert part in text, part


def import_gpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu


@pytest.mark.parametrize(
    ("gpu_name", "denoise_s", "fraction", "met"),
    [
        ("NVIDIA H100 80GB HBM3", 0.42, 0.45, (True, True)),
        ("NVIDIA H200", 0.61, 0.31, (False, False)),
        ("NVIDIA RTX A6000", 0.9, 0.5, (None, None)),  # not H100 class: reported, not judged
    ],
)
def test_the_targets_are_judged_on_an_h100_class_gpu_only(
    dry_run, gpu_name, denoise_s, fraction, met
) -> None:
    """The verdicts of a GPU run, from the dry run's report made to look like one."""
    gpu = import_gpu()
    report = json.loads(json.dumps(dry_run[0]))
    report.update(dry_run=False, datasheet_bf16_tflops=gpu.datasheet_peak(gpu_name, None))
    report["machine"].update(gpu=gpu_name, driver="580.0", gpu_memory_gib=80.0)
    for row in report["rows"]:
        row.update(precision_used="bf16", denoise_s=denoise_s, fraction_of_peak=fraction,
                   peak_gpu_gib=12.5)  # fmt: skip
    targets = {t["target"]: t["met"] for t in gpu.judge(report)}
    assert targets["4 BU × 64 triplet < 0.5 s (denoise, H100 class)"] is met[0]
    assert targets["≥ 40 % of dense bf16 peak (model)"] is met[1]
    report["targets"] = gpu.judge(report)
    text = gpu.markdown(report)
    assert gpu_name in text and f"{100 * fraction:.0f} %" in text and "12.5" in text


def test_the_datasheet_table_tells_similar_names_apart() -> None:
    gpu = import_gpu()
    assert gpu.datasheet_peak("NVIDIA H100 PCIe", None) == 756.0
    assert gpu.datasheet_peak("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu.datasheet_peak("NVIDIA A10", None) == 125.0
    assert gpu.datasheet_peak("NVIDIA L4", None) == 121.0
    assert gpu.datasheet_peak("NVIDIA L40S", None) == 362.1
    assert gpu.datasheet_peak("Some Future GPU", None) is None
    assert gpu.datasheet_peak("Some Future GPU", 500.0) == 500.0


def test_without_a_gpu_the_real_run_says_so_in_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real run would start")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert "Traceback" not in done.stderr
