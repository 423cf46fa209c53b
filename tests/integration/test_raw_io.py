"""Raw O_DIRECT I/O on an image through loop devices: writes that cross chunk
boundaries at 2 KiB alignment land in the image only; the device (its backing
file and its loop device) stays as it was."""

from __future__ import annotations

import os

from tests.integration.conftest import run
from tests.integration.helpers import (
    KiB,
    MiB,
    add_device,
    block_size,
    create,
    direct_read,
    direct_write,
    md5,
    md5_file,
    storage_dir,
    take,
)

SIZE = 16 * MiB
#: Not multiples of the 64 KiB chunk, nor of 4 KiB: each 1 MiB write starts
#: and ends inside a chunk.
ODD_OFFSETS = [126 * KiB, 2174 * KiB, 4222 * KiB]
#: 4 KiB aligned, for the daemon's loop device (4096-byte sectors).
ALIGNED_OFFSETS = [8188 * KiB, 10236 * KiB]


def patched(base: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(base)
    for off, data in writes:
        out[off : off + len(data)] = data
    return bytes(out)


def test_image_raw_direct_io_crossing_chunks(daemon, backing, tmp_path):
    original = os.urandom(SIZE)
    path = backing("r.img", SIZE)
    with open(path, "r+b") as f:
        f.write(original)
    dev = add_device(daemon, path, "r")
    assert direct_read(dev["loop"], 0, SIZE) == original

    sid = create(daemon, ["r"], storage_dir(tmp_path), "32M")
    img = take(daemon, sid)["r"]
    assert block_size(img["loop"]) == 4096
    assert int(run("blockdev", "--getsize64", img["loop"]).stdout) == SIZE
    assert os.path.getsize(img["path"]) == SIZE
    assert direct_read(img["loop"], 0, SIZE) == original

    # The daemon's loop device has 4096-byte sectors, so O_DIRECT at 2 KiB
    # alignment needs a 512-byte-sector loop device over the same image file.
    small = run(
        "losetup", "--find", "--show", "--sector-size=512", "--direct-io=on", img["path"]
    ).stdout.strip()
    try:
        assert block_size(small) == 512
        writes = [(off, os.urandom(MiB)) for off in ODD_OFFSETS]
        for off, data in writes:
            direct_write(small, off, data)
        for off, data in writes:
            assert direct_read(small, off, MiB) == data, off
            # Read back through the daemon's loop device, 4 KiB aligned around it.
            lo, hi = off - off % 4096, -(-(off + MiB) // 4096) * 4096
            assert direct_read(img["loop"], lo, hi - lo) == patched(original, writes)[lo:hi]
        aligned = [(off, os.urandom(MiB)) for off in ALIGNED_OFFSETS]
        for off, data in aligned:
            direct_write(img["loop"], off, data)
        expect = patched(original, writes + aligned)
        assert direct_read(img["loop"], 0, SIZE) == expect
        assert direct_read(small, 0, SIZE) == expect
        with open(img["path"], "rb") as f:  # the FUSE file itself
            assert md5(f.read()) == md5(expect)

        # The device saw none of it: backing file and loop device.
        assert md5_file(path) == md5(original)
        assert direct_read(dev["loop"], 0, SIZE) == original

        # Device writes over the same chunks now: the image keeps its own data.
        later = [(off - 6 * KiB, os.urandom(MiB + 12 * KiB)) for off, _ in writes + aligned]
        later = [(off - off % 4096, data) for off, data in later]
        for off, data in later:
            direct_write(dev["loop"], off, data)
        assert direct_read(dev["loop"], 0, SIZE) == patched(original, later)
        assert direct_read(img["loop"], 0, SIZE) == expect
        assert direct_read(small, 0, SIZE) == expect
    finally:
        run("losetup", "-d", small, check=False)
    daemon.cli("snapshot", "destroy", "-i", sid)
    with open(path, "rb") as f:
        assert md5(f.read()) == md5(patched(original, later))
