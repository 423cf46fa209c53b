"""CBT map: block size rule, marking, switch at take, wrap, new generations."""

from __future__ import annotations

import errno
import mmap

import numpy as np
import pytest

import blksnap
from blksnap.engine.cbt import CbtMap, tracking_block_shift
from blksnap.engine.params import Params
from blksnap.engine.regions import Regions
from blksnap.units import GiB, KiB, MiB, TiB


@pytest.mark.parametrize(
    ("capacity", "block_size"),
    [
        (1, 64 * KiB),
        (64 * MiB, 64 * KiB),
        (128 * GiB, 64 * KiB),  # exactly 2**21 blocks of 64 KiB
        (128 * GiB + 1, 128 * KiB),  # one block too many: double
        (1 * TiB, 512 * KiB),
        (4 * 1024 * TiB, 64 * MiB),  # capped at the maximum
        (64 * 1024 * TiB, 64 * MiB),  # still capped: more blocks then
    ],
)
def test_block_size_rule(capacity, block_size):
    assert 1 << tracking_block_shift(capacity, Params()) == block_size


def test_block_size_parameters_are_honoured():
    p = Params(
        tracking_block_minimum_shift=12,
        tracking_block_maximum_count=16,
        tracking_block_maximum_shift=14,
    )
    assert tracking_block_shift(16 * 4096, p) == 12
    assert tracking_block_shift(16 * 4096 + 1, p) == 13
    assert tracking_block_shift(1 << 30, p) == 14


def test_mark_and_switch():
    cbt = CbtMap(10 * 64 * KiB + 5, Params())
    assert cbt.block_count == 11
    info = cbt.info()
    assert info.changes_number == 0
    cbt.mark(64 * KiB - 1, 2)  # straddles blocks 0 and 1
    cbt.mark(10 * 64 * KiB, 5)  # the partial last block
    assert not cbt.read_map.any()  # the read map is frozen until take
    cbt.switch()
    assert cbt.info().changes_number == 1
    assert list(np.flatnonzero(cbt.read_map)) == [0, 1, 10]
    cbt.mark(3 * 64 * KiB, 1)
    assert cbt.read_map[3] == 0
    cbt.switch()
    assert cbt.info().changes_number == 2
    assert list(cbt.changed_blocks(1)) == [3]
    assert list(cbt.changed_blocks(0)) == [0, 1, 3, 10]
    assert cbt.info().generation_id == info.generation_id


def test_wrap_after_255_starts_new_generation():
    cbt = CbtMap(MiB, Params())
    first = cbt.info().generation_id
    for n in range(1, 256):
        cbt.mark(0, 1)
        cbt.switch()
        info = cbt.info()
        assert info.changes_number == n
        assert info.generation_id == first
    cbt.mark(64 * KiB, 1)
    cbt.switch()
    info = cbt.info()
    assert info.generation_id != first
    assert info.changes_number == 1
    # The new generation's first take: block 1 written in it, block 0 not.
    assert cbt.read_map[1] == 1 and cbt.read_map[0] == 0


def test_mark_both_reaches_the_frozen_map():
    cbt = CbtMap(MiB, Params())
    cbt.mark_both(0, 1)  # before any take: only the write map
    assert not cbt.read_map.any()
    cbt.switch()
    cbt.mark_both(5 * 64 * KiB, 1)
    assert cbt.read_map[5] == cbt.info().changes_number == 1
    cbt.switch()
    assert cbt.read_map[5] == 2
    with pytest.raises(blksnap.BlksnapError) as info:
        cbt.mark_both(MiB, 1)
    assert info.value.errno == errno.EINVAL


def test_resize_is_a_new_generation():
    cbt = CbtMap(MiB, Params())
    gen = cbt.info().generation_id
    cbt.resize(2 * MiB)
    assert cbt.info().generation_id != gen
    assert cbt.info().device_capacity == 2 * MiB
    assert cbt.block_count == 32


def test_engine_cbt_info_and_map(engine, make_file):
    dev = engine.add_device(make_file(MiB + 512), name="d0")  # a partial last block
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.cbt_info("d0")
    assert info.value.errno == errno.ENOENT  # no tracker yet
    engine.attach("d0")
    info = engine.cbt_info("d0")
    assert info.as_dict() == {
        "block_size": 64 * KiB,
        "device_capacity": MiB + 512,
        "block_count": 17,
        "generation_id": info.generation_id,
        "changes_number": 0,
        "recovered": [],
    }
    assert engine.cbt_map("d0") == bytes(17)
    dev.write(0, b"x")
    assert engine.cbt_map("d0") == bytes(17)


def test_reattach_is_a_new_generation(engine, make_file):
    engine.add_device(make_file(MiB), name="d0")
    engine.attach("d0")
    gen = engine.cbt_info("d0").generation_id
    engine.detach("d0")
    engine.attach("d0")
    assert engine.cbt_info("d0").generation_id != gen


def test_mark_dirty(engine, make_file, storage_dir):
    engine.add_device(make_file(MiB), name="d0")
    engine.attach("d0")
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    engine.mark_dirty("d0", [(2 * 64 * KiB + 7, 1), (9 * 64 * KiB, 64 * KiB + 1)])
    cmap = engine.cbt_map("d0")
    assert [i for i, b in enumerate(cmap) if b] == [2, 9, 10]
    before = engine.cbt_map("d0")
    for bad in ([(-1, 10)], [(0, 0)], [(MiB - 1, 2)]):
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.mark_dirty("d0", bad)
        assert info.value.errno == errno.EINVAL
    assert engine.cbt_map("d0") == before
    engine.snapshot_destroy(sid)


def test_capacity_change_is_a_new_generation_at_take(engine, make_file, storage_dir):
    path = make_file(MiB)
    dev = engine.add_device(path, name="d0")
    engine.attach("d0")
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    gen = engine.cbt_info("d0").generation_id
    engine.snapshot_destroy(sid)
    with open(path, "r+b") as f:
        f.truncate(2 * MiB)  # grown under us
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=MiB)
    engine.snapshot_take(sid)
    info = engine.cbt_info("d0")
    assert info.generation_id != gen
    assert info.device_capacity == dev.size == 2 * MiB
    assert engine.image(sid, "d0").size == 2 * MiB
    engine.snapshot_destroy(sid)


class KeptRegions(Regions):
    """Regions kept by key in this process: what a supervisor's memfds are
    to the next worker."""

    def __init__(self) -> None:
        self.kept: dict[str, mmap.mmap] = {}
        self.dropped: list[str] = []

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        region = self.kept.get(key)
        if region is not None and len(region) == size:
            return region, True
        region = self.kept[key] = mmap.mmap(-1, size)
        return region, False

    def drop(self, key: str) -> None:
        self.kept.pop(key, None)
        self.dropped.append(key)


def test_a_map_in_a_kept_region_carries_on() -> None:
    regions = KeptRegions()
    first = CbtMap(MiB, Params(), regions, "cbt/a")
    assert not first.resumed
    bs = first.block_size
    first.mark(3 * bs, 10)
    first.switch()  # take 1: changes_number 1, active 2
    first.mark(7 * bs, 1)
    # The process dies; the next one opens the same key.
    again = CbtMap(MiB, Params(), regions, "cbt/a")
    assert again.resumed
    assert again.generation_id == first.generation_id
    assert (again.active, again.changes_number) == (2, 1)
    assert again.write_map[3] == 1 and again.write_map[7] == 2
    assert again.read_map[3] == 1 and again.read_map[7] == 0
    again.switch()
    assert again.info().changes_number == 2
    assert set(again.changed_blocks(1).tolist()) == {7}
    # Another capacity: nothing carried over.
    other = CbtMap(2 * MiB, Params(), regions, "cbt/a")
    assert not other.resumed and other.generation_id != first.generation_id
    assert not other.write_map.any()
    other.release()
    assert "cbt/a" in regions.dropped and "cbt/a" not in regions.kept


def test_a_resize_starts_a_fresh_region() -> None:
    regions = KeptRegions()
    cbt = CbtMap(MiB, Params(), regions, "cbt/b")
    cbt.mark(0, 4096)
    gen = cbt.generation_id
    cbt.resize(2 * MiB)
    assert cbt.generation_id != gen and not cbt.write_map.any()
    assert CbtMap(2 * MiB, Params(), regions, "cbt/b").generation_id == cbt.generation_id
