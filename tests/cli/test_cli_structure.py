"""The shape of the ``blksnap`` command line: one module per command group,
each binding a handler to every command it adds; shared argument helpers and
timeouts from :mod:`blksnap.cli.args` and :data:`blksnap.settings.SETTINGS`;
a start that imports neither numpy nor the backup application."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from blksnap.cli import app
from blksnap.cli.args import TIMEOUT_HELP, call_timeout
from blksnap.settings import SETTINGS

CLI_DIR = Path(app.__file__).resolve().parent


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(argv words, parser) of every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


def test_every_command_has_a_handler() -> None:
    leaves = dict(_leaves(app._parser()))
    assert len(leaves) == 34  # v2: gc, key create, repo upgrade; mount, umount
    assert {("gc",), ("key", "create"), ("repo", "upgrade")} <= set(leaves)
    for words, parser in leaves.items():
        handler = parser.get_default("handler")
        assert callable(handler), words
        # Bound by the command module of its group, never by app itself.
        assert handler.__module__.startswith("blksnap.cli.") and handler.__module__.endswith(
            "_cmd"
        ), (words, handler.__module__)


def test_command_modules_do_not_import_app() -> None:
    for path in CLI_DIR.glob("*.py"):
        if path.name in ("app.py", "__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "blksnap.cli" or n.startswith("blksnap.cli.app") for n in names), (
                path.name,
                names,
            )


def test_no_cli_module_is_too_long() -> None:
    for path in CLI_DIR.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 600, path.name


def _timeout(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: str | None = None):
    if env is None:
        monkeypatch.delenv("BLKSNAP_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("BLKSNAP_TIMEOUT", env)
    parser = app._parser()
    return call_timeout(parser.parse_args(argv), parser)


@pytest.mark.parametrize(
    ("argv", "long"),
    [
        ("version", False),
        ("daemon start", False),
        ("daemon stop", True),
        ("daemon status", False),
        ("device add p -n n", False),
        ("device add p -n n --loop", True),
        ("device remove n", True),
        ("device list", False),
        ("snapshot create -d a", False),
        ("snapshot take -i x", True),
        ("snapshot destroy -i x", True),
        ("snapshot waitevent -i x -t 5", False),
        ("backup -d a --repo r", True),
        ("backups --repo r", False),
        ("restore --repo r -b latest -d a --to p", False),
    ],
)
def test_timeouts_come_from_the_settings(
    argv: str, long: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = SETTINGS.cli_long_timeout if long else SETTINGS.cli_timeout
    assert _timeout(argv.split(), monkeypatch) == want
    assert _timeout(["--timeout", "7", *argv.split()], monkeypatch) == 7.0
    assert _timeout(argv.split(), monkeypatch, env="0") is None  # 0: no limit
    assert _timeout(argv.split(), monkeypatch, env="2.5") == 2.5


def test_timeout_help_names_the_settings() -> None:
    assert f"default {SETTINGS.cli_timeout:g}, {SETTINGS.cli_long_timeout:g} for" in TIMEOUT_HELP


def test_start_imports_no_numpy_nor_backup() -> None:
    code = (
        "import sys, blksnap.cli; "
        "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith("
        "('blksnap.backup', 'blksnap.tools', 'blksnap.frontends'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out
