"""Device writes through a loop device while a snapshot is taken, first
writes and rewrites mixed (rewrites of stored chunks are served on the FUSE
event loop's thread, first writes by worker threads): the image keeps the
device as it was at take, the device ends with what was written last, and a
snapshot taken after another is destroyed copies its chunks again."""

from __future__ import annotations

import mmap
import os
import random
import threading

from tests.integration.helpers import (
    KiB,
    MiB,
    add_device,
    collect,
    create,
    direct_read,
    storage_dir,
    take,
)

SIZE = 8 * MiB
PAGE = 4 * KiB
WRITERS = 4
WRITES = 400


def _writers(loop_dev: str, expected: bytearray, seed: int) -> None:
    """``WRITERS`` threads of O_DIRECT writes (4 KiB and 64 KiB) on pages of
    their own (page p belongs to writer p % WRITERS), each page written
    several times; ``expected`` follows every write."""
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = random.Random(seed * 100 + w)
        mine = [p for p in range(SIZE // PAGE) if p % WRITERS == w]
        hot = rng.sample(mine, 64)  # rewritten over and over
        buf = mmap.mmap(-1, 64 * KiB)
        fd = os.open(loop_dev, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            for i in range(WRITES):
                page = rng.choice(hot) if i % 2 else rng.choice(mine)
                data = rng.randbytes(PAGE)
                buf[:PAGE] = data
                with memoryview(buf)[:PAGE] as view:
                    assert os.pwrite(fd, view, page * PAGE) == PAGE
                expected[page * PAGE : (page + 1) * PAGE] = data
            os.fsync(fd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            os.close(fd)
            buf.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _whole_chunk_rewrites(loop_dev: str, expected: bytearray, rng: random.Random) -> None:
    """Sequential 1 MiB writes over the first half of the device, twice."""
    buf = mmap.mmap(-1, MiB)
    fd = os.open(loop_dev, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for _ in range(2):
            for off in range(0, SIZE // 2, MiB):
                data = rng.randbytes(MiB)
                buf[:] = data
                with memoryview(buf) as view:
                    assert os.pwrite(fd, view, off) == MiB
                expected[off : off + MiB] = data
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def test_first_writes_and_rewrites_under_snapshots(daemon, backing, tmp_path):
    rng = random.Random(7)
    original = rng.randbytes(SIZE)
    path = backing("w.img", SIZE)
    with open(path, "r+b") as f:
        f.write(original)
    dev = add_device(daemon, path, "w")
    expected = bytearray(original)

    # Snapshot 1: every chunk written is first copied, then rewritten.
    sid = create(daemon, ["w"], storage_dir(tmp_path), "16M")
    img = take(daemon, sid)["w"]
    _writers(dev["loop"], expected, seed=1)
    _whole_chunk_rewrites(dev["loop"], expected, rng)
    _writers(dev["loop"], expected, seed=2)
    assert direct_read(img["loop"], 0, SIZE) == original
    assert direct_read(dev["loop"], 0, SIZE) == expected
    daemon.cli("snapshot", "destroy", "-i", sid)

    # Snapshot 2, after 1 is gone: chunks stored in 1 are new again in 2.
    at_take = bytes(expected)
    sid = create(daemon, ["w"], storage_dir(tmp_path, "diff2"), "16M")
    img = take(daemon, sid)["w"]
    _whole_chunk_rewrites(dev["loop"], expected, rng)
    _writers(dev["loop"], expected, seed=3)
    assert direct_read(img["loop"], 0, SIZE) == at_take
    assert direct_read(dev["loop"], 0, SIZE) == expected
    [snap] = [s for s in collect(daemon) if s["id"] == sid]
    assert snap["state"] == "taken", snap
    daemon.cli("snapshot", "destroy", "-i", sid)
    with open(path, "rb") as f:
        assert f.read() == expected
