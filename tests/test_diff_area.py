"""Copy-on-write ordering: a device write waits for its chunk's original,
concurrent writers copy a chunk once, and the chunk map grows with the
chunks touched, not with the device."""

from __future__ import annotations

import os
import threading

import pytest

import blksnap
from blksnap.units import GiB, MiB, TiB

CHUNK = blksnap.Params().chunk_size


def test_concurrent_writers_to_one_chunk_copy_it_once(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(4 * MiB), name="d0")
    original = os.urandom(4 * MiB)
    dev.write(0, original)
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=4 * MiB)
    engine.snapshot_take(sid)
    area = engine.snapshot(sid).members["d0"].diff_area
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        dev.write(CHUNK * 5 + i * 512, bytes([i]) * 512)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert area.chunks_stored == 1
    [snap] = engine.snapshot_collect()
    assert snap["storage"]["used"] == CHUNK
    assert engine.image(sid, "d0").read(0, 4 * MiB) == original
    engine.snapshot_destroy(sid)


def test_device_write_waits_until_the_original_is_stored(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(MiB), name="d0")
    dev.write(0, b"\x01" * MiB)
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    storage = engine.snapshot(sid).storage
    release = threading.Event()
    entered = threading.Event()
    real_write = storage.write

    def slow_write(*args, **kw):  # the real storage write, held back
        entered.set()
        assert release.wait(10)
        return real_write(*args, **kw)

    storage.write = slow_write
    done = threading.Event()
    img = engine.image(sid, "d0")

    def write_then_signal():
        dev.write(100, b"\x02" * 10)
        done.set()

    t = threading.Thread(target=write_then_signal)
    t.start()
    try:
        assert entered.wait(10)
        # The copy is in progress: the write has not reached the device,
        # and the image still reads the original.
        assert not done.wait(0.2)
        with open(dev.path, "rb") as f:
            assert f.read(110)[100:] == b"\x01" * 10
        assert img.read(0, CHUNK) == b"\x01" * CHUNK
        # A second writer to the same chunk waits for the same copy.
        second = threading.Thread(target=dev.write, args=(200, b"\x03"))
        second.start()
        second.join(0.2)
        assert second.is_alive()
    finally:
        release.set()
        t.join(10)
    second.join(10)
    assert done.is_set() and not second.is_alive()
    assert dev.read(100, 10) == b"\x02" * 10 and dev.read(200, 1) == b"\x03"
    assert img.read(0, CHUNK) == b"\x01" * CHUNK
    storage.write = real_write
    engine.snapshot_destroy(sid)


def test_chunk_map_follows_chunks_touched_not_device_size(engine, make_file, storage_dir):
    try:
        path = make_file(TiB)
    except OSError as exc:  # a file system without sparse files that large
        pytest.skip(f"cannot make a 1 TiB sparse file here: {exc}")
    dev = engine.add_device(path, name="big")
    sid = engine.snapshot_create(["big"], storage=storage_dir, limit=16 * MiB)
    engine.snapshot_take(sid)
    area = engine.snapshot(sid).members["big"].diff_area
    assert area.map_bytes == 0
    for off in (0, 100 * GiB, TiB - 4096):
        dev.write(off, b"x" * 4096)
    assert area.chunks_stored == 3
    page = engine.params.chunk_map_page * 8
    assert area.map_bytes == 3 * page  # three pages of the map, out of 4096
    assert engine.image(sid, "big").read(TiB - 4096, 4096) == bytes(4096)
    engine.snapshot_destroy(sid)


def test_writes_before_take_are_not_copied(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(MiB), name="d0")
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    dev.write(0, b"before take")
    [snap] = engine.snapshot_collect()
    assert snap["storage"]["used"] == 0
    engine.snapshot_take(sid)
    assert engine.image(sid, "d0").read(0, 11) == b"before take"
    engine.snapshot_destroy(sid)


def test_chunk_size_grows_to_bound_the_chunk_map(tmp_path, make_file, storage_dir):
    params = blksnap.Params(chunk_size=4096, chunk_maximum_count=64)
    assert params.chunk_size_for(64 * 4096) == 4096
    assert params.chunk_size_for(64 * 4096 + 1) == 8192
    eng = blksnap.Engine(tmp_path / "st2", params=params)
    try:
        small = eng.add_device(make_file(64 * 4096), name="small")
        big = eng.add_device(make_file(MiB), name="big")  # 256 chunks of 4 KiB: too many
        original = os.urandom(MiB)
        big.write(0, original)
        sid = eng.snapshot_create(["small", "big"], storage=storage_dir, limit=2 * MiB)
        eng.snapshot_take(sid)
        [snap] = eng.snapshot_collect()
        assert snap["chunk_size"] == 16384  # MiB / 64
        big.write(100, b"x")
        small.write(0, b"y")
        assert eng.snapshot(sid).members["big"].diff_area.chunk_count == 64
        assert snap["storage"]["used"] == 0 and eng.snapshot_collect()[0]["storage"]["used"] == (
            2 * 16384
        )
        assert eng.image(sid, "big").read(0, MiB) == original
        assert eng.image(sid, "small").read(0, 1) == b"\0"
    finally:
        eng.close()
