"""Snapshot life cycle, images, events, and every bad input's errno."""

from __future__ import annotations

import errno
import os
import threading
import uuid

import pytest

import blksnap
from blksnap.units import KiB, MiB
from tests.conftest import collector_off, file_bytes, open_fd_targets

CHUNK = blksnap.Params().chunk_size


@pytest.fixture
def two(engine, make_file):
    a = engine.add_device(make_file(4 * MiB), name="a")
    b = engine.add_device(make_file(2 * MiB), name="b")
    a.write(0, os.urandom(4 * MiB))
    b.write(0, os.urandom(2 * MiB))
    return a, b


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(blksnap.BlksnapError) as info:
        fn(*args, **kw)
    return info.value.errno


def test_image_is_the_device_at_take(engine, two, storage_dir):
    a, b = two
    sid = engine.snapshot_create(["a", "b"], storage=storage_dir, limit=8 * MiB)
    assert engine.filters("a") == ["blksnap"]  # attached on demand
    engine.snapshot_take(sid)
    at_take = {"a": a.read(0, a.size), "b": b.read(0, b.size)}
    a.write(CHUNK - 3, b"\x01" * (3 * CHUNK))  # crosses four chunks
    b.write(100, b"\x02" * 5)
    a.write(0, b"\x03" * 10)
    for name in ("a", "b"):
        img = engine.image(sid, name)
        assert img.size == len(at_take[name])
        assert img.read(0, img.size) == at_take[name]
        assert img.read(CHUNK - 1, 7) == at_take[name][CHUNK - 1 : CHUNK + 6]
    assert a.read(CHUNK - 3, 3 * CHUNK) == b"\x01" * (3 * CHUNK)
    engine.snapshot_destroy(sid)


def test_image_writes_stay_in_the_snapshot(engine, two, storage_dir):
    a, _ = two
    sid = engine.snapshot_create(["a"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    device_before = file_bytes(a.path)
    img = engine.image(sid, "a")
    expect = bytearray(img.read(0, img.size))
    img.write(CHUNK * 2 - 100, b"\x07" * 300)
    expect[CHUNK * 2 - 100 : CHUNK * 2 + 200] = b"\x07" * 300
    img.write(5, b"\x08")
    expect[5:6] = b"\x08"
    assert img.read(0, img.size) == bytes(expect)
    assert file_bytes(a.path) == device_before
    # A later device write to the same chunk leaves the image's copy alone.
    a.write(CHUNK * 2 - 50, b"\x09" * 10)
    assert img.read(0, img.size) == bytes(expect)
    # The image write marked its blocks changed for the backup under way.
    cbt = engine.cbt_info("a")
    cmap = engine.cbt_map("a")
    assert cmap[(CHUNK * 2 - 100) // cbt.block_size] == cbt.changes_number
    engine.snapshot_destroy(sid)


def test_image_bounds(engine, two, storage_dir):
    sid = engine.snapshot_create(["b"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    img = engine.image(sid, "b")
    assert errno_of(img.read, img.size - 1, 2) == errno.EINVAL
    assert errno_of(img.read, -1, 2) == errno.EINVAL
    assert errno_of(img.write, img.size, b"x") == errno.ENOSPC
    assert img.read(img.size, 0) == b""
    engine.snapshot_destroy(sid)


def test_destroy_removes_images_and_keeps_tracking(engine, two, storage_dir):
    a, _ = two
    sid = engine.snapshot_create(["a"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    img = engine.image(sid, "a")
    engine.snapshot_destroy(sid)
    assert errno_of(img.read, 0, 1) == errno.ENOENT
    assert errno_of(engine.image, sid, "a") == errno.ENOENT
    assert engine.snapshot_collect() == []
    assert engine.filters("a") == ["blksnap"]
    n = engine.cbt_info("a").changes_number
    a.write(3 * CHUNK, b"z")
    sid2 = engine.snapshot_create(["a"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid2)
    info = engine.cbt_info("a")
    assert info.changes_number == n + 1
    block = 3 * CHUNK // info.block_size
    assert engine.cbt_map("a")[block] == n + 1
    engine.snapshot_destroy(sid2)


def _snapshot_regions(sid: str) -> list[str]:
    """The memory regions of snapshot ``sid`` this process holds open."""
    return [t for t in open_fd_targets() if f"blksnap-snap/{sid}" in t]


def test_destroy_releases_the_snapshots_memory_at_once(engine, two, storage_dir):
    """A destroyed snapshot's regions (its state and each device's chunk
    map, memory of their own) are released by the destroy itself, not
    whenever the garbage collector comes by: a daemon that allocates little
    may not collect for a long time, and each snapshot of a busy device
    leaves a chunk map of touched pages."""
    a, b = two
    with collector_off():
        for _ in range(3):
            sid = engine.snapshot_create(["a", "b"], storage=storage_dir, limit=4 * MiB)
            engine.snapshot_take(sid)
            a.write(0, b"x" * 4096)
            b.write(CHUNK, b"y" * 4096)
            img = engine.image(sid, "a")
            img.read(0, 4096)
            assert _snapshot_regions(sid)
            del img
            engine.snapshot_destroy(sid)
            assert _snapshot_regions(sid) == []


def test_collect_and_info(engine, two, storage_dir):
    sid = engine.snapshot_create(["a", "b"], storage=storage_dir, limit=MiB)
    [snap] = engine.snapshot_collect()
    assert snap["id"] == sid and snap["state"] == "created" and snap["error"] is None
    assert [d["name"] for d in snap["devices"]] == ["a", "b"]
    assert all(d["image"] is None for d in snap["devices"])
    engine.snapshot_take(sid)
    [snap] = engine.snapshot_collect(sid)
    assert snap["state"] == "taken"
    assert [d["image"] for d in snap["devices"]] == ["a", "b"]
    assert engine.snapshot_info("a") == {"id": sid, "state": "taken", "error": 0, "image": "a"}
    engine.snapshot_destroy(sid)
    assert errno_of(engine.snapshot_info, "a") == errno.ENOENT


def test_wait_event_times_out(engine, two, storage_dir):
    sid = engine.snapshot_create(["a"], storage=storage_dir, limit=8 * MiB)
    assert engine.wait_event(sid, timeout=0.05) is None
    engine.snapshot_destroy(sid)


def test_bad_input_changes_nothing(engine, two, storage_dir, make_file):
    a, b = two
    unknown = str(uuid.uuid4())
    assert errno_of(engine.snapshot_create, [], storage=storage_dir, limit=MiB) == errno.EINVAL
    assert errno_of(engine.snapshot_create, ["a", "a"], storage=storage_dir, limit=MiB) == (
        errno.EINVAL
    )
    assert errno_of(engine.snapshot_create, ["a", "zz"], storage=storage_dir, limit=MiB) == (
        errno.ENOENT
    )
    # Storage on a device of the same snapshot, by the same path or a hard link.
    assert errno_of(engine.snapshot_create, ["a", "b"], storage=b.path, limit=MiB) == errno.EINVAL
    link = b.path + ".link"
    os.link(b.path, link)
    assert errno_of(engine.snapshot_create, ["b"], storage=link, limit=MiB) == errno.EINVAL
    assert errno_of(engine.snapshot_create, ["a"], storage="/nonexistent/x", limit=MiB) == (
        errno.ENOENT
    )
    assert errno_of(engine.snapshot_create, ["a"], storage=storage_dir) == errno.EINVAL  # no size
    # None of those attached a tracker or made a snapshot.
    assert engine.filters("a") == [] and engine.filters("b") == []
    assert engine.snapshot_collect() == []
    assert os.listdir(storage_dir) == []

    sid = engine.snapshot_create(["a"], storage=storage_dir, limit=MiB)
    assert errno_of(engine.snapshot_create, ["b", "a"], storage=storage_dir, limit=MiB) == (
        errno.EBUSY
    )
    assert engine.filters("b") == []
    assert errno_of(engine.remove_device, "a") == errno.EBUSY
    assert errno_of(engine.image, sid, "a") == errno.ENOENT  # not taken yet
    assert errno_of(engine.snapshot_append_storage, sid, a.path, size=MiB) == errno.EINVAL
    for fn, args in (
        (engine.snapshot_take, (unknown,)),
        (engine.snapshot_destroy, (unknown,)),
        (engine.snapshot_collect, (unknown,)),
        (engine.wait_event, (unknown, 0.01)),
        (engine.image, (unknown, "a")),
        (engine.snapshot_append_storage, (unknown, storage_dir)),
        (engine.snapshot_take, ("not-a-uuid",)),
    ):
        assert errno_of(fn, *args) == errno.ENOENT, fn
    engine.snapshot_take(sid)
    assert errno_of(engine.snapshot_take, sid) == errno.EALREADY
    assert errno_of(engine.image, sid, "b") == errno.ENOENT
    [snap] = engine.snapshot_collect()
    assert snap["state"] == "taken"
    engine.snapshot_destroy(sid)
    assert errno_of(engine.snapshot_destroy, sid) == errno.ENOENT


def test_snapshot_without_storage_then_appended(engine, two, storage_dir):
    a, _ = two
    sid = engine.snapshot_create(["a"])
    assert errno_of(engine.snapshot_take, sid) == errno.EINVAL
    engine.snapshot_append_storage(sid, storage_dir, size=MiB)
    engine.snapshot_take(sid)
    before = a.read(0, 64 * KiB)
    a.write(0, b"q" * 10)
    assert engine.image(sid, "a").read(0, 64 * KiB) == before
    engine.snapshot_destroy(sid)


def test_destroy_under_load(engine, two, storage_dir):
    """Writers on the device and the image, readers of the image, while
    destroy runs: no crash, image I/O ends with ENOENT, device intact."""
    a, _ = two
    sid = engine.snapshot_create(["a"], storage=storage_dir, limit=16 * MiB)
    engine.snapshot_take(sid)
    img = engine.image(sid, "a")
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[int, bytes] = {}

    def device_writer(slot: int) -> None:
        i = 0
        while not stop.is_set():
            data = bytes([slot + 1]) * 4096
            a.write(slot * MiB + (i % 200) * 4096, data)
            written[slot * MiB + (i % 200) * 4096] = data
            i += 1

    def image_io(kind: str) -> None:
        try:
            while True:
                if kind == "read":
                    img.read(os.getpid() % 4096, 200_000)
                else:
                    img.write(3 * MiB + 123, b"i" * 70_000)
        except blksnap.BlksnapError as exc:
            if exc.errno != errno.ENOENT:
                errors.append(exc)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=device_writer, args=(s,)) for s in (0, 1)]
    threads += [threading.Thread(target=image_io, args=(k,)) for k in ("read", "read", "write")]
    for t in threads:
        t.start()
    try:
        threading.Event().wait(0.3)
        engine.snapshot_destroy(sid)
        threading.Event().wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for off, data in written.items():
        assert a.read(off, len(data)) == data
    assert os.listdir(storage_dir) == []


def test_caller_chosen_snapshot_id(engine, two, storage_dir):
    """A caller may pick the id (a UUID) before creating: a backup records it
    first, so it can name the snapshot even if it dies before the answer."""
    want = str(uuid.uuid4())
    assert engine.snapshot_create(["a"], storage=storage_dir, limit=MiB, sid=want) == want
    assert [s["id"] for s in engine.snapshot_collect()] == [want]
    # The same id again: EEXIST, nothing created (b stays free).
    assert errno_of(engine.snapshot_create, ["b"], storage_dir, MiB, sid=want) == errno.EEXIST
    assert errno_of(engine.snapshot_create, ["b"], storage_dir, MiB, sid="nope") == errno.EINVAL
    assert len(engine.snapshot_collect()) == 1
    other = engine.snapshot_create(["b"], storage=storage_dir, limit=MiB)
    assert uuid.UUID(other) and other != want
