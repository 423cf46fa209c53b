"""Devices: backing files, capacity, I/O, bounds, exclusive block devices."""

from __future__ import annotations

import errno
import os

import pytest

import blksnap
from tests.conftest import collector_off, file_bytes


def test_read_write_flush_roundtrip(engine, make_file):
    path = make_file(1 << 20)
    dev = engine.add_device(path, name="d0")
    assert dev.size == 1 << 20
    data = os.urandom(10_000)
    dev.write(4093, data)  # unaligned
    dev.flush()
    assert dev.read(4093, len(data)) == data
    assert file_bytes(path)[4093 : 4093 + len(data)] == data
    assert dev.read(0, 10) == bytes(10)


def test_write_zeroes_and_discard(engine, make_file):
    path = make_file(1 << 20)
    dev = engine.add_device(path, name="d0")
    dev.write(0, b"\xff" * (1 << 20))
    dev.write_zeroes(1000, 5000)
    dev.discard(200_000, 3)
    content = file_bytes(path)
    assert content[1000:6000] == bytes(5000)
    assert content[999] == 0xFF and content[6000] == 0xFF
    assert content[200_000:200_003] == bytes(3)


@pytest.mark.parametrize(
    ("offset", "length", "write", "err"),
    [
        (-1, 10, False, errno.EINVAL),
        (0, -1, False, errno.EINVAL),
        ((1 << 20) - 5, 10, False, errno.EINVAL),
        (1 << 20, 1, False, errno.EINVAL),
        (-512, 512, True, errno.EINVAL),
        ((1 << 20) - 5, 10, True, errno.ENOSPC),
        (1 << 21, 1, True, errno.ENOSPC),
    ],
)
def test_out_of_range_io_rejected_and_nothing_written(
    engine, make_file, offset, length, write, err
):
    path = make_file(1 << 20)
    dev = engine.add_device(path, name="d0")
    before = file_bytes(path)
    with pytest.raises(blksnap.BlksnapError) as info:
        if write:
            dev.write(offset, b"\xaa" * length)
        else:
            dev.read(offset, length)
    assert info.value.errno == err
    assert file_bytes(path) == before
    assert os.path.getsize(path) == 1 << 20


def test_zero_length_io_is_a_no_op(engine, make_file):
    dev = engine.add_device(make_file(4096), name="d0")
    assert dev.read(4096, 0) == b""
    dev.write(4096, b"")


def test_add_device_errors_change_nothing(engine, make_file, tmp_path):
    path = make_file(1 << 20)
    engine.add_device(path, name="d0")
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.add_device(path, name="d1")  # same file, other name
    assert info.value.errno == errno.EBUSY
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.add_device(make_file(4096), name="d0")  # name taken
    assert info.value.errno == errno.EEXIST
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.add_device(str(tmp_path / "missing"), name="d2")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(blksnap.BlksnapError) as info:
        engine.add_device(str(tmp_path), name="d3")  # a directory
    assert info.value.errno == errno.EINVAL
    for bad in ("", "a/b", "-x", "x" * 65, "../x"):
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.add_device(make_file(4096), name=bad)
        assert info.value.errno == errno.EINVAL
    assert [d.name for d in engine.devices()] == ["d0"]


def test_remove_device(engine, make_file):
    engine.add_device(make_file(4096), name="d0")
    engine.remove_device("d0")
    assert engine.devices() == []
    with pytest.raises(blksnap.NotFound):
        engine.remove_device("d0")


def _loop_device(path: str):
    import subprocess

    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root and /dev/loop-control")
    out = subprocess.run(
        ["losetup", "--find", "--show", path], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.skip(f"losetup failed: {out.stderr.strip()}")
    return out.stdout.strip()


def test_block_device_opened_exclusively(engine, make_file):
    import subprocess

    loop = _loop_device(make_file(4 << 20))
    try:
        dev = engine.add_device(loop, name="blk")
        assert dev.size == 4 << 20
        dev.write(512, b"x" * 4096)
        assert dev.read(512, 4096) == b"x" * 4096
        # A second exclusive opener is refused while we hold it.
        with pytest.raises(OSError) as info:
            os.open(loop, os.O_RDWR | os.O_EXCL)
        assert info.value.errno == errno.EBUSY
        engine.remove_device("blk")
        fd = os.open(loop, os.O_RDWR | os.O_EXCL)
        os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_removed_device_refuses_io_with_enodev(engine, make_file):
    path = make_file(1 << 20)
    dev = engine.add_device(path, name="d0")
    dev.write(0, b"kept")
    engine.remove_device("d0")
    for call in (lambda: dev.read(0, 4), lambda: dev.write(0, b"lost"), dev.flush):
        with pytest.raises(blksnap.BlksnapError) as info:
            call()
        assert info.value.errno == errno.ENODEV
    assert file_bytes(path)[:4] == b"kept"


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("empty", "size 0"),
        ("odd", "not a multiple of 512"),
        ("tiny", "not a multiple of 512"),
        ("/proc/self/status", "pseudo file system"),
        ("/proc/cpuinfo", "pseudo file system"),
        ("/sys/kernel/mm/transparent_hugepage/enabled", "pseudo file system"),
        ("/dev/null", "regular file"),
        ("/dev/zero", "regular file"),
        ("fifo", "regular file"),
        ("dir", "regular file"),
    ],
)
def test_add_device_refuses_what_is_no_disk(engine, make_file, tmp_path, kind, why):
    """Size 0, sizes that are not whole sectors, /proc pseudo-files, character
    devices, FIFOs and directories: EINVAL saying why, and nothing served."""
    if kind == "empty":
        path = make_file(0)
    elif kind == "odd":
        path = make_file((1 << 20) + 100)
    elif kind == "tiny":
        path = make_file(1)
    elif kind == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    elif kind == "dir":
        path = str(tmp_path)
    else:
        path = kind
        if not os.path.exists(path):
            pytest.skip(f"no {path} here")
    with collector_off():
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(blksnap.BlksnapError) as info:
            engine.add_device(path, name="d0")
        after = len(os.listdir("/proc/self/fd"))
    assert info.value.errno == errno.EINVAL, info.value
    assert why in info.value.message and path in info.value.message, info.value.message
    assert engine.devices() == []
    assert after == fds  # nothing left open
    if kind in ("empty", "odd", "tiny"):
        assert os.path.getsize(path) in (0, (1 << 20) + 100, 1)  # untouched
    # The name is still free for a proper disk.
    assert engine.add_device(make_file(1 << 20), name="d0").size == 1 << 20


def test_backing_store_says_what_the_path_is(tmp_path):
    from blksnap.engine.device import BackingStore

    os.mkfifo(tmp_path / "fifo")
    for path, what in (
        ("/dev/null", "is a character device"),
        (str(tmp_path / "fifo"), "is a FIFO"),
        (str(tmp_path), "is a directory"),
    ):
        with pytest.raises(blksnap.BlksnapError) as info:
            BackingStore(path)
        assert info.value.errno == errno.EINVAL and what in info.value.message, info.value
