"""TRIM, WRITE_ZEROES and base:allocation over NBD against a real blksnapd,
with clients nobody here wrote: qemu-io, nbdinfo and nbdcopy.

The backing store deallocates (a sparse file stays sparse, written data
gives its space back), a snapshot keeps the data of take time whatever is
trimmed, the CBT marks what was trimmed, and ``base:allocation`` reports the
holes of the backing file, on devices and on images."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.integration.conftest import have, run
from tests.integration.helpers import sha256_file
from tests.integration.test_nbd_clients import cbtinfo, snapshot, uri

KiB = 1 << 10
MiB = 1 << 20
HOLE = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
#: What the file system may add for its own bookkeeping (extent tree blocks).
SLACK = 64 * KiB

pytestmark = pytest.mark.skipif(
    not all(have(t) for t in ("qemu-io", "nbdinfo", "nbdcopy")),
    reason="needs qemu-utils and libnbd-bin (make apt)",
)


def allocated(path: str) -> int:
    """Bytes the file system gave ``path`` (st_blocks)."""
    return os.stat(path).st_blocks * 512


def qemu_io(export: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, export)
    assert "error" not in out.stdout.lower() and "failed" not in out.stdout.lower(), out.stdout


def read_export(export: str, tmp_path: Path, name: str) -> bytes:
    out = tmp_path / name
    run("nbdcopy", export, str(out))
    return out.read_bytes()


def alloc_map(export: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` (base:allocation): (offset, length, type), merged."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(run("nbdinfo", "--json", "--map", export).stdout):
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def write_at(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_qemu_io_discard_and_write_zeroes_deallocate(nbd_daemon, backing, tmp_path):
    """(a) Over NBD, discard and write -z -u give the space of written data
    back; on a sparse file they allocate nothing; write -z (NO_HOLE) keeps
    the range allocated. Data reads back as zeros, the rest is intact."""
    size = 16 * MiB
    path = backing("d.img", size)
    content = bytearray(random.Random(1).randbytes(size))
    write_at(path, 0, content)
    run("sync", "-f", path)
    nbd_daemon.cli("device", "add", path, "--name", "d")
    dev = uri(nbd_daemon.nbd, "d")
    before = allocated(path)
    assert before >= size
    qemu_io(dev, "discard 2M 4M")
    after_discard = allocated(path)
    assert after_discard <= before - 4 * MiB  # the old way wrote zeros: no change
    qemu_io(dev, "write -z -u 8M 2M")
    after_unmap = allocated(path)
    assert after_unmap <= after_discard - 2 * MiB
    qemu_io(dev, "write -z 12M 1M")  # NO_HOLE: stays allocated, no growth either
    assert after_unmap - MiB < allocated(path) <= after_unmap + SLACK
    for off, n in ((2 * MiB, 4 * MiB), (8 * MiB, 2 * MiB), (12 * MiB, 1 * MiB)):
        content[off : off + n] = bytes(n)
    assert read_export(dev, tmp_path, "d.raw") == content
    with open(path, "rb") as f:
        assert f.read() == content

    # A sparse backing file stays sparse: zeroing or trimming holes costs nothing.
    sparse = backing("s.img", size)
    nbd_daemon.cli("device", "add", sparse, "--name", "s")
    sdev = uri(nbd_daemon.nbd, "s")
    assert allocated(sparse) == 0
    qemu_io(sdev, "write -z -u 0 8M", "discard 8M 8M")
    nbd_daemon.cli("device", "remove", "s")  # (flushed and closed)
    assert allocated(sparse) == 0
    with open(sparse, "rb") as f:
        assert f.read() == bytes(size)


def test_trim_after_take_keeps_the_image_and_marks_the_cbt(nbd_daemon, backing, tmp_path):
    """(b) With a snapshot taken, trim and zeroing on the device export
    copy the chunks first: the image export stays the device at take
    (sha256), the device reads zeros there and gave the space back, and the
    CBT marks exactly the blocks trimmed (the device's dirty bitmap now, the
    read map after the next take)."""
    size = 16 * MiB
    path = backing("c.img", size)
    write_at(path, 0, random.Random(2).randbytes(size))
    run("sync", "-f", path)
    at_take = sha256_file(path)
    nbd_daemon.cli("device", "add", path, "--name", "c")
    nbd_daemon.cli("attach", "-d", "c")
    sid = snapshot(nbd_daemon, ["c"], tmp_path / "diff")
    info = cbtinfo(nbd_daemon, "c")
    block = info["block_size"]
    dev = uri(nbd_daemon.nbd, "c")
    before = allocated(path)
    # Not chunk aligned, crossing chunks; 4 KiB aligned so qemu sends them whole.
    ranges = [(1 * MiB + 12 * KiB, 3 * MiB + 100 * KiB), (9 * MiB + 4 * KiB, 200 * KiB)]
    qemu_io(dev, *(f"discard {off} {n}" for off, n in ranges), f"write -z -u {14 * MiB} {MiB}")
    ranges.append((14 * MiB, MiB))
    assert allocated(path) <= before - 3 * MiB
    got = read_export(dev, tmp_path, "dev.raw")
    for off, n in ranges:
        assert got[off : off + n] == bytes(n)
    image = uri(nbd_daemon.nbd, f"{sid}/c")
    run("nbdcopy", image, str(tmp_path / "img.raw"))
    assert sha256_file(tmp_path / "img.raw") == at_take
    expect = set()
    for off, n in ranges:
        expect |= set(range(off // block, (off + n - 1) // block + 1))
    # Live: the device's dirty bitmap (blocks changed since the take).
    bitmap = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:blksnap", dev).stdout)
    dirty = set()
    for e in bitmap:
        if e["type"] & 1:
            dirty |= set(range(e["offset"] // block, (e["offset"] + e["length"]) // block))
    assert dirty == expect
    # The next take's CBT map (readcbtmap, the ctl's cbtmap) numbers them as changed.
    nbd_daemon.cli("snapshot", "destroy", "-i", sid)
    sid2 = snapshot(nbd_daemon, ["c"], tmp_path / "diff")
    out = tmp_path / "cbt.map"
    nbd_daemon.cli("readcbtmap", "-d", "c", "-f", str(out))
    cbt = out.read_bytes()
    assert {b for b, number in enumerate(cbt) if number > info["changes_number"]} == expect
    nbd_daemon.cli("snapshot", "destroy", "-i", sid2)


def test_base_allocation_reports_holes(nbd_daemon, backing, tmp_path):
    """(c) ``nbdinfo --map`` on a device reports its backing file's holes
    (type 3: hole, zero) and data (0); on an image, chunks not copied are
    what the device was at take (holes stay holes), copied chunks are data."""
    size = 16 * MiB
    path = backing("h.img", size)
    write_at(path, 2 * MiB, random.Random(3).randbytes(2 * MiB))
    write_at(path, 10 * MiB, random.Random(4).randbytes(1 * MiB))
    nbd_daemon.cli("device", "add", path, "--name", "h")
    nbd_daemon.cli("attach", "-d", "h")
    dev = uri(nbd_daemon.nbd, "h")
    layout = [
        (0, 2 * MiB, HOLE),
        (2 * MiB, 2 * MiB, 0),
        (4 * MiB, 6 * MiB, HOLE),
        (10 * MiB, 1 * MiB, 0),
        (11 * MiB, 5 * MiB, HOLE),
    ]
    assert alloc_map(dev) == layout
    sid = snapshot(nbd_daemon, ["h"], tmp_path / "diff")
    image = uri(nbd_daemon.nbd, f"{sid}/h")
    assert alloc_map(image) == layout
    at_take = read_export(image, tmp_path, "take.raw")
    # After take: a write into a hole (6 MiB) copies that chunk, a trim of
    # data (10 MiB) copies those chunks and leaves a hole on the device.
    qemu_io(dev, f"write -P 0x5a {6 * MiB} 4k", f"discard {10 * MiB} {MiB}")
    got = alloc_map(dev)
    assert got[-1] == (6 * MiB + 4 * KiB, 10 * MiB - 4 * KiB, HOLE)  # trimmed: a hole now
    assert [e for e in got if e[0] < 6 * MiB] == [*layout[:2], (4 * MiB, 2 * MiB, HOLE)]
    img = alloc_map(image)
    # The copied hole chunk is data in the image: one chunk at 6 MiB.
    [copied] = [e for e in img if e[0] == 6 * MiB]
    chunk = copied[1]
    assert copied[2] == 0 and 4 * KiB <= chunk <= MiB and chunk & (chunk - 1) == 0
    assert img == [
        (0, 2 * MiB, HOLE),
        (2 * MiB, 2 * MiB, 0),
        (4 * MiB, 2 * MiB, HOLE),
        (6 * MiB, chunk, 0),
        (6 * MiB + chunk, 4 * MiB - chunk, HOLE),
        (10 * MiB, 1 * MiB, 0),  # copied before the trim: data
        (11 * MiB, 5 * MiB, HOLE),
    ]
    # What the image says are holes read as zeros, and it is the device at take.
    data = read_export(image, tmp_path, "img.raw")
    assert data == at_take
    for off, n, kind in img:
        if kind == HOLE:
            assert data[off : off + n] == bytes(n)
    nbd_daemon.cli("snapshot", "destroy", "-i", sid)
