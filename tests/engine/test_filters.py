"""The filter stack: registration, altitudes, attach/detach errnos, ctl, and
what pass / skip / repeat / redirect do to a request."""

from __future__ import annotations

import errno

import pytest

import blksnap
from blksnap import Bio, Filter, FilterResult, Op
from tests.conftest import file_bytes


class Recorder(Filter):
    """Counts the requests it sees; altitude 105."""

    name = "recorder"
    altitude = 105

    def __init__(self, device, opts):
        super().__init__(device, {})
        self.seen: list[tuple[Op, int, int, bool]] = []
        self.opts = opts

    def submit(self, bio: Bio) -> FilterResult:
        self.seen.append((bio.op, bio.offset, bio.length, bio.filtered))
        return FilterResult.PASS


class Rival(Filter):
    """Another filter at the recorder's altitude."""

    name = "rival"
    altitude = 105


class ZeroReads(Filter):
    """Completes every read itself with 0x5a bytes (SKIP)."""

    name = "zeroreads"
    altitude = 101

    def submit(self, bio: Bio) -> FilterResult:
        if bio.op is Op.READ:
            bio.result = b"\x5a" * bio.length
            return FilterResult.SKIP
        return FilterResult.PASS


class RepeatTwice(Filter):
    """Asks to be called again twice per request, then passes."""

    name = "repeat"
    altitude = 102

    def __init__(self, device, opts):
        super().__init__(device, opts)
        self.calls = 0

    def submit(self, bio: Bio) -> FilterResult:
        self.calls += 1
        count = bio.private.get("repeat", 0)
        if count < 2:
            bio.private["repeat"] = count + 1
            return FilterResult.REPEAT
        return FilterResult.PASS


class Redirect(Filter):
    """Sends writes to the device named in option ``to``."""

    name = "redirect-test"
    altitude = 103
    target: blksnap.Device | None = None

    def submit(self, bio: Bio) -> FilterResult:
        if bio.op is Op.WRITE and Redirect.target is not None:
            bio.device = Redirect.target
            return FilterResult.REDIRECT
        return FilterResult.PASS


class Mirror(Filter):
    """Issues its own write (a copy at offset+4096) for each write: that
    write must reach the backing store without re-entering any filter."""

    name = "mirror"
    altitude = 104

    def __init__(self, device, opts):
        super().__init__(device, opts)
        self.calls = 0

    def submit(self, bio: Bio) -> FilterResult:
        self.calls += 1
        if bio.op is Op.WRITE:
            self.device.submit_filtered(Bio(Op.WRITE, bio.offset + 4096, bio.length, bio.data))
        return FilterResult.PASS


@pytest.fixture
def dev(engine, make_file):
    for cls in (Recorder, Rival, ZeroReads, RepeatTwice, Redirect, Mirror):
        engine.register_filter(cls)
    return engine.add_device(make_file(1 << 20), name="d0")


def test_register_twice_is_eexist(engine):
    engine.register_filter(Recorder)
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.register_filter(Recorder)
    assert info.value.errno == errno.EEXIST


def test_attach_errnos(engine, dev):
    flt = engine.attach("d0", "recorder", {"k": "v"})
    assert flt.opts == {"k": "v"}
    assert engine.filters("d0") == ["recorder"]
    for name, err in (("recorder", errno.EALREADY), ("rival", errno.EBUSY), ("nope", errno.ENOENT)):
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.attach("d0", name)
        assert info.value.errno == err
        assert engine.filters("d0") == ["recorder"]
        assert engine.device("d0").filters.find("recorder") is flt
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.attach("nodev", "recorder")
    assert info.value.errno == errno.ENOENT


def test_detach_errnos(engine, dev):
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.detach("d0", "recorder")
    assert info.value.errno == errno.ENOENT
    engine.attach("d0", "recorder")
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.detach("d0", "rival")  # another name at that altitude
    assert info.value.errno == errno.EINVAL
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.detach("d0", "nope")
    assert info.value.errno == errno.ENOENT
    assert engine.filters("d0") == ["recorder"]
    engine.detach("d0", "recorder")
    assert engine.filters("d0") == []


def test_unknown_option_is_einval(engine, dev):
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.attach("d0", "blksnap", {"bogus": "1"})
    assert info.value.errno == errno.EINVAL
    assert engine.filters("d0") == []


def test_ctl_unknown_command_is_enotty(engine, dev):
    engine.attach("d0", "recorder")
    engine.attach("d0", "blksnap")
    for flt in ("recorder", "blksnap"):
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.ctl("d0", flt, "no-such-command")
        assert info.value.errno == errno.ENOTTY
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.ctl("d0", "rival", "x")  # registered, not attached
    assert info.value.errno == errno.ENOENT


def test_stack_order_by_altitude(engine, dev):
    engine.attach("d0", "recorder")  # altitude 105
    engine.attach("d0", "zeroreads")  # altitude 101
    engine.attach("d0", "blksnap")  # altitude 100
    assert engine.filters("d0") == ["blksnap", "zeroreads", "recorder"]


def test_pass_sees_every_request(engine, dev):
    rec = engine.attach("d0", "recorder")
    dev.write(100, b"abc")
    dev.read(0, 512)
    dev.flush()
    dev.write_zeroes(4096, 4096)
    assert rec.seen == [
        (Op.WRITE, 100, 3, False),
        (Op.READ, 0, 512, False),
        (Op.FLUSH, 0, 0, False),
        (Op.WRITE_ZEROES, 4096, 4096, False),
    ]
    assert dev.read(100, 3) == b"abc"


def test_skip_completes_the_request_above_the_lower_filters(engine, dev):
    rec = engine.attach("d0", "recorder")
    engine.attach("d0", "zeroreads")
    dev.write(0, b"real")
    assert dev.read(0, 4) == b"\x5a" * 4
    # The recorder (higher altitude) never saw the skipped read.
    assert [s[0] for s in rec.seen] == [Op.WRITE]
    engine.detach("d0", "zeroreads")
    assert dev.read(0, 4) == b"real"


def test_repeat_calls_the_filter_again(engine, dev):
    flt = engine.attach("d0", "repeat")
    dev.write(0, b"x")
    assert flt.calls == 3
    assert dev.read(0, 1) == b"x"


def test_redirect_moves_the_request_to_another_device(engine, dev, make_file):
    other_path = make_file(1 << 20, name="other.img")
    other = engine.add_device(other_path, name="other")
    Redirect.target = other
    try:
        engine.attach("d0", "redirect-test")
        dev.write(10, b"moved")
        assert file_bytes(other_path)[10:15] == b"moved"
        assert file_bytes(dev.path)[10:15] == bytes(5)
    finally:
        Redirect.target = None


def test_filter_issued_io_does_not_reenter(engine, dev):
    rec = engine.attach("d0", "recorder")
    mirror = engine.attach("d0", "mirror")
    dev.write(0, b"twin")
    assert mirror.calls == 1  # its own write did not come back to it
    assert rec.seen == [(Op.WRITE, 0, 4, False)]  # nor reached the filter above
    data = file_bytes(dev.path)
    assert data[0:4] == b"twin" and data[4096:4100] == b"twin"


def test_tracker_detach_busy_while_in_snapshot(engine, dev, storage_dir):
    engine.attach("d0")
    sid = engine.snapshot_create(["d0"], storage=storage_dir, limit=1 << 20)
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.detach("d0")
    assert info.value.errno == errno.EBUSY
    assert engine.filters("d0") == ["blksnap"]
    engine.snapshot_destroy(sid)
    engine.detach("d0")
    assert engine.filters("d0") == []
