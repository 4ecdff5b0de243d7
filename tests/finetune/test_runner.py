"""The fine-tune job a profile asks for carries what the child needs, through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from nrrn_daemon.config.loading import load_profile
from nrrn_daemon.finetune.run import FinetuneJob
from nrrn_daemon.finetune.runner import job_for


def test_the_job_carries_the_profiles_frame_thresholds(tmp_path: Path) -> None:
    profile = load_profile(
        "generic", overrides={"frames.blank_std": 2.5, "frames.unrelated_ratio": 0.3}
    )
    job = job_for(
        profile, db=tmp_path / "db.sqlite", dataset="ds", parent="p.pt", models_dir=tmp_path
    )
    back = FinetuneJob(**json.loads(json.dumps(asdict(job))))  # as the child reads it
    assert back.frames is not None
    assert back.frames["blank_std"] == 2.5 and back.frames["unrelated_ratio"] == 0.3
    assert back == job
