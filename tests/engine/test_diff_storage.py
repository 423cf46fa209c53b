"""Diff storage: directories, files, block devices, ranges, growth, events,
and failures that corrupt the snapshot but never the device."""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager

import pytest

import blksnap
from blksnap.engine.event_queue import CORRUPTED, LOW_FREE_SPACE, NO_SPACE
from blksnap.units import MiB
from tests.conftest import file_bytes, open_fd_targets

CHUNK = blksnap.Params().chunk_size


def drain_events(engine, sid, timeout=0.2):
    events = []
    while (ev := engine.wait_event(sid, timeout)) is not None:
        events.append(ev)
    return events


def open_fds_under(directory: str) -> list[str]:
    return [t for t in open_fd_targets() if t.startswith(directory)]


def test_directory_storage_is_anonymous_and_removed(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(4 * MiB), name="d0")
    dev.write(0, os.urandom(4 * MiB))
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    dev.write(0, bytes(2 * MiB))
    assert os.listdir(storage_dir) == []  # nothing a user could trip over
    assert open_fds_under(storage_dir)  # but the engine holds it open
    [snap] = engine.snapshot_collect()
    assert snap["storage"]["used"] == 2 * MiB
    engine.snapshot_destroy(sid)
    assert open_fds_under(storage_dir) == []


def test_regular_file_storage_with_limit(engine, make_file, tmp_path):
    dev = engine.add_device(make_file(4 * MiB), name="d0")
    original = os.urandom(4 * MiB)
    dev.write(0, original)
    store = tmp_path / "store.bin"
    store.touch()
    sid = engine.snapshot_create(["d0"], storage=str(store), limit=2 * MiB)
    engine.snapshot_take(sid)
    dev.write(MiB, bytes(CHUNK))
    # The original chunk is in the file, at the first slot.
    assert file_bytes(str(store))[:CHUNK] == original[MiB : MiB + CHUNK]
    engine.snapshot_destroy(sid)
    assert store.exists()  # a file the user gave stays


def test_ranges_are_the_only_space_used(engine, make_file, tmp_path):
    dev = engine.add_device(make_file(2 * MiB), name="d0")
    dev.write(0, b"\xee" * (2 * MiB))
    store = tmp_path / "ranges.bin"
    with open(store, "wb") as f:
        f.truncate(4 * MiB)
    sid = engine.snapshot_create(["d0"])
    # Sector ranges: 1 MiB..1.25 MiB and 3 MiB..3.25 MiB of the file.
    ranges = [(3 * MiB, MiB // 4), (MiB, MiB // 4)]
    engine.snapshot_append_storage(sid, str(store), ranges=ranges)
    engine.snapshot_take(sid)
    dev.write(0, bytes(MiB // 2))  # 8 chunks of originals: fills both ranges
    data = file_bytes(str(store))
    assert data[MiB : MiB + MiB // 4] == b"\xee" * (MiB // 4)
    assert data[3 * MiB : 3 * MiB + MiB // 4] == b"\xee" * (MiB // 4)
    outside = data[:MiB] + data[MiB + MiB // 4 : 3 * MiB] + data[3 * MiB + MiB // 4 :]
    assert outside == bytes(len(outside))
    assert engine.image(sid, "d0").read(0, MiB // 2) == b"\xee" * (MiB // 2)
    engine.snapshot_destroy(sid)


def test_bad_storage_arguments(engine, make_file, tmp_path, storage_dir):
    engine.add_device(make_file(MiB), name="d0")
    sid = engine.snapshot_create(["d0"])
    store = tmp_path / "s.bin"
    store.touch()
    cases = [
        (str(store), {}),  # empty file, no size
        (str(store), {"ranges": [(0, MiB), (MiB // 2, MiB)]}),  # overlapping
        (str(store), {"ranges": [(-512, 512)]}),
        (str(store), {"size": 1000}),  # not one chunk
        (storage_dir, {"ranges": [(0, MiB)]}),  # ranges in a directory
        (storage_dir, {"size": 0}),
    ]
    for path, kw in cases:
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.snapshot_append_storage(sid, path, **kw)
        assert info.value.errno == errno.EINVAL, (path, kw)
    [snap] = engine.snapshot_collect()
    assert snap["storage"]["capacity"] == 0
    engine.snapshot_destroy(sid)


def test_low_free_space_then_append_keeps_snapshot_alive(engine, make_file, storage_dir):
    dev = engine.add_device(make_file(8 * MiB), name="d0")
    original = os.urandom(8 * MiB)
    dev.write(0, original)
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=2 * MiB)
    engine.snapshot_take(sid)
    dev.write(0, bytes(int(1.6 * MiB)))  # past 75% of 2 MiB
    events = drain_events(engine, sid, 0.05)
    assert [e.code for e in events] == [LOW_FREE_SPACE]
    assert events[0].data["free"] < MiB // 2
    dev.write(2 * MiB, bytes(MiB // 8))  # still low: no second event
    assert drain_events(engine, sid, 0.05) == []
    engine.snapshot_append_storage(sid, storage_dir, size=8 * MiB)
    dev.write(0, bytes(8 * MiB))  # needs 8 MiB in all: fits in 10 MiB
    assert engine.image(sid, "d0").read(0, 8 * MiB) == original
    [snap] = engine.snapshot_collect()
    assert snap["state"] == "taken" and snap["storage"]["capacity"] == 10 * MiB
    # The mark was re-armed by the append and crossed again: one more event.
    assert [e.code for e in drain_events(engine, sid, 0.05)] == [LOW_FREE_SPACE]
    engine.snapshot_destroy(sid)


def test_overflow_corrupts_snapshot_not_device(engine, make_file, storage_dir):
    """1 MiB of diff storage, 64 MiB written after take."""
    size = 64 * MiB
    dev = engine.add_device(make_file(size), name="d0")
    dev.write(0, b"\x11" * size)
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    img = engine.image(sid, "d0")
    new = os.urandom(size)
    for off in range(0, size, 4 * MiB):
        dev.write(off, new[off : off + 4 * MiB])
    codes = [e.code for e in drain_events(engine, sid)]
    assert codes == [LOW_FREE_SPACE, NO_SPACE, CORRUPTED]
    with pytest.raises(blksnap.BlksnapError) as info:
        img.read(0, 4096)
    assert info.value.errno == errno.EIO
    with pytest.raises(blksnap.BlksnapError) as info:
        img.write(0, b"x")
    assert info.value.errno == errno.EIO
    [snap] = engine.snapshot_collect()
    assert snap["state"] == "corrupted" and snap["error"] == "ENOSPC"
    assert dev.read(0, size) == new
    assert file_bytes(dev.path) == new
    dev.write(5, b"still works")
    assert dev.read(5, 11) == b"still works"
    engine.snapshot_destroy(sid)


def test_one_full_device_corrupts_the_whole_set(engine, make_file, storage_dir):
    a = engine.add_device(make_file(4 * MiB), name="a")
    engine.add_device(make_file(4 * MiB), name="b")
    sid = engine.snapshot_create(["a", "b"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    a.write(0, os.urandom(4 * MiB))
    for name in ("a", "b"):
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.image(sid, name).read(0, 512)
        assert info.value.errno == errno.EIO
    engine.snapshot_destroy(sid)


def _root_or_skip():
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs and making loop devices needs root")


@contextmanager
def small_tmpfs(path, size: str):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_limit_beyond_the_file_system_is_refused(engine, make_file, tmp_path):
    """A limit larger than the storage's file system can hold (64 MiB on a
    real 1 MiB tmpfs) is refused at create with ENOSPC, and nothing changes."""
    _root_or_skip()
    engine.add_device(make_file(8 * MiB), name="d0")
    with small_tmpfs(tmp_path / "tiny", "1m") as tiny:
        with pytest.raises(blksnap.BlksnapError) as exc:
            engine.snapshot_create(["d0"], storage=tiny, limit=64 * MiB)
        assert exc.value.errno == errno.ENOSPC
        assert "can hold only" in exc.value.message
        assert engine.snapshot_collect() == []
        assert engine.filters("d0") == []
        assert os.listdir(tiny) == []


def test_file_system_filling_up_sends_low_free_space_first(engine, make_file, tmp_path):
    """The storage's file system fills up (another file takes most of a real
    4 MiB tmpfs) long before the limit: free space counts statvfs, so
    ``low_free_space`` comes first, while there is room to act; then the
    file system's ENOSPC corrupts the snapshot and the device goes on."""
    _root_or_skip()
    dev = engine.add_device(make_file(8 * MiB), name="d0")
    with small_tmpfs(tmp_path / "tiny", "4m") as tiny:
        sid = engine.snapshot_create(["d0"], storage=tiny, limit=3 * MiB)
        with open(os.path.join(tiny, "other"), "wb") as f:
            f.write(os.urandom(3 * MiB))  # someone else takes the room
        engine.snapshot_take(sid)
        data = os.urandom(8 * MiB)
        for off in range(0, len(data), MiB):
            dev.write(off, data[off : off + MiB])
        events = drain_events(engine, sid)
        codes = [e.code for e in events]
        assert codes == [LOW_FREE_SPACE, NO_SPACE, CORRUPTED]
        low = events[0].data
        # Slots alone would have said 3 MiB free: the file system held ~1 MiB.
        assert low["free"] <= 1 * MiB, low
        [snap] = engine.snapshot_collect()
        assert snap["error"] == "ENOSPC"
        assert dev.read(0, 8 * MiB) == data
        engine.snapshot_destroy(sid)


@contextmanager
def loop_device(backing: str):
    out = subprocess.run(
        ["losetup", "--find", "--show", backing], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.skip(f"no loop device: {out.stderr.strip()}")
    loop = out.stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["blockdev", "--setrw", loop], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


def test_block_device_storage_and_a_failing_one(engine, make_file):
    """Diff storage on a real block device; then the device starts refusing
    writes (set read-only under us): the snapshot is corrupted with that
    error, the protected device carries on."""
    _root_or_skip()
    dev = engine.add_device(make_file(4 * MiB), name="d0")
    original = os.urandom(4 * MiB)
    dev.write(0, original)
    with loop_device(make_file(8 * MiB, name="store.img")) as loop:
        sid = engine.snapshot_create(["d0"], storage=loop)
        [snap] = engine.snapshot_collect()
        assert snap["storage"]["capacity"] == 8 * MiB
        engine.snapshot_take(sid)
        dev.write(0, bytes(MiB))
        img = engine.image(sid, "d0")
        assert img.read(0, 4 * MiB) == original
        subprocess.run(["blockdev", "--setro", loop], check=True)
        dev.write(2 * MiB, b"\x44" * MiB)
        codes = [e.code for e in drain_events(engine, sid)]
        assert codes == [CORRUPTED]
        [snap] = engine.snapshot_collect()
        assert snap["state"] == "corrupted" and snap["error"] in ("EPERM", "EIO", "EROFS")
        with pytest.raises(blksnap.BlksnapError) as info:
            img.read(0, 512)
        assert info.value.errno == errno.EIO
        assert (
            dev.read(0, 4 * MiB)
            == bytes(MiB) + original[MiB : 2 * MiB] + b"\x44" * MiB + (original[3 * MiB :])
        )
        engine.snapshot_destroy(sid)
