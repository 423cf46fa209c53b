"""Knobs outside the engine, in one frozen, documented object.

The engine's tunables are :class:`blksnap.engine.params.Params` (the kernel
module's parameters). Everything else that is a number someone might want
to tune — the front-ends' limits and thread counts, the daemon's waits, the
backup application's read size, the CLI's timeouts — is a field here, with
its default and why. Protocol and on-disk format constants are not knobs:
they stay beside the code that speaks them.

Code reads :data:`SETTINGS` when it needs a value (so a test or an embedder
may pass another :class:`Settings` where a constructor takes one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from blksnap.units import KiB, MiB


def _fuse_threads() -> int:
    return min(16, max(4, 2 * (os.cpu_count() or 1)))


def _nbd_threads() -> int:
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


@dataclass(frozen=True)
class Settings:
    # -- blksnapd -------------------------------------------------------------------
    #: Control socket, FUSE mount and state directory of blksnapd by default.
    socket: str = "/run/blksnap/blksnapd.sock"
    mount: str = "/run/blksnap/mnt"
    state_dir: str = "/var/lib/blksnap"
    #: Worker threads for engine calls of the control socket.
    control_threads: int = 8
    #: A handle closed (or a file system unmounted lazily) just before a
    #: "who uses it" check is released by the kernel a moment later: users
    #: are looked for again for this long before a command refuses (EBUSY).
    users_grace: float = 1.0
    #: ``daemon status`` gives the FUSE data path this long to answer a stat.
    health_timeout: float = 2.0

    # -- FUSE front-end -------------------------------------------------------------
    #: Reader threads of the FUSE session: each serves a request start to
    #: finish, so a copy-on-write write waiting for its chunk holds one.
    #: Twice the CPUs, 4 to 16. Measured (make bench, thread sweep, 2 CPUs),
    #: with the compiled short way: passthrough 4 KiB writes within 3 % from
    #: 2 to 16 threads (every thread reads in C), 0.85 of the best at 32;
    #: first writes under a snapshot (served in Python, one thread at a
    #: time) best at 2 and 32, 0.91 at 4. Kept at 4: spare threads for
    #: requests that wait. (Before it, in Python only: first writes best at 4
    #: in three runs of four, passthrough 16.6k IOPS with 2 threads and 9.1k
    #: with 8, the GIL handed to and fro.)
    fuse_threads: int = field(default_factory=_fuse_threads)
    #: How long the kernel may cache names and attributes of the FUSE files
    #: (changes are pushed to it with invalidation notifications).
    fuse_cache_seconds: float = 60.0
    #: How often blksnapd checks the FUSE session's reader threads.
    fuse_watch_seconds: float = 0.2
    #: ``daemon restart``: how long the old worker waits for its successor to
    #: be started and ready to take over before it goes anyway.
    restart_wait: float = 30.0

    # -- NBD front-end --------------------------------------------------------------
    #: Largest READ/WRITE payload a client may send or ask for.
    nbd_max_payload: int = 32 * MiB
    #: Longest export name or meta context query string.
    nbd_max_string: int = 4096
    #: Largest option payload read whole; larger unknown ones are skipped up to ...
    nbd_max_option_data: int = 64 * KiB
    #: ... this many bytes, after which the connection is dropped.
    nbd_max_option_discard: int = 16 * MiB
    #: Most extents in one BLOCK_STATUS reply.
    nbd_max_extents: int = 1 << 20
    #: Requests and bytes a connection may have in flight before the server
    #: stops reading from it.
    nbd_max_inflight: int = 64
    nbd_max_inflight_bytes: int = 64 * MiB
    #: Worker threads for slow requests (shared by all connections).
    nbd_threads: int = field(default_factory=_nbd_threads)
    #: A request slower than ``nbd_slow_io`` plus its copy at ``nbd_copy_rate``
    #: bytes/s counts against its connection; at ``nbd_slow_score`` the
    #: connection's requests go to the worker pool instead of its reader thread.
    nbd_slow_io: float = 1e-3
    nbd_copy_rate: int = 1 << 30
    nbd_slow_score: int = 8
    #: Socket send buffer asked for per connection.
    nbd_send_buffer: int = 4 * MiB
    #: A client must finish the handshake within this many seconds.
    nbd_handshake_timeout: float = 60.0
    #: At shutdown, requests in flight get this long to be answered.
    nbd_shutdown_grace: float = 10.0

    # -- backup application ---------------------------------------------------------
    #: A backup reads the image in runs of adjacent changed blocks up to
    #: this size, with this many reader threads.
    backup_read_size: int = 4 * MiB
    backup_read_threads: int = 4
    #: zstd level of stored blocks (1: fast, and most of the gain).
    backup_zstd_level: int = 1
    #: The chunks a backup stores are flushed to disk in the background every
    #: this many bytes (and all of them before it publishes).
    backup_writeback_step: int = 32 * MiB
    #: gc never removes a chunk whose mtime is less than this many seconds
    #: before it started (on top of the rule that protects every chunk a
    #: running backup touched: docs/REPOSITORY.md, "Garbage collection").
    gc_grace: float = 300.0
    #: In an object store (``s3://``), a running backup, gc or reader renews
    #: the record saying so every third of this many seconds; a record older
    #: than this (by the store's clock) is one of a process that died.
    object_lease: float = 300.0
    #: A backup into an object store lists the chunks present when it
    #: begins (a request per 1000) and keeps up to this many digests (about
    #: 150 bytes each), so that it asks nothing for a chunk it has listed.
    object_known_chunks: int = 4_000_000
    #: Restore rebuilds a device this many bytes at a time, fetching its
    #: chunks with this many threads.
    restore_window: int = 16 * MiB
    restore_threads: int = 4
    #: A mounted backup (``blksnap mount``) or an instant restore's source
    #: keeps at most this many bytes of decoded chunks in memory.
    mount_cache: int = 64 * MiB
    #: Restore onto a block device zeroes this much at its start first and
    #: writes it last: room for any file-system signature or superblock.
    restore_head: int = 64 * KiB

    # -- command line ---------------------------------------------------------------
    #: Seconds the CLI waits for an answer of blksnapd, and for the long
    #: commands (snapshot take and destroy, backup, daemon stop, device
    #: remove, device add --loop).
    cli_timeout: float = 30.0
    cli_long_timeout: float = 300.0


#: The settings in force.
SETTINGS = Settings()
