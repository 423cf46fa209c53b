"""The compiled short way (blksnap/_shortway.c) through real FUSE files:
what it serves and what it gives back to Python, and that no write gets
past a drain: under writes in flight, snapshots are taken and destroyed and
the tracker's CBT and the images are checked against what was written.

Each test mounts blksnapd's FUSE files (:class:`OwnFS`) on an engine, as
the daemon does, and undoes it in ``finally``."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import blksnap
from blksnap import shortway
from blksnap.engine.device import Device
from blksnap.frontends.fuse_own import OwnFS
from tests.conftest import needs_fuse

MiB = 1 << 20
BS = 4096
SIZE = 16 * MiB

needs_short_way = pytest.mark.skipif(
    shortway.LIB is None, reason=f"no compiled short way: {shortway.WHY_NOT}"
)


@contextmanager
def served(
    engine: blksnap.Engine, mnt: Path, names: list[str], *, short_way: bool = True
) -> Iterator[OwnFS]:
    mnt.mkdir(exist_ok=True)
    fs = OwnFS(engine, threads=4, short_way=short_way)
    try:
        for name in names:
            fs.add_device(name)
        fs.mount(str(mnt))
        yield fs
    finally:
        fs.close()


def device_with_way(
    engine: blksnap.Engine, make_file: Callable[..., str], name: str = "a"
) -> tuple[str, Device, shortway.Way]:
    """A device on a new backing file, and its short way."""
    disk = make_file(SIZE, f"{name}.img")
    dev = engine.add_device(disk, name=name)
    assert dev.short_way is not None
    return disk, dev, dev.short_way


def aligned(size: int, fill: bytes = b"\0") -> memoryview:
    """A page-aligned buffer for O_DIRECT (an anonymous mmap)."""
    import mmap

    m = mmap.mmap(-1, size)
    if fill != b"\0":
        m[:] = fill * (size // len(fill))
    return memoryview(m)


def block(b: int, version: int) -> bytes:
    """Block ``b``'s content at ``version``: both, repeated."""
    return struct.pack("<QQ", b, version) * (BS // 16)


def version_of(data: bytes, b: int) -> int:
    got_b, version = struct.unpack_from("<QQ", data)
    if data != struct.pack("<QQ", got_b, version) * (BS // 16) or (version and got_b != b):
        raise AssertionError(f"block {b}: torn or misplaced data ({got_b}, {version})")
    return version


@needs_fuse
@needs_short_way
def test_what_the_short_way_serves_and_gives_back(
    tmp_path: Path, engine: blksnap.Engine, make_file: Callable[..., str], storage_dir: str
) -> None:
    disk, _dev, way = device_with_way(engine, make_file)
    with served(engine, tmp_path / "mnt", ["a"]) as fs:
        fd = os.open(tmp_path / "mnt" / "dev" / "a", os.O_RDWR | os.O_DIRECT)
        buf = aligned(64 * 1024, b"p")
        try:
            # No filter: reads and writes in C, on the backing file.
            assert way.mode == shortway.READS | shortway.WRITES
            c0 = way.counts()
            assert os.pwrite(fd, buf, 1 * MiB) == len(buf)
            assert os.pread(fd, 64 * 1024, 1 * MiB) == bytes(buf)
            c1 = way.counts()
            assert (c1["writes"] - c0["writes"], c1["reads"] - c0["reads"]) == (1, 1)
            with open(disk, "rb") as f:
                f.seek(1 * MiB)
                assert f.read(64 * 1024) == b"p" * 64 * 1024

            # The tracker: writes mark its CBT map in C.
            engine.attach("a")
            assert way.mode == shortway.READS | shortway.WRITES | shortway.TRACKED
            trk = engine.tracker("a")
            before = trk.cbt.active
            assert os.pwrite(fd, buf, 5 * MiB) == len(buf)
            shift = trk.cbt.block_shift
            first, last = 5 * MiB >> shift, (5 * MiB + len(buf) - 1) >> shift
            assert set(trk.cbt.write_map[first : last + 1].tolist()) == {before}
            # (The first write of a region since the attach waits for its
            # write intent in Python; the next is served in C.)
            cw = way.counts()
            assert cw["writes"] + cw["returned"] == c1["writes"] + c1["returned"] + 1
            assert trk.cbt.intent is not None and cw["returned"] == c1["returned"] + 1
            assert os.pwrite(fd, buf, 5 * MiB) == len(buf)
            assert way.counts()["writes"] == cw["writes"] + 1

            # A snapshot taken: a first write goes the long way (its chunks
            # copied first), a rewrite of stored chunks in C; reads in C.
            sid = engine.snapshot_create(["a"], storage_dir, 64 * MiB)
            engine.snapshot_take(sid)
            tracked = shortway.READS | shortway.WRITES | shortway.TRACKED
            assert way.mode == tracked | shortway.STORED
            c2 = way.counts()
            new = aligned(64 * 1024, b"n")
            assert os.pwrite(fd, new, 1 * MiB) == len(new)
            assert os.pread(fd, 64 * 1024, 1 * MiB) == bytes(new)
            c3 = way.counts()
            assert c3["writes"] == c2["writes"] and c3["reads"] == c2["reads"] + 1
            assert c3["returned"] == c2["returned"] + 1
            assert os.pwrite(fd, aligned(64 * 1024, b"r"), 1 * MiB) == len(new)
            assert way.counts()["writes"] == c3["writes"] + 1
            image = engine.image(sid, "a")
            assert bytes(image.read(1 * MiB, 64 * 1024)) == b"p" * 64 * 1024  # kept
            assert os.pread(fd, 64 * 1024, 1 * MiB) == b"r" * 64 * 1024
            # Blocks written either way are marked.
            assert trk.cbt.write_map[1 * MiB >> shift] == trk.cbt.active

            # The image's file: chunks not stored are read in C, from the
            # device; a stored chunk goes back to Python (diff storage).
            fs.add_snapshot(sid, ["a"])
            assert image.short_way is not None
            iway = image.short_way
            assert iway.mode == shortway.READS | shortway.IMAGE
            ifd = os.open(tmp_path / "mnt" / "images" / sid / "a", os.O_RDONLY | os.O_DIRECT)
            try:
                i0, reads0 = iway.counts(), image.reads
                assert os.pread(ifd, 64 * 1024, 5 * MiB) == b"p" * 64 * 1024
                i1 = iway.counts()
                assert i1["reads"] == i0["reads"] + 1 and image.reads == reads0 + 1
                assert os.pread(ifd, 64 * 1024, 1 * MiB) == b"p" * 64 * 1024
                i2 = iway.counts()
                assert i2["reads"] == i1["reads"] and i2["returned"] == i1["returned"] + 1
                assert image.reads == reads0 + 2
            finally:
                os.close(ifd)
            fs.remove_snapshot(sid)

            engine.snapshot_destroy(sid)
            assert way.mode == tracked and iway.mode == 0
            engine.detach("a")
            assert way.mode == shortway.READS | shortway.WRITES
        finally:
            os.close(fd)
    engine.remove_device("a")
    assert way.mode == 0


@needs_fuse
@needs_short_way
def test_a_flakey_filter_closes_the_short_way(
    tmp_path: Path, engine: blksnap.Engine, make_file: Callable[..., str]
) -> None:
    """A filter that is not the tracker: every request goes through it."""
    _disk, _dev, way = device_with_way(engine, make_file)
    with served(engine, tmp_path / "mnt", ["a"]):
        engine.attach("a", "flakey", {"mode": "error_writes"})  # (down until told)
        assert way.mode == 0
        fd = os.open(tmp_path / "mnt" / "dev" / "a", os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError):
                os.pwrite(fd, aligned(BS, b"x"), 0)
        finally:
            os.close(fd)
        assert way.counts()["writes"] == 0


@needs_fuse
@needs_short_way
def test_a_drain_holds_the_short_way(
    tmp_path: Path, engine: blksnap.Engine, make_file: Callable[..., str]
) -> None:
    """While the device's gate is drained (a take, an attach), no write
    served in C reaches the backing store; after, they go on."""
    disk, dev, way = device_with_way(engine, make_file)
    with (
        served(engine, tmp_path / "mnt", ["a"]),
        _Writers(tmp_path / "mnt" / "dev" / "a", 4, SIZE // BS) as writers,
    ):
        time.sleep(0.1)
        for _ in range(3):
            dev.queue.freeze()
            try:
                held = way.counts()
                with open(disk, "rb") as f:
                    before = f.read()
                time.sleep(0.3)
                with open(disk, "rb") as f:
                    assert f.read() == before, "a write reached the device in a drain"
                # (those that came meanwhile were given back: they wait in the gate)
                assert way.counts()["writes"] == held["writes"]
            finally:
                dev.queue.unfreeze()
            time.sleep(0.2)
            assert way.counts()["writes"] > held["writes"]
        assert not writers.errors


@needs_fuse
@needs_short_way
def test_a_file_open_on_a_removed_device_never_reaches_its_successor(
    tmp_path: Path, engine: blksnap.Engine, make_file: Callable[..., str]
) -> None:
    """A device removed and added again under its name is a new file (a new
    node id): the file still open on the old one fails, in C as in Python,
    and writes nothing to the new one."""
    old_disk, new_disk = make_file(SIZE, "old.img"), make_file(SIZE, "new.img")
    engine.add_device(old_disk, name="a")
    with served(engine, tmp_path / "mnt", ["a"]) as fs:
        path = tmp_path / "mnt" / "dev" / "a"
        old = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwrite(old, aligned(BS, b"o"), 0) == BS
            fs.remove_device("a")
            engine.remove_device("a")
            dev = engine.add_device(new_disk, name="a")
            fs.add_device("a")
            new = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                assert os.pwrite(new, aligned(BS, b"n"), 0) == BS
                with pytest.raises(OSError):
                    os.pwrite(old, aligned(BS, b"x"), 0)
                with pytest.raises(OSError):
                    os.pread(old, BS, 0)
                assert os.pread(new, BS, 0) == b"n" * BS
                assert dev.short_way is not None and dev.short_way.counts()["writes"] == 1
            finally:
                os.close(new)
        finally:
            os.close(old)
    with open(new_disk, "rb") as f:
        assert f.read(BS) == b"n" * BS
    with open(old_disk, "rb") as f:
        assert f.read(BS) == b"o" * BS


class _Writers:
    """Threads writing 4 KiB blocks through the FUSE file, each its own
    blocks, each block's versions in order; every write's start and end
    (monotonic) recorded."""

    def __init__(self, path: Path, nthreads: int, blocks: int) -> None:
        self.path = path
        self.blocks = blocks
        self.stop = threading.Event()
        #: block -> [(version, start, end)]
        self.log: dict[int, list[tuple[int, float, float]]] = {}
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i, nthreads), daemon=True)
            for i in range(nthreads)
        ]

    def _run(self, i: int, n: int) -> None:
        try:
            rng = random.Random(i)
            mine = list(range(i, self.blocks, n))
            buf = aligned(BS)
            fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
            try:
                while not self.stop.is_set():
                    b = rng.choice(mine)
                    history = self.log.setdefault(b, [])
                    version = len(history) + 1
                    buf[:] = block(b, version)
                    start = time.monotonic()
                    os.pwrite(fd, buf, b * BS)
                    history.append((version, start, time.monotonic()))
            finally:
                os.close(fd)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> _Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


@needs_fuse
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_no_write_gets_past_a_take_or_a_destroy(
    tmp_path: Path,
    engine: blksnap.Engine,
    make_file: Callable[..., str],
    storage_dir: str,
    compiled: bool,
) -> None:
    """Writes in flight while snapshots are taken and destroyed, over and
    over. After each take, every block reads from the image at the version
    its last write ended before the take began, or a later one begun before
    the take ended (none lost, none from after); read through the image's
    file (in C: chunks not stored) while the writes go on, it reads the same
    as in the engine. And what an incremental
    backup relies on: every write the image does not have (a version past
    the image's, ended before the next take) is in the changes the next
    take reports since this one. A write let past a drain, or marked under
    a stale number, breaks one or the other."""
    if compiled and shortway.LIB is None:
        pytest.skip(f"no compiled short way: {shortway.WHY_NOT}")
    # (the writers leave the last MiB alone: its chunks are never stored, so
    # the image's file reads them in C whatever the timing)
    blocks = (SIZE - MiB) // BS
    disk = make_file(SIZE, "a.img")
    dev = engine.add_device(disk, name="a")
    engine.attach("a")
    trk = engine.tracker("a")
    shift = trk.cbt.block_shift
    rounds = 8
    with (
        served(engine, tmp_path / "mnt", ["a"], short_way=compiled) as fs,
        _Writers(tmp_path / "mnt" / "dev" / "a", 4, blocks) as writers,
    ):
        #: The take before: its changes number and what its image held.
        prev: tuple[int, dict[int, int]] | None = None
        time.sleep(0.2)
        for _ in range(rounds):
            sid = engine.snapshot_create(["a"], storage_dir, 64 * MiB)
            t0 = time.monotonic()
            engine.snapshot_take(sid)
            t1 = time.monotonic()
            changes = engine.cbt_info("a").changes_number
            image = engine.image(sid, "a")
            fs.add_snapshot(sid, ["a"])
            ifd = os.open(tmp_path / "mnt" / "images" / sid / "a", os.O_RDONLY | os.O_DIRECT)
            try:
                through_file = [os.pread(ifd, 256 * 1024, at) for at in range(0, SIZE, 256 * 1024)]
            finally:
                os.close(ifd)
            fs.remove_snapshot(sid)
            assert b"".join(through_file) == bytes(image.read(0, SIZE))
            log = {b: list(h) for b, h in list(writers.log.items())}
            held: dict[int, int] = {}
            for b, history in log.items():
                done_before = [v for v, _, end in history if end < t0]
                begun_before = [v for v, start, _ in history if start < t1]
                got = held[b] = version_of(bytes(image.read(b * BS, BS)), b)
                low = max(done_before, default=0)
                high = max(begun_before, default=0)
                assert low <= got <= high, (b, got, low, high)
            if prev is not None:
                changed = set(trk.cbt.changed_blocks(prev[0]).tolist())
                for b, history in log.items():
                    missed = [v for v, _, end in history if v > prev[1].get(b, 0) and end < t0]
                    if missed:
                        assert (b * BS) >> shift in changed, (b, missed, prev[1].get(b))
            engine.snapshot_destroy(sid)
            prev = (changes, held)
            time.sleep(0.05)
    if compiled:
        assert dev.short_way is not None
        counts = dev.short_way.counts()
        assert counts["writes"] > 0, counts  # (the short way did serve)
        assert image.short_way is not None and image.short_way.counts()["reads"] >= 4
