"""blksnapd's own FUSE session under a block device's load, on a real daemon:
fio with crc32c verification at queue depths 1, 32 and 128 and 4 KiB, 64 KiB
and 1 MiB blocks on a device whose snapshot is taken (every write copies on
write first), and blkdiscard (plain and ``-z``) on such a device: the image
keeps the data from before the take, the device reads zeros, the CBT marks
exactly the discarded blocks and the next image sees the zeros.

(ext4 and xfs on loop devices with a snapshot taken and its image mounted:
``test_filesystems.py``; fstrim: ``test_fuse_own.py``.)"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, run
from tests.integration.helpers import (
    MiB,
    add_device,
    collect,
    create,
    direct_read,
    queue_limit,
    storage_dir,
    take_full,
)

KiB = 1 << 10
#: Each fio job writes its own region, so that each copies on write.
JOB_SIZE = 16 * MiB
QUEUE_DEPTHS = (1, 32, 128)
BLOCK_SIZES = {"4k": 4 * KiB, "64k": 64 * KiB, "1m": MiB}


def md5_of(path: str, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        f.seek(offset)
        left = os.fstat(f.fileno()).st_size - offset if length is None else length
        while left > 0 and (block := f.read(min(4 * MiB, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def random_device(
    backing: Callable[[str, int], str], name: str, size: int, seed: str
) -> tuple[str, bytes]:
    """A backing file of ``size`` random bytes: its path and contents."""
    data = random.Random(seed).randbytes(size)
    path = backing(f"{name}.img", size)
    with open(path, "r+b") as f:
        f.write(data)
    return path, data


def fio_jobs(dev: str) -> str:
    """One job per queue depth and block size, one after the other
    (stonewall), each writing its own region in random order (fio's random
    map writes no block twice, so in-flight writes never overlap) and then
    reading it back against crc32c headers."""
    lines = [
        "[global]", f"filename={dev}", "ioengine=libaio", "direct=1", "rw=randwrite",
        "verify=crc32c", "do_verify=1", "verify_fatal=1", "verify_state_save=0",
        "randrepeat=0", f"size={JOB_SIZE}",
    ]  # fmt: skip
    i = 0
    for qd in QUEUE_DEPTHS:
        for bs_name, bs in BLOCK_SIZES.items():
            lines += [f"[qd{qd}-{bs_name}]", "stonewall", f"iodepth={qd}", f"bs={bs}",
                      f"offset={i * JOB_SIZE}"]  # fmt: skip
            i += 1
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not shutil.which("fio"), reason="fio is not installed")
def test_fio_verify_queue_depths_and_block_sizes_with_snapshot_taken(
    daemon: Daemon, backing: Callable[[str, int], str], tmp_path: Path
) -> None:
    jobs = len(QUEUE_DEPTHS) * len(BLOCK_SIZES)
    size = (jobs + 1) * JOB_SIZE
    path, data = random_device(backing, "m", size, "fio-matrix")
    before = hashlib.md5(data).hexdigest()
    del data
    lp = add_device(daemon, path, "m")["loop"]
    sid = create(daemon, ["m"], storage_dir(tmp_path), f"{size // MiB + 64}M")
    img = take_full(daemon, sid)["images"]["m"]
    assert md5_of(img["path"]) == before
    jobfile = tmp_path / "matrix.fio"
    jobfile.write_text(fio_jobs(lp))
    out = run("fio", "--output-format=json", str(jobfile), cwd=tmp_path, timeout=240)
    result = json.loads(out.stdout[out.stdout.index("{") :])
    got = {j["jobname"]: j for j in result["jobs"]}
    assert sorted(got) == sorted(f"qd{q}-{b}" for q in QUEUE_DEPTHS for b in BLOCK_SIZES)
    for name, job in got.items():
        assert job["error"] == 0, (name, job["error"], out.stderr[-2000:])
        assert job["write"]["io_bytes"] == JOB_SIZE, (name, job["write"]["io_bytes"])
        # The verify pass read every block back (and checked its crc32c).
        assert job["read"]["io_bytes"] == JOB_SIZE, (name, job["read"]["io_bytes"])
    # The deep jobs kept that many requests in flight most of the time.
    for qd in QUEUE_DEPTHS[1:]:
        levels = got[f"qd{qd}-4k"]["iodepth_level"]
        deep = sum(v for k, v in levels.items() if k in ("32", ">=64"))
        assert deep > 50, (qd, levels)
    assert "verify" not in out.stderr, out.stderr[-2000:]
    # Every job's region changed on the device and copied on write first:
    # the image holds what was there at the take, bit for bit.
    assert md5_of(img["path"]) == before
    for i in range(jobs):
        assert md5_of(lp, i * JOB_SIZE, JOB_SIZE) != md5_of(img["path"], i * JOB_SIZE, JOB_SIZE)
    assert md5_of(lp, jobs * JOB_SIZE, JOB_SIZE) == md5_of(img["path"], jobs * JOB_SIZE, JOB_SIZE)
    snap = collect(daemon, sid)[0]
    assert snap["state"] == "taken" and snap["error"] is None, snap
    assert daemon.client.status()["healthy"]
    daemon.cli("snapshot", "destroy", "-i", sid)


def blocks_of(ranges: list[tuple[int, int]], block: int) -> set[int]:
    out: set[int] = set()
    for off, length in ranges:
        out.update(range(off // block, (off + length - 1) // block + 1))
    return out


@pytest.mark.skipif(not shutil.which("blkdiscard"), reason="blkdiscard is not installed")
def test_blkdiscard_and_zeroout_with_snapshot_taken(
    daemon: Daemon, backing: Callable[[str, int], str], tmp_path: Path
) -> None:
    size = 64 * MiB
    path, data = random_device(backing, "z", size, "blkdiscard")
    lp = add_device(daemon, path, "z")["loop"]
    # The loop device passes both on to the FUSE file as fallocate: a
    # discard as PUNCH_HOLE, a zeroout as ZERO_RANGE (no fallback writes).
    assert queue_limit(lp, "discard_max_bytes") > 0
    assert queue_limit(lp, "write_zeroes_max_bytes") > 0
    sid = create(daemon, ["z"], storage_dir(tmp_path), "128M")
    img = take_full(daemon, sid)["images"]["z"]
    cn = daemon.client.cbt_info("z").changes_number
    block = daemon.client.cbt_info("z").block_size
    assert md5_of(img["path"]) == hashlib.md5(data).hexdigest()
    # Ranges off the CBT's blocks: they mark every block they touch.
    discard = (5 * MiB + 8 * KiB, 3 * MiB + 4 * KiB)
    zeroout = (20 * MiB + 12 * KiB, 2 * MiB)
    zeroout_whole = (40 * MiB, 8 * MiB)
    run("blkdiscard", "-o", str(discard[0]), "-l", str(discard[1]), lp)
    run("blkdiscard", "-z", "-o", str(zeroout[0]), "-l", str(zeroout[1]), lp)
    run("blkdiscard", "-z", "-o", str(zeroout_whole[0]), "-l", str(zeroout_whole[1]), lp)
    ranges = [discard, zeroout, zeroout_whole]
    expected = bytearray(data)
    for off, length in ranges:
        expected[off : off + length] = bytes(length)
    # The device reads zeros there and its data elsewhere (through the loop
    # device, O_DIRECT, and in its backing file).
    for off, length in ranges:
        lo, hi = off - 64 * KiB, off + length + 64 * KiB
        assert direct_read(lp, lo, hi - lo) == bytes(expected[lo:hi]), (off, length)
    with open(path, "rb") as f:
        assert hashlib.md5(f.read()).digest() == hashlib.md5(expected).digest()
    # The image still has the data from before the take.
    assert md5_of(img["path"]) == hashlib.md5(data).hexdigest()
    for off, length in ranges:
        assert direct_read(img["loop"], off, length) == data[off : off + length]
    snap = collect(daemon, sid)[0]
    assert snap["state"] == "taken" and snap["error"] is None, snap
    daemon.cli("snapshot", "destroy", "-i", sid)
    # The next take: its CBT marks exactly the blocks discarded or zeroed,
    # and its image sees the zeros.
    sid2 = create(daemon, ["z"], storage_dir(tmp_path, "diff2"), "128M")
    img2 = take_full(daemon, sid2)["images"]["z"]
    marked = {i for i, b in enumerate(daemon.client.cbt_map("z")) if b > cn}
    assert marked == blocks_of(ranges, block), (sorted(marked), block)
    assert md5_of(img2["path"]) == hashlib.md5(expected).hexdigest()
    for off, length in ranges:
        assert direct_read(img2["loop"], off, length) == bytes(length)
    daemon.cli("snapshot", "destroy", "-i", sid2)
    assert daemon.client.status()["healthy"]
