"""blksnapd's NBD exports read and written by clients nobody here wrote:
qemu-img (qemu-utils), nbdinfo and nbdcopy (libnbd-bin)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from blksnap.hostinfo import proc_stat
from tests.integration.conftest import BIN, SKIP, have, run, start_daemon, stop_daemon
from tests.integration.helpers import sha256_file
from tests.integration.nbd_client import OptionFailed, RawNbd

KiB = 1 << 10
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not all(have(t) for t in ("qemu-img", "nbdinfo", "nbdcopy")),
    reason="needs qemu-utils and libnbd-bin (make apt)",
)


def uri(sock: str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def random_file(path: str, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.write(data)
    return data


def snapshot(daemon, names: list[str], storage: Path, limit: str = "64M") -> str:
    storage.mkdir(exist_ok=True)
    args = ["snapshot", "create"]
    for n in names:
        args += ["-d", n]
    sid = daemon.cli(*args, "-f", str(storage), "-l", limit).stdout.strip()
    daemon.cli("snapshot", "take", "-i", sid)
    return sid


def cbtinfo(daemon, name: str) -> dict:
    return json.loads(daemon.cli("--json", "cbtinfo", "-d", name).stdout)


def dirty_blocks(map_json: str, block: int, blocks: int) -> list[bool]:
    """Per CBT block, from ``nbdinfo --json --map``: dirty (bit 0) or not.
    Extents follow each other, on block boundaries, and cover the export."""
    out: list[bool] = []
    pos = 0
    for ext in json.loads(map_json):
        assert ext["offset"] == pos and pos % block == 0 and ext["length"] % block == 0, ext
        out += [bool(ext["type"] & 1)] * (ext["length"] // block)
        pos += ext["length"]
    assert len(out) == blocks
    return out


def extents_of(dirty: list[bool], block: int, offset: int, length: int) -> list[tuple[int, int]]:
    """What block status should say for ``offset``..``offset+length``: runs of
    equal blocks, merged, clipped to the range."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        b = pos // block
        stop = min(end, (b + 1) * block)
        flag = int(dirty[b])
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + stop - pos, flag)
        else:
            out.append((stop - pos, flag))
        pos = stop
    return out


class Writers:
    """Threads that keep writing random blocks to a device through its FUSE
    file; :meth:`pause` holds them between writes."""

    def __init__(self, path: str, size: int, n: int = 2) -> None:
        self.path = path
        self.size = size
        self.stop = threading.Event()
        self.gate = threading.Lock()
        self.writes = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                while not self.stop.is_set():
                    n = rng.choice((4 * KiB, 64 * KiB, 300 * KiB, 1 * MiB))
                    off = rng.randrange(0, self.size - n)
                    data = rng.randbytes(n)
                    with self.gate:
                        os.pwrite(fd, data, off)
                        self.writes += 1
            finally:
                os.close(fd)
        except BaseException as exc:
            self.errors.append(exc)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not self.errors, self.errors


def test_qemu_img_convert_of_image_while_writers_change_the_device(nbd_daemon, backing, tmp_path):
    size = 64 * MiB
    path = backing("d.img", size)
    random_file(path, size, seed=1)
    nbd_daemon.cli("device", "add", path, "--name", "d")
    nbd_daemon.cli("attach", "-d", "d")
    dev_file = os.path.join(nbd_daemon.mount, "dev", "d")
    writers = Writers(dev_file, size)
    try:
        while writers.writes < 20:
            time.sleep(0.01)
        with writers.gate:  # the instant: no write in flight
            sid = snapshot(nbd_daemon, ["d"], tmp_path / "diff", "128M")
            expected = sha256_file(path)  # what the device held at take
        at_take = writers.writes
        out = tmp_path / "converted.raw"
        run(
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri(nbd_daemon.nbd, f"{sid}/d"),
            str(out),
        )
        through_fuse = sha256_file(os.path.join(nbd_daemon.mount, "images", sid, "d"))
        assert writers.writes > at_take + 10, "the writers did not run during the copy"
    finally:
        writers.finish()
    assert sha256_file(out) == expected
    assert through_fuse == expected
    assert sha256_file(path) != expected  # the device did change meanwhile
    # nbdcopy (multi-conn) of the same export agrees.
    out2 = tmp_path / "nbdcopy.raw"
    run("nbdcopy", uri(nbd_daemon.nbd, f"{sid}/d"), str(out2))
    assert sha256_file(out2) == expected
    nbd_daemon.cli("snapshot", "destroy", "-i", sid)


def test_dirty_bitmap_is_the_cbt(nbd_daemon, backing, tmp_path):
    size = 32 * MiB
    path = backing("c.img", size)
    random_file(path, size, seed=2)
    nbd_daemon.cli("device", "add", path, "--name", "c")
    nbd_daemon.cli("attach", "-d", "c")
    dev_file = os.path.join(nbd_daemon.mount, "dev", "c")
    # Take 1: the previous snapshot (a backup's reference point).
    sid1 = snapshot(nbd_daemon, ["c"], tmp_path / "diff1")
    prev = cbtinfo(nbd_daemon, "c")
    nbd_daemon.cli("snapshot", "destroy", "-i", sid1)
    block = prev["block_size"]
    blocks = prev["block_count"]
    # Changes between take 1 and take 2, at odd alignments.
    changes = [(0, 512), (5 * block + 100, 3 * block), (17 * block - 1, 2), (size - 4096, 4096)]
    changes += [(random.Random(3).randrange(size - 70000), 70000) for _ in range(5)]
    with open(dev_file, "r+b") as f:
        for off, n in changes:
            f.seek(off)
            f.write(os.urandom(n))
    sid2 = snapshot(nbd_daemon, ["c"], tmp_path / "diff2")
    info = cbtinfo(nbd_daemon, "c")
    assert info["generation_id"] == prev["generation_id"]
    assert info["changes_number"] == prev["changes_number"] + 1
    changed = [False] * blocks
    for off, n in changes:
        for b in range(off // block, (off + n - 1) // block + 1):
            changed[b] = True
    # Writes after take 2 belong to the next backup, not to this image ...
    with open(dev_file, "r+b") as f:
        f.seek(9 * block)
        f.write(os.urandom(block))
    # ... but blocks marked dirty by hand go to both.
    nbd_daemon.cli("markdirtyblock", "-d", "c", "-r", f"{(20 * block) // 512}:8")

    def cbt_map() -> bytes:
        out = tmp_path / "cbt.map"
        nbd_daemon.cli("readcbtmap", "-d", "c", "-f", str(out))
        return out.read_bytes()

    cbt = cbt_map()
    assert len(cbt) == blocks
    from_cbt = [number > prev["changes_number"] for number in cbt]
    image = uri(nbd_daemon.nbd, f"{sid2}/c")
    got = run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:blksnap", image).stdout
    from_nbd = dirty_blocks(got, block, blocks)
    assert from_nbd == from_cbt  # block by block
    expected = list(changed)
    expected[20] = True
    assert from_nbd == expected  # and exactly what was written (and marked)
    # base:allocation: all data, honestly unknown whether zero.
    alloc = json.loads(run("nbdinfo", "--json", "--map", image).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in alloc] == [(0, size, 0)]
    # The device export: blocks changed since take 2 (write map == active).
    got = run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:blksnap", uri(nbd_daemon.nbd, "c"))
    dev_dirty = dirty_blocks(got.stdout, block, blocks)
    assert [b for b, d in enumerate(dev_dirty) if d] == [9, 20]
    # Block status of an unaligned range through a raw client: clipped, merged.
    with RawNbd(nbd_daemon.nbd) as c:
        c.open(f"{sid2}/c", meta=["qemu:dirty-bitmap:blksnap"])
        for off, n in ((5 * block + 7, 4 * block), (100, 30 * block), (size - 5000, 5000)):
            ext = next(iter(c.block_status(off, n).values()))
            assert ext == extents_of(expected, block, off, n), (off, n)
            ext = next(iter(c.block_status(off, n, flags=8).values()))  # REQ_ONE
            assert ext == extents_of(expected, block, off, n)[:1], (off, n)
        c.disconnect()
    nbd_daemon.cli("snapshot", "destroy", "-i", sid2)


def test_nbdcopy_round_trip_through_a_device_export(nbd_daemon, backing, tmp_path):
    size = 48 * MiB
    path = backing("r.img", size)
    nbd_daemon.cli("device", "add", path, "--name", "r")
    nbd_daemon.cli("attach", "-d", "r")
    src = tmp_path / "src.raw"
    random_file(str(src), size, seed=4)
    run("nbdcopy", "--flush", str(src), uri(nbd_daemon.nbd, "r"))
    assert sha256_file(path) == sha256_file(src)
    back = tmp_path / "back.raw"
    run("nbdcopy", uri(nbd_daemon.nbd, "r"), str(back))
    assert sha256_file(back) == sha256_file(src)
    # Writes went through the filter stack: the CBT saw every block.
    got = run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:blksnap", uri(nbd_daemon.nbd, "r"))
    assert [(e["length"], e["type"]) for e in json.loads(got.stdout)] == [(size, 1)]
    # And through a snapshot: image unchanged by device writes over NBD.
    sid = snapshot(nbd_daemon, ["r"], tmp_path / "diff")
    run("nbdcopy", str(src), uri(nbd_daemon.nbd, "r"))  # rewrite while taken
    zeros = tmp_path / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(size)
    run("nbdcopy", str(zeros), uri(nbd_daemon.nbd, "r"))
    image_copy = tmp_path / "image.raw"
    run("nbdcopy", uri(nbd_daemon.nbd, f"{sid}/r"), str(image_copy))
    assert sha256_file(image_copy) == sha256_file(src)
    assert sha256_file(path) == sha256_file(zeros)
    nbd_daemon.cli("snapshot", "destroy", "-i", sid)


def test_nbdinfo_list_follows_devices_and_snapshots(nbd_daemon, backing, tmp_path):
    for name, size in (("a", 8 * MiB), ("b", 12 * MiB)):
        nbd_daemon.cli("device", "add", backing(f"{name}.img", size), "--name", name)

    def exports() -> dict[str, dict]:
        out = run("nbdinfo", "--list", "--json", uri(nbd_daemon.nbd, "")).stdout
        return {e["export-name"]: e for e in json.loads(out)["exports"]}

    assert sorted(exports()) == ["a", "b"]
    sid = snapshot(nbd_daemon, ["a", "b"], tmp_path / "diff")
    got = exports()
    assert sorted(got) == sorted(["a", "b", f"{sid}/a", f"{sid}/b"])
    assert got[f"{sid}/b"]["export-size"] == 12 * MiB
    assert got[f"{sid}/a"]["is_read_only"] is True
    assert got["a"]["is_read_only"] is False
    assert got["a"]["can_multi_conn"] is True
    assert "qemu:dirty-bitmap:blksnap" in got[f"{sid}/a"]["contexts"]
    desc = run("nbdinfo", "--json", uri(nbd_daemon.nbd, f"{sid}/a")).stdout
    assert (
        cbtinfo(nbd_daemon, "a")["generation_id"] in json.loads(desc)["exports"][0]["description"]
    )
    nbd_daemon.cli("snapshot", "destroy", "-i", sid)
    assert sorted(exports()) == ["a", "b"]
    nbd_daemon.cli("device", "remove", "b")
    assert sorted(exports()) == ["a"]


def test_image_destroyed_under_a_connected_client(nbd_daemon, backing, tmp_path):
    size = 8 * MiB
    path = backing("x.img", size)
    content = random_file(path, size, seed=5)
    nbd_daemon.cli("device", "add", path, "--name", "x")
    sid = snapshot(nbd_daemon, ["x"], tmp_path / "diff")
    with RawNbd(nbd_daemon.nbd) as img, RawNbd(nbd_daemon.nbd) as dev:
        img.open(f"{sid}/x", meta=["qemu:dirty-bitmap:blksnap"])
        dev.open("x")
        assert img.read(0, 65536) == content[:65536]
        # A device with NBD clients cannot be removed from under them.
        r = nbd_daemon.cli("device", "remove", "x", check=False)
        assert r.returncode == 1 and "EBUSY" in r.stderr
        # Nor a snapshot whose image has one, unless forced.
        r = nbd_daemon.cli("snapshot", "destroy", "-i", sid, check=False)
        assert r.returncode == 1 and "EBUSY" in r.stderr
        nbd_daemon.cli("snapshot", "destroy", "-i", sid, "--force")
        for cmd in ("READ", "FLUSH", "BLOCK_STATUS"):
            r = img.call(cmd, 0, 4096 if cmd != "FLUSH" else 0)
            assert r.error == "ESHUTDOWN", (cmd, r)
            assert "destroyed" in r.message
        img.disconnect()
        assert img.closed_by_server()
        # The device and the server carry on.
        assert dev.read(0, 4096) == content[:4096]
        dev.disconnect()
    with RawNbd(nbd_daemon.nbd) as c:
        c.greet()
        with pytest.raises(OptionFailed) as exc:
            c.go(f"{sid}/x")
        assert exc.value.kind == "UNKNOWN"
    deadline = time.monotonic() + 10
    while nbd_daemon.client.status()["nbd_clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
    nbd_daemon.cli("device", "remove", "x")  # no client left: it goes


def test_writable_images_and_tcp_listener(backing, tmp_path):
    if SKIP:
        pytest.skip(SKIP)
    d = start_daemon(tmp_path, ["--nbd", "127.0.0.1:0", "--nbd-writable-images"])
    try:
        status = d.client.status()
        host, _, port = status["nbd"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        size = 8 * MiB
        path = backing("w.img", size)
        content = random_file(path, size, seed=6)
        d.cli("device", "add", path, "--name", "w")
        sid = snapshot(d, ["w"], tmp_path / "diff")
        image = f"nbd://127.0.0.1:{port}/{sid}/w"
        info = json.loads(run("nbdinfo", "--json", image).stdout)["exports"][0]
        assert info["is_read_only"] is False
        patch = tmp_path / "patch.raw"
        patch.write_bytes(b"\x5a" * (1 * MiB))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 2M 1M", image)
        got = tmp_path / "img.raw"
        run("nbdcopy", image, str(got))
        data = got.read_bytes()
        assert data[2 * MiB : 3 * MiB] == patch.read_bytes()
        assert data[: 2 * MiB] == content[: 2 * MiB]
        with open(path, "rb") as f:
            assert f.read() == content  # image writes never reach the device
        # Image writes mark the CBT (read map) so the next backup rereads them.
        info = json.loads(d.cli("--json", "cbtinfo", "-d", "w").stdout)
        block = info["block_size"]
        cbt = tmp_path / "cbt.map"
        d.cli("readcbtmap", "-d", "w", "-f", str(cbt))
        numbers = cbt.read_bytes()
        marked = [b for b, n in enumerate(numbers) if n >= info["changes_number"]]
        assert marked == list(range(2 * MiB // block, 3 * MiB // block))
        d.cli("snapshot", "destroy", "-i", sid)
    finally:
        stop_daemon(d)


def test_wildcard_address_refused_and_cli_passes_nbd_through(tmp_path):
    if SKIP:
        pytest.skip(SKIP)
    for addr in ("0.0.0.0:10809", "[::]:0", "*:0"):
        r = subprocess.run(
            [
                str(BIN / "blksnapd"),
                *("--socket", str(tmp_path / "x.sock"), "--mount", str(tmp_path / "xm")),
                *("--state-dir", str(tmp_path / "xs"), "--nbd", addr),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2 and "--nbd-any" in r.stderr, (addr, r.stderr)
    # blksnap daemon start --nbd ...
    sock, nbd = str(tmp_path / "c.sock"), str(tmp_path / "c-nbd.sock")
    args = [str(BIN / "blksnap"), "--socket", sock, "--json"]
    r = run(
        *args,
        "daemon",
        "start",
        "--state-dir",
        str(tmp_path / "cs"),
        "--mount",
        str(tmp_path / "cm"),
        "--nbd",
        f"unix:{nbd}",
    )
    pid = json.loads(r.stdout)["pid"]
    try:
        status = json.loads(run(*args, "daemon", "status").stdout)
        assert status["nbd"] == f"unix:{nbd}"
        assert oct(os.stat(nbd).st_mode & 0o777) == "0o600"
        text = run(str(BIN / "blksnap"), "--socket", sock, "daemon", "status").stdout
        assert f"nbd    unix:{nbd}" in text
        run("nbdinfo", "--list", uri(nbd, ""))
        run(*args, "daemon", "stop")
        assert not os.path.exists(nbd)
    finally:
        # Not our child (the CLI detached it): stop it by its pid if it is still up.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                if sig == signal.SIGKILL or time.monotonic() > deadline - 25:
                    os.kill(pid, sig)
                time.sleep(0.1)
        subprocess.run(["umount", "-l", str(tmp_path / "cm")], check=False, capture_output=True)


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"
