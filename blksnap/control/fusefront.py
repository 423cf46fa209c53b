"""blksnapd's FUSE session, either kind: mount, serve, notice its end, unmount.

``pyfuse3`` (the default): :class:`~blksnap.frontends.fuse.BlksnapFS`, served
by ``pyfuse3.main`` on the daemon's trio event loop. ``own`` (opt-in,
``--fuse own``): :class:`~blksnap.frontends.fuse_own.OwnFS`, served by
reader threads outside trio; a task of the loop watches them.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from blksnap.engine.engine import Engine
from blksnap.errors import InvalidArgument
from blksnap.settings import SETTINGS

log = logging.getLogger("blksnapd")

#: The FUSE sessions blksnapd can serve its files with (``--fuse``).
FUSE_SESSIONS = ("pyfuse3", "own")


class FuseFront:
    """The FUSE files of one daemon: ``fs`` has the tree methods the daemon
    calls (``add_device`` ... ``open_count``)."""

    def __init__(
        self, engine: Engine, mount: str, kind: str, *, threads: int, direct_io: bool
    ) -> None:
        if kind not in FUSE_SESSIONS:
            raise InvalidArgument(f"--fuse must be one of {', '.join(FUSE_SESSIONS)}: {kind}")
        self.kind = kind
        self.mount = mount
        self.fs: Any
        if kind == "own":
            from blksnap.frontends.fuse_own import OwnFS

            if not direct_io:
                log.warning("--no-direct-io: the own FUSE session always serves direct I/O")

            self.fs = OwnFS(engine, threads=threads)
        else:
            from blksnap.frontends.fuse import BlksnapFS

            self.fs = BlksnapFS(engine, threads=threads, direct_io=direct_io)

    def ended_why(self) -> str:
        return (
            "the FUSE session ended (connection aborted or mount removed): "
            f"{self.mount} no longer serves the devices; 'blksnap daemon stop' clears it"
        )

    def alive(self) -> bool:
        """The own session: are its reader threads all serving? (pyfuse3's
        end is noticed by :meth:`serve` returning.)"""
        return self.kind != "own" or self.fs.alive()

    def mount_fs(self) -> None:
        if self.kind == "own":
            self.fs.mount(self.mount)
            return
        import pyfuse3

        from blksnap.frontends.fuse import mount_options

        pyfuse3.init(self.fs, self.mount, mount_options())

    async def serve(self, stopping: trio.Event) -> str | None:
        """Until the session ends; why it ended while the daemon was not
        stopping (None if it was). pyfuse3's main loop returns when the
        kernel ends the session (an abort through
        /sys/fs/fuse/connections/N/abort, the mount taken away) and may raise
        on a read error of /dev/fuse; the own session's threads end then.
        Either way the daemon keeps answering its control socket, so that
        ``daemon status`` can say what is wrong and ``daemon stop`` can clear
        the dead mount."""
        if self.kind == "own":
            while self.fs.alive():
                await trio.sleep(SETTINGS.fuse_watch_seconds)
        else:
            import pyfuse3

            # Idle pyfuse3 tasks: requests handed to the worker pool each hold
            # one, and creating tasks per request costs (bench: +28%).
            try:
                await pyfuse3.main(SETTINGS.fuse_idle_tasks, SETTINGS.fuse_max_tasks)
            except Exception as exc:
                return f"the FUSE session failed: {exc!r}"
        return None if stopping.is_set() else self.ended_why()

    def unmount(self) -> None:
        """Unmount; the own session also joins its reader threads here."""
        if self.kind == "own":
            self.fs.close()
            return
        import pyfuse3

        pyfuse3.close(unmount=True)

    def close(self) -> None:
        """After :meth:`unmount`: pyfuse3's worker threads joined."""
        if self.kind != "own":
            self.fs.close()
