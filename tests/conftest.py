"""Shared fixtures: real files on disk and an engine that is always closed."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import blksnap


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., str]:
    """Create a sparse backing file of ``size`` bytes (optionally with data)."""
    counter = iter(range(10_000))

    def make(size: int, name: str | None = None, data: bytes | None = None) -> str:
        path = tmp_path / (name or f"disk{next(counter)}.img")
        with open(path, "wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
        return str(path)

    return make


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[blksnap.Engine]:
    eng = blksnap.Engine(tmp_path / "state")
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def storage_dir(tmp_path: Path) -> str:
    path = tmp_path / "diff"
    path.mkdir()
    return str(path)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def open_fd_targets() -> list[str]:
    """What this process's open descriptors point at (``/proc/self/fd``)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # (the listing's own descriptor, gone)
            continue
    return out


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Counting this process's descriptors: the garbage collected first and
    the collector off meanwhile, so that no earlier test's object, freed by
    it, closes descriptors of its own in between."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def kill_engine(eng: blksnap.Engine) -> None:
    """Leave ``eng`` as a killed blksnapd worker leaves its state: nothing
    written (no clean checkpoint, no intent cleared), its checkpoint thread
    stopped, its devices' files closed as the kernel closes a dead
    process's: an abandoned engine then neither writes again nor holds
    descriptors and memory for the rest of the run."""
    eng._stop_checkpoints.set()
    eng._closed = True
    if eng._checkpointer is not None:  # (before its files close: numbers get reused)
        eng._checkpointer.join()
    for dev in eng.devices():
        trk = eng.tracker_of(dev.name)
        if trk is not None and trk.cbt.intent is not None:
            trk.cbt.intent.close()
        dev.backing.close()


#: Tests that mount FUSE themselves (the integration tests skip through the sandbox).
needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mounting FUSE needs root and /dev/fuse",
)
