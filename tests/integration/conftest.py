"""A real blksnapd per test: its own state dir, FUSE mount and socket under
the test's tmp_path. Everything it and the test made (mounts, loop devices,
the process) is removed afterwards, even when the test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from blksnap.tools import sandbox
from blksnap.tools.sandbox import Sandbox, why_not

SKIP = why_not()
BIN = sandbox.BIN
Daemon = Sandbox
mounts_under = sandbox.mounts_under
loops_under = sandbox.loops_under


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure show its output in the assertion."""
    out = subprocess.run(list(args), capture_output=True, text=True, check=False, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def cli(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "blksnap"), "--socket", sock, *args, check=check)


def start_daemon(
    root: Path, extra: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Daemon:
    try:
        return sandbox.start(root, extra, env=env)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None


def stop_daemon(d: Daemon) -> None:
    d.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    if SKIP:
        pytest.skip(SKIP)
    # Short paths: loop backing file names are truncated at 64 characters
    # in some tools' output.
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))


@pytest.fixture
def nbd_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that also serves NBD on ``<tmp>/nbd.sock`` (``daemon.nbd``)."""
    if SKIP:
        pytest.skip(SKIP)
    nbd = str(tmp_path / "nbd.sock")
    d = start_daemon(tmp_path, ["--nbd", f"unix:{nbd}"])
    d.nbd = nbd
    try:
        yield d
    finally:
        stop_daemon(d)
        assert not os.path.exists(nbd), "NBD socket left behind"
        assert not mounts_under(str(tmp_path)), mounts_under(str(tmp_path))
        assert not loops_under(str(tmp_path)), loops_under(str(tmp_path))


@pytest.fixture
def backing(tmp_path: Path) -> Callable[[str, int], str]:
    def make(name: str, size: int) -> str:
        path = tmp_path / "backing" / name
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    return make


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
