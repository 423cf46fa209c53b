"""The FUSE front-end without a mount: the worker pool's hand-off, and which
requests take the fast path on the event loop thread (they must never be
ones that can copy chunks or wait on another thread: snapshot rewrites of
stored chunks may, first writes may not)."""

from __future__ import annotations

import errno
import threading
import time

import pyfuse3
import pytest
import trio

import blksnap
from blksnap.frontends.fuse import DEV_DIR, BlksnapFS, WorkerPool

KiB = 1 << 10
MiB = 1 << 20
CHUNK = blksnap.Params().chunk_size


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
    dev = engine.device("d")

    def never_waits(target, off=0, n=4096):
        return fs._never_waits(target, off, n)  # the rule under test

    assert never_waits(dev)  # no filter
    engine.attach("d")
    assert never_waits(dev)  # tracker, no snapshot: CBT only
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    assert not never_waits(dev)  # in a snapshot: a take may arm COW
    engine.snapshot_take(sid)
    assert not never_waits(dev)  # chunk 0 is new: the write copies it
    assert not never_waits(engine.image(sid, "d"))
    dev.write(0, b"x")  # chunk 0 stored
    assert never_waits(dev)  # a rewrite: no copy, no wait
    assert not never_waits(dev, 0, 2 * CHUNK)  # also chunk 1: new
    assert not never_waits(engine.image(sid, "d"))
    engine.snapshot_destroy(sid)
    assert never_waits(dev, 0, 4 * MiB)
    fs.close()


def _pool_calls(fs: BlksnapFS) -> list[object]:
    """Record what the front-end hands to its worker pool."""
    calls: list[object] = []
    real_run = fs.pool.run

    async def run(fn, *args):
        calls.append(fn)
        return await real_run(fn, *args)

    fs.pool.run = run  # type: ignore[method-assign]
    return calls


def test_snapshot_rewrites_take_the_fast_path(engine, make_file, storage_dir):
    path = make_file(4 * MiB)
    engine.add_device(path, name="d")
    fs = BlksnapFS(engine, threads=2)
    fs.add_device("d")
    ino = fs.nodes[DEV_DIR].children["d"]
    old = bytes(range(256)) * 4 * 64  # one chunk
    engine.device("d").write(0, old * 2)
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    calls = _pool_calls(fs)

    async def main() -> None:
        fi = await fs.open(ino, 0, None)
        await fs.write(fi.fh, 0, b"a" * 4096)  # chunk 0 new: copied in the pool
        assert len(calls) == 1
        await fs.write(fi.fh, 4096, b"b" * 4096)  # chunk 0 stored: inline
        await fs.write(fi.fh, 0, b"c" * CHUNK)
        assert len(calls) == 1
        await fs.write(fi.fh, CHUNK - 4096, b"d" * 8192)  # chunk 1 new: pool
        assert len(calls) == 2
        await fs.write(fi.fh, CHUNK - 4096, b"e" * 8192)
        assert len(calls) == 2
        await fs.release(fi.fh)

    try:
        trio.run(main)
    finally:
        fs.close()
    cbt = engine.tracker("d").cbt
    assert cbt.write_map[0] == cbt.active  # the inline writes were marked too
    img = engine.image(sid, "d")
    assert img.read(0, 2 * CHUNK) == old * 2
    assert engine.device("d").read(0, 2 * CHUNK) == (
        b"c" * (CHUNK - 4096) + b"e" * 8192 + old[4096:]
    )
    engine.snapshot_destroy(sid)


def test_stale_fast_path_answer_falls_back_to_the_pool(engine, make_file, storage_dir):
    """A take that arms copy-on-write between the check and the write: the
    tracker refuses the write on the loop thread, the pool copies and writes."""
    path = make_file(4 * MiB)
    engine.add_device(path, name="d")
    engine.attach("d")
    fs = BlksnapFS(engine, threads=2)
    fs.add_device("d")
    ino = fs.nodes[DEV_DIR].children["d"]
    old = b"o" * CHUNK
    engine.device("d").write(0, old)
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    fs._never_waits = lambda target, off, n: True  # the stale answer
    calls = _pool_calls(fs)

    async def main() -> None:
        fi = await fs.open(ino, 0, None)
        assert await fs.write(fi.fh, 0, b"n" * 4096) == 4096
        await fs.release(fi.fh)

    try:
        trio.run(main)
    finally:
        fs.close()
    assert len(calls) == 1
    assert engine.image(sid, "d").read(0, CHUNK) == old
    assert engine.device("d").read(0, 4096) == b"n" * 4096
    engine.snapshot_destroy(sid)


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
