"""A worker taking over a live FUSE connection rebuilds its devices before it
serves its own mount: nothing on that path may touch the mount (a stat of it
waits for an answer only that worker could give). Here the mount's
connection is never served at all (INIT unanswered: every request on it
waits), which is what the worker's own mount looks like to it then."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from blksnap.engine.engine import Engine
from blksnap.frontends.fuse_session import mount_fuse, umount
from tests.conftest import needs_fuse


@needs_fuse
def test_adding_a_device_never_touches_the_unserved_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    backing = tmp_path / "a.img"
    backing.write_bytes(bytes(1 << 20))
    fd = mount_fuse(str(mnt))
    done = threading.Event()
    errors: list[BaseException] = []
    try:
        eng = Engine(tmp_path / "state")
        eng.served_root = str(mnt)

        def rebuild() -> None:
            try:
                eng.add_device(str(backing), "a")
                eng.attach("a")
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=rebuild, daemon=True)
        t.start()
        finished = done.wait(10)
    finally:
        os.close(fd)  # the only fd: the connection ends, a stuck stat returns
        umount(str(mnt), lazy=True)
    assert finished, "adding a device waited on the unserved FUSE mount"
    assert not errors, errors
    eng.close()
