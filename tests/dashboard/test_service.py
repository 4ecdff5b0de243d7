"""``systemd/nrrn-dashboard.service``: unprivileged, read-only, network limited; scored by
``systemd-analyze security --offline=true`` where systemd-analyze is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "nrrn-dashboard.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_is_unprivileged_read_only_and_loopback_only():
    s = settings()
    assert s["User"] == ["nrrn"] and "DynamicUser" not in s
    assert s["ProtectSystem"] == ["strict"] and "ReadWritePaths" not in s
    assert "StateDirectory" not in s and "CacheDirectory" not in s  # it writes nowhere
    assert s["CapabilityBoundingSet"] == [""] and s["NoNewPrivileges"] == ["yes"]
    assert s["IPAddressDeny"] == ["any"] and s["IPAddressAllow"] == ["localhost"]
    assert s["SocketBindDeny"] == ["any"] and s["SocketBindAllow"] == ["tcp:8765"]
    assert "nrrn-daemon dashboard" in s["ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_scores_it_safe():
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert score is not None, done.stdout + done.stderr
    assert float(score.group(1)) <= 2.0, done.stdout
