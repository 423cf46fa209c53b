"""The layers contract (pyproject.toml, docs/ARCHITECTURE.md): imports only go
down, cli -> tools -> control -> backup -> frontends -> engine -> shared, and
no module imports itself back through others (no import cycle)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run(
        [str(LINT), "--config", str(where / "pyproject.toml"), "--no-cache"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LINT.exists():
        pytest.skip(f"import-linter is not installed ({LINT})")
    where = tmp_path_factory.mktemp("layers")
    shutil.copytree(
        ROOT / "blksnap", where / "blksnap", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", where / "pyproject.toml")
    return where


def test_the_tree_keeps_the_layers(tree_copy: Path) -> None:
    out = lint(tree_copy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("engine/gate.py", "blksnap.frontends.fuse_own"),  # engine -> front-end
        ("errors.py", "blksnap.engine.params"),  # shared -> engine
        ("backup/repo.py", "blksnap.control.client"),  # backup -> control
    ],
)
def test_an_upward_import_breaks_the_contract(
    tree_copy: Path, tmp_path: Path, module: str, upward: str
) -> None:
    where = tmp_path / "tree"
    shutil.copytree(tree_copy, where)
    with open(where / "blksnap" / module, "a") as f:
        f.write(f"\nimport {upward}  # noqa\n")
    out = lint(where)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and upward in out.stdout, out.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v) & modules:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("blksnap", exclude_type_checking_imports=True)
    # The package itself re-exports names lazily: it is not a module of a cycle.
    modules = {m for m in graph.modules if m != "blksnap"}
    assert _cycles(graph, modules) == []
