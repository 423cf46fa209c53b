"""The ``hydrate`` filter (an instant restore: a device served from a backup
while it is copied to its target) and the sources it reads (:class:`Source`,
:class:`View`), in process.

The source is an image in memory (:class:`MemSource`) whose units can be
made to block or fail; the target starts as junk, so that a byte read from
the target where the source should have answered shows."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import blksnap
import blksnap.engine.hydrate as hydrate_module
from blksnap.engine import hydrate as hydrate_mod
from blksnap.engine import source as sources
from blksnap.engine.device import Device
from blksnap.engine.gate import Gate
from blksnap.engine.hydrate import MAP_OFFSET
from blksnap.engine.source import Source, View
from blksnap.errors import IOFailure, NotFound
from tests.conftest import file_bytes

KiB = 1 << 10
MiB = 1 << 20
UNIT = 64 * KiB
#: 16 whole units and a short one.
SRC_SIZE = 16 * UNIT + 12 * KiB
SRC_UNITS = 17
#: The target is larger than the source: past it, the device is the target's own.
DEV_SIZE = 18 * UNIT
ZERO_UNITS = frozenset({4, 5, 9})
#: What the target holds before the restore.
JUNK = b"\xee"


class MemSource(Source):
    """An image in memory, in units of ``unit``; ``zero`` units (all zeros)
    are said so by :meth:`is_zero`. ``reads`` counts :meth:`read_unit` by
    unit; with ``gate`` set it waits for it, with the unit in ``failing`` it
    raises ``IOFailure``, with ``delay`` it takes that long."""

    def __init__(
        self,
        data: bytes,
        unit: int = UNIT,
        zero: Iterable[int] = ZERO_UNITS,
        identity: str = "backup-1 device d",
    ) -> None:
        self.data = bytes(data)
        self.size = len(data)
        self.unit = unit
        self.zero = frozenset(zero)
        for i in self.zero:
            assert not any(self.data[i * unit : (i + 1) * unit]), f"unit {i} is not zero"
        self.identity = identity
        self.description = f"test source ({identity})"
        self.reads: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.failing: set[int] = set()
        self.delay = 0.0

    def read_unit(self, index: int) -> bytes:
        with self._lock:
            self.reads[index] += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if index in self.failing:
            raise IOFailure(f"{self.description}: unit {index} is unreadable")
        a = index * self.unit
        return self.data[a : a + self.unit_length(index)]

    def is_zero(self, index: int) -> bool:
        return index in self.zero

    def fetched(self) -> int:
        with self._lock:
            return sum(self.reads.values())


def source_bytes(size: int = SRC_SIZE, unit: int = UNIT, zero: Iterable[int] = ZERO_UNITS) -> bytes:
    """Random bytes with the ``zero`` units zeroed (and no other unit all zeros)."""
    data = bytearray(os.urandom(size))
    for i in zero:
        data[i * unit : (i + 1) * unit] = bytes(len(data[i * unit : (i + 1) * unit]))
    return bytes(data)


@pytest.fixture
def register() -> Iterator[Callable[[Source], str]]:
    """Register a source under a key of its own; unregistered at teardown."""
    keys: list[str] = []

    def reg(src: Source) -> str:
        key = f"test-hydrate/{uuid.uuid4().hex}"
        sources.register(key, src)
        keys.append(key)
        return key

    yield reg
    for key in keys:
        sources.unregister(key)


def _errno(fn: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(blksnap.BlksnapError) as info:
        fn(*args)
    return info.value.errno


def _target(make_file: Callable[..., str], name: str = "target.img", size: int = DEV_SIZE) -> str:
    return make_file(size, name=name, data=JUNK * size)


def _attach(eng: blksnap.Engine, name: str, key: str, map_path: Path, **opts: str) -> Any:
    return eng.attach(name, "hydrate", {"source": key, "map": str(map_path), **opts})


def _status(eng: blksnap.Engine, name: str = "d") -> dict[str, Any]:
    return eng.ctl(name, "hydrate", "status")


def _units(*units: int, size: int = SRC_SIZE) -> int:
    """Bytes of the source in ``units``."""
    return sum(min(UNIT, size - i * UNIT) for i in units)


def _wait_state(eng: blksnap.Engine, want: str, name: str = "d", timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status(eng, name)
        if status["state"] == want:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.005)


def _wait_retired(eng: blksnap.Engine, name: str = "d", timeout: float = 15) -> dict:
    """Until the filter took itself off the stack; its last status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            gone = "hydrate" not in eng.filters(name)
            status = _status(eng, name)
        except NotFound:
            # (between the removal and the retired status being recorded:
            # see test_status_answers_through_the_retirement)
            gone, status = False, {}
        if gone:
            return status
        assert status.get("state") != "failed", status
        assert time.monotonic() < deadline, status
        time.sleep(0.005)


def _map_units(map_path: Path, count: int = SRC_UNITS) -> list[int]:
    """The units the committed map file names done."""
    raw = file_bytes(str(map_path))[MAP_OFFSET : MAP_OFFSET + count]
    return [i for i, b in enumerate(raw) if b]


# -- reads ----------------------------------------------------------------------------


def test_paused_reads_come_from_the_source_and_fill_the_target(
    engine, make_file, register, tmp_path
):
    data = source_bytes()
    target = _target(make_file)
    dev = engine.add_device(target, name="d")
    src = MemSource(data)
    _attach(engine, "d", register(src), tmp_path / "h.map", paused="1")
    status = _status(engine)
    assert status["state"] == "paused"
    assert (status["done"], status["total"]) == (0, SRC_SIZE)
    assert engine.filters("d") == ["hydrate"]

    # Across units 1-3, at odd offsets.
    off, n = 2 * UNIT - 1000, UNIT + 3000
    assert dev.read(off, n) == data[off : off + n]
    assert src.reads == Counter({1: 1, 2: 1, 3: 1})
    assert _status(engine)["done"] == _units(1, 2, 3)
    # Zero units 4 and 5: zeros (not the target's junk), never fetched.
    assert dev.read(4 * UNIT + 7, UNIT) == bytes(UNIT)
    assert src.fetched() == 3
    assert _status(engine)["done"] == _units(1, 2, 3, 4, 5)
    # The short last unit, and on past the source: the target's own bytes.
    off, n = SRC_SIZE - 100, 100 + 20 * KiB
    assert dev.read(off, n) == data[-100:] + JUNK * 20 * KiB
    assert src.reads[16] == 1
    status = _status(engine)
    assert status["done"] == _units(1, 2, 3, 4, 5, 16) == 5 * UNIT + 12 * KiB
    assert status["filled"] == status["done"] and status["copied"] == 0
    assert status["state"] == "paused"
    # Only past the source: nothing fetched, nothing done.
    assert dev.read(SRC_SIZE + 512, 4096) == JUNK * 4096
    # Read again: from the target now.
    assert dev.read(UNIT, 5 * UNIT) == data[UNIT : 6 * UNIT]
    assert src.fetched() == 4
    assert _status(engine)["done"] == 5 * UNIT + 12 * KiB

    # The target holds what was filled, and only that.
    disk = file_bytes(target)
    assert disk[UNIT : 6 * UNIT] == data[UNIT : 6 * UNIT]
    assert disk[16 * UNIT : SRC_SIZE] == data[16 * UNIT :]
    assert disk[:UNIT] == JUNK * UNIT
    assert disk[6 * UNIT : 16 * UNIT] == JUNK * (10 * UNIT)
    assert disk[SRC_SIZE:] == JUNK * (DEV_SIZE - SRC_SIZE)
    # A unit not done yet is still the source's.
    assert dev.read(7 * UNIT, 10) == data[7 * UNIT : 7 * UNIT + 10]


# -- writes ---------------------------------------------------------------------------


def test_writes_fill_only_the_units_they_cover_in_part(engine, make_file, register, tmp_path):
    data = source_bytes()
    target = _target(make_file)
    dev = engine.add_device(target, name="d")
    src = MemSource(data)
    _attach(engine, "d", register(src), tmp_path / "h.map", paused="1")
    retired: list[tuple[str, str]] = []
    engine.on_filter_retired = lambda name, flt: retired.append((name, flt))
    model = bytearray(data + JUNK * (DEV_SIZE - SRC_SIZE))

    def write(off: int, buf: bytes) -> None:
        dev.write(off, buf)
        model[off : off + len(buf)] = buf

    def done() -> int:
        return _status(engine)["done"]

    # A whole unit: not fetched.
    write(6 * UNIT, os.urandom(UNIT))
    assert src.fetched() == 0 and done() == UNIT
    assert file_bytes(target)[6 * UNIT : 7 * UNIT] == model[6 * UNIT : 7 * UNIT]
    # Part of unit 7, then 8 and 9 whole: only 7 fetched.
    write(7 * UNIT + 100, os.urandom(3 * UNIT - 100))
    assert src.reads == Counter({7: 1}) and done() == 4 * UNIT
    # Inside unit 10: fetched, the rest of it the source's.
    write(10 * UNIT + 5, b"x" * 10)
    assert src.reads[10] == 1 and done() == 5 * UNIT
    assert dev.read(10 * UNIT, UNIT) == model[10 * UNIT : 11 * UNIT]
    assert dev.read(10 * UNIT, 5) == data[10 * UNIT : 10 * UNIT + 5]
    # Discard: unit 11 whole (not fetched), part of unit 12 (fetched).
    dev.discard(11 * UNIT, UNIT)
    model[11 * UNIT : 12 * UNIT] = bytes(UNIT)
    dev.discard(12 * UNIT + 4096, 8192)
    model[12 * UNIT + 4096 : 12 * UNIT + 12288] = bytes(8192)
    assert 11 not in src.reads and src.reads[12] == 1 and done() == 7 * UNIT
    # Write-zeroes: unit 13 whole (not fetched), part of unit 14 (fetched).
    dev.write_zeroes(13 * UNIT, UNIT)
    model[13 * UNIT : 14 * UNIT] = bytes(UNIT)
    dev.write_zeroes(14 * UNIT + UNIT - 512, 512, unmap=True)
    model[15 * UNIT - 512 : 15 * UNIT] = bytes(512)
    assert 13 not in src.reads and src.reads[14] == 1 and done() == 9 * UNIT
    # The short last unit covered whole (and on past the source): not fetched.
    write(16 * UNIT, os.urandom(SRC_SIZE - 16 * UNIT + 4096))
    assert 16 not in src.reads and done() == 9 * UNIT + 12 * KiB
    assert src.fetched() == 4
    assert dev.read(0, DEV_SIZE) == model
    assert file_bytes(target)[6 * UNIT : 15 * UNIT] == model[6 * UNIT : 15 * UNIT]

    engine.ctl("d", "hydrate", "resume")
    last = _wait_retired(engine)
    assert last["state"] == "done" and last["done"] == last["total"] == SRC_SIZE
    assert retired == [("d", "hydrate")]
    # The copy never fetched a unit a write made done.
    assert not {6, 8, 9, 11, 13, 16} & set(src.reads)
    assert all(n == 1 for n in src.reads.values()), src.reads
    assert engine.filters("d") == []
    assert dev.read(0, DEV_SIZE) == model
    assert file_bytes(target) == model
    # An ordinary device from now on.
    write(0, b"after")
    assert file_bytes(target)[:5] == b"after"
    assert _status(engine)["state"] == "done"  # (the retired status, kept)


def test_the_tracker_marks_writes_not_the_copy(engine, make_file, register, tmp_path):
    """At altitude 250, below the tracker: a device write is marked in the
    CBT, a unit the copy (or a read) puts back from the source is not."""
    data = source_bytes()
    dev = engine.add_device(_target(make_file), name="d")
    engine.attach("d")
    _attach(engine, "d", register(MemSource(data)), tmp_path / "h.map", paused="1")
    assert engine.filters("d") == ["blksnap", "hydrate"]
    dev.write(3 * UNIT + 10, b"tracked")
    dev.read(7 * UNIT, 100)
    engine.ctl("d", "hydrate", "resume")
    _wait_retired(engine)
    trk = engine.tracker("d")

    def marked(offset: int) -> bool:
        return bool(trk.cbt.write_map[offset >> trk.cbt.block_shift])

    assert marked(3 * UNIT + 10)
    assert not marked(7 * UNIT) and not marked(12 * UNIT) and not marked(0)


# -- detach ---------------------------------------------------------------------------


def test_detach_by_hand_before_done_is_refused(engine, make_file, register, tmp_path):
    data = source_bytes()
    dev = engine.add_device(_target(make_file), name="d")
    _attach(engine, "d", register(MemSource(data)), tmp_path / "h.map", paused="1")
    with pytest.raises(blksnap.errors.Busy) as info:
        engine.detach("d", "hydrate")
    assert info.value.errno == errno.EBUSY
    assert engine.filters("d") == ["hydrate"]
    # Still serving the source (the gate was let go).
    assert dev.read(2 * UNIT, 100) == data[2 * UNIT : 2 * UNIT + 100]
    dev.write(0, b"w")
    assert _status(engine)["state"] == "paused"


# -- the map --------------------------------------------------------------------------


def test_done_units_survive_a_clean_close(tmp_path, make_file, register):
    """A flush commits what is done; so does an engine's close (its
    detach), even units made done by writes never flushed: the next attach
    carries on from them, fetching none again."""
    data = source_bytes()
    target = _target(make_file)
    map_path = tmp_path / "maps" / "h.map"  # (its directory made too)
    model = bytearray(data + JUNK * (DEV_SIZE - SRC_SIZE))
    first = blksnap.Engine(tmp_path / "s1")
    try:
        dev = first.add_device(target, name="d")
        _attach(first, "d", register(MemSource(data)), map_path, paused="1")
        dev.write(3 * UNIT + 100, b"w" * 500)  # part of unit 3: filled first
        model[3 * UNIT + 100 : 3 * UNIT + 600] = b"w" * 500
        dev.read(5 * UNIT + 1, 10)  # unit 5: zero
        dev.read(8 * UNIT, 10)
        dev.flush()
        assert _map_units(map_path) == [3, 5, 8]
        new7 = os.urandom(UNIT)
        dev.write(7 * UNIT, new7)  # whole, not flushed
        model[7 * UNIT : 8 * UNIT] = new7
        dev.write(10 * UNIT + 5, b"x" * 10)  # part, not flushed
        model[10 * UNIT + 5 : 10 * UNIT + 15] = b"x" * 10
        before = _status(first)["done"]
        assert before == _units(3, 5, 7, 8, 10)
    finally:
        first.close()
    assert _map_units(map_path) == [3, 5, 7, 8, 10]

    second = blksnap.Engine(tmp_path / "s2")
    try:
        dev = second.add_device(target, name="d")
        src = MemSource(data)  # (made again, as a new process would)
        _attach(second, "d", register(src), map_path, paused="1")
        assert _status(second)["done"] == before
        for i in (3, 5, 7, 8, 10):
            assert dev.read(i * UNIT, UNIT) == model[i * UNIT : (i + 1) * UNIT], i
        assert src.fetched() == 0
        assert dev.read(11 * UNIT, 10) == data[11 * UNIT : 11 * UNIT + 10]  # not done
        assert src.reads == Counter({11: 1})
        second.ctl("d", "hydrate", "resume")
        _wait_retired(second)
        assert file_bytes(target) == model
        assert 7 not in src.reads and 10 not in src.reads
    finally:
        second.close()


def test_the_map_names_a_unit_only_once_flushed(tmp_path, make_file, register):
    """A unit done but not committed when the power went is filled again
    from the source (the map as it was on disk then)."""
    data = source_bytes()
    target = _target(make_file)
    map_path = tmp_path / "h.map"
    first = blksnap.Engine(tmp_path / "s1")
    try:
        dev = first.add_device(target, name="d")
        _attach(first, "d", register(MemSource(data)), map_path, paused="1")
        assert _map_units(map_path) == []
        dev.write(6 * UNIT, b"6" * UNIT)
        dev.read(2 * UNIT, 1)
        assert _map_units(map_path) == []  # done, not durable
        dev.flush()
        assert _map_units(map_path) == [2, 6]
        dev.write(8 * UNIT, b"8" * UNIT)  # never flushed
        assert _map_units(map_path) == [2, 6]
        at_cut = file_bytes(str(map_path))
    finally:
        first.close()
    # The power went before the close: the map as it was then.
    map_path.write_bytes(at_cut)
    second = blksnap.Engine(tmp_path / "s2")
    try:
        dev = second.add_device(target, name="d")
        src = MemSource(data)
        _attach(second, "d", register(src), map_path, paused="1")
        assert _status(second)["done"] == _units(2, 6)
        assert dev.read(6 * UNIT, UNIT) == b"6" * UNIT
        assert dev.read(8 * UNIT, UNIT) == data[8 * UNIT : 9 * UNIT]  # filled again
        assert src.reads == Counter({8: 1})
    finally:
        second.close()


def test_a_map_of_another_source_or_target_is_refused(engine, make_file, register, tmp_path):
    data = source_bytes()
    a_path = _target(make_file, "a.img")
    b_path = _target(make_file, "b.img")
    map_path = tmp_path / "h.map"
    dev = engine.add_device(a_path, name="a")
    _attach(engine, "a", register(MemSource(data, identity="backup-1")), map_path, paused="1")
    dev.read(UNIT, 10)
    dev.flush()
    engine.remove_device("a")  # (a close: what is done is committed)
    kept = file_bytes(str(map_path))
    assert _map_units(map_path) == [1]

    # The same target, another backup.
    engine.add_device(a_path, name="a")
    other = MemSource(data, identity="backup-2")
    assert _errno(_attach, engine, "a", register(other), map_path) == errno.EEXIST
    # The same backup, another target (of the same size).
    engine.add_device(b_path, name="b")
    same = MemSource(data, identity="backup-1")
    assert _errno(_attach, engine, "b", register(same), map_path) == errno.EEXIST
    assert engine.filters("a") == engine.filters("b") == []
    assert file_bytes(str(map_path)) == kept
    assert other.fetched() == same.fetched() == 0
    assert file_bytes(b_path) == JUNK * DEV_SIZE

    # The right pair carries on.
    _attach(engine, "a", register(MemSource(data, identity="backup-1")), map_path, paused="1")
    assert _status(engine, "a")["done"] == UNIT


def test_bad_attaches_are_refused(engine, make_file, register, tmp_path):
    data = source_bytes()
    engine.add_device(_target(make_file), name="d")
    map_path = tmp_path / "h.map"
    key = register(MemSource(data))
    assert _errno(engine.attach, "d", "hydrate", {}) == errno.EINVAL
    assert _errno(engine.attach, "d", "hydrate", {"source": key}) == errno.EINVAL
    assert _errno(engine.attach, "d", "hydrate", {"map": str(map_path)}) == errno.EINVAL
    assert _errno(_attach, engine, "d", "no-such-source", map_path) == errno.ENOENT
    opts = {"source": key, "map": str(map_path), "colour": "red"}
    assert _errno(engine.attach, "d", "hydrate", opts) == errno.EINVAL
    big = register(MemSource(source_bytes(DEV_SIZE + UNIT), zero=()))
    assert _errno(_attach, engine, "d", big, map_path) == errno.ENOSPC
    assert engine.filters("d") == []
    assert not map_path.exists()


# -- a snapshot during hydration ------------------------------------------------------


def test_a_snapshot_taken_during_hydration_reads_the_source(
    engine, make_file, register, tmp_path, storage_dir
):
    data = source_bytes()
    dev = engine.add_device(_target(make_file), name="d")
    src = MemSource(data)
    _attach(engine, "d", register(src), tmp_path / "h.map", paused="1")
    at_take = data + JUNK * (DEV_SIZE - SRC_SIZE)
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=4 * MiB)
    engine.snapshot_take(sid)
    assert engine.filters("d") == ["blksnap", "hydrate"]
    image = engine.image(sid, "d")
    model = bytearray(at_take)
    for off, n in ((6 * UNIT, UNIT), (10 * UNIT + 100, 200), (2 * UNIT, 3 * UNIT)):
        buf = os.urandom(n)
        dev.write(off, buf)  # units not done: the copy-on-write reads the source
        model[off : off + n] = buf
    assert src.reads[6] == 1  # (a whole unit: fetched for the copy-on-write alone)
    assert dev.read(0, DEV_SIZE) == model
    assert image.read(6 * UNIT, UNIT) == data[6 * UNIT : 7 * UNIT]
    assert image.read(10 * UNIT, UNIT) == data[10 * UNIT : 11 * UNIT]
    assert image.read(12 * UNIT + 3, 5) == data[12 * UNIT + 3 : 12 * UNIT + 8]  # never written
    assert image.read(0, DEV_SIZE) == at_take
    engine.ctl("d", "hydrate", "resume")
    _wait_retired(engine)
    assert image.read(0, DEV_SIZE) == at_take
    assert dev.read(0, DEV_SIZE) == model
    assert engine.snapshot_collect(sid)[0]["error"] is None
    engine.snapshot_destroy(sid)


def test_image_allocation_during_hydration_says_no_hole_where_data_reads(
    engine, make_file, register, tmp_path, storage_dir
):
    data = source_bytes()
    dev = engine.add_device(make_file(DEV_SIZE, name="sparse.img"), name="d")  # all holes
    _attach(engine, "d", register(MemSource(data)), tmp_path / "h.map", paused="1")
    assert dev.allocation(0, DEV_SIZE) == [(0, DEV_SIZE, False)]  # the device: right
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=4 * MiB)
    engine.snapshot_take(sid)
    image = engine.image(sid, "d")
    runs = image.allocation(8 * UNIT, UNIT)  # (before a read fills the unit)
    assert image.read(8 * UNIT, UNIT) == data[8 * UNIT : 9 * UNIT] != bytes(UNIT)
    engine.snapshot_destroy(sid)
    assert not any(hole for _, _, hole in runs), runs


# -- concurrency ----------------------------------------------------------------------


def test_reads_and_writes_while_the_copy_runs(engine, make_file, register, tmp_path):
    size = 4 * MiB
    zero = {5, 6, 20, 40, 41, 63}
    data = source_bytes(size, zero=zero)
    target = _target(make_file, size=size)
    dev = engine.add_device(target, name="d")
    src = MemSource(data, zero=zero)
    src.delay = 0.003  # (so that the copy lasts a while)
    _attach(engine, "d", register(src), tmp_path / "h.map", paused="1")
    model = bytearray(data)
    stop = threading.Event()
    errors: list[BaseException] = []
    ops = [0, 0, 0, 0]
    region = size // 4

    def worker(k: int) -> None:
        """Random I/O in region k (its own: the model stays exact), each
        read checked against the model."""
        rnd = random.Random(k)
        lo = k * region
        try:
            while not stop.is_set() or ops[k] < 40:
                off = lo + rnd.randrange(region - 1)
                n = min(rnd.randrange(1, 3 * UNIT), lo + region - off)
                kind = rnd.random()
                if kind < 0.4:
                    got = dev.read(off, n)
                    assert got == model[off : off + n], (k, off, n)
                elif kind < 0.8:
                    buf = rnd.randbytes(n)
                    dev.write(off, buf)
                    model[off : off + n] = buf
                elif kind < 0.9:
                    dev.discard(off, n)
                    model[off : off + n] = bytes(n)
                else:
                    dev.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                ops[k] += 1
        except BaseException as exc:  # pragma: no cover - the assertion says
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        engine.ctl("d", "hydrate", "resume")
        last = _wait_retired(engine)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert last["done"] == size and last["copied"] > 0
    assert dev.read(0, size) == model
    assert file_bytes(target) == model


# -- failures -------------------------------------------------------------------------


def test_a_source_failure_fails_the_read_and_stops_the_copy(engine, make_file, register, tmp_path):
    data = source_bytes()
    target = _target(make_file)
    dev = engine.add_device(target, name="d")
    src = MemSource(data)
    src.failing = {2}
    flt = _attach(engine, "d", register(src), tmp_path / "h.map", paused="1")
    assert _errno(dev.read, 2 * UNIT + 10, 100) == errno.EIO
    assert _errno(dev.write, 2 * UNIT + 10, b"part") == errno.EIO  # (the fill first)
    assert _status(engine)["done"] == 0
    assert engine.device_errors()["d"]["by_op"] == {"read": 1, "write": 1}
    assert dev.read(3 * UNIT, 100) == data[3 * UNIT : 3 * UNIT + 100]  # others serve
    dev.write(2 * UNIT, b"w" * UNIT)  # whole: no fill needed

    src.failing = {12}
    engine.ctl("d", "hydrate", "resume")
    status = _wait_state(engine, "failed")
    assert "unit 12" in status["error"], status
    assert status["done"] < SRC_SIZE
    flt._thread.join(5)  # (the copy stopped: see test_resume_right_after_a_failure)
    assert not flt._thread.is_alive()
    done = _status(engine)["done"]
    time.sleep(0.05)
    assert _status(engine)["done"] == done
    assert _errno(dev.read, 12 * UNIT, 1) == errno.EIO

    src.failing = set()
    status = engine.ctl("d", "hydrate", "resume")
    assert status["state"] == "running" and status["error"] is None
    _wait_retired(engine)
    model = b"w" * UNIT
    assert file_bytes(target)[:SRC_SIZE] == data[: 2 * UNIT] + model + data[3 * UNIT :]


def test_resume_right_after_a_failure(engine, make_file, register, tmp_path, monkeypatch):
    """The failed copy's last steps (its fetchers' pool shut down) are held
    until ``resume`` has been asked: the window made wide."""
    release = threading.Event()

    class HeldPool(ThreadPoolExecutor):
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            release.wait(5)
            super().shutdown(wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(hydrate_mod, "ThreadPoolExecutor", HeldPool)
    data = source_bytes()
    engine.add_device(_target(make_file), name="d")
    src = MemSource(data)
    src.failing = {0}
    _attach(engine, "d", register(src), tmp_path / "h.map", paused="1")
    try:
        engine.ctl("d", "hydrate", "resume")
        _wait_state(engine, "failed")
        src.failing = set()
        engine.ctl("d", "hydrate", "resume")
    finally:
        release.set()
    deadline = time.monotonic() + 3
    while "hydrate" in engine.filters("d") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "hydrate" not in engine.filters("d"), _status(engine)


# -- steering -------------------------------------------------------------------------


def test_rate_limit_and_pause(engine, make_file, register, tmp_path, monkeypatch):
    size = 4 * MiB
    data = source_bytes(size, zero=())
    target = _target(make_file, size=size)
    engine.add_device(target, name="d")
    _attach(engine, "d", register(MemSource(data, zero=())), tmp_path / "h.map", paused="1")
    assert engine.ctl("d", "hydrate", "rate", "1M")["rate_limit"] == MiB
    t0 = time.monotonic()
    assert engine.ctl("d", "hydrate", "resume")["state"] == "running"
    while _status(engine)["done"] == 0:  # (it does run)
        assert time.monotonic() - t0 < 10
        time.sleep(0.01)
    time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
    status = _status(engine)
    # 1 MiB/s for about a second (a slow machine only copies less).
    assert 0 < status["done"] <= 2.5 * MiB, status
    assert status["state"] == "running"
    # The current rate: what the copy moves now (at most the limit, give or
    # take a unit), not an average since the attach.
    assert 0 < status["rate"] <= 1.5 * MiB, status
    status = engine.ctl("d", "hydrate", "pause")
    assert status["state"] == "paused"
    time.sleep(0.2)  # (the unit under way finishes; then nothing)
    paused_at = _status(engine)["done"]
    time.sleep(0.2)
    assert _status(engine)["done"] == paused_at < size
    monkeypatch.setattr(hydrate_module, "RATE_WINDOW", 0.3)
    time.sleep(0.4)
    status = _status(engine)
    assert status["rate"] == 0 and status["average_rate"] > 0, status
    engine.ctl("d", "hydrate", "rate", "0")
    engine.ctl("d", "hydrate", "resume")
    last = _wait_retired(engine)
    assert last["done"] == size and last["rate_limit"] == 0
    assert file_bytes(target) == data


def test_status_answers_through_the_retirement(engine, make_file, register, tmp_path):
    """Asked while the filter takes itself off, ``ctl status`` never finds
    no filter at all (as migrate's: the retired status is put in place before
    the filter goes). The engine's callback runs with the filter off the
    stack: what a poller in another thread may see then."""
    data = source_bytes()
    engine.add_device(_target(make_file), name="d")
    _attach(engine, "d", register(MemSource(data)), tmp_path / "h.map", paused="1")
    seen: list[Any] = []

    def retired(name: str, flt: str) -> None:
        try:
            seen.append(engine.ctl(name, flt, "status"))
        except blksnap.BlksnapError as exc:
            seen.append(exc)

    engine.on_filter_retired = retired
    engine.ctl("d", "hydrate", "resume")
    _wait_retired(engine)
    assert len(seen) == 1
    assert isinstance(seen[0], dict), seen[0]
    assert seen[0]["state"] == "done"


def test_done_only_once_off_the_stack(engine, make_file, register, tmp_path, monkeypatch):
    """``state: done`` means the device is an ordinary one again: while the
    last commit runs, every unit done but the filter still on the stack,
    the status says it is still at work (a poller that saw "done" then found
    the filter still attached)."""
    data = source_bytes()
    engine.add_device(_target(make_file), name="d")
    _attach(engine, "d", register(MemSource(data)), tmp_path / "h.map", paused="1")
    seen: list[tuple[bool, str]] = []
    commit = hydrate_module.Hydrate.commit

    def watched(self: Any, *args: Any) -> None:
        if self.complete:  # (the last commit, in the copy's thread)
            seen.append(("hydrate" in engine.filters("d"), _status(engine)["state"]))
        commit(self, *args)

    monkeypatch.setattr(hydrate_module.Hydrate, "commit", watched)
    engine.ctl("d", "hydrate", "resume")
    last = _wait_retired(engine)
    assert seen and all(on for on, _ in seen), seen
    assert all(state != "done" for _, state in seen), seen
    assert last["state"] == "done"


class _StallingGate(Gate):
    """A device gate that holds the copy thread's first ``enter`` until told."""

    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self.thread_name = thread_name
        self.stalled = threading.Event()
        self.go = threading.Event()
        self.armed = True

    def enter(self) -> None:
        if self.armed and threading.current_thread().name == self.thread_name:
            self.armed = False
            self.stalled.set()
            self.go.wait(10)
        super().enter()


def test_a_drain_while_the_copy_fills_a_unit_a_request_waits_for(
    engine, make_file, register, tmp_path
):
    data = source_bytes()
    dev: Device = engine.add_device(_target(make_file), name="d")
    gate = _StallingGate("hydrate-d")
    dev.queue = gate
    _attach(engine, "d", register(MemSource(data)), tmp_path / "h.map", paused="1")
    engine.ctl("d", "hydrate", "resume")
    assert gate.stalled.wait(5)  # the copy, about to fill unit 0, its lock held
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(bytes(dev.read(0, 4096))), daemon=True)
    reader.start()  # in the gate, then waits for unit 0's lock
    deadline = time.monotonic() + 5
    while gate.inflight == 0 and not got:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    drain = threading.Thread(target=gate.freeze, daemon=True)  # (a take's drain)
    drain.start()
    while gate._frozen == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    gate.go.set()  # the copy enters the gate now
    reader.join(1.5)
    stuck = reader.is_alive()
    # Let everything go: the drain is given up, then woken once no request is left.
    gate.unfreeze()
    reader.join(5)
    deadline = time.monotonic() + 5
    while gate.inflight and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.freeze()
    gate.unfreeze()
    drain.join(5)
    assert not reader.is_alive() and not drain.is_alive()
    assert got == [data[:4096]]
    assert not stuck, "the read, the drain and the copy wait for each other"


# -- sources and views ----------------------------------------------------------------


def test_view_serves_a_source_read_only(register):
    data = source_bytes()
    src = MemSource(data)
    view = View("b1/d", src)
    assert view.size == SRC_SIZE
    assert view.read(0, SRC_SIZE) == data
    assert view.read(2 * UNIT - 3, UNIT + 6) == data[2 * UNIT - 3 : 3 * UNIT + 3]
    assert view.read(SRC_SIZE - 5, 5) == data[-5:]
    assert view.read(7, 0) == b""
    src.reads.clear()
    assert view.read(4 * UNIT + 1, 2 * UNIT - 2) == bytes(2 * UNIT - 2)  # zero units
    assert view.read(9 * UNIT, UNIT) == bytes(UNIT)
    assert src.fetched() == 0
    assert _errno(view.write, 0, b"x") == errno.EROFS
    assert view.read(0, 1) == data[:1]  # (written nothing)
    src.reads.clear()
    assert _errno(view.read, SRC_SIZE - 5, 6) == errno.EINVAL
    assert _errno(view.read, -1, 1) == errno.EINVAL
    assert not view.write_may_wait(0, 1)
    view.flush()

    U = UNIT
    assert view.allocation(0, SRC_SIZE) == [
        (0, 4 * U, False),
        (4 * U, 2 * U, True),
        (6 * U, 3 * U, False),
        (9 * U, U, True),
        (10 * U, SRC_SIZE - 10 * U, False),
    ]
    assert view.allocation(4 * U + 100, 2 * U) == [
        (4 * U + 100, 2 * U - 100, True),
        (6 * U, 100, False),
    ]
    assert view.allocation(0, SRC_SIZE, limit=2) == [(0, 4 * U, False), (4 * U, 2 * U, True)]
    assert view.allocation(9 * U + 1, 10) == [(9 * U + 1, 10, True)]
    assert _errno(view.allocation, SRC_SIZE - 1, 2) == errno.EINVAL
    assert src.fetched() == 0  # (allocation reads nothing)

    # The registry.
    key = register(src)
    assert sources.get(key) is src and key in sources.registered()
    assert _errno(sources.register, key, MemSource(data)) == errno.EEXIST
    assert sources.unregister(key) is src
    assert sources.unregister(key) is None
    assert _errno(sources.get, key) == errno.ENOENT
