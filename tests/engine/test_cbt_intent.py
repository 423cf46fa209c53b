"""Write intent: a region's byte is durable before the first write to it
since the last checkpoint reaches the device; concurrent first writes share
one flush; a checkpoint clears the regions; after a crash the CBT is the
last checkpoint plus every region in the intent file, same generation."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import blksnap
from blksnap.engine import cbt_checkpoint, cbt_intent
from blksnap.engine.params import Params
from blksnap.engine.regions import LocalRegions
from blksnap.engine.tracker import intent_path
from tests.conftest import kill_engine, random_bytes

MiB = 1 << 20
SIZE = 16 * MiB
REGION = MiB
PARAMS = Params(cbt_intent_region_size=REGION, cbt_checkpoint_interval=0)


@pytest.fixture
def disk(make_file) -> str:
    return make_file(SIZE, name="disk.img", data=random_bytes(SIZE))


def start(state: Path, disk: str, params: Params = PARAMS) -> blksnap.Engine:
    # Regions of its own: a second engine in this process is a new blksnapd,
    # not a worker carrying the first one's maps on.
    eng = blksnap.Engine(state, params, regions=LocalRegions())
    eng.add_device(disk, name="d")
    eng.attach("d")
    return eng


def on_disk(state: Path) -> np.ndarray:
    with open(intent_path(cbt_checkpoint.path_for(str(state), "d")), "rb") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=4096) != 0


def test_a_first_write_waits_for_its_region_to_be_durable(tmp_path, disk, monkeypatch):
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")
    seen: list[bool] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        # At the flush, the backing file does not hold the write yet.
        with open(disk, "rb") as f:
            f.seek(5 * MiB + 100)
            seen.append(f.read(4) == b"MARK")

    monkeypatch.setattr(cbt_intent.os, "fdatasync", fdatasync)
    dev.write(5 * MiB + 100, b"MARK")
    assert seen == [False]
    assert np.flatnonzero(on_disk(tmp_path / "state")).tolist() == [5]
    dev.write(5 * MiB + 9000, b"more")  # same region: no flush
    assert len(seen) == 1
    dev.write(9 * MiB - 2, b"span")  # two regions, one flush
    assert len(seen) == 2
    assert np.flatnonzero(on_disk(tmp_path / "state")).tolist() == [5, 8, 9]
    eng.close()


def test_concurrent_first_writes_share_flushes(tmp_path, disk, monkeypatch):
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")
    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.05)
        real(fd)

    monkeypatch.setattr(cbt_intent.os, "fdatasync", slow)
    barrier = threading.Barrier(16)

    def writer(r: int) -> None:
        barrier.wait()
        dev.write(r * REGION, b"x" * 4096)

    threads = [threading.Thread(target=writer, args=(r,)) for r in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    intent = eng.tracker("d").cbt.intent
    assert intent is not None
    assert on_disk(tmp_path / "state").all()
    assert intent.flushes <= 4, intent.flushes  # one leader, the rest grouped
    eng.close()


def test_a_checkpoint_clears_the_regions(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")
    dev.write(3 * MiB, b"a" * 100)
    assert on_disk(tmp_path / "state").any()
    assert eng.checkpoint_cbt() == 1
    assert not on_disk(tmp_path / "state").any()
    assert eng.checkpoint_cbt(only_dirty=True) == 0  # nothing written since
    dev.write(4 * MiB, b"b")
    assert np.flatnonzero(on_disk(tmp_path / "state")).tolist() == [4]
    cp = cbt_checkpoint.load(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"))
    assert not isinstance(cp, str) and not cp.clean and cp.intent_token is not None
    eng.close()


def test_after_a_crash_the_cbt_is_the_checkpoint_and_the_intent(tmp_path, disk, storage_dir):
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")
    dev.write(MiB, b"before the take")
    sid = eng.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    eng.snapshot_take(sid)  # a checkpoint, the regions cleared
    eng.snapshot_destroy(sid)
    backup = eng.cbt_info("d")
    dev.write(2 * MiB + 5, b"checkpointed")
    eng.checkpoint_cbt()
    dev.write(6 * MiB + 70_000, b"after the last checkpoint")
    dev.write(11 * MiB, b"y" * 200_000)
    kill_engine(eng)

    again = start(tmp_path / "state", disk)
    trk = again.tracker("d")
    assert "write intent" in trk.origin and "2 region(s)" in trk.origin, trk.origin
    cbt = trk.cbt
    assert cbt.generation_id == backup.generation_id
    changed = {
        int(b) for b in np.flatnonzero(cbt.write_map > backup.changes_number)
    }  # every block written since the take ...
    bs = cbt.block_shift
    for off, n in ((2 * MiB + 5, 12), (6 * MiB + 70_000, 25), (11 * MiB, 200_000)):
        assert set(range(off >> bs, ((off + n - 1) >> bs) + 1)) <= changed
    # ... and beyond the checkpointed block, only blocks of the two regions
    # set in the intent file, under the number the recovery gave them.
    (mark,) = cbt.recovered
    extra = changed - {2 * MiB >> bs}
    per_region = REGION >> bs
    assert extra == set(range(6 * per_region, 7 * per_region)) | set(
        range(11 * per_region, 12 * per_region)
    )
    assert {int(cbt.write_map[b]) for b in extra} == {mark}
    assert cbt.active == mark + 1 and mark > backup.changes_number
    # The next take reports them, and writes after the recovery get numbers
    # of their own.
    again.device("d").write(0, b"new")
    sid = again.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    again.snapshot_take(sid)
    info = again.cbt_info("d")
    assert info.recovered == (mark,) and info.generation_id == backup.generation_id
    again.snapshot_destroy(sid)
    again.close()


def test_a_crash_right_after_a_take_lost_before_its_checkpoint(tmp_path, disk, storage_dir):
    """The take's own checkpoint may be lost in a crash: the recovery still
    numbers every write after that take above its changes number."""
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")
    eng.checkpoint_cbt = lambda *a, **k: 0  # type: ignore[method-assign]
    sid = eng.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    eng.snapshot_take(sid)
    eng.snapshot_destroy(sid)
    backup = eng.cbt_info("d")
    dev.write(7 * MiB, b"after the take")
    kill_engine(eng)
    again = start(tmp_path / "state", disk)
    cbt = again.tracker("d").cbt
    assert cbt.generation_id == backup.generation_id
    assert cbt.write_map[7 * MiB >> cbt.block_shift] > backup.changes_number
    again.close()


def test_a_damaged_intent_file_starts_a_new_generation(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    gen = eng.cbt_info("d").generation_id
    eng.device("d").write(0, b"x")
    kill_engine(eng)
    path = intent_path(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"))
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    again = start(tmp_path / "state", disk)
    origin = again.tracker("d").origin
    assert origin.startswith("new: ") and "header digest" in origin, origin
    assert again.cbt_info("d").generation_id != gen
    again.close()


def test_without_write_intent_a_crash_starts_a_new_generation(tmp_path, disk):
    params = Params(cbt_intent_region_size=0, cbt_checkpoint_interval=0)
    eng = start(tmp_path / "state", disk, params)
    gen = eng.cbt_info("d").generation_id
    eng.device("d").write(0, b"x")
    kill_engine(eng)
    again = start(tmp_path / "state", disk, params)
    origin = again.tracker("d").origin
    assert "no write intent covers" in origin, origin
    assert again.cbt_info("d").generation_id != gen
    again.close()


def test_an_intent_file_that_fails_gives_the_intent_up(tmp_path, disk, monkeypatch):
    """ENOSPC on the intent file: the device's writes go on, the checkpoint
    in use goes (a crash then means a new generation, never a missed write)."""
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cbt_intent.os, "fdatasync", full)
    dev.write(0, b"still written")
    with open(disk, "rb") as f:
        assert f.read(13) == b"still written"
    assert not os.path.exists(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"))
    trk = eng.tracker("d")
    assert "write intent given up" in trk.origin
    assert trk.status()["write_intent"]["failed"]
    monkeypatch.undo()
    eng.close()  # a clean stop still keeps the CBT
    again = start(tmp_path / "state", disk)
    assert again.tracker("d").origin == "checkpoint"
    again.close()


def test_the_periodic_checkpoint(tmp_path, disk):
    params = Params(cbt_intent_region_size=REGION, cbt_checkpoint_interval=0.05)
    eng = start(tmp_path / "state", disk, params)
    eng.device("d").write(8 * MiB, b"x")
    trk = eng.tracker("d")
    deadline = time.monotonic() + 10
    # (the checkpoint clears the file a moment before it counts itself done)
    while (on_disk(tmp_path / "state").any() or trk.checkpoints < 1) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert not on_disk(tmp_path / "state").any()
    assert trk.checkpoints >= 1
    eng.close()


def test_writes_fail_when_neither_intent_nor_checkpoint_can_be_kept(tmp_path, disk, monkeypatch):
    """The state dir's disk is gone: the intent cannot be written and the
    checkpoint in use cannot be removed. A write let through then would be
    missed by that checkpoint after a crash: writes fail with EIO instead."""
    eng = start(tmp_path / "state", disk)
    dev = eng.device("d")

    def gone(*_args) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cbt_intent.os, "fdatasync", gone)
    monkeypatch.setattr(cbt_checkpoint.os, "unlink", gone)
    with pytest.raises(blksnap.BlksnapError) as info:
        dev.write(0, b"refused")
    assert info.value.errno == 5
    with open(disk, "rb") as f:
        assert f.read(7) != b"refused"
    with pytest.raises(blksnap.BlksnapError):
        dev.write(10 * MiB, b"refused too")
    monkeypatch.undo()
    kill_engine(eng)


def test_regions_smaller_than_a_tracking_block(tmp_path, disk):
    """A block that spans several regions passes at once only when every
    one of them is durable."""
    params = Params(cbt_intent_region_size=16 * 1024, cbt_checkpoint_interval=0)
    eng = start(tmp_path / "state", disk, params)
    dev = eng.device("d")
    intent = eng.tracker("d").cbt.intent
    assert intent is not None and eng.tracker("d").cbt.block_size == 64 * 1024
    dev.write(0, b"a")
    flushes = intent.flushes
    dev.write(20 * 1024, b"b")  # the same block, another region: a flush
    assert intent.flushes == flushes + 1
    assert np.flatnonzero(on_disk(tmp_path / "state")).tolist() == [0, 1]
    dev.write(0, b"c" * 65536)  # the whole block: its four regions
    assert np.flatnonzero(on_disk(tmp_path / "state")).tolist() == [0, 1, 2, 3]
    flushes = intent.flushes
    dev.write(50 * 1024, b"d")
    assert intent.flushes == flushes  # every region of the block durable
    eng.close()


def test_the_take_checkpoint_waits_for_guard_storage(tmp_path, disk, storage_dir):
    """A caller that holds file systems frozen around the take (blksnapd)
    takes with ``guard_storage=False``: the checkpoint is written by
    ``guard_storage`` after the thaw, not inside the frozen window."""
    eng = start(tmp_path / "state", disk)
    trk = eng.tracker("d")
    sid = eng.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    before = trk.checkpoints
    eng.snapshot_take(sid, guard_storage=False)
    assert trk.checkpoints == before
    eng.guard_storage(sid)
    assert trk.checkpoints == before + 1
    cp = cbt_checkpoint.load(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"))
    assert not isinstance(cp, str) and cp.changes_number == eng.cbt_info("d").changes_number
    eng.snapshot_destroy(sid)
    eng.close()
