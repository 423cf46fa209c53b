"""CBT checkpoints: the map outlives a clean stop of the engine (same
generation), and every case where it cannot be trusted starts a new
generation and says why."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import blksnap
from blksnap.engine import cbt_checkpoint
from blksnap.engine import tracker as tracker_mod
from blksnap.engine.cbt_checkpoint import BackingFacts
from tests.conftest import collector_off, random_bytes

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def disk(make_file) -> str:
    return make_file(SIZE, name="disk.img", data=random_bytes(SIZE))


def start(state: Path, disk: str) -> blksnap.Engine:
    eng = blksnap.Engine(state)
    eng.add_device(disk, name="d")
    eng.attach("d")
    return eng


def marks(eng: blksnap.Engine) -> tuple[bytes, bytes]:
    cbt = eng.tracker("d").cbt
    return cbt.write_map.tobytes(), cbt.read_map.tobytes()


def test_a_clean_stop_carries_the_cbt_on(tmp_path, disk, storage_dir):
    first = start(tmp_path / "state", disk)
    dev = first.device("d")
    dev.write(3 * MiB, b"a" * 5000)
    sid = first.snapshot_create(["d"], storage=storage_dir, limit=8 * MiB)
    first.snapshot_take(sid)
    first.snapshot_destroy(sid)
    dev.write(9 * MiB, b"b" * 100)
    info, maps = first.cbt_info("d"), marks(first)
    assert info.changes_number == 1
    first.close()
    second = start(tmp_path / "state", disk)
    assert second.tracker("d").origin == "checkpoint"
    assert second.cbt_info("d") == info
    assert marks(second) == maps
    # Numbering goes on: blocks written since the take are after it.
    trk = second.tracker("d")
    assert trk.cbt.active == 2
    assert set(np.flatnonzero(trk.cbt.write_map > info.changes_number).tolist()) == {
        9 * MiB >> trk.cbt.block_shift
    }
    second.close()


def test_a_device_removed_and_added_again_keeps_its_cbt(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    eng.device("d").write(0, b"x")
    gen = eng.cbt_info("d").generation_id
    eng.remove_device("d")
    eng.add_device(disk, name="d")
    eng.attach("d")
    assert eng.cbt_info("d").generation_id == gen and eng.tracker("d").origin == "checkpoint"
    eng.close()


def test_detach_ends_the_cbt(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    gen = eng.cbt_info("d").generation_id
    eng.detach("d")
    assert not os.path.exists(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"))
    eng.attach("d")
    assert eng.cbt_info("d").generation_id != gen
    assert eng.tracker("d").origin == "new: no checkpoint"
    eng.close()


def _new_generation(tmp_path: Path, disk: str, gen: str) -> str:
    eng = start(tmp_path / "state", disk)
    try:
        assert eng.cbt_info("d").generation_id != gen
        origin = eng.tracker("d").origin
        assert origin.startswith("new: "), origin
        return origin
    finally:
        eng.close()


def test_a_file_written_while_stopped_starts_a_new_generation(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    gen = eng.cbt_info("d").generation_id
    eng.close()
    with open(disk, "r+b") as f:  # same size, one byte
        f.seek(12345)
        f.write(b"!")
    assert "changed while blksnapd was not serving it" in _new_generation(tmp_path, disk, gen)


def test_a_resized_file_starts_a_new_generation(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    gen = eng.cbt_info("d").generation_id
    eng.close()
    os.truncate(disk, SIZE + MiB)
    assert "size changed" in _new_generation(tmp_path, disk, gen)


def test_another_file_under_the_path_starts_a_new_generation(tmp_path, disk):
    eng = start(tmp_path / "state", disk)
    gen = eng.cbt_info("d").generation_id
    eng.close()
    data = Path(disk).read_bytes()
    os.rename(disk, f"{disk}.old")  # (kept: its inode is not reused)
    Path(disk).write_bytes(data)  # same bytes, another inode
    assert "not the one checkpointed" in _new_generation(tmp_path, disk, gen)


def test_an_unclean_stop_starts_a_new_generation(tmp_path, disk):
    start(tmp_path / "state", disk).close()  # a clean stop: a checkpoint
    crashed = start(tmp_path / "state", disk)  # carries it on, marks it in use
    assert crashed.tracker("d").origin == "checkpoint"
    crashed.device("d").write(0, b"y" * 4096)
    gen = crashed.cbt_info("d").generation_id
    # (never closed: what a kill leaves is the checkpoint marked in use)
    other = tmp_path / "other"
    other.mkdir()
    os.link(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"), other / "d.cbt")
    eng = blksnap.Engine(tmp_path / "state2")
    os.makedirs(tmp_path / "state2" / "cbt")
    os.link(other / "d.cbt", tmp_path / "state2" / "cbt" / "d.cbt")
    eng.add_device(disk, name="d")
    eng.attach("d")
    origin = eng.tracker("d").origin
    assert "did not stop cleanly" in origin and eng.cbt_info("d").generation_id != gen
    eng.close()
    crashed.close()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_starts_a_new_generation(tmp_path, disk, damage):
    eng = start(tmp_path / "state", disk)
    gen = eng.cbt_info("d").generation_id
    eng.close()
    path = cbt_checkpoint.path_for(str(tmp_path / "state"), "d")
    data = bytearray(Path(path).read_bytes())
    if damage == "truncate":
        Path(path).write_bytes(data[: len(data) // 2])
        want = "torn"
    else:
        data[200] ^= 0x40
        Path(path).write_bytes(data)
        want = "digest mismatch"
    assert want in _new_generation(tmp_path, disk, gen)


def test_block_devices_are_not_trusted_unless_asked():
    cp = cbt_checkpoint.Checkpoint(
        clean=True, capacity=MiB, block_shift=16, block_count=16, active=2, changes_number=1,
        generation_id="00000000-0000-0000-0000-000000000001",
        read_generation_id="00000000-0000-0000-0000-000000000001",
        facts=BackingFacts((0, 0x0701), True, MiB, 0, 0), written_at=0.0,
        write_map=bytes(16), read_map=bytes(16),
    )  # fmt: skip
    same = BackingFacts((0, 0x0701), True, MiB, 0, 0)
    assert "cannot be detected" in (cbt_checkpoint.distrust(cp, same, False) or "")
    assert cbt_checkpoint.distrust(cp, same, True) is None
    other = BackingFacts((0, 0x0702), True, MiB, 0, 0)
    assert cbt_checkpoint.distrust(cp, other, True) is not None


def test_checkpoint_io_at_attach_is_done_before_the_drain(tmp_path, disk, monkeypatch):
    """The state dir may live on the very device being attached (a
    protected root file system): its checkpoint is read and marked in use
    before the device is drained for the attach, or that I/O would wait for
    the drain forever."""
    start(tmp_path / "state", disk).close()
    eng = blksnap.Engine(tmp_path / "state")
    dev = eng.add_device(disk, name="d")
    frozen_at: list[int] = []
    real_load, real_save = cbt_checkpoint.load, cbt_checkpoint.save

    def load(path):
        frozen_at.append(dev.queue._frozen)
        return real_load(path)

    def save(path, cp):
        frozen_at.append(dev.queue._frozen)
        real_save(path, cp)

    monkeypatch.setattr(cbt_checkpoint, "load", load)
    monkeypatch.setattr(cbt_checkpoint, "save", save)
    eng.attach("d")
    assert eng.tracker("d").origin == "checkpoint"
    assert frozen_at == [0, 0]
    eng.close()


def test_a_checkpoint_that_cannot_be_marked_in_use_is_not_trusted(tmp_path, disk, monkeypatch):
    start(tmp_path / "state", disk).close()
    kept = cbt_checkpoint.load(cbt_checkpoint.path_for(str(tmp_path / "state"), "d"))
    assert not isinstance(kept, str)

    def full(path, cp):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cbt_checkpoint, "save", full)
    eng = blksnap.Engine(tmp_path / "state")
    eng.add_device(disk, name="d")
    eng.attach("d")  # no error: a new generation instead
    assert "could not be marked in use" in eng.tracker("d").origin
    assert eng.cbt_info("d").generation_id != kept.generation_id
    monkeypatch.undo()
    eng.close()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_refused_attach_leaves_the_checkpoint_and_no_descriptor(tmp_path, disk, monkeypatch):
    """An attach that fails (an option the tracker does not take, or a
    failure once its write intent is open) leaves nothing behind: no
    descriptor of the intent file left open (blksnapd would run out of them,
    one per attempt), and with a bad option the clean checkpoint untouched,
    so the next attach carries the CBT on as if it never happened."""
    start(tmp_path / "state", disk).close()
    eng = blksnap.Engine(tmp_path / "state")
    eng.add_device(disk, name="d")
    cp_path = eng.device("d").checkpoint_path
    with open(cp_path, "rb") as f:
        cp_before = f.read()
    with collector_off():
        before = _open_fds()
        for _ in range(3):
            with pytest.raises(blksnap.BlksnapError) as info:
                eng.attach("d", "blksnap", {"bogus": "1"})
            assert info.value.errno == errno.EINVAL
        assert _open_fds() == before
        with open(cp_path, "rb") as f:
            assert f.read() == cp_before

        def no_map(*args, **kwargs):
            raise blksnap.BlksnapError("no memory for the map", errno.ENOMEM)

        monkeypatch.setattr(tracker_mod, "CbtMap", no_map)
        with pytest.raises(blksnap.BlksnapError) as info:
            eng.attach("d")
        assert info.value.errno == errno.ENOMEM
        assert _open_fds() == before
    monkeypatch.undo()
    eng.attach("d")
    assert eng.filters("d") == ["blksnap"]
    eng.close()
