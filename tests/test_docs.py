"""The README stays true: every command, every option and every profile field is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main

from nrrn_daemon.cli.app import app
from nrrn_daemon.config.loading import profile_field_docs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_every_command_is_documented():
    assert set(COMMANDS) >= {
        "start",
        "status",
        "provenance",
        "profiles",
        "demo",
        "denoise",
        "train",
        "evaluate",
        "metrics",
    }
    for name in COMMANDS:
        assert f"### `nrrn-daemon {name}`" in README, (
            f"README has no section for `nrrn-daemon {name}`"
        )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_documented(name):
    section = README.split(f"### `nrrn-daemon {name}`", 1)[1].split("\n### ", 1)[0]
    for param in COMMANDS[name].params:
        if param.param_type_name == "option" and param.name != "help":
            assert any(opt in section for opt in param.opts), (
                f"{name}: {param.opts} not in its README section"
            )


@pytest.mark.parametrize("field", [f for f, _ in profile_field_docs()])
def test_every_profile_field_is_documented(field):
    leaf = field if "." in field or field in ("name", "description") else None
    if leaf is None:  # a table such as [watch]: its fields are checked one by one
        assert f"`{field}." in README
    else:
        assert f"`{field}`" in README, f"profile field {field} is missing from the README"


def test_the_readme_commands_are_the_ci_commands():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    test_line = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_line.strip() in README
