"""Every sector tells its own story (in the spirit of blksnap's test_corrupt).

Each 512-byte sector carries its own position, the global sequence number of
the write that stamped it, the writer, and a checksum. The device is filled
(sequence 0); writer threads then rewrite random sector-aligned extents at
full speed while snapshots are taken, read and destroyed, round after round,
with reader threads reading each image while the rewrites go on. Every sector
read from an image must be whole (checksum), in its place (position), no
newer than the take (sequence) and the same on every read; and each whole
image must equal the device at its take, rebuilt from the writers' logs.

The writers own disjoint regions (interleaved, 24 KiB each, so every chunk
is shared by several writers and many extents cross chunk boundaries); a
writer's writes are therefore ordered, and the device at any instant is each
writer's log replayed up to some point. Each write notes which takes had
begun or returned around it: those acknowledged before a take began must be
in its image, those begun after it returned must not, and of the few in
between, the image must hold a prefix, each write whole or not at all.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import blksnap
from blksnap.units import KiB, MiB

SECTOR = 512
WORDS = SECTOR // 8
DEV_SIZE = 4 * MiB
SECTORS = DEV_SIZE // SECTOR
REGION = 48  # sectors: 24 KiB, which no chunk size divides
# A sector is 64 little-endian words: position, sequence, writer, 60 words of
# filler that depend on all three, and a checksum (a weighted sum of the 63
# words before it: any mix of two sectors' words fails it).
FILL = np.frombuffer(random.Random(7).randbytes(4 * KiB), dtype=np.uint64)
FILL_AT = np.arange(WORDS - 4, dtype=np.uint64)
WEIGHTS = np.frombuffer(random.Random(8).randbytes(8 * (WORDS - 1)), dtype=np.uint64) | 1
FILLER_WRITER = 0xFFFF
WRITERS = 4
READERS = 2
ROUNDS = 5
ROUND_TIME = 0.5  # seconds of rewrites and image reads per snapshot


def checksum(words: np.ndarray) -> np.ndarray:
    return (words[:, : WORDS - 1] * WEIGHTS).sum(axis=1, dtype=np.uint64)


def stamp(first: int, count: int, seq: int, writer: int) -> bytes:
    """Sectors ``first``..``first+count-1`` as written by ``writer`` at ``seq``."""
    pos = np.arange(first, first + count, dtype=np.uint64)
    words = np.empty((count, WORDS), dtype=np.uint64)
    words[:, 0] = pos
    words[:, 1] = seq
    words[:, 2] = (writer << 32) | (seq & 0xFFFFFFFF)
    start = (pos * np.uint64(13) + np.uint64(seq * 101 + writer)) % np.uint64(len(FILL) - 64)
    words[:, 3 : WORDS - 1] = FILL[(start[:, None] + FILL_AT).astype(np.intp)]
    words[:, WORDS - 1] = checksum(words)
    return words.tobytes()


def check_sectors(data: bytes, first: int, max_seq: int) -> None:
    """Whole, in place, not newer than ``max_seq``: every sector of ``data``,
    which was read at sector ``first``."""
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, WORDS)
    torn = np.flatnonzero(checksum(words) != words[:, WORDS - 1])
    assert not len(torn), f"sector {first + int(torn[0])} is torn"
    expect = np.arange(first, first + len(words), dtype=np.uint64)
    moved = np.flatnonzero(words[:, 0] != expect)
    assert not len(moved), (
        f"sector {first + int(moved[0])} holds sector {int(words[moved[0], 0])}'s data"
    )
    newer = np.flatnonzero(words[:, 1] > max_seq)
    assert not len(newer), (
        f"sector {first + int(newer[0])} has sequence {int(words[newer[0], 1])}, "
        f"newer than take ({max_seq})"
    )


@dataclass
class Write:
    seq: int
    first: int
    count: int
    #: ``Run.phase`` before the write and after it was acknowledged.
    phases: tuple[int, int]


@dataclass
class Run:
    """Shared by the threads. ``phase`` is 2k-1 while take k runs and 2k once
    it has returned."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0
    phase: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    writes: int = 0

    def next_seq(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


def owned(wid: int) -> list[tuple[int, int]]:
    """Regions (first sector, sector count) of writer ``wid``."""
    every = [(s, min(REGION, SECTORS - s)) for s in range(0, SECTORS, REGION)]
    return [r for i, r in enumerate(every) if i % WRITERS == wid]


def writer(dev: blksnap.Device, run: Run, wid: int, log: list[Write]) -> None:
    rng = random.Random(wid)
    mine = owned(wid)
    while not run.stop.is_set():
        start, size = rng.choice(mine)
        a = rng.randrange(size)
        b = rng.randrange(a, size) + 1
        seq = run.next_seq()
        data = stamp(start + a, b - a, seq, wid)
        p0 = run.phase
        dev.write((start + a) * SECTOR, data)
        p1 = run.phase
        log.append(Write(seq, start + a, b - a, (p0, p1)))
        run.writes += 1


def reader(
    img: blksnap.Image, stop: threading.Event, reference: bytes, max_seq: int, seed: int
) -> int:
    """Reads the image while writers rewrite the device; returns the reads done."""
    rng = random.Random(seed)
    reads = 0
    while not stop.is_set():
        first = rng.randrange(SECTORS)
        count = rng.randint(1, min(SECTORS - first, 512))
        data = img.read(first * SECTOR, count * SECTOR)
        check_sectors(data, first, max_seq)
        assert data == reference[first * SECTOR : (first + count) * SECTOR], (
            f"image changed at sectors {first}+{count} while the device was rewritten"
        )
        # An unaligned read of the same place returns the same bytes.
        lo = rng.randrange(len(data))
        hi = rng.randint(lo + 1, len(data))
        assert img.read(first * SECTOR + lo, hi - lo) == data[lo:hi]
        reads += 1
    return reads


def replay(base: bytearray, writes: list[Write], wid: int) -> None:
    """Apply ``writes`` (in order) to ``base``; those later writes cover
    entirely are skipped."""
    covered = np.zeros(SECTORS, dtype=bool)
    survivors = []
    for w in reversed(writes):
        span = covered[w.first : w.first + w.count]
        if not span.all():
            survivors.append(w)
            span[:] = True
    for w in reversed(survivors):
        base[w.first * SECTOR : (w.first + w.count) * SECTOR] = stamp(w.first, w.count, w.seq, wid)


class Model:
    """The device as the writers' logs say, advanced take by take."""

    def __init__(self, initial: bytes) -> None:
        self.state = bytearray(initial)
        self.replayed = [0] * WRITERS  # writes of each writer in ``state``

    def at_take(self, k: int, logs: list[list[Write]], image: bytes) -> tuple[bytes, int, int]:
        """The device at take ``k``, checked against ``image``; and the number
        of writes acknowledged before it, and begun after it."""
        taking, taken = 2 * k - 1, 2 * k
        before = after = 0
        overlapping: list[list[Write]] = []
        for wid, full in enumerate(logs):
            log = list(full)
            assert log and log[-1].phases[0] >= taken, "a writer stalled"
            assert [w.seq for w in log] == sorted(w.seq for w in log)
            done = [w for w in log if w.phases[1] < taking]
            between = [w for w in log if w.phases[1] >= taking and w.phases[0] < taken]
            assert log[: len(done) + len(between)] == done + between
            before += len(done)
            after += len(log) - len(done) - len(between)
            # ``state`` then holds the writes acknowledged before take k.
            replay(self.state, done[self.replayed[wid] :], wid)
            self.replayed[wid] = len(done)
            overlapping.append(between)
        expect = bytearray(self.state)
        for wid, between in enumerate(overlapping):
            spans = [(w.first * SECTOR, (w.first + w.count) * SECTOR) for w in between]
            matches = []
            for n in range(len(between) + 1):
                candidate = bytearray(expect)
                replay(candidate, between[:n], wid)
                if all(image[a:b] == candidate[a:b] for a, b in spans):
                    matches.append(candidate)
            assert matches, (
                f"take {k}, writer {wid}: the image holds no prefix of the {len(between)} "
                "writes that overlapped the take (half a write, or a later one without "
                "an earlier one)"
            )
            expect = matches[0]
        return bytes(expect), before, after


class SlowWrites(blksnap.Filter):
    """Holds every write for a moment below the tracker, so writes are still
    in flight when a take comes: the take must drain them."""

    name = "slowwrites"
    altitude = 101

    def submit(self, bio: blksnap.Bio) -> blksnap.FilterResult:
        if bio.op is blksnap.Op.WRITE:
            time.sleep(0.0005)
        return blksnap.FilterResult.PASS


@pytest.fixture
def pattern_engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[blksnap.Engine]:
    chunk, slow = request.param
    eng = blksnap.Engine(tmp_path / "state", params=blksnap.Params(chunk_size=chunk))
    try:
        path = tmp_path / "disk.img"
        with open(path, "wb") as f:
            f.truncate(DEV_SIZE)
        eng.add_device(path, name="disk")
        if slow:
            eng.register_filter(SlowWrites)
            eng.attach("disk")
            eng.attach("disk", SlowWrites.name)
        (tmp_path / "diff").mkdir()
        yield eng
    finally:
        eng.close()


def wait_until(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


@pytest.mark.parametrize(
    "pattern_engine",
    [(4 * KiB, False), (64 * KiB, False), (1 * MiB, False), (64 * KiB, True)],
    ids=["4K", "64K", "1M", "64K-slow-device"],
    indirect=True,
)
def test_image_sectors_are_whole_in_place_and_from_the_take(pattern_engine, tmp_path):
    eng = pattern_engine
    dev = eng.device("disk")
    initial = stamp(0, SECTORS, 0, FILLER_WRITER)
    dev.write(0, initial)
    check_sectors(dev.read(0, DEV_SIZE), 0, 0)
    model = Model(initial)

    run = Run()
    logs: list[list[Write]] = [[] for _ in range(WRITERS)]
    with ThreadPoolExecutor(WRITERS + READERS) as pool:
        writers = [pool.submit(writer, dev, run, w, logs[w]) for w in range(WRITERS)]
        try:
            for k in range(1, ROUNDS + 1):
                sid = eng.snapshot_create(["disk"], storage=tmp_path / "diff", limit=2 * DEV_SIZE)
                start = run.writes
                wait_until(lambda s=start: run.writes >= s + 100, "writers made no progress")
                run.phase = 2 * k - 1
                eng.snapshot_take(sid)
                run.phase = 2 * k
                max_seq = run.counter  # no write begun after take is in the image
                img = eng.image(sid, "disk")
                reference = img.read(0, DEV_SIZE)  # while the rewrites go on
                check_sectors(reference, 0, max_seq)
                stop_readers = threading.Event()
                readers = [
                    pool.submit(reader, img, stop_readers, reference, max_seq, 10 * k + i)
                    for i in range(READERS)
                ]
                try:
                    time.sleep(ROUND_TIME)
                finally:
                    stop_readers.set()
                    reads = [fut.result() for fut in readers]
                assert all(n > 0 for n in reads)
                wait_until(
                    lambda k=k: all(log and log[-1].phases[0] >= 2 * k for log in logs),
                    "a writer stalled",
                )
                expect, before, after = model.at_take(k, logs, reference)
                assert before > 50 and after > 50, "the take did not race the writers"
                assert reference == expect, f"image {k} is not the device at take"
                check_sectors(img.read(0, DEV_SIZE), 0, max_seq)
                assert img.read(0, DEV_SIZE) == reference
                eng.snapshot_destroy(sid)
        finally:
            run.stop.set()
            for fut in writers:
                fut.result()

    # And the device holds every write.
    for wid, log in enumerate(logs):
        replay(model.state, log[model.replayed[wid] :], wid)
    assert dev.read(0, DEV_SIZE) == model.state
