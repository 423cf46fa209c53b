"""The block-stack walk on a sysfs tree of the test's own: partitions and
stacked devices (device-mapper, md) that this machine's kernel cannot make,
and the overlap rule itself. Loop devices are tested for real in
tests/integration/test_storage_on_device.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blksnap import blockstack
from blksnap.blockstack import Extent, overlap

DISK = os.makedev(253, 0)
PART1 = os.makedev(259, 1)
PART2 = os.makedev(259, 2)
DM = os.makedev(252, 0)


def _dev(path: Path, devnum: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dev").write_text(f"{os.major(devnum)}:{os.minor(devnum)}\n")


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """vdz with partitions vdz1 (sectors 2048..+4096) and vdz2 (6144..+4096),
    and dm-0 over vdz2."""
    block = tmp_path / "block"
    links = tmp_path / "dev" / "block"
    links.mkdir(parents=True)
    _dev(block / "vdz", DISK)
    for name, num, start in (("vdz1", PART1, 2048), ("vdz2", PART2, 6144)):
        part = block / "vdz" / name
        _dev(part, num)
        (part / "partition").write_text("1\n")
        (part / "start").write_text(f"{start}\n")
        (part / "size").write_text("4096\n")
        (links / f"{os.major(num)}:{os.minor(num)}").symlink_to(part)
    _dev(block / "dm-0", DM)
    (block / "dm-0" / "slaves").mkdir()
    (block / "dm-0" / "slaves" / "vdz2").symlink_to(block / "vdz" / "vdz2")
    for name, num in (("vdz", DISK), ("dm-0", DM)):
        (links / f"{os.major(num)}:{os.minor(num)}").symlink_to(block / name)
    monkeypatch.setattr(blockstack, "SYSFS", str(tmp_path))
    return tmp_path


def test_partition_is_a_range_of_its_disk(sysfs: Path) -> None:
    [p1] = blockstack.resolve_devnum(PART1)
    assert p1 == Extent((0, DISK), 2048 * 512, 4096 * 512, "/dev/vdz")
    [disk] = blockstack.resolve_devnum(DISK)
    assert disk.start == 0 and disk.length is None
    [p2] = blockstack.resolve_devnum(PART2)
    assert overlap([p1], [disk]) == p1
    assert overlap([p1], [p2]) is None  # side by side, no shared byte


def test_stacked_device_is_all_of_its_slaves(sysfs: Path) -> None:
    [dm] = blockstack.resolve_devnum(DM)
    assert dm.base == (0, DISK) and dm.length is None
    [p1] = blockstack.resolve_devnum(PART1)
    # Conservative: a device-mapper device may map any byte of its slaves.
    assert overlap([dm], [p1]) is not None


def test_not_a_block_device_of_this_host(sysfs: Path) -> None:
    assert blockstack.resolve_devnum(os.makedev(0, 42)) == []


def test_windows_of_one_file() -> None:
    base = (1, 2)
    a = Extent(base, 0, 4096, "f")
    b = Extent(base, 4096, None, "f")
    c = Extent(base, 4095, 2, "f")
    assert overlap([a], [b]) is None
    assert overlap([a], [c]) == a and overlap([b], [c]) == b
    assert overlap([a], [Extent((1, 3), 0, None, "g")]) is None
    served = Extent((0, 0), 0, None, "x", served="disk0")
    assert overlap([served], [Extent((0, 0), 0, None, "y", served="disk1")]) is None
    assert a.shifted(1024, None) == Extent(base, 1024, 3072, "f")
    assert b.shifted(1024, 100) == Extent(base, 5120, 100, "f")
