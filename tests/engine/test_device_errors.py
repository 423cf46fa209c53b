"""I/O failures of a device's backing store (or a filter): counted per op,
the last one kept, reported as ``device_error`` events at a limited rate;
the caller's own mistakes (out of range) are not failures of the device."""

from __future__ import annotations

import errno
import logging

import pytest

from blksnap import Engine
from blksnap.engine.engine import DEVICE_ERROR
from blksnap.engine.filters import Bio, Filter, FilterResult, Op
from blksnap.errors import BlksnapError, IOFailure

MiB = 1 << 20


class Failing(Filter):
    """Fails every write with EIO while ``on`` (reads pass)."""

    name = "failing"
    altitude = 150
    on = True

    def submit(self, bio: Bio) -> FilterResult:
        if self.on and bio.op is Op.WRITE:
            raise IOFailure("injected write failure")
        return FilterResult.PASS


@pytest.fixture
def eng(tmp_path):
    e = Engine(tmp_path / "state")
    e.register_filter(Failing)
    path = tmp_path / "d.img"
    path.write_bytes(b"\0" * (4 * MiB))
    e.add_device(str(path), "d")
    yield e
    e.close()


def test_failures_counted_last_kept_and_reported_once(eng, caplog):
    eng.attach("d", "failing")
    caplog.set_level(logging.ERROR, logger="blksnap.engine.engine")
    for i in range(500):
        with pytest.raises(BlksnapError) as exc:
            eng.device("d").write(i * 4096, b"x" * 4096)
        assert exc.value.errno == errno.EIO
    assert eng.device("d").read(0, 4096) == bytes(4096)  # reads still served
    errs = eng.device_errors()
    assert errs["d"]["errors"] == 500
    assert errs["d"]["by_op"] == {"write": 500}
    last = errs["d"]["last"]
    assert (last["errno"], last["error"], last["op"]) == (errno.EIO, "EIO", "write")
    assert (last["offset"], last["length"]) == (499 * 4096, 4096)
    # Rate limited: one line and one event, not 500.
    lines = [r for r in caplog.records if "device d" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    ev = eng.events.wait(0.1)
    assert ev is not None and ev.code == DEVICE_ERROR
    assert ev.data["device"] == "d" and ev.data["errno"] == errno.EIO
    assert eng.events.wait(0.05) is None


def test_caller_mistakes_are_not_device_failures(eng):
    dev = eng.device("d")
    with pytest.raises(BlksnapError) as exc:
        dev.write(dev.size, b"x")
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(BlksnapError) as exc:
        dev.read(dev.size - 1, 2)
    assert exc.value.errno == errno.EINVAL
    assert eng.device_errors() == {}
    assert eng.events.wait(0.05) is None


def test_failure_queued_on_the_snapshot_of_the_device(eng, tmp_path):
    sid = eng.snapshot_create(["d"], storage=str(tmp_path), limit=8 * MiB)
    eng.attach("d", "failing")
    with pytest.raises(BlksnapError):
        eng.device("d").write(0, b"x" * 4096)
    ev = eng.wait_event(sid, timeout=1.0)
    assert ev is not None and ev.code == DEVICE_ERROR and ev.data["device"] == "d"
    eng.snapshot_destroy(sid)
