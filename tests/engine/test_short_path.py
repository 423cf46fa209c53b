"""The short way of a device read or write (no filter, or a tracker with no
snapshot taken: :meth:`Device.read`, :meth:`Device.write`) keeps every
promise of the full way through :meth:`Device.submit`: the filters are read
inside the gate, failures are counted and reported, a snapshot's
copy-on-write still happens."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from blksnap import Engine
from blksnap.engine.engine import DEVICE_ERROR
from blksnap.engine.filters import Bio, Filter, FilterResult, Op
from blksnap.errors import BlksnapError

MiB = 1 << 20


class Seen(Filter):
    """Records the writes it sees."""

    name = "seen"
    altitude = 150

    def __init__(self, device, opts) -> None:
        super().__init__(device, opts)
        self.writes: list[int] = []

    def submit(self, bio: Bio) -> FilterResult:
        if bio.op is Op.WRITE:
            self.writes.append(bio.offset)
        return FilterResult.PASS


@pytest.fixture
def eng(tmp_path):
    e = Engine(tmp_path / "state")
    e.register_filter(Seen)
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(4 * MiB))
    e.add_device(str(path), "d")
    yield e
    e.close()


def _blocked_write(dev, offset: int, data: bytes) -> tuple[threading.Thread, list]:
    """A write started while the gate is frozen: it waits at the gate."""
    errors: list = []

    def write() -> None:
        try:
            dev.write(offset, data)
        except BaseException as exc:  # (reported by the test)
            errors.append(exc)

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and dev.queue.inflight == 0, "the write did not wait at the gate"
    return t, errors


@pytest.mark.parametrize("filt", ["seen", "blksnap"])
def test_a_write_waiting_at_the_gate_meets_the_filter_attached_meanwhile(eng, filt):
    """A write that arrives while an attach drains the device goes through
    the filter attached by then: the short way looks at the filters only
    once it is inside the gate (a tracker that missed it would leave a
    change out of the next incremental backup)."""
    dev = eng.device("d")
    dev.queue.freeze()
    try:
        t, errors = _blocked_write(dev, 3 * 4096, b"w" * 4096)
        flt = eng.attach("d", filt)  # (drains too: the frozen gate has no request in flight)
    finally:
        dev.queue.unfreeze()
    t.join(5)
    assert not t.is_alive() and not errors
    if filt == "seen":
        assert flt.writes == [3 * 4096]
    else:
        tracker = eng.tracker_of("d")
        shift = tracker.cbt.block_shift
        assert tracker.cbt.write_map[(3 * 4096) >> shift] == tracker.cbt.active
    assert dev.read(3 * 4096, 4096) == b"w" * 4096


def test_a_write_waiting_at_the_gate_copies_for_the_snapshot_taken_meanwhile(eng, tmp_path):
    """With a tracker attached, a write that waits at the gate while a take
    drains the device copies its chunk before it lands: the image keeps
    what the device held at the take."""
    eng.attach("d")
    dev = eng.device("d")
    before = dev.read(0, 4 * MiB)
    sid = eng.snapshot_create(["d"], storage=str(tmp_path), limit=8 * MiB)
    dev.queue.freeze()
    try:
        t, errors = _blocked_write(dev, 5 * 4096, b"n" * 4096)
        eng.snapshot_take(sid)
    finally:
        dev.queue.unfreeze()
    t.join(5)
    assert not t.is_alive() and not errors
    image = eng.image(sid, "d")
    assert image.read(0, 4 * MiB) == before
    assert dev.read(5 * 4096, 4096) == b"n" * 4096
    eng.snapshot_destroy(sid)


@pytest.mark.parametrize("filt", [None, "blksnap"])
def test_backing_store_failures_on_the_short_way_are_counted(eng, filt):
    """A read or write the backing store refuses (here: its descriptor made
    read-only, then write-only, under the device) fails with the kernel's
    errno and is counted, kept and reported like any device failure."""
    if filt:
        eng.attach("d", filt)
    dev = eng.device("d")

    def reopen(flags: int) -> None:  # (the backing store's fd, opened anew)
        fd = os.open(dev.path, flags | os.O_CLOEXEC)
        try:
            os.dup2(fd, dev.backing.fd)
        finally:
            os.close(fd)

    reopen(os.O_RDONLY)
    with pytest.raises(BlksnapError) as exc:
        dev.write(8192, b"x" * 4096)
    assert exc.value.errno == errno.EBADF
    reopen(os.O_WRONLY)
    with pytest.raises(BlksnapError) as exc:
        dev.read(0, 4096)
    assert exc.value.errno == errno.EBADF
    errs = eng.device_errors()["d"]
    assert errs["by_op"] == {"write": 1, "read": 1}
    assert (errs["last"]["op"], errs["last"]["offset"], errs["last"]["length"]) == ("read", 0, 4096)
    ev = eng.events.wait(0.5)
    assert ev is not None and ev.code == DEVICE_ERROR and ev.data["device"] == "d"
    assert dev.queue.inflight == 0  # (the gate was left on the way out)


def test_rewrites_under_a_snapshot_take_the_short_way_and_keep_the_image(eng, tmp_path):
    """With a snapshot taken, a write into a chunk already stored copies
    nothing (the tracker passes it the short way); one into a chunk not
    stored copies first. The image keeps the device at take throughout, and
    the CBT marks every write."""
    eng.attach("d")
    dev = eng.device("d")
    before = dev.read(0, 4 * MiB)
    sid = eng.snapshot_create(["d"], storage=str(tmp_path), limit=8 * MiB)
    eng.snapshot_take(sid)
    area = eng.tracker_of("d").diff_area
    assert area.write_needs_copy(0, 4096)
    dev.write(0, b"a" * 4096)  # copies its chunk
    assert not area.write_needs_copy(0, 4096)
    dev.write(4096, b"b" * 4096)  # the same chunk: stored, nothing to copy
    far = 3 * MiB
    assert area.write_needs_copy(far, 4096)
    dev.write(far, b"c" * 4096)
    image = eng.image(sid, "d")
    assert image.read(0, 4 * MiB) == before
    assert dev.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    assert dev.read(far, 4096) == b"c" * 4096
    cbt = eng.tracker_of("d").cbt
    for off in (0, 4096, far):
        assert cbt.write_map[off >> cbt.block_shift] == cbt.active
    eng.snapshot_destroy(sid)


def test_the_short_way_follows_each_snapshot_and_its_end(eng, tmp_path):
    """The tracker's short way is made for the state of the moment (its
    diff area): after a destroy, writes only mark the CBT; after the take of
    the next snapshot, a chunk the last one stored must be copied again, or
    the new image would show the writes made after its take."""
    eng.attach("d")
    dev = eng.device("d")
    cbt = eng.tracker_of("d").cbt
    for round_ in range(2):
        before = dev.read(0, 2 * MiB)
        sid = eng.snapshot_create(["d"], storage=str(tmp_path), limit=8 * MiB)
        eng.snapshot_take(sid)
        dev.write(0, bytes([round_ + 1]) * 4096)  # copies
        dev.write(4096, bytes([round_ + 10]) * 4096)  # stored: the short way
        dev.write(64 * 1024 - 4096, bytes([round_ + 20]) * 8192)  # across two chunks
        assert eng.image(sid, "d").read(0, 2 * MiB) == before
        eng.snapshot_destroy(sid)
        active = cbt.active
        dev.write(MiB, bytes([round_ + 30]) * 4096)  # no snapshot: marked only
        assert cbt.write_map[MiB >> cbt.block_shift] == active
        assert dev.read(MiB, 4096) == bytes([round_ + 30]) * 4096


def test_image_reads_of_the_device_meet_a_disk_filter_and_skip_the_tracker(eng, tmp_path):
    """An image reads the chunks not stored from the device below the
    tracker: the short way (the backing store itself) while no filter there
    stands for the disk, through it once one does (a failing disk fails
    the image's reads too)."""
    eng.attach("d")
    dev = eng.device("d")
    before = dev.read(0, MiB)
    sid = eng.snapshot_create(["d"], storage=str(tmp_path), limit=8 * MiB)
    eng.snapshot_take(sid)
    image = eng.image(sid, "d")
    assert image.read(4096, 4096) == before[4096:8192]
    eng.attach("d", "flakey", {"mode": "error_reads"})  # down: reads fail
    with pytest.raises(BlksnapError) as exc:
        image.read(8192, 4096)
    assert exc.value.errno == errno.EIO
    eng.ctl("d", "flakey", "up")
    assert image.read(0, MiB) == before
    eng.detach("d", "flakey")
    eng.snapshot_destroy(sid)
