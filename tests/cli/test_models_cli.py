"""`nrrn-daemon finetune` and `nrrn-daemon models`: run by hand, list, promote, roll back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset, one_thread, tiny_parent, write_profile  # noqa: F401
from typer.testing import CliRunner

from nrrn_daemon.cli.app import app
from nrrn_daemon.finetune.runner import request_file
from nrrn_daemon.store.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    signal = rng.integers(60, 190, size=(1, 32, 32)).astype(np.float64)
    noisy = np.clip(signal + rng.normal(0, 20, size=(20, 32, 32)), 0, 255).astype(np.uint8)
    parent = tiny_parent(tmp_path / "parent.pt")
    db = make_dataset(tmp_path, noisy, parent)
    profile = write_profile(tmp_path, parent)
    return {"db": db, "profile": str(profile), "parent": parent}


def cli(*args: str):
    return runner.invoke(app, list(args))


def test_finetune_now_records_and_models_lists_promotes_and_rolls_back(setup) -> None:
    base = ["--profile", setup["profile"], "--db", str(setup["db"])]
    done = cli("finetune", "--now", "--steps", "5", "--minutes", "1", "--json", *base)
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert result["status"] in ("promoted", "rejected") and result["steps"] == 5
    listing = cli("models", "--json", *base)
    assert listing.exit_code == 0, listing.output
    (ds,) = json.loads(listing.output)["datasets"]
    labels = [m["label"] for m in ds["models"]]
    cand = f"ft-{result['candidate_sha256'][:8]}"
    parent = f"model-{result['parent_sha256'][:12]}"
    assert labels == [parent, cand]
    assert ds["finetunes"][0]["status"] == result["status"]
    assert cli("models", *base).exit_code == 0  # the table renders

    assert cli("models", "promote", result["candidate_sha256"][:10], *base).exit_code == 0
    with Store(setup["db"], readonly=True) as store:
        assert store.models()["datasets"][0]["current"] == cand
    back = cli("models", "rollback", *base)
    assert back.exit_code == 0, back.output
    assert parent in back.output
    with Store(setup["db"], readonly=True) as store:
        assert store.models()["datasets"][0]["current"] == parent
    # The parent has no recorded parent: nothing further to roll back to.
    again = cli("models", "rollback", *base)
    assert again.exit_code == 1 and "roll back" in again.output


def test_models_errors_are_one_line(setup) -> None:
    base = ["--profile", setup["profile"], "--db", str(setup["db"])]
    for args in (["promote"], ["promote", "nope"], ["--dataset", "other"]):
        res = cli("models", *args, *base)
        assert res.exit_code == 1, (args, res.output)
        assert "error:" in res.output and "Traceback" not in res.output


def test_finetune_asks_a_running_daemon_and_now_refuses(setup) -> None:
    base = ["--profile", setup["profile"], "--db", str(setup["db"])]
    with Store(setup["db"]) as store:  # a live daemon's run row (recent heartbeat)
        store.start_run(profile_name="ftest", profile_json={}, device="cpu", pid=os.getpid())
    refused = cli("finetune", "--now", *base)
    assert refused.exit_code == 1 and "without --now" in refused.output
    asked = cli("finetune", "--steps", "3", *base)
    assert asked.exit_code == 0, asked.output
    request = json.loads(request_file(setup["db"]).read_text())
    assert request["steps"] == 3
