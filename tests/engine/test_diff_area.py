"""Copy-on-write ordering: a device write waits for its chunk's original,
concurrent writers copy a chunk once, and the chunk map grows with the
chunks touched, not with the device. The check a front-end makes before
serving a write on a thread that must not block
(``Tracker.write_may_wait``), and the tracker's ``no_wait`` guard."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import blksnap
from blksnap.engine.tracker import WouldWait, no_wait
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


# -- the no-wait check: Tracker.write_may_wait / DiffArea.write_needs_copy ----------


def test_write_may_wait_follows_the_chunk_states(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(MiB), name="d0")
    dev.write(0, b"\x01" * MiB)
    engine.attach("d0")
    trk = engine.tracker("d0")
    assert trk.write_may_wait(0, MiB)  # the region's first write: its write intent
    dev.write(0, b"\x01")  # (the byte it holds)
    assert not trk.write_may_wait(0, MiB)  # no snapshot: a CBT mark only
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    assert trk.write_may_wait(0, 4096)  # created: a take may arm copy-on-write
    engine.snapshot_take(sid)
    area = engine.snapshot(sid).members["d0"].diff_area
    assert area is trk.diff_area
    assert trk.write_may_wait(0, 4096) and area.write_needs_copy(0, 4096)  # new chunk
    assert not area.write_needs_copy(0, 0)
    assert not area.write_needs_copy(area.capacity, 4096)  # past the size at take

    # Loading: the copy of chunk 0 held back in the storage write.
    storage = engine.snapshot(sid).storage
    entered, release = threading.Event(), threading.Event()
    real_write = storage.write

    def slow_write(*args, **kw):
        entered.set()
        assert release.wait(10)
        return real_write(*args, **kw)

    storage.write = slow_write
    t = threading.Thread(target=dev.write, args=(0, b"\x02" * 4096))
    t.start()
    try:
        assert entered.wait(10)
        assert 0 in area._loading  # the state under test
        assert trk.write_may_wait(0, 4096)
        assert trk.write_may_wait(CHUNK - 4096, 4096)
    finally:
        release.set()
        t.join(10)
    storage.write = real_write

    # Stored: rewrites of chunk 0 neither copy nor wait, anywhere in it.
    assert not trk.write_may_wait(0, 4096)
    assert not trk.write_may_wait(CHUNK - 4096, 4096)
    assert not trk.write_may_wait(100, 10)
    # Spanning chunk 0 (stored) and chunk 1 (new).
    assert trk.write_may_wait(CHUNK - 4096, 8192)
    dev.write(CHUNK, b"\x03")
    assert not trk.write_may_wait(CHUNK - 4096, 8192)
    assert not trk.write_may_wait(0, 2 * CHUNK)
    assert trk.write_may_wait(0, 2 * CHUNK + 1)
    assert engine.image(sid, "d0").read(0, MiB) == b"\x01" * MiB

    engine.snapshot_destroy(sid)
    assert not trk.write_may_wait(0, MiB)  # tracking only again


def test_write_may_wait_across_chunk_map_pages(tmp_path, make_file, storage_dir):
    eng = blksnap.Engine(tmp_path / "st2", params=blksnap.Params(chunk_map_page=4))
    try:
        dev = eng.add_device(make_file(MiB), name="d0")
        sid = eng.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
        eng.snapshot_take(sid)
        trk = eng.tracker("d0")
        dev.write(3 * CHUNK, b"x" * 4096)  # the last chunk of page 0
        assert trk.write_may_wait(3 * CHUNK, 2 * CHUNK)  # page 1 not even made
        dev.write(4 * CHUNK, b"x" * 4096)
        assert not trk.write_may_wait(3 * CHUNK, 2 * CHUNK)
        assert trk.write_may_wait(3 * CHUNK, 2 * CHUNK + 1)  # chunk 5: new
        assert trk.write_may_wait(2 * CHUNK, 2 * CHUNK)  # chunk 2: new
        eng.snapshot_destroy(sid)
    finally:
        eng.close()


def test_corrupted_snapshot_lets_writes_through_without_copy(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(4 * MiB), name="d0")
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=2 * CHUNK)
    engine.snapshot_take(sid)
    trk = engine.tracker("d0")
    dev.write(0, b"x" * 3 * CHUNK)  # a third chunk does not fit: corrupted
    assert engine.snapshot_collect()[0]["state"] == "corrupted"
    # Copy-on-write has stopped: no chunk, stored or not, copies or waits.
    assert not trk.write_may_wait(0, 4 * MiB)
    with no_wait:
        dev.write(3 * MiB, b"y" * 4096)
    assert dev.read(3 * MiB, 4096) == b"y" * 4096
    engine.snapshot_destroy(sid)


def test_no_wait_refuses_a_write_that_would_copy_untouched(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(MiB), name="d0")
    dev.write(0, b"\x01" * MiB)
    engine.attach("d0")
    trk = engine.tracker("d0")
    dev.write(0, b"\x01")  # (the byte it holds: its write-intent region set)
    assert not trk.write_may_wait(0, 4096)  # the answer the caller got ...
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)  # ... went stale: copy-on-write armed meanwhile
    cbt = trk.cbt
    marked = cbt.write_map.copy()
    with no_wait, pytest.raises(WouldWait) as exc:
        dev.write(0, b"\x02" * 4096)
    assert exc.value.errno == errno.EAGAIN
    # Nothing done: not copied, not written, not marked.
    assert trk.diff_area.chunks_stored == 0
    assert dev.read(0, 4096) == b"\x01" * 4096
    assert (cbt.write_map == marked).all()
    # Outside no_wait the same write copies, then lands; then its rewrite is
    # let through under no_wait, marked like any write.
    dev.write(0, b"\x02" * 4096)
    cbt.write_map[:] = 0
    with no_wait:
        dev.write(4096, b"\x03" * 4096)
    assert cbt.write_map[0] == cbt.active
    assert dev.read(0, 8192) == b"\x02" * 4096 + b"\x03" * 4096
    assert engine.image(sid, "d0").read(0, MiB) == b"\x01" * MiB
    # no_wait is per thread, and over once the block ends.
    assert not no_wait.active
    engine.snapshot_destroy(sid)
