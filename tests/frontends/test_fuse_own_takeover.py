"""blksnapd's FUSE files taken over by a new server in the middle of an OPEN:
the kernel sends the OPEN the old server read and never answered again, and
the handle the old server had already recorded for it is the one given
back (one handle, released by the one RELEASE the kernel sends), not a
second one that nobody releases and that keeps the device busy."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blksnap
from blksnap.frontends import fuse_proto as p
from blksnap.frontends.fuse_own import OwnFS
from tests.conftest import needs_fuse

MiB = 1 << 20


@needs_fuse
def test_open_resent_after_a_takeover_gets_the_handle_recorded(
    tmp_path: Path, engine: blksnap.Engine, make_file: Callable[..., str]
) -> None:
    disk = make_file(4 * MiB, "a.img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    record = tmp_path / "fuse.json"
    eng = engine
    old = new = None
    opener: threading.Thread | None = None
    entered, die = threading.Event(), threading.Event()
    opened: list[int] = []
    try:
        dev = eng.add_device(disk, name="a")
        old = OwnFS(eng, threads=1, record=str(record))
        old.add_device("a")
        old.mount(str(mnt))
        session = old.session
        assert session is not None
        served = session._slow

        def killed_before_answering_open(req: p.Request) -> Any:
            out = served(req)  # the handle made and recorded ...
            if req.opcode == p.Opcode.OPEN:
                entered.set()  # ... and the server gone before its answer: its
                die.wait(60)  # thread reads nothing more until the unmount
                return None
            return out

        session._slow = killed_before_answering_open  # type: ignore[method-assign]
        opener = threading.Thread(
            target=lambda: opened.append(os.open(mnt / "dev" / "a", os.O_RDWR)), daemon=True
        )
        opener.start()
        assert entered.wait(10), "the OPEN never reached the server"
        rec = json.loads(record.read_text())
        assert list(rec["handles"].values()) == ["dev/a"], rec

        # A new server, from the record, on the same connection.
        new = OwnFS(eng, threads=1, record=str(record), resume=rec)
        new.add_device("a")
        new.adopt(str(mnt), [os.dup(session.fds[0])], initialized=True)
        opener.join(10)
        assert opened, "the resent OPEN was not answered"
        assert new.open_count(dev) == 1
        after = json.loads(record.read_text())
        assert after["handles"] == rec["handles"], after
        # The handle works, and the one RELEASE the kernel sends frees it.
        os.pwrite(opened[0], b"x" * 4096, 8192)
        assert os.pread(opened[0], 4096, 8192) == b"x" * 4096
        os.close(opened.pop())
        for _ in range(100):
            if new.open_count(dev) == 0:
                break
            threading.Event().wait(0.05)
        assert new.open_count(dev) == 0
        assert json.loads(record.read_text())["handles"] == {}
    finally:
        for fd in opened:
            os.close(fd)
        if new is not None:
            new.close()
        die.set()
        if opener is not None:
            opener.join(10)
        if old is not None and old.session is not None:
            old.session.mounted = False  # (unmounted by the new server)
            old.close()
