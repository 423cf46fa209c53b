"""The engine calls the front-ends and the daemon use instead of its
internals: CBT dirty runs, Device.write_may_wait and Device.allocation,
Engine.tracker_of and Engine.snapshot_of."""

from __future__ import annotations

import numpy as np
import pytest

import blksnap
from blksnap.engine.cbt import CbtMap, mask_runs
from blksnap.engine.params import Params
from blksnap.units import KiB, MiB

BS = 64 * KiB  # the CBT block of a small device


# -- CbtMap.changed_runs / mask_runs ------------------------------------------------------


def test_mask_runs_merges_clips_and_limits():
    mask = np.array([True, True, False, False, True], dtype=bool)
    # blocks of 16 bytes starting at block 10: bytes 160..240
    assert mask_runs(mask, 10, 4, 165, 235) == [(165, 27, True), (192, 32, False), (224, 11, True)]
    assert mask_runs(mask, 10, 4, 165, 235, limit=2) == [(165, 27, True), (192, 32, False)]
    assert mask_runs(mask, 10, 4, 200, 200) == []
    assert mask_runs(mask[:0], 10, 4, 160, 170) == []


def test_changed_runs_of_the_write_and_read_maps():
    cbt = CbtMap(16 * BS, Params())
    assert cbt.block_size == BS
    cbt.mark(2 * BS, BS)
    cbt.mark(5 * BS + 1, 2 * BS)  # blocks 5, 6 and 7
    live = cbt.changed_runs(0, 16 * BS, cbt.active - 1, live=True)
    assert live == [(0, 2 * BS, False), (2 * BS, BS, True), (3 * BS, 2 * BS, False),
                    (5 * BS, 3 * BS, True), (8 * BS, 8 * BS, False)]  # fmt: skip
    # Nothing frozen yet: the read map is all zero.
    assert cbt.changed_runs(0, 16 * BS, 0) == [(0, 16 * BS, False)]
    cbt.switch()  # take 1: changes_number 1
    assert cbt.changes_number == 1
    assert cbt.changed_runs(0, 16 * BS, cbt.changes_number - 1) == live
    # The write map moved on: nothing written under the new number.
    assert cbt.changed_runs(0, 16 * BS, cbt.active - 1, live=True) == [(0, 16 * BS, False)]
    cbt.mark(0, 1)
    cbt.switch()  # take 2: only block 0 changed since take 1
    assert cbt.changed_runs(0, 16 * BS, cbt.changes_number - 1) == [
        (0, BS, True),
        (BS, 15 * BS, False),
    ]
    # Since before take 1: both takes' blocks.
    assert cbt.changed_runs(0, 4 * BS, 0) == [(0, BS, True), (BS, BS, False), (2 * BS, BS, True),
                                              (3 * BS, BS, False)]  # fmt: skip


def test_changed_runs_clip_limit_and_past_the_map():
    cbt = CbtMap(4 * BS, Params())
    cbt.mark(BS, BS)
    since = cbt.active - 1
    assert cbt.changed_runs(BS + 10, 20, since, live=True) == [(BS + 10, 20, True)]
    assert cbt.changed_runs(10, 2 * BS, since, live=True) == [
        (10, BS - 10, False),
        (BS, BS, True),
        (2 * BS, 10, False),
    ]
    assert cbt.changed_runs(10, 2 * BS, since, live=True, limit=1) == [(10, BS - 10, False)]
    assert cbt.changed_runs(0, 0, since, live=True) == []
    # A range past the tracked capacity (a device grown, not yet retaken): dirty.
    assert cbt.changed_runs(3 * BS, 2 * BS, since, live=True) == [
        (3 * BS, BS, False),
        (4 * BS, BS, True),
    ]


# -- Device.write_may_wait, Device.allocation, Image.write_may_wait -------------------


class _Delay(blksnap.Filter):
    """A filter that says nothing about itself: writes may wait in it."""

    name = "slow-test"
    altitude = 160


def test_device_write_may_wait_asks_every_filter(engine, make_file, storage_dir):
    engine.add_device(make_file(4 * MiB), name="d")
    dev = engine.device("d")
    assert not dev.write_may_wait(0, 4096)  # no filter
    engine.attach("d")
    assert dev.write_may_wait(0, 4096)  # the region's first write: its write intent
    dev.write(0, b"x")
    assert not dev.write_may_wait(0, 4096)  # tracker, no snapshot: a CBT mark
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    assert dev.write_may_wait(0, 4096)  # created: a take may arm copy-on-write
    engine.snapshot_take(sid)
    assert dev.write_may_wait(0, 4096)  # a new chunk: copied
    assert engine.image(sid, "d").write_may_wait(0, 4096)  # an image always may
    dev.write(0, b"x")
    assert not dev.write_may_wait(0, 4096)  # a rewrite
    engine.register_filter(_Delay)
    engine.snapshot_destroy(sid)
    assert not dev.write_may_wait(0, 4096)
    engine.attach("d", "slow-test")
    assert dev.write_may_wait(0, 4096)  # a filter that does not know better
    engine.detach("d", "slow-test")
    assert not dev.write_may_wait(0, 4096)


def test_device_allocation_follows_the_filters(engine, make_file):
    engine.add_device(make_file(4 * MiB, data=b"x" * MiB), name="d")
    dev = engine.device("d")
    assert dev.allocation(0, 4 * MiB) == [(0, MiB, False), (MiB, 3 * MiB, True)]
    assert dev.allocation(0, 4 * MiB, limit=1) == [(0, MiB, False)]
    engine.attach("d")  # the tracker reads the backing store
    assert dev.allocation(0, 4 * MiB) == [(0, MiB, False), (MiB, 3 * MiB, True)]
    engine.register_filter(_Delay)
    engine.attach("d", "slow-test")  # may serve reads from elsewhere: all data
    assert dev.allocation(MiB, MiB) == [(MiB, MiB, False)]
    with pytest.raises(blksnap.InvalidArgument):
        dev.allocation(4 * MiB, 1)


# -- Engine.tracker_of, Engine.snapshot_of ------------------------------------------------


def test_tracker_of_and_snapshot_of(engine, make_file, storage_dir):
    engine.add_device(make_file(4 * MiB), name="d")
    assert engine.tracker_of("d") is None
    assert engine.snapshot_of("d") is None
    trk = engine.attach("d")
    assert engine.tracker_of("d") is trk is engine.tracker("d")
    assert engine.snapshot_of("d") is None
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    assert engine.snapshot_of("d") == sid
    engine.snapshot_destroy(sid)
    assert engine.snapshot_of("d") is None
    with pytest.raises(blksnap.NotFound):
        engine.tracker_of("nope")
    with pytest.raises(blksnap.NotFound):
        engine.snapshot_of("nope")
