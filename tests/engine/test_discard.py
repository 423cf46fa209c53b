"""Discard and write-zeroes in the engine: the backing store deallocates
(holes punched in a file, BLKZEROOUT on a block device) instead of writing
zeros, the tracker still marks and copies first, and the allocation queries
(``BackingStore.extents``, ``Image.allocation``) tell holes from data."""

from __future__ import annotations

import logging
import os
import random
import tempfile

import pytest

import blksnap
from blksnap.units import KiB, MiB
from tests.engine.test_diff_storage import loop_device

CHUNK = blksnap.Params().chunk_size
#: What a file system may add for its own bookkeeping (extent tree blocks).
SLACK = 64 * KiB


def blocks(path: str) -> int:
    """Bytes allocated to ``path`` (its st_blocks, in bytes)."""
    return os.stat(path).st_blocks * 512


def holes(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    return [(off, n) for off, n, hole in runs if hole]


def check_runs(runs: list[tuple[int, int, bool]], offset: int, length: int) -> None:
    """Runs follow each other from ``offset``, alternate, cover the range."""
    pos = offset
    for i, (off, n, hole) in enumerate(runs):
        assert off == pos and n > 0, runs
        if i:
            assert hole != runs[i - 1][2], runs
        pos += n
    assert pos == offset + length, runs


@pytest.fixture
def full(engine, make_file):
    """A device of 8 MiB, every byte written (no holes)."""
    data = os.urandom(8 * MiB)
    dev = engine.add_device(make_file(8 * MiB, "full.img", data), name="full")
    os.fsync(dev.backing.fd)
    return dev, bytearray(data)


def test_discard_punches_a_hole_and_reads_zeros(full):
    dev, model = full
    before = blocks(dev.path)
    assert before >= 8 * MiB
    dev.discard(2 * MiB, 3 * MiB)
    model[2 * MiB : 5 * MiB] = bytes(3 * MiB)
    assert blocks(dev.path) <= before - 3 * MiB + SLACK  # the space is given back
    assert dev.backing.extents(0, dev.size) == [
        (0, 2 * MiB, False),
        (2 * MiB, 3 * MiB, True),
        (5 * MiB, 3 * MiB, False),
    ]
    assert dev.size == 8 * MiB and os.stat(dev.path).st_size == 8 * MiB  # size kept
    assert dev.read(0, dev.size) == model


def test_discard_at_any_alignment_zeroes_exactly_the_range(full):
    dev, model = full
    rng = random.Random(7)
    for _ in range(40):
        n = rng.choice((1, 511, 4096, 5000, 70 * KiB, 300 * KiB))
        off = rng.randrange(0, dev.size - n)
        if rng.random() < 0.5:
            dev.discard(off, n)
        else:
            dev.write_zeroes(off, n, unmap=rng.random() < 0.5)
        model[off : off + n] = bytes(n)
    assert dev.read(0, dev.size) == model
    dev.flush()
    with open(dev.path, "rb") as f:
        assert f.read() == model


def test_write_zeroes_unmaps_only_when_allowed(full):
    dev, model = full
    before = blocks(dev.path)
    dev.write_zeroes(1 * MiB, 2 * MiB)  # no unmap: stays allocated
    # (give or take the file system's own extent blocks)
    kept = blocks(dev.path)
    assert before <= kept <= before + SLACK
    dev.write_zeroes(4 * MiB, 2 * MiB, unmap=True)
    # Released, give or take the file system's extent blocks (ext4 may add
    # one when a punch splits an extent).
    assert blocks(dev.path) <= kept - 2 * MiB + SLACK
    model[1 * MiB : 3 * MiB] = bytes(2 * MiB)
    model[4 * MiB : 6 * MiB] = bytes(2 * MiB)
    assert dev.read(0, dev.size) == model
    assert (4 * MiB, 2 * MiB) in holes(dev.backing.extents(0, dev.size))


def test_write_zeroes_on_a_hole_does_not_write_data(engine, make_file):
    """The old way wrote zeros: a sparse backing file grew by the range."""
    dev = engine.add_device(make_file(16 * MiB, "sparse.img"), name="sparse")
    assert blocks(dev.path) == 0
    dev.discard(0, 16 * MiB)
    dev.write_zeroes(0, 8 * MiB, unmap=True)
    dev.flush()
    assert blocks(dev.path) == 0
    assert dev.read(0, 16 * MiB) == bytes(16 * MiB)


def test_zero_range_unsupported_falls_back_to_writing_zeros(engine, caplog):
    """tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE (EOPNOTSUPP):
    zeros are written instead, and that is logged once."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        path = os.path.join(tmp, "t.img")
        data = os.urandom(2 * MiB)
        with open(path, "wb") as f:
            f.write(data)
        dev = engine.add_device(path, name="shm")
        try:
            with caplog.at_level(logging.INFO, logger="blksnap.engine.device"):
                dev.write_zeroes(0, 100 * KiB)
                dev.write_zeroes(1 * MiB, 4096)
            said = [r for r in caplog.records if "zero range not supported" in r.getMessage()]
            assert len(said) == 1
            expect = bytearray(data)
            expect[: 100 * KiB] = bytes(100 * KiB)
            expect[MiB : MiB + 4096] = bytes(4096)
            assert dev.read(0, dev.size) == expect
            before = blocks(path)
            dev.discard(MiB, MiB)  # tmpfs can punch
            assert blocks(path) <= before - MiB + SLACK
            assert dev.read(MiB, MiB) == bytes(MiB)
        finally:
            engine.remove_device("shm")


def test_extents_of_a_sparse_file(engine, make_file):
    dev = engine.add_device(make_file(8 * MiB, "holes.img"), name="holes")
    assert dev.backing.extents(0, dev.size) == [(0, 8 * MiB, True)]
    dev.write(1 * MiB, b"\x01" * (64 * KiB))
    dev.write(4 * MiB - 4096, b"\x02" * 8192)
    runs = dev.backing.extents(0, dev.size)
    check_runs(runs, 0, dev.size)
    assert [(o, n) for o, n, h in runs if not h] == [
        (1 * MiB, 64 * KiB),
        (4 * MiB - 4096, 8192),
    ]
    # Clipped to the range asked, unaligned ends included.
    assert dev.backing.extents(1 * MiB + 100, 4096) == [(1 * MiB + 100, 4096, False)]
    runs = dev.backing.extents(100, 4 * MiB)
    check_runs(runs, 100, 4 * MiB)
    # A limit gives a prefix.
    whole = dev.backing.extents(0, dev.size)
    assert dev.backing.extents(0, dev.size, limit=2) == whole[:2]
    assert dev.backing.extents(0, 0) == []


def test_discard_after_take_keeps_the_image_and_marks_the_cbt(engine, full, storage_dir):
    dev, model = full
    sid = engine.snapshot_create(["full"], storage=storage_dir, limit=16 * MiB)
    engine.snapshot_take(sid)
    at_take = bytes(model)
    img = engine.image(sid, "full")
    before = blocks(dev.path)
    ranges = [
        (CHUNK - 3, 2 * CHUNK + 7, "discard"),  # unaligned, across chunks
        (2 * MiB, 1 * MiB, "discard"),
        (5 * MiB + 100, 300 * KiB, "zero-unmap"),
        (7 * MiB, 64 * KiB, "zero"),
    ]
    for off, n, how in ranges:
        if how == "discard":
            dev.discard(off, n)
        else:
            dev.write_zeroes(off, n, unmap=how == "zero-unmap")
        model[off : off + n] = bytes(n)
    assert dev.read(0, dev.size) == model
    assert img.read(0, img.size) == at_take  # copied before deallocation
    # The backing store gave the space back, though the snapshot copied it.
    assert blocks(dev.path) <= before - 1 * MiB + SLACK
    # The CBT: the next take's map numbers exactly those blocks as changed.
    first = engine.cbt_info("full")
    engine.snapshot_destroy(sid)
    sid = engine.snapshot_create(["full"], storage=storage_dir, limit=16 * MiB)
    engine.snapshot_take(sid)
    cmap = engine.cbt_map("full")
    bs = first.block_size
    marked = {b for b, number in enumerate(cmap) if number > first.changes_number}
    expect = set()
    for off, n, _ in ranges:
        expect |= set(range(off // bs, (off + n - 1) // bs + 1))
    assert marked == expect
    engine.snapshot_destroy(sid)


def test_image_allocation(engine, make_file, storage_dir):
    """Chunks still on the device are what the backing store says (at take:
    any write since copied them); chunks in diff storage are data."""
    size = 32 * CHUNK
    dev = engine.add_device(make_file(size, "alloc.img"), name="alloc")
    for c in (2, 3, 10):  # data in chunks 2, 3 and 10; holes elsewhere
        dev.write(c * CHUNK, os.urandom(CHUNK))
    sid = engine.snapshot_create(["alloc"], storage=storage_dir, limit=64 * CHUNK)
    engine.snapshot_take(sid)
    img = engine.image(sid, "alloc")
    at_take = img.read(0, size)
    assert img.allocation(0, size) == [
        (0, 2 * CHUNK, True),
        (2 * CHUNK, 2 * CHUNK, False),
        (4 * CHUNK, 6 * CHUNK, True),
        (10 * CHUNK, CHUNK, False),
        (11 * CHUNK, 21 * CHUNK, True),
    ]
    # A device write to hole chunk 20 copies it: the image reads it from
    # diff storage now (data, though zeros); discarding data chunk 10 leaves
    # a hole on the device but the image's copy is data.
    dev.write(20 * CHUNK + 5, b"x")
    dev.discard(10 * CHUNK, CHUNK)
    dev.discard(2 * CHUNK, 2 * CHUNK)
    assert dev.backing.extents(10 * CHUNK, CHUNK) == [(10 * CHUNK, CHUNK, True)]
    runs = img.allocation(0, size)
    check_runs(runs, 0, size)
    assert runs == [
        (0, 2 * CHUNK, True),
        (2 * CHUNK, 2 * CHUNK, False),
        (4 * CHUNK, 6 * CHUNK, True),
        (10 * CHUNK, CHUNK, False),
        (11 * CHUNK, 9 * CHUNK, True),
        (20 * CHUNK, CHUNK, False),
        (21 * CHUNK, 11 * CHUNK, True),
    ]
    # Every hole the image reports reads as zeros.
    for off, n in holes(runs):
        assert img.read(off, n) == bytes(n)
    assert img.read(0, size) == at_take
    # Clipped, unaligned, limited.
    assert img.allocation(CHUNK + 7, 2 * CHUNK) == [
        (CHUNK + 7, CHUNK - 7, True),
        (2 * CHUNK, CHUNK + 7, False),
    ]
    assert img.allocation(0, size, limit=3) == runs[:3]
    assert img.allocation(5, 0) == []
    with pytest.raises(blksnap.BlksnapError):
        img.allocation(size - 1, 2)
    # An image write stores its chunk: data from then on.
    img.write(25 * CHUNK, b"y")
    assert (25 * CHUNK, CHUNK, False) in img.allocation(0, size)
    engine.snapshot_destroy(sid)


def test_block_device_discard_and_write_zeroes(engine, make_file, storage_dir):
    """On a block device (a loop device here) both go to BLKZEROOUT; the
    pieces of an unaligned range outside whole sectors are written."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root and /dev/loop-control")
    data = os.urandom(4 * MiB)
    path = make_file(4 * MiB, "blk.img", data)
    with loop_device(path) as loop:
        dev = engine.add_device(loop, name="blk")
        assert dev.backing.extents(0, dev.size) == [(0, dev.size, False)]
        sid = engine.snapshot_create(["blk"], storage=storage_dir, limit=8 * MiB)
        engine.snapshot_take(sid)
        img = engine.image(sid, "blk")
        model = bytearray(data)
        for off, n, how in (
            (1 * MiB, 1 * MiB, "discard"),
            (100, 5000, "discard"),
            (3 * MiB + 7, 64 * KiB, "zero"),
        ):
            if how == "discard":
                dev.discard(off, n)
            else:
                dev.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        assert not dev.backing._no_zeroout  # the ioctl did it, no fallback
        assert dev.read(0, dev.size) == model
        assert img.read(0, img.size) == data
        engine.snapshot_destroy(sid)
        dev.flush()
        engine.remove_device("blk")
        with open(path, "rb") as f:
            assert f.read() == model
