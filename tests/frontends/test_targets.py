"""Targets: a device or an image as the front-ends serve it."""

from __future__ import annotations

import pytest

import blksnap
from blksnap.frontends import targets
from blksnap.frontends.targets import DeviceTarget, ImageTarget

MiB = 1 << 20
BS = 64 * 1024  # the CBT block of a small device


def test_lookup_names_and_life(engine, make_file, storage_dir):
    engine.add_device(make_file(4 * MiB), name="d")
    engine.attach("d")
    dev = targets.lookup(engine, "d")
    assert isinstance(dev, DeviceTarget) and dev.served is engine.device("d")
    assert (dev.kind, dev.name, dev.size) == ("device", "d", 4 * MiB)
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    img = targets.lookup(engine, f"{sid}/d")
    assert isinstance(img, ImageTarget) and img.served is engine.image(sid, "d")
    assert (img.kind, img.name, img.sid) == ("image", f"{sid}/d", sid)
    assert targets.names(engine) == ["d", f"{sid}/d"]
    assert "(read-only)" in img.description(readonly=True)
    assert "(read-only)" not in img.description()
    for bad in ("", "nope", f"{sid}/nope", "x/d", "/d"):
        with pytest.raises(blksnap.BlksnapError):
            targets.lookup(engine, bad)
    assert dev.alive() and img.alive()
    engine.snapshot_destroy(sid)
    assert not img.alive() and dev.alive()
    engine.detach("d")
    engine.remove_device("d")
    assert not dev.alive()


def test_io_and_dirty_ranges(engine, make_file, storage_dir):
    engine.add_device(make_file(4 * MiB), name="d")
    dev = targets.device_target(engine, "d")
    assert not dev.has_dirty_map()
    assert dev.dirty_ranges(10, 100) == [(10, 100, True)]  # untracked: all may have changed
    assert not dev.write_may_wait(0, 4096)
    engine.attach("d")
    assert dev.has_dirty_map()
    dev.write(BS, b"a" * 10, fua=True)
    assert dev.read(BS, 10) == b"a" * 10
    assert dev.dirty_ranges(0, 3 * BS) == [(0, BS, False), (BS, BS, True), (2 * BS, BS, False)]
    assert dev.dirty_ranges(0, 3 * BS, limit=1) == [(0, BS, False)]
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    engine.snapshot_take(sid)
    img = targets.image_target(engine, sid, "d")
    assert img.write_may_wait(0, 4096)
    # The device: nothing written since the take; the image: block 1 changed.
    assert dev.dirty_ranges(0, 3 * BS) == [(0, 3 * BS, False)]
    assert img.dirty_ranges(0, 3 * BS) == [(0, BS, False), (BS, BS, True), (2 * BS, BS, False)]
    dev.write_zeroes(2 * BS, BS)
    assert dev.dirty_ranges(0, 3 * BS) == [(0, 2 * BS, False), (2 * BS, BS, True)]
    img.write_zeroes(0, 3 * BS + 5, fua=True)  # into the image's chunks
    assert img.read(0, 3 * BS + 5) == bytes(3 * BS + 5)
    assert img.dirty_ranges(0, 4 * BS)[0] == (0, 4 * BS, True)  # image writes mark it
    img.trim(0, BS)  # a hint: nothing changes
    assert img.read(BS, 10) == bytes(10)
    assert dev.read(BS, 10) == b"a" * 10
    dev.trim(BS, BS, fua=True)
    assert dev.read(BS, 10) == bytes(10)
    assert img.allocation(0, BS)[0][2] is False  # copied into diff storage: data
    engine.snapshot_destroy(sid)
