"""Take is atomic across the devices of a snapshot (SPEC, semantics 5).

Writer threads draw a sequence number ``n`` from a locked counter and write
the same 512-byte record for ``n`` to both devices, one after the other:
"forward" writers to ``da`` then ``db``, "backward" writers to ``db`` then
``da``. The record of ``n`` goes to the same slot on both devices, a slot no
other record uses in the round, so nothing is ever overwritten within a round.

While the writers run, a snapshot of both devices is taken. For each writer,
its records are written in order, and the second write of ``n`` starts only
after the first completed. So, at one instant:

* the records of a writer present on a device's image are a *prefix* of the
  writer's records (no write is lost, none from after the instant slipped in);
* on the device the writer writes second, that prefix is the first one, or
  the first one minus its last record (the one the writer had in flight
  between the two devices at the instant).

A take that switched the devices one after the other while writes went on
breaks the second rule for one of the two kinds of writers (records on the
second device that are missing from the first, or many more records on the
first device than on the second). Each writer also notes whether the take had
started or returned around every write: a write acknowledged before take
began must be in the image; a write begun after take returned must not be.
"""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

import blksnap
from blksnap.units import KiB, MiB

SLOT = 512
DEV_SIZE = 2 * MiB
SLOTS = DEV_SIZE // SLOT
MAGIC = b"ATOMSEQ\0"
HEAD = struct.Struct("<8sIQI")  # magic, round, seq, writer
CRC = struct.Struct("<I")
FILL = random.Random(5).randbytes(2 * SLOT)
ROUNDS = 5
WRITERS = (("da", "db"), ("da", "db"), ("db", "da"), ("db", "da"))

# Phases of the take, as the writers see them.
BEFORE, TAKING, AFTER = 0, 1, 2


def record(rnd: int, seq: int, writer: int) -> bytes:
    head = HEAD.pack(MAGIC, rnd, seq, writer)
    start = (seq * 7) % SLOT
    body = head + FILL[start : start + SLOT - HEAD.size - CRC.size]
    return body + CRC.pack(zlib.crc32(body))


def parse(image: bytes, rnd: int, perm: list[int]) -> dict[int, int]:
    """seq -> writer of every record of round ``rnd`` in ``image``; checks
    that every slot is untouched (zeros), an older round's record, or a whole
    record in the slot its sequence number maps to."""
    found: dict[int, int] = {}
    zero = bytes(SLOT)
    for slot in range(SLOTS):
        raw = image[slot * SLOT : (slot + 1) * SLOT]
        if raw == zero:
            continue
        magic, r, seq, writer = HEAD.unpack_from(raw)
        assert magic == MAGIC, f"slot {slot}: not a record"
        assert CRC.unpack_from(raw, SLOT - CRC.size)[0] == zlib.crc32(raw[: -CRC.size]), (
            f"slot {slot}: torn record"
        )
        assert r <= rnd, f"slot {slot}: record of a future round {r}"
        if r == rnd:
            assert perm[seq] == slot, f"record {seq} found in slot {slot}, not {perm[seq]}"
            assert raw == record(rnd, seq, writer)
            found[seq] = writer
    return found


@dataclass
class Write:
    seq: int
    #: Phase seen before the first write, between the two, after the second.
    phases: tuple[int, int, int]


@dataclass
class Round:
    rnd: int
    perm: list[int]
    stop_at: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0
    phase: int = BEFORE
    stop: threading.Event = field(default_factory=threading.Event)

    def next_seq(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or self.counter >= self.stop_at:
                return None
            seq = self.counter
            self.counter += 1
            return seq


class SlowWrites(blksnap.Filter):
    """Holds every write for a moment, below the tracker: writes linger in
    flight, so the take has to drain them."""

    name = "slowwrites"
    altitude = 101
    delay: ClassVar[float] = 0.0003

    def submit(self, bio: blksnap.Bio) -> blksnap.FilterResult:
        if bio.op is blksnap.Op.WRITE:
            time.sleep(self.delay)
        return blksnap.FilterResult.PASS


@pytest.fixture
def atomic_engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[blksnap.Engine]:
    chunk = getattr(request, "param", 64 * KiB)
    eng = blksnap.Engine(tmp_path / "state", params=blksnap.Params(chunk_size=chunk))
    try:
        for name in ("da", "db"):
            path = tmp_path / f"{name}.img"
            with open(path, "wb") as f:
                f.truncate(DEV_SIZE)
            eng.add_device(path, name=name)
        (tmp_path / "diff").mkdir()
        yield eng
    finally:
        eng.close()


def writer(eng: blksnap.Engine, rd: Round, wid: int, log: list[Write]) -> None:
    first, second = (eng.device(n) for n in WRITERS[wid])
    while True:
        seq = rd.next_seq()
        if seq is None:
            return
        rec = record(rd.rnd, seq, wid)
        off = rd.perm[seq] * SLOT
        p0 = rd.phase
        first.write(off, rec)
        p1 = rd.phase
        second.write(off, rec)
        p2 = rd.phase
        log.append(Write(seq, (p0, p1, p2)))


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "writers made no progress"
        time.sleep(0.0005)


def check_round(
    rd: Round,
    before: dict[str, bytes],
    images: dict[str, bytes],
    devices: dict[str, bytes],
    logs: list[list[Write]],
) -> None:
    present = {name: parse(images[name], rd.rnd, rd.perm) for name in images}
    written = sorted(w.seq for log in logs for w in log)
    assert written == list(range(rd.counter)), "a writer lost a sequence number"
    # The take fell in the middle of the stream on both devices.
    for name in images:
        assert 0 < len(present[name]) < len(written), (
            f"{name}: {len(present[name])} of {len(written)} records at take: "
            "the take did not race the writers"
        )

    for wid, log in enumerate(logs):
        first, second = WRITERS[wid]
        seqs = [w.seq for w in log]
        assert seqs == sorted(seqs)
        in_first = [s in present[first] for s in seqs]
        in_second = [s in present[second] for s in seqs]
        k = sum(in_first)
        j = sum(in_second)
        assert in_first == [True] * k + [False] * (len(seqs) - k), (
            f"writer {wid}: its records on {first}'s image are not a prefix: {in_first}"
        )
        assert in_second == [True] * j + [False] * (len(seqs) - j), (
            f"writer {wid}: its records on {second}'s image are not a prefix"
        )
        assert k - 1 <= j <= k, (
            f"writer {wid} ({first} then {second}): {k} records on {first}'s image but "
            f"{j} on {second}'s: the take was not one instant for both devices"
        )
        for w, f_in, s_in in zip(log, in_first, in_second, strict=True):
            p0, p1, p2 = w.phases
            if p1 == BEFORE:
                assert f_in, f"record {w.seq} acknowledged before take is not on {first}'s image"
            if p0 == AFTER:
                assert not f_in, f"record {w.seq} written after take is on {first}'s image"
            if p2 == BEFORE:
                assert s_in, f"record {w.seq} acknowledged before take is not on {second}'s image"
            if p1 == AFTER:
                assert not s_in, f"record {w.seq} written after take is on {second}'s image"

    # Byte for byte: the image is the device before the round plus exactly the
    # records present; the device holds every record of the round.
    writer_of = {w.seq: wid for wid, log in enumerate(logs) for w in log}
    for name in images:
        expect = bytearray(before[name])
        for seq in present[name]:
            expect[rd.perm[seq] * SLOT : (rd.perm[seq] + 1) * SLOT] = record(
                rd.rnd, seq, writer_of[seq]
            )
        assert images[name] == bytes(expect), f"{name}: image differs from the model"
        expect = bytearray(before[name])
        for seq, wid in writer_of.items():
            expect[rd.perm[seq] * SLOT : (rd.perm[seq] + 1) * SLOT] = record(rd.rnd, seq, wid)
        assert devices[name] == bytes(expect), f"{name}: device differs from the model"


def run_rounds(eng: blksnap.Engine, storage: str, rounds: int, take_after: int, extra: int) -> None:
    rng = random.Random(1234)
    names = ("da", "db")
    with ThreadPoolExecutor(len(WRITERS)) as pool:
        for rnd in range(1, rounds + 1):
            before = {n: eng.device(n).read(0, DEV_SIZE) for n in names}
            perm = list(range(SLOTS))
            rng.shuffle(perm)
            rd = Round(rnd, perm, stop_at=SLOTS)
            logs: list[list[Write]] = [[] for _ in WRITERS]
            futures = [pool.submit(writer, eng, rd, w, logs[w]) for w in range(len(WRITERS))]
            try:
                # Created while the writers run (attaching the tracker drains them).
                sid = eng.snapshot_create(list(names), storage=storage, limit=2 * DEV_SIZE)
                wait_for(lambda rd=rd: rd.counter >= take_after or rd.stop_at <= rd.counter)
                rd.phase = TAKING
                eng.snapshot_take(sid)
                rd.phase = AFTER
                taken_at = rd.counter
                # Read while the writers go on: an image never changes.
                early = {n: eng.image(sid, n).read(0, DEV_SIZE) for n in names}
                wait_for(lambda rd=rd, t=taken_at: rd.counter >= min(t + extra, SLOTS))
            finally:
                rd.stop.set()
                for fut in futures:
                    fut.result()
            images = {n: eng.image(sid, n).read(0, DEV_SIZE) for n in names}
            for n in names:
                assert images[n] == early[n], f"{n}: the image changed after take"
            devices = {n: eng.device(n).read(0, DEV_SIZE) for n in names}
            check_round(rd, before, images, devices, logs)
            eng.snapshot_destroy(sid)


@pytest.mark.parametrize("atomic_engine", [64 * KiB, 4 * KiB], indirect=True)
def test_take_is_one_instant_for_all_devices(atomic_engine, tmp_path):
    run_rounds(atomic_engine, str(tmp_path / "diff"), ROUNDS, take_after=400, extra=800)


def test_take_is_atomic_with_a_slow_device(atomic_engine, tmp_path):
    """Writes to ``db`` linger below the tracker: the take must drain them on
    one device while the other is already held."""
    atomic_engine.register_filter(SlowWrites)
    atomic_engine.attach("db")  # the tracker first: it must see writes first
    atomic_engine.attach("db", SlowWrites.name)
    assert atomic_engine.filters("db") == ["blksnap", SlowWrites.name]
    run_rounds(atomic_engine, str(tmp_path / "diff"), ROUNDS, take_after=150, extra=300)


def test_a_write_in_flight_at_take_is_on_one_side_of_it(atomic_engine, tmp_path):
    """A write to ``db`` is held in flight below the tracker while the take
    runs; once it completes, its writer writes ``da``. The images must not
    change when the held write lands, and must not hold the ``da`` write
    without the ``db`` write it follows."""
    eng = atomic_engine
    entered = threading.Event()
    release = threading.Event()

    class HoldWrites(blksnap.Filter):
        name = "holdwrites"
        altitude = 101

        def submit(self, bio: blksnap.Bio) -> blksnap.FilterResult:
            if bio.op is blksnap.Op.WRITE and not entered.is_set():
                entered.set()
                release.wait(10)
            return blksnap.FilterResult.PASS

    eng.register_filter(HoldWrites)
    eng.attach("db", HoldWrites.name)
    da, db = eng.device("da"), eng.device("db")
    sid = eng.snapshot_create(["da", "db"], storage=tmp_path / "diff", limit=2 * DEV_SIZE)
    first, second = b"\x11" * (3 * SLOT), b"\x22" * (3 * SLOT)
    at = 64 * KiB - SLOT  # across a chunk boundary

    def chain() -> None:
        db.write(at, first)
        da.write(at, second)

    with ThreadPoolExecutor(2) as pool:
        writing = pool.submit(chain)
        try:
            assert entered.wait(5)
            taking = pool.submit(eng.snapshot_take, sid)
            time.sleep(0.3)
            early = None
            if taking.done():  # the take did not wait for the write: what did it see?
                taking.result()
                early = {n: eng.image(sid, n).read(0, DEV_SIZE) for n in ("da", "db")}
        finally:
            release.set()
        writing.result()
        taking.result()
    final = {n: eng.image(sid, n).read(0, DEV_SIZE) for n in ("da", "db")}
    if early is not None:
        assert early == final, "an image changed when a write in flight at take landed"
    b_in = final["db"][at : at + len(first)]
    a_in = final["da"][at : at + len(second)]
    assert b_in in (first, bytes(len(first))), "the write in flight is half in the image"
    assert a_in in (second, bytes(len(second)))
    assert not (a_in == second and b_in != first), (
        "da's image has a write that followed one not on db's"
    )
    assert da.read(at, len(second)) == second and db.read(at, len(first)) == first
    eng.snapshot_destroy(sid)
