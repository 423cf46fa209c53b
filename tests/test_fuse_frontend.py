"""The FUSE front-end without a mount: the worker pool's hand-off, and which
requests take the fast path on the event loop thread (they must never be
ones that can copy chunks or wait on another thread)."""

from __future__ import annotations

import errno
import threading
import time

import pyfuse3
import pytest
import trio

from blksnap.frontends.fuse import BlksnapFS, WorkerPool

KiB = 1 << 10
MiB = 1 << 20


def test_pool_results_exceptions_and_bound():
    pool = WorkerPool(3)
    running = 0
    peak = 0
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        if i == 7:
            raise OSError(errno.EIO, "boom")
        return i * i

    async def main() -> dict[int, object]:
        out: dict[int, object] = {}

        async def one(i: int) -> None:
            try:
                out[i] = await pool.run(job, i)
            except OSError as exc:
                out[i] = exc.errno

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        return out

    try:
        out = trio.run(main)
    finally:
        pool.close()
    assert out == {i: (errno.EIO if i == 7 else i * i) for i in range(20)}
    assert peak <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("blksnap-fuse")]


def test_pool_runs_off_the_event_loop_thread():
    pool = WorkerPool(1)

    async def main() -> tuple[int, int]:
        return threading.get_ident(), await pool.run(threading.get_ident)

    try:
        loop_thread, worker_thread = trio.run(main)
    finally:
        pool.close()
    assert loop_thread != worker_thread


def test_fast_path_only_without_copy_on_write(engine, make_file, storage_dir):
    path = make_file(4 * MiB)
    engine.add_device(path, name="d")
    fs = BlksnapFS(engine, threads=2)
    fs.add_device("d")
    never_waits = fs._never_waits  # the rule under test
    dev = engine.device("d")
    assert never_waits(dev)  # no filter
    engine.attach("d")
    assert never_waits(dev)  # tracker, no snapshot: CBT only
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    assert not never_waits(dev)  # in a snapshot: a take may arm COW
    engine.snapshot_take(sid)
    assert not never_waits(dev)
    assert not never_waits(engine.image(sid, "d"))
    engine.snapshot_destroy(sid)
    assert never_waits(dev)
    fs.close()


def test_writes_reach_the_engine_on_both_paths(engine, make_file, storage_dir):
    path = make_file(4 * MiB)
    engine.add_device(path, name="d")
    engine.attach("d")
    fs = BlksnapFS(engine, threads=2)
    fs.add_device("d")
    ino = fs.nodes[fs.nodes[pyfuse3.ROOT_INODE + 1].children["d"]].ino
    old = bytes(range(256)) * 16 * 16  # 64 KiB

    async def main() -> None:
        fi = await fs.open(ino, 0, None)
        # Fast path (aligned) and pool (unaligned), no snapshot.
        assert await fs.write(fi.fh, 0, old) == len(old)
        cbt = engine.tracker("d").cbt
        assert cbt.write_map[0] == cbt.active  # the fast path went through the tracker
        assert await fs.write(fi.fh, 64 * KiB + 512, b"x" * 512) == 512
        assert await fs.read(fi.fh, 64 * KiB + 512, 512) == b"x" * 512
        sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
        engine.snapshot_take(sid)
        # In a snapshot: the pool, with copy-on-write before the write.
        assert await fs.write(fi.fh, 0, b"n" * 4096) == 4096
        assert engine.image(sid, "d").read(0, len(old)) == old
        assert await fs.read(fi.fh, 0, 4096) == b"n" * 4096
        engine.snapshot_destroy(sid)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.write(fi.fh, 4 * MiB - 4096, b"z" * 8192)
        assert exc.value.errno == errno.ENOSPC
        await fs.release(fi.fh)

    try:
        trio.run(main)
    finally:
        fs.close()
    with open(path, "rb") as f:
        assert f.read(4096) == b"n" * 4096
