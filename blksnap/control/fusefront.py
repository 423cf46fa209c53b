"""blksnapd's FUSE files: mount, serve, notice the session's end, unmount.

The files are :class:`~blksnap.frontends.fuse_own.OwnFS`, served by reader
threads of blksnapd's own FUSE session outside the trio event loop; a task of
the loop watches the threads, so that the daemon notices a connection the
kernel ended (an abort, the mount taken away) and says so in its status.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from blksnap import shortway
from blksnap.engine.engine import Engine
from blksnap.frontends.fuse_own import OwnFS
from blksnap.settings import SETTINGS

log = logging.getLogger("blksnapd")

#: In the state dir: the node ids and open file handles of the FUSE files
#: (:meth:`blksnap.frontends.fuse_own.OwnFS.record`).
FUSE_RECORD = "fuse-nodes.json"


class FuseFront:
    """The FUSE files of one daemon: ``fs`` has the tree methods the daemon
    calls (``add_device`` ... ``open_count``)."""

    def __init__(
        self,
        engine: Engine,
        mount: str,
        state_dir: str,
        *,
        threads: int,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.mount = mount
        self.threads = threads
        record = os.path.join(state_dir, FUSE_RECORD)
        self.fs = OwnFS(engine, threads=threads, record=record, resume=resume)
        if self.fs.short_way:
            log.info("devices' reads and writes: the compiled short way")
        else:
            log.warning("devices' reads and writes: Python only (%s): several times slower",
                        shortway.WHY_NOT)  # fmt: skip

    def ended_why(self) -> str:
        return (
            "the FUSE session ended (connection aborted or mount removed): "
            f"{self.mount} no longer serves the devices; 'blksnap daemon stop' clears it"
        )

    def alive(self) -> bool:
        """Are the session's reader threads all serving?"""
        return self.fs.alive()

    def mount_fs(self) -> None:
        self.fs.mount(self.mount)

    def adopt(self, fds: list[int], *, initialized: bool) -> None:
        """Serve the connection the supervisor mounted (its fds)."""
        self.threads = len(fds)
        self.fs.adopt(self.mount, fds, initialized=initialized)

    async def serve(self, stopping: trio.Event) -> str | None:
        """Until the session ends; why it ended while the daemon was not
        stopping (None if it was). The daemon keeps answering its control
        socket then, so that ``daemon status`` can say what is wrong and
        ``daemon stop`` can clear the dead mount."""
        while self.fs.alive():
            await trio.sleep(SETTINGS.fuse_watch_seconds)
        return None if stopping.is_set() else self.ended_why()

    def unmount(self, forced: bool = False) -> None:
        """Unmount (lazily if busy) and join the reader threads. ``forced``
        (``daemon stop --force``): users of the FUSE files may remain, which
        keep the connection, and the reader threads with it, until this
        process and its supervisor have exited (the kernel then fails their
        requests): no use waiting for them."""
        try:
            self.fs.close(timeout=1.0 if forced else 10.0)
        except TimeoutError as exc:
            if not forced:
                raise
            log.warning("%s is still in use (%s): its users get errors once blksnapd "
                        "has exited", self.mount, exc)  # fmt: skip
