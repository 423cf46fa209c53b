"""The filters blksnap brings (flakey, delay, powercut, migrate), in process:
what each does to requests, where it sits in the stack, and what the
others see of it."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import blksnap
from blksnap.engine.migrate import PIECE
from tests.conftest import file_bytes, random_bytes
from tests.engine.test_cbt import KeptRegions

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def dev(engine, make_file):
    return engine.add_device(make_file(SIZE, data=random_bytes(SIZE)), name="d")


def _errno(fn, *args):
    with pytest.raises(blksnap.BlksnapError) as info:
        fn(*args)
    return info.value.errno


def _cbt_marked(engine, name: str, offset: int) -> bool:
    trk = engine.tracker(name)
    return bool(trk.cbt.write_map[offset >> trk.cbt.block_shift])


# -- the stack ------------------------------------------------------------------------


def test_builtin_filters_stack_in_altitude_order(engine, dev, make_file):
    target = make_file(SIZE, name="target.img")
    for name, opts in (
        ("migrate", {"target": target, "rate": "64K"}),
        ("blksnap", {}),
        ("powercut", {}),
        ("flakey", {"mode": "drop_writes", "up": "0", "down": "0"}),
        ("delay", {}),
    ):
        engine.attach("d", name, opts)
    assert engine.filters("d") == ["flakey", "delay", "blksnap", "powercut", "migrate"]
    stack = engine.filter_status("d")
    assert [s["altitude"] for s in stack] == sorted(s["altitude"] for s in stack)
    kinds = {k["filter"]: k for k in engine.filter_kinds()}
    assert {"flakey", "delay", "blksnap", "powercut", "migrate"} <= set(kinds)
    assert "mode" in kinds["flakey"]["options"] and "cut" in kinds["powercut"]["commands"]
    engine.ctl("d", "migrate", "abort")
    for name in ("migrate", "delay", "flakey", "powercut", "blksnap"):
        engine.detach("d", name)
    assert engine.filters("d") == []


def test_unknown_options_are_refused(engine, dev):
    for name, opts in (
        ("flakey", {"mode": "sometimes"}),
        ("flakey", {"colour": "red"}),
        ("delay", {"read_ms": "-1"}),
        ("powercut", {"x": "1"}),
        ("migrate", {}),
    ):
        assert _errno(engine.attach, "d", name, opts) == errno.EINVAL, name
    assert engine.filters("d") == []


# -- flakey ---------------------------------------------------------------------------


def test_flakey_error_writes_never_reach_the_tracker(engine, dev):
    engine.attach("d")
    before = dev.read(0, 4096)
    engine.attach("d", "flakey", {"mode": "error_writes"})  # both 0: down until told
    assert _errno(dev.write, 0, b"x" * 4096) == errno.EIO
    assert _errno(dev.flush) == errno.EIO
    assert dev.read(0, 4096) == before  # reads pass
    assert not _cbt_marked(engine, "d", 0)  # the tracker never saw it
    assert engine.ctl("d", "flakey", "status")["failed"] == 2
    engine.ctl("d", "flakey", "up")
    dev.write(0, b"y" * 4096)
    assert dev.read(0, 4096) == b"y" * 4096
    assert _cbt_marked(engine, "d", 0)


def test_flakey_drop_writes_acknowledges_and_discards(engine, dev):
    engine.attach("d")
    before = dev.read(MiB, 8192)
    engine.attach("d", "flakey", {"mode": "drop_writes"})
    dev.write(MiB, b"z" * 8192)  # no error
    dev.flush()  # flushes pass
    assert dev.read(MiB, 8192) == before
    assert file_bytes(dev.path)[MiB : MiB + 8192] == before
    assert not _cbt_marked(engine, "d", MiB)
    assert engine.ctl("d", "flakey", "status")["dropped"] == 1


def test_flakey_errors_reads_and_corrupts(engine, dev):
    flt = engine.attach("d", "flakey", {"mode": "error_reads"})
    assert _errno(dev.read, 0, 512) == errno.EIO
    engine.ctl("d", "flakey", "mode", "corrupt_writes,corrupt_reads")
    assert flt.modes == {"corrupt_writes", "corrupt_reads"}
    engine.detach("d", "flakey")
    engine.attach("d", "flakey", {"mode": "corrupt_writes", "byte": "3", "value": "65"})
    dev.write(4096, b"\x00" * 16)
    assert file_bytes(dev.path)[4096:4112] == b"\x00\x00A" + b"\x00" * 13
    engine.ctl("d", "flakey", "mode", "corrupt_reads")
    assert dev.read(4096, 4)[2:3] == b"A"
    dev.write(4096, b"\x00" * 4)  # not corrupted now
    assert dev.read(4096, 4) == b"\x00\x00A\x00"  # the read is
    engine.ctl("d", "flakey", "up")
    assert dev.read(4096, 4) == b"\x00" * 4
    assert _errno(engine.ctl, "d", "flakey", "mode", "bogus") == errno.EINVAL


def test_flakey_up_and_down_intervals(engine, dev):
    engine.attach("d", "flakey", {"mode": "error_writes", "up": "0.15", "down": "0.15"})
    seen = set()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        try:
            dev.write(0, b"w")
            seen.add("up")
        except blksnap.BlksnapError as exc:
            assert exc.errno == errno.EIO
            seen.add("down")
        time.sleep(0.02)
    assert seen == {"up", "down"}
    engine.ctl("d", "flakey", "down")  # held down whatever the intervals say
    for _ in range(5):
        assert _errno(dev.write, 0, b"w") == errno.EIO
        time.sleep(0.05)
    assert engine.ctl("d", "flakey", "auto")["forced"] is None


# -- delay ----------------------------------------------------------------------------


def test_delay_holds_requests(engine, dev):
    engine.attach("d", "delay", {"read_ms": "40", "write_ms": "20"})
    t0 = time.monotonic()
    dev.read(0, 512)
    t1 = time.monotonic()
    dev.write(0, b"q")
    t2 = time.monotonic()
    # (lower bounds only: a sleep lasts at least what was asked)
    assert t1 - t0 >= 0.04 and t2 - t1 >= 0.02
    status = engine.ctl("d", "delay", "set", "read_ms=0")
    assert status["read_ms"] == 0 and status["write_ms"] == 20 and status["held"] == 2
    assert _errno(engine.ctl, "d", "delay", "set", "nope=1") == errno.EINVAL
    assert dev.write_may_wait(0, 4096)


# -- powercut -------------------------------------------------------------------------


def test_powercut_cut_keeps_exactly_what_was_flushed(engine, dev):
    engine.attach("d")
    engine.attach("d", "powercut")
    durable_a = random_bytes(8192)
    dev.write(0, durable_a)
    dev.write(MiB + 100, b"durable-b")  # a partial block
    dev.flush()
    after_flush = dev.read(0, SIZE)
    dev.write(0, random_bytes(4096))  # lost: written since the flush
    dev.write(0, random_bytes(100))  # twice: the first save stays
    dev.write(MiB + 4000, random_bytes(300))  # across a block edge
    dev.discard(2 * MiB, 64 * 1024)
    dev.write(SIZE - 512, b"e" * 512)  # the last sector
    assert engine.ctl("d", "powercut", "status")["unflushed_blocks"] == 2 + 2 + 16 + 1 - 1
    status = engine.ctl("d", "powercut", "cut")
    assert status["state"] == "cut" and status["unflushed_blocks"] == 0
    assert file_bytes(dev.path) == after_flush  # the device holds what was durable
    for fn, args in ((dev.read, (0, 512)), (dev.write, (0, b"x")), (dev.flush, ())):
        assert _errno(fn, *args) == errno.EIO
    engine.ctl("d", "powercut", "restore")
    assert dev.read(0, SIZE) == after_flush
    assert _cbt_marked(engine, "d", 0)  # the tracker saw the lost writes: more, never less


def test_powercut_undo_log_carries_on_in_kept_regions(tmp_path, make_file):
    regions = KeptRegions()
    path = make_file(SIZE, name="p.img", data=random_bytes(SIZE))
    first = blksnap.Engine(tmp_path / "s1", regions=regions)
    d = first.add_device(path, name="p")
    first.attach("p", "powercut")
    d.write(0, b"a" * 4096)
    d.flush()
    durable = file_bytes(path)
    d.write(0, b"b" * 4096)
    d.write(3 * MiB, b"c" * 10)
    # The process "dies": a second engine takes the regions over.
    second = blksnap.Engine(tmp_path / "s2", regions=regions)
    second.add_device(path, name="p", taking_over=True)
    second.attach("p", "powercut")
    assert second.ctl("p", "powercut", "status")["unflushed_blocks"] == 2
    second.ctl("p", "powercut", "cut")
    assert file_bytes(path) == durable
    second.detach("p", "powercut")
    assert "filter/p/powercut" in regions.dropped
    first.close()
    second.close()


# -- migrate --------------------------------------------------------------------------


def _wait_state(engine, name: str, want: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = engine.ctl(name, "migrate", "status")
        if status["state"] == want:
            return status
        assert status["state"] == "copying", status
        assert time.monotonic() < deadline, status
        time.sleep(0.01)


def test_migrate_under_writes_switches_to_an_identical_target(engine, make_file):
    data = bytearray(random_bytes(SIZE))
    old_path = make_file(SIZE, name="src.img", data=bytes(data))
    dev = engine.add_device(old_path, name="d")
    engine.attach("d")
    generation = engine.cbt_info("d").generation_id
    target = make_file(SIZE + MiB, name="target.img")  # larger: the device keeps its size
    stop = threading.Event()
    errors: list[BaseException] = []
    written: list[dict[int, bytes]] = [{}, {}, {}]

    def writer(k: int) -> None:
        """8 KiB writes of block pairs of its own (blocks 2j-1 and 2j, j % 3
        == k), many astride two pieces of the copy; what each pair last got,
        in ``written[k]``."""
        rnd = __import__("random").Random(k)
        try:
            while not stop.is_set():
                if rnd.random() < 0.3:
                    j = rnd.randrange(1, SIZE // PIECE) * PIECE // 8192  # astride
                else:
                    j = rnd.randrange(1, SIZE // 8192)
                if j % 3 != k:
                    continue
                buf = rnd.randbytes(8192)
                dev.write((2 * j - 1) * 4096, buf)
                written[k][2 * j - 1] = buf
        except BaseException as exc:  # pragma: no cover - the assertion says
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        engine.attach("d", "migrate", {"target": target, "rate": "16M"})
        status = _wait_state(engine, "d", "switched")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert sum(len(w) for w in written) > 100
    for w in written:
        for block, buf in w.items():
            data[block * 4096 : block * 4096 + 8192] = buf
    assert status["copied"] == status["total"] == SIZE
    assert engine.filters("d") == ["blksnap"]  # it detached itself
    assert dev.path == os.path.abspath(target) and dev.size == SIZE
    # The target holds every write, made during the copy or before.
    assert file_bytes(target)[:SIZE] == bytes(data)
    old = file_bytes(old_path)
    dev.write(0, b"after the switch" * 256)
    dev.flush()
    assert file_bytes(old_path) == old  # the old store is no longer written
    assert engine.cbt_info("d").generation_id == generation
    assert _cbt_marked(engine, "d", 0)
    assert engine.ctl("d", "migrate", "status")["state"] == "switched"  # kept after


def test_migrate_abort_leaves_the_device_where_it_was(engine, dev, make_file):
    target = make_file(SIZE, name="t.img")
    engine.attach("d", "migrate", {"target": target, "rate": "1M"})
    status = engine.ctl("d", "migrate", "abort")
    assert status["state"] == "aborted" and status["copied"] < SIZE
    dev.write(0, b"only on the old store")
    assert file_bytes(target)[:21] != b"only on the old store"
    assert dev.path != os.path.abspath(target)
    engine.detach("d", "migrate")
    assert engine.ctl("d", "migrate", "status")["state"] == "aborted"


def test_migrate_refuses_bad_targets(engine, dev, make_file):
    small = make_file(SIZE - MiB, name="small.img")
    assert _errno(engine.attach, "d", "migrate", {"target": small}) == errno.ENOSPC
    assert _errno(engine.attach, "d", "migrate", {"target": dev.path}) == errno.EBUSY
    other = make_file(SIZE, name="other.img")
    engine.add_device(other, name="o")
    assert _errno(engine.attach, "d", "migrate", {"target": other}) == errno.EBUSY
    assert engine.filters("d") == []


def test_migrate_carries_on_from_its_progress(tmp_path, make_file):
    regions = KeptRegions()
    data = random_bytes(SIZE)
    path = make_file(SIZE, name="m.img", data=data)
    target = make_file(SIZE, name="mt.img")
    first = blksnap.Engine(tmp_path / "s1", regions=regions)
    first.add_device(path, name="m")
    first.attach("m", "migrate", {"target": target, "rate": "2M"})
    deadline = time.monotonic() + 20
    while first.ctl("m", "migrate", "status")["copied"] < 2 * PIECE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.ctl("m", "migrate", "abort")  # (stands for the worker's death)
    done = first.ctl("m", "migrate", "status")["copied"]
    # The region is what a worker taking over finds: the copy goes on from there.
    second = blksnap.Engine(tmp_path / "s2", regions=regions)
    dev = second.add_device(path, name="m", taking_over=True)
    flt = second.attach("m", "migrate", {"target": target})
    assert flt._from >= done - PIECE and flt._from > 0
    _wait_state(second, "m", "switched")
    assert dev.path == os.path.abspath(target)
    assert file_bytes(target) == data
    first.close()
    second.close()


def test_migrate_status_answers_through_the_switch(engine, make_file):
    """Polled without pause, ``ctl status`` goes from copying to switched
    and never finds no filter at all in between."""
    for i in range(30):
        path = make_file(MiB, name=f"s{i}.img", data=random_bytes(MiB))
        engine.add_device(path, name=f"s{i}")
        engine.attach(f"s{i}", "migrate", {"target": make_file(MiB, name=f"t{i}.img")})
        states = set()
        while True:
            state = engine.ctl(f"s{i}", "migrate", "status")["state"]  # never ENOENT
            states.add(state)
            if state != "copying":
                break
        assert state == "switched", states
        engine.remove_device(f"s{i}")


def test_a_snapshot_taken_during_a_migration_stays_right_across_the_switch(
    engine, make_file, storage_dir
):
    data = random_bytes(SIZE)
    dev = engine.add_device(make_file(SIZE, name="m.img", data=data), name="m")
    sid = engine.snapshot_create(["m"], storage=storage_dir, limit=2 * SIZE)
    engine.snapshot_take(sid)
    image = engine.image(sid, "m")
    model = bytearray(data)
    rnd = __import__("random").Random(9)

    def scribble(n: int) -> None:
        for _ in range(n):
            off = rnd.randrange(0, SIZE // 4096) * 4096
            buf = rnd.randbytes(4096)
            dev.write(off, buf)  # copy-on-write first, then the write
            model[off : off + 4096] = buf

    scribble(50)
    engine.attach("m", "migrate", {"target": make_file(SIZE, name="mt.img"), "rate": "16M"})
    while engine.ctl("m", "migrate", "status")["state"] == "copying":
        scribble(5)
    assert engine.ctl("m", "migrate", "status")["state"] == "switched"
    scribble(50)  # on the new store: copies of chunks never copied yet
    assert image.read(0, SIZE) == data  # the image: the device at take, throughout
    assert dev.read(0, SIZE) == bytes(model)
    snap = engine.snapshot_collect(sid)[0]
    assert snap["error"] is None, snap
    engine.snapshot_destroy(sid)


def test_a_disk_failing_reads_fails_the_snapshot_not_the_writes(engine, dev, storage_dir):
    """Copy-on-write reads the device's original data below the tracker,
    through the filters that stand for the disk: flakey failing reads fails
    the copy, so the snapshot is corrupted; the device's write goes on."""
    sid = engine.snapshot_create(["d"], storage=storage_dir, limit=SIZE)
    engine.snapshot_take(sid)
    engine.attach("d", "flakey", {"mode": "error_reads"})  # down: reads fail
    dev.write(0, b"w" * 4096)  # its chunk's copy cannot be read
    snap = engine.snapshot_collect(sid)[0]
    assert snap["state"] == "corrupted" and snap["error"] == "EIO", snap
    engine.ctl("d", "flakey", "up")
    assert dev.read(0, 4096) == b"w" * 4096
    engine.snapshot_destroy(sid)
