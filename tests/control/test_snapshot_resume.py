"""A snapshot carried on by the next worker (:meth:`Engine.snapshot_resume`)
from what the dead one left in regions its supervisor holds: a real
:class:`Supervisor` reads the worker's ``store``/``drop`` messages and holds
the fds; a second engine in this process, given them as a new worker is,
plays the next worker (the first one is abandoned, never closed, as a
killed worker would be)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import blksnap
from blksnap.control.regions import SupervisedRegions
from blksnap.control.supervisor import Inherited, Supervisor
from blksnap.engine.snapshot_state import S_DESTROYING, S_TAKING
from blksnap.units import MiB
from tests.conftest import kill_engine

CHUNK = blksnap.Params().chunk_size


class Workers:
    """Engines that follow one another, as blksnapd's workers do."""

    def __init__(self, tmp_path: Path) -> None:
        self.sup = Supervisor([], str(tmp_path / "mnt"), str(tmp_path / "sock"), 1)
        self.state = str(tmp_path / "state")
        self.engines: list[blksnap.Engine] = []

    def next(self) -> blksnap.Engine:
        """A new worker's engine, given every fd the supervisor holds."""
        self.sup._read_status(0)
        inh = Inherited(
            supervisor=os.getpid(),
            fuse=[],
            control=-1,
            status=os.dup(self.sup._chan_worker.fileno()),
            initialized=True,
            restarts=len(self.engines),
            stored={k: os.dup(fd) for k, fd in self.sup.stored.items()},
        )
        eng = blksnap.Engine(self.state, regions=SupervisedRegions(inh))
        self.engines.append(eng)
        return eng

    def held(self) -> set[str]:
        self.sup._read_status(0)
        return set(self.sup.stored)

    def close(self) -> None:
        for eng in self.engines[:-1]:  # (dead workers)
            kill_engine(eng)
        if self.engines:
            self.engines[-1].close()
        for eng in self.engines:  # (what the kernel closes when a worker ends)
            assert isinstance(eng.regions, SupervisedRegions)
            for fd in eng.regions.fds.values():  # (plain fds: nothing else owns them)
                os.close(fd)
            eng.regions.inherited.close_status()
        self.sup._read_status(0)
        for fd in self.sup.stored.values():
            os.close(fd)
        self.sup._chan.close()
        self.sup._chan_worker.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.close()


def serve(eng: blksnap.Engine, paths: dict[str, str], taking_over: bool) -> None:
    for name, path in paths.items():
        eng.add_device(path, name, taking_over=taking_over)
        eng.attach(name, "blksnap")


@pytest.fixture
def paths(make_file) -> dict[str, str]:
    return {"a": make_file(4 * MiB, data=os.urandom(4 * MiB)),
            "b": make_file(2 * MiB, data=os.urandom(2 * MiB))}  # fmt: skip


def test_a_taken_snapshot_carries_on(workers, paths, storage_dir) -> None:
    first = workers.next()
    serve(first, paths, False)
    sid = first.snapshot_create(["a", "b"], storage=storage_dir, limit=16 * MiB)
    first.snapshot_take(sid)
    a = first.device("a")
    at_take = {n: first.image(sid, n).read(0, first.device(n).size) for n in paths}
    a.write(CHUNK - 3, b"\x01" * (3 * CHUNK))
    first.device("b").write(0, b"\x02" * 10)
    before = {d["name"]: d for d in first.snapshot_collect(sid)[0]["devices"]}
    gen = first.cbt_info("a").generation_id
    # A copy cut short: slots handed out and written, never published.
    snap = first.snapshot(sid)
    for loc in snap.storage.alloc_many(3):
        snap.storage.write(loc, b"\xee" * CHUNK)

    second = workers.next()  # the first is dead: never closed
    serve(second, paths, True)
    resumed = second.snapshot_resume(sid)
    assert resumed is not None and resumed.state == "taken"
    after = {d["name"]: d for d in second.snapshot_collect(sid)[0]["devices"]}
    for name in paths:
        assert after[name]["chunks_stored"] == before[name]["chunks_stored"] > 0
        assert after[name]["image_bytes_read"] == before[name]["image_bytes_read"] > 0
        assert second.image(sid, name).read(0, len(at_take[name])) == at_take[name]
    assert second.cbt_info("a").generation_id == gen
    # Copy-on-write goes on in the new worker, into slots never handed out.
    a2 = second.device("a")
    for off in range(0, a2.size, 3 * CHUNK):
        a2.write(off, b"\x05" * 512)
    assert second.image(sid, "a").read(0, a2.size) == at_take["a"]
    stored = second.snapshot_collect(sid)[0]["devices"][0]["chunks_stored"]
    assert stored > before["a"]["chunks_stored"]
    assert any(k.startswith(f"snap/{sid}") for k in workers.held())
    second.snapshot_destroy(sid)
    assert not [k for k in workers.held() if k.startswith("snap/")]
    assert {"cbt/a", "cbt/b"} <= workers.held()


def test_a_created_snapshot_carries_on_and_is_taken(workers, paths, storage_dir) -> None:
    first = workers.next()
    serve(first, paths, False)
    sid = first.snapshot_create(["a"], storage=storage_dir, limit=8 * MiB)
    second = workers.next()
    serve(second, paths, True)
    assert second.snapshot_resume(sid).state == "created"
    assert second.snapshot_of("a") == sid
    second.snapshot_take(sid)
    a = second.device("a")
    at_take = a.read(0, a.size)
    a.write(0, b"\x09" * CHUNK)
    assert second.image(sid, "a").read(0, a.size) == at_take
    second.snapshot_destroy(sid)


def test_a_take_cut_short_is_corrupted_with_the_reason(workers, paths, storage_dir) -> None:
    first = workers.next()
    serve(first, paths, False)
    sid = first.snapshot_create(["a", "b"], storage=storage_dir, limit=8 * MiB)
    first.snapshot_take(sid)
    # As a worker dying between the first CBT switch and the arming leaves it.
    first.snapshot(sid).keep.set_state(S_TAKING)
    second = workers.next()
    serve(second, paths, True)
    snap = second.snapshot_resume(sid)
    info = second.snapshot_collect(sid)[0]
    assert info["state"] == "corrupted" and info["errno"] == errno.EIO
    assert "cut short" in info["reason"], info
    assert [e.code for e in [second.wait_event(sid, 0)]] == ["corrupted"]
    with pytest.raises(blksnap.BlksnapError) as exc:
        second.image(sid, "a")
    assert exc.value.errno == errno.ENOENT
    second.device("a").write(0, b"\x01" * 4096)  # the device goes on
    assert snap is not None
    second.snapshot_destroy(sid)
    assert second.snapshot_of("a") is None


def test_a_destroy_cut_short_is_finished(workers, paths, storage_dir, tmp_path) -> None:
    first = workers.next()
    serve(first, paths, False)
    storage = tmp_path / "storage.img"
    storage.write_bytes(b"")
    sid = first.snapshot_create(["a"], storage=str(storage), limit=8 * MiB)
    first.snapshot_append_storage(sid, storage_dir, size=4 * MiB)
    first.snapshot_take(sid)
    first.device("a").write(0, b"\x01" * 4096)
    first.snapshot(sid).keep.set_state(S_DESTROYING)
    second = workers.next()
    serve(second, paths, True)
    assert second.snapshot_resume(sid) is None
    assert not [k for k in workers.held() if k.startswith("snap/")]
    assert second.snapshot_of("a") is None
    assert second.snapshot_collect() == []
    # Nothing is left of it: the device can be in a new snapshot.
    second.snapshot_take(second.snapshot_create(["a"], storage=storage_dir, limit=4 * MiB))


def test_a_create_cut_short_before_its_state_was_whole_never_was(
    workers, paths, storage_dir
) -> None:
    """The worker killed inside ``snapshot create``, after the state's region
    was made but before its magic (written last): the next worker finds no
    snapshot to carry on and none lost (the create never returned)."""
    first = workers.next()
    serve(first, paths, False)
    sid = first.snapshot_create(["a"], storage=storage_dir, limit=8 * MiB)
    first.snapshot(sid).keep.words[0] = 0  # (as it was before the magic)
    second = workers.next()
    serve(second, paths, True)
    assert second.snapshots_left() == [sid]
    assert second.snapshot_resume(sid) is None
    assert not [k for k in workers.held() if k.startswith("snap/")]
    assert second.snapshot_of("a") is None and second.snapshot_collect() == []
    second.snapshot_take(second.snapshot_create(["a"], storage=storage_dir, limit=4 * MiB))


def test_a_snapshot_whose_device_is_gone_is_released(workers, paths, storage_dir) -> None:
    first = workers.next()
    serve(first, paths, False)
    sid = first.snapshot_create(["a", "b"], storage=storage_dir, limit=8 * MiB)
    first.snapshot_take(sid)
    second = workers.next()
    serve(second, {"a": paths["a"]}, True)  # b's backing is not served again
    assert second.snapshots_left() == [sid]
    with pytest.raises(blksnap.BlksnapError) as exc:
        second.snapshot_resume(sid)
    assert exc.value.errno == errno.ENOENT and "b is not served" in exc.value.message
    assert not [k for k in workers.held() if k.startswith("snap/")]
    assert second.snapshot_of("a") is None


def test_regions_that_end_with_the_process_keep_nothing(engine, make_file, storage_dir) -> None:
    engine.add_device(make_file(MiB), "a")
    sid = engine.snapshot_create(["a"], storage=storage_dir, limit=4 * MiB)
    engine.snapshot_take(sid)
    assert engine.snapshots_left() == []
    engine.snapshot_destroy(sid)
