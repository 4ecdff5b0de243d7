"""The package layout keeps its promises: layers, no import cycle, no private name shared.

The layers are import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``): a stage
imports only the stages below it (``model`` knows nothing of ``daemon``, ``store`` nothing of
``cli``). Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

import nrrn_daemon

PACKAGE = Path(nrrn_daemon.__file__).parent
REPO = PACKAGE.parent


def _modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    )


def test_the_layer_contracts_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True)
    assert exit_code == 0, capsys.readouterr().out


def test_there_is_no_import_cycle() -> None:
    graph = grimp.build_graph("nrrn_daemon", exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


def test_no_private_name_is_imported_from_another_module() -> None:
    shared = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nrrn_daemon"):
                shared += [
                    f"{path.relative_to(REPO)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert shared == []


def test_every_module_is_in_the_readmes_how_it_works_table() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## How it works", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+\.py)`", section))
    files = [
        str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
        if p.name not in ("__init__.py", "__main__.py")
    ]  # fmt: skip
    assert [f for f in files if f not in named] == [], "modules missing from 'How it works'"
    stale = sorted(n for n in named - set(files) if "/" in n and not n.startswith("tests/"))
    assert stale == [], "'How it works' names modules that do not exist"


@pytest.mark.parametrize("module", [m for m in _modules() if not m.endswith("__main__")])
def test_every_module_imports_on_its_own(module: str) -> None:
    """Each module imports by itself (catches an import that only works after another)."""
    __import__(module)
