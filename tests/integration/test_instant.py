"""Backups used at once: ``blksnap mount`` serves any backup of a chain
read-only (file-level restore from its loop device), and ``blksnap restore
--instant`` serves a target as the device while it is hydrated, a worker
crash in the middle carried on, the next backup incremental."""

from __future__ import annotations

import errno
import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Daemon, have, run
from tests.integration.helpers import (
    Writer,
    add_device,
    direct_read,
    direct_write,
    fio_json,
    fio_verify,
    kill_worker,
    md5,
    populate,
    sha256_file,
    tree,
)

MiB = 1 << 20
SIZE = 64 * MiB


def jcli(daemon: Daemon, *args: str) -> dict:
    return json.loads(daemon.cli("--json", *args).stdout)


def backup(daemon: Daemon, repo: Path, name: str, *mode: str) -> dict:
    return jcli(daemon, "backup", "-d", name, "--repo", str(repo), "--no-progress", *mode)


def backed_up_and_lost(
    daemon: Daemon, tmp_path: Path, name: str, data: bytes | bytearray
) -> tuple[Path, dict]:
    """Device ``name`` holding ``data``, tracked, backed up into
    ``tmp_path/repo``, then removed (lost): the repository and the backup."""
    src = tmp_path / f"{name}.src"
    src.write_bytes(bytes(data))
    add_device(daemon, str(src), name, loop=False)
    daemon.cli("attach", "-d", name)
    repo = tmp_path / "repo"
    b = backup(daemon, repo, name)
    daemon.cli("device", "remove", name)
    return repo, b


def instant(daemon: Daemon, repo: Path, b: dict, name: str, target: Path, *more: str) -> dict:
    """``blksnap restore --instant`` of ``name`` as of backup ``b`` onto ``target``."""
    return jcli(
        daemon, "restore", "--instant", "--repo", str(repo), "-b", b["id"], "-d", name,
        "--to", str(target), *more,
    )  # fmt: skip


def ext4_device(daemon: Daemon, tmp_path: Path, name: str, size: int = SIZE) -> tuple[str, str]:
    """A device with ext4 on it, mounted: (its loop device, the mount point)."""
    path = tmp_path / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    out = add_device(daemon, str(path), name)
    daemon.cli("attach", "-d", name)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", out["loop"])
    where = daemon.mount_fs(out["loop"], tmp_path / f"mnt-{name}")
    return out["loop"], where


def hydration(daemon: Daemon, name: str) -> dict:
    for d in daemon.client.devices():
        if d["name"] == name:
            return d["hydration"]
    raise AssertionError(f"no device {name}")


def wait_hydrated(daemon: Daemon, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = hydration(daemon, name)
        if h and h["state"] == "done":
            return h
        assert h is None or h["state"] != "failed", h
        time.sleep(0.1)
    raise AssertionError(f"{name} not hydrated in {timeout} s: {hydration(daemon, name)}")


@pytest.mark.skipif(not have("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_mount_every_backup_of_a_chain(daemon: Daemon, tmp_path: Path) -> None:
    """full -> incremental -> differential -> incremental: each backup,
    mounted with a loop device, holds the files as they were at its take."""
    rng = random.Random(16)
    _, where = ext4_device(daemon, tmp_path, "d0")
    repo = tmp_path / "repo"
    states: dict[str, dict[str, str]] = {}
    for step, mode in enumerate(["--full", "--incremental", "--differential", "--incremental"]):
        populate(where, rng, 6, f"s{step}-")
        if step == 2:
            os.unlink(os.path.join(where, "s0-000.bin"))
        run("sync", "-f", where)
        states[backup(daemon, repo, "d0", mode)["id"]] = tree(where)
    kinds = [b["devices"][0]["kind"] for b in jcli(daemon, "backups", "--repo", str(repo))]
    assert kinds == ["full", "incremental", "differential", "incremental"]
    for i, (bid, want) in enumerate(states.items()):
        got = jcli(daemon, "mount", "--repo", str(repo), "-b", bid, "-d", "d0", "--loop")
        assert got["name"] == f"backups/{bid}/d0"
        assert got["path"] == os.path.join(daemon.mount, "backups", bid, "d0")
        assert got["loop"].startswith("/dev/loop")
        # read-only: a write is refused
        with pytest.raises(OSError), open(got["path"], "r+b") as f:
            f.write(b"x")
        mnt = daemon.mount_fs(got["loop"], tmp_path / f"ro{i}", "ro", "noload")
        assert tree(mnt) == want, bid
        # in use: umount refused
        err = daemon.cli("--json", "umount", "-b", bid, "-d", "d0", check=False)
        assert err.returncode != 0 and "EBUSY" in err.stderr
        daemon.umount(mnt)
        daemon.cli("umount", "--repo", str(repo), "-b", bid, "-d", "d0")
        assert not os.path.exists(got["path"])


def test_instant_restore_smoke(daemon: Daemon, tmp_path: Path) -> None:
    rng = random.Random(5)
    data = bytearray(rng.randbytes(8 * MiB)) + bytes(8 * MiB)
    repo, b = backed_up_and_lost(daemon, tmp_path, "d0", data)
    target = tmp_path / "target.img"
    got = instant(daemon, repo, b, "d0", target, "--paused")
    assert got["hydration"]["state"] == "paused", got
    path = got["path"]
    with open(path, "rb") as f:
        assert f.read(4096) == bytes(data[:4096])
        f.seek(5 * MiB)
        assert f.read(MiB) == bytes(data[5 * MiB : 6 * MiB])
    # Left half-way (the device removed): given again onto the same target
    # it carries on; onto another one it is refused unless --force gives
    # the first up, and then nothing of the first counts for the second.
    daemon.cli("device", "remove", "d0")
    again = instant(daemon, repo, b, "d0", target, "--paused")
    assert again["resumed"] and again["hydration"]["done"] == 2 * MiB, again
    daemon.cli("device", "remove", "d0")
    other = tmp_path / "other.img"
    err = daemon.cli(
        "--json", "restore", "--instant", "--repo", str(repo), "-b", b["id"], "-d", "d0",
        "--to", str(other), check=False,
    )  # fmt: skip
    assert err.returncode != 0 and "EEXIST" in err.stderr and "--force" in err.stderr, err
    assert not other.exists()
    got = instant(daemon, repo, b, "d0", other, "--paused", "--force")
    assert got["hydration"]["done"] == 0 and not got["resumed"], got
    daemon.cli("ctl", "-d", "d0", "--filter", "hydrate", "resume")
    wait_hydrated(daemon, "d0")
    assert md5(Path(got["path"]).read_bytes()) == md5(bytes(data)) == md5(other.read_bytes())
    assert "hydrate" not in daemon.client.devices()[0]["filters"]
    # Zero chunks are holes in the target, as a plain restore leaves them.
    assert os.stat(other).st_blocks * 512 <= 8 * MiB + MiB, os.stat(other)


def test_instant_restore_bytes_match_a_model_across_a_worker_kill(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Raw device: writes at random offsets (partial chunks, whole chunks,
    across chunks) while the hydration runs slowly, blksnapd's worker killed
    in the middle; the target ends exactly as the backup plus the writes,
    and the next backup is an incremental against the backup, restoring to
    the same bytes."""
    rng = random.Random(11)
    size = 48 * MiB
    data = bytearray(rng.randbytes(size))
    data[20 * MiB : 28 * MiB] = bytes(8 * MiB)  # zero chunks: never stored, still restored
    repo, b = backed_up_and_lost(daemon, tmp_path, "r0", data)
    os.unlink(tmp_path / "r0.src")
    target = tmp_path / "target.img"
    got = instant(daemon, repo, b, "r0", target, "--rate", "6M")
    assert got["linked"] and got["target"] == str(target)
    model = bytearray(data)
    path = got["path"]
    touched: set[int] = set()  # 1 MiB chunks written since the restore

    def write_some(n: int) -> None:
        for _ in range(n):
            length = rng.choice([4096, 64 * 1024, MiB, 3 * MiB])
            off = rng.randrange(0, (size - length) // 4096) * 4096
            chunk = rng.randbytes(length)
            direct_write(path, off, chunk)
            model[off : off + length] = chunk
            touched.update(range(off // MiB, (off + length - 1) // MiB + 1))

    write_some(12)
    before = hydration(daemon, "r0")
    assert before["state"] == "running" and before["done"] < before["total"], before
    # Reads of regions not restored yet come from the backup, at once.
    for _ in range(6):
        off = rng.randrange(0, (size - 8192) // 4096) * 4096
        assert direct_read(path, off, 8192) == bytes(model[off : off + 8192])
    kill_worker(daemon)
    after = hydration(daemon, "r0")
    assert after["state"] in ("running", "done") and after["done"] >= before["done"], after
    write_some(12)
    daemon.cli("ctl", "-d", "r0", "--filter", "hydrate", "rate", "0")
    done = wait_hydrated(daemon, "r0")
    assert done["done"] == done["total"] == size
    assert direct_read(path, 0, size) == bytes(model)
    assert md5(target.read_bytes()) == md5(bytes(model))
    # The next backup: incremental against the restored one, reading only
    # what was written since.
    nxt = backup(daemon, repo, "r0")
    dev = nxt["devices"][0]
    assert nxt["kind"] == "incremental" and dev["parent"] == b["id"], nxt
    assert dev["bytes_read"] == len(touched) * MiB < size, (dev, len(touched))
    out = tmp_path / "again.img"
    daemon.cli("restore", "--repo", str(repo), "-b", nxt["id"], "-d", "r0", "--to", str(out))
    assert md5(out.read_bytes()) == md5(bytes(model))


@pytest.mark.skipif(not have("mkfs.ext4") or not have("fio"), reason="needs mkfs.ext4 and fio")
def test_instant_restore_of_ext4_used_at_once(daemon: Daemon, tmp_path: Path) -> None:
    """An ext4 device backed up, gone, restored instantly: mounted before
    anything is copied, its files read, fio verify and a file writer at
    work while the hydration runs and the worker is killed; afterwards the
    device is ordinary, fsck-clean, and its next backup incremental."""
    rng = random.Random(3)
    _, where = ext4_device(daemon, tmp_path, "e0", size=96 * MiB)
    populate(os.path.join(where, "files"), rng, 20, "f")
    ballast = {}  # read only at the end: the copy has them to do meanwhile
    for i in range(6):
        data = rng.randbytes(6 * MiB)
        Path(where, f"ballast{i}").write_bytes(data)
        ballast[f"ballast{i}"] = md5(data)
    run("sync", "-f", where)
    want = tree(os.path.join(where, "files"))
    repo = tmp_path / "repo"
    b = backup(daemon, repo, "e0")
    daemon.umount(where)
    daemon.cli("device", "remove", "e0")
    target = tmp_path / "e0-restored.img"
    t0 = time.monotonic()
    got = instant(daemon, repo, b, "e0", target, "--loop", "--paused")
    mnt = daemon.mount_fs(got["loop"], tmp_path / "restored")
    assert tree(os.path.join(mnt, "files")) == want  # every file, read at once
    assert sorted(os.listdir(mnt)) == sorted(["files", "lost+found", *ballast])
    served_in = time.monotonic() - t0
    h = hydration(daemon, "e0")
    assert h["state"] == "paused" and h["done"] < h["total"], (h, served_in)
    os.makedirs(os.path.join(mnt, "w"))
    writer = Writer(os.path.join(mnt, "w"), tmp_path / "stop", keep=30, maxsize=200_000)
    fio = fio_verify(f"{mnt}/fio.dat", "16M", 6, name="inst")
    try:
        daemon.cli("ctl", "-d", "e0", "--filter", "hydrate", "rate", "256K")
        daemon.cli("ctl", "-d", "e0", "--filter", "hydrate", "resume")
        time.sleep(2)
        mid = hydration(daemon, "e0")
        assert mid["state"] == "running" and mid["done"] < mid["total"], mid
        kill_worker(daemon)
        # The new worker carries on, at the rate the old one was told.
        st = json.loads(
            daemon.cli("--json", "ctl", "-d", "e0", "--filter", "hydrate", "status").stdout
        )
        assert st["state"] == "running" and st["rate_limit"] == 256 * 1024, st
        assert st["done"] >= mid["done"], (st, mid)
        out, err = fio.communicate(timeout=120)
        daemon.cli("ctl", "-d", "e0", "--filter", "hydrate", "rate", "0")
        wait_hydrated(daemon, "e0", timeout=180)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        writer.stop()
    assert fio.returncode == 0, err[-2000:]
    job = fio_json(out)
    assert job["error"] == 0 and job["read"]["io_bytes"] > 0
    assert not writer.errors() and writer.count() > 5, writer.describe()
    files = writer.files()
    for name, digest in files.items():
        with open(os.path.join(mnt, "w", name), "rb") as f:
            assert md5(f.read()) == digest, name
    assert tree(os.path.join(mnt, "files")) == want
    for name, digest in ballast.items():
        assert md5(Path(mnt, name).read_bytes()) == digest, name
    dev = next(d for d in daemon.client.devices() if d["name"] == "e0")
    assert dev["filters"] == ["blksnap"] and dev["hydration"]["state"] == "done"
    # The next backup is incremental against the restored one and restores
    # to what the device holds.
    run("sync", "-f", mnt)
    nxt = backup(daemon, repo, "e0")
    assert nxt["kind"] == "incremental" and nxt["devices"][0]["parent"] == b["id"], nxt
    daemon.umount(mnt)
    run("fsck.ext4", "-n", "-f", got["loop"])
    out_img = tmp_path / "e0-again.img"
    daemon.cli("restore", "--repo", str(repo), "-b", nxt["id"], "-d", "e0", "--to", str(out_img))
    nxt2 = backup(daemon, repo, "e0")  # (unmounted: the device holds still)
    out2 = tmp_path / "e0-again2.img"
    daemon.cli("restore", "--repo", str(repo), "-b", nxt2["id"], "-d", "e0", "--to", str(out2))
    assert sha256_file(out2) == sha256_file(f"{daemon.mount}/dev/e0")
    assert sha256_file(target) == sha256_file(out2)


@pytest.mark.skipif(not have("qemu-img"), reason="qemu-img is not installed")
def test_mounted_encrypted_backup_over_nbd_blocks_prune(nbd_daemon: Daemon, tmp_path: Path) -> None:
    """An encrypted repository (key file): the backup is served as NBD
    export backups/B/N to qemu-img, read-only; while mounted a prune is
    refused (EBUSY) and daemon status names the mount."""
    daemon = nbd_daemon
    rng = random.Random(7)
    data = rng.randbytes(6 * MiB) + bytes(3 * MiB) + rng.randbytes(3 * MiB)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    add_device(daemon, str(src), "n0", loop=False)
    daemon.cli("attach", "-d", "n0")
    repo, key = tmp_path / "repo", tmp_path / "repo.key"
    daemon.cli("key", "create", "--repo", str(repo), "--key-file", str(key))
    b = jcli(daemon, "backup", "-d", "n0", "--repo", str(repo), "--key-file", str(key))
    jcli(daemon, "backup", "-d", "n0", "--repo", str(repo), "--key-file", str(key), "--full")
    # Without the key: refused, nothing mounted.
    err = daemon.cli("--json", "mount", "--repo", str(repo), "-b", b["id"], "-d", "n0", check=False)
    assert err.returncode != 0 and "ENOKEY" in err.stderr
    got = jcli(
        daemon, "mount", "--repo", str(repo), "--key-file", str(key), "-b", b["id"], "-d", "n0",
        "--nbd",
    )  # fmt: skip
    assert got["nbd_export"] == f"backups/{b['id']}/n0" and got["loop"] is None
    uri = f"nbd+unix:///{got['nbd_export']}?socket={daemon.nbd}"
    out = tmp_path / "via-nbd.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    assert md5(out.read_bytes()) == md5(data)
    wr = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", uri, check=False)
    assert "read-only" in (wr.stdout + wr.stderr).lower() or "denied" in wr.stdout + wr.stderr, wr
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    assert md5(out.read_bytes()) == md5(data)
    st = jcli(daemon, "daemon", "status")
    assert st["mounted_backups"] == [f"{b['id']}/n0"]
    err = daemon.cli(
        "--json", "prune", "--repo", str(repo), "--key-file", str(key), "--keep-last", "1",
        check=False,
    )  # fmt: skip
    assert err.returncode != 0 and "EBUSY" in err.stderr
    assert len(jcli(daemon, "backups", "--repo", str(repo), "--key-file", str(key))) == 2
    daemon.cli("umount", "-b", b["id"], "-d", "n0")
    assert jcli(daemon, "daemon", "status")["mounted_backups"] == []
    daemon.cli("prune", "--repo", str(repo), "--key-file", str(key), "--keep-last", "1")
    assert len(jcli(daemon, "backups", "--repo", str(repo), "--key-file", str(key))) == 1


def test_hydration_carries_on_after_blksnapd_dies_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """blksnapd killed whole (supervisor and worker: the live maps are gone),
    then started at boot with --restore-devices: a hydration from a
    repository without a key carries on by itself, one that needs a
    passphrase waits unserved until restore --instant is given again; in
    both the flushed writes made before are kept (the committed map), and
    the targets end as the backups plus those writes."""
    from tests.integration.conftest import SKIP

    if SKIP:
        pytest.skip(SKIP)
    from blksnap.tools import sandbox
    from tests.integration.helpers import kill_daemon

    rng = random.Random(21)
    monkeypatch.setenv("BLKSNAP_PASSPHRASE", "hydrate me")
    root = tmp_path / "d"
    d = sandbox.start(root, ["--restore-devices"])
    models: dict[str, bytearray] = {}
    targets: dict[str, Path] = {}
    try:
        for name, encrypted in (("p0", False), ("q0", True)):
            data = rng.randbytes(12 * MiB) + bytes(4 * MiB)
            src = tmp_path / f"{name}.src"
            src.write_bytes(data)
            repo = tmp_path / f"repo-{name}"
            if encrypted:
                d.cli("key", "create", "--repo", str(repo))
            d.client.add_device(str(src), name)
            d.client.attach(name)
            b = jcli(d, "backup", "-d", name, "--repo", str(repo), "--no-progress")
            d.client.remove_device(name)
            targets[name] = tmp_path / f"{name}.target"
            got = jcli(
                d, "restore", "--instant", "--repo", str(repo), "-b", b["id"], "-d", name,
                "--to", str(targets[name]), "--paused",
            )  # fmt: skip
            model = bytearray(data)
            for off, length in ((3 * MiB + 4096, 8192), (9 * MiB, MiB), (13 * MiB, 4096)):
                chunk = rng.randbytes(length)
                direct_write(got["path"], off, chunk)  # (each fsync'd: a flush)
                model[off : off + length] = chunk
            assert direct_read(got["path"], 6 * MiB, 4096) == bytes(model[6 * MiB : 6 * MiB + 4096])
            models[name] = model
    finally:
        kill_daemon(d)
    d = sandbox.start(root, ["--restore-devices"])
    try:
        names = [x["name"] for x in d.client.devices()]
        assert names == ["p0"], names  # q0 waits for its passphrase
        assert "q0" in d.log_text() and "restore --instant again" in d.log_text()
        h = hydration(d, "p0")
        assert h["done"] >= 3 * MiB, h  # what was written and flushed is done
        path = os.path.join(d.mount, "dev", "p0")
        assert direct_read(path, 9 * MiB, MiB) == bytes(models["p0"][9 * MiB : 10 * MiB])
        wait_hydrated(d, "p0")  # (a pause is not carried across a boot)
        assert md5(targets["p0"].read_bytes()) == md5(bytes(models["p0"]))
        # q0: given again, with the passphrase in the environment.
        b = jcli(d, "backups", "--repo", str(tmp_path / "repo-q0"))[0]
        got = jcli(
            d, "restore", "--instant", "--repo", str(tmp_path / "repo-q0"), "-b", b["id"],
            "-d", "q0", "--to", str(targets["q0"]),
        )  # fmt: skip
        assert got["resumed"] and got["hydration"]["done"] >= 3 * MiB, got
        wait_hydrated(d, "q0")
        assert md5(targets["q0"].read_bytes()) == md5(bytes(models["q0"]))
    finally:
        d.stop()


@pytest.mark.skipif(not have("mkfs.xfs"), reason="mkfs.xfs is not installed")
def test_file_level_restore_from_xfs_beside_the_live_file_system(
    daemon: Daemon, tmp_path: Path
) -> None:
    """xfs: the backup's loop device is mounted (ro, norecovery, nouuid)
    while the device it came from is still mounted with the same UUID, and
    a deleted file is copied back out of it."""
    rng = random.Random(9)
    path = tmp_path / "x0.img"
    with open(path, "wb") as f:
        f.truncate(320 * MiB)
    out = add_device(daemon, str(path), "x0")
    daemon.cli("attach", "-d", "x0")
    run("mkfs.xfs", "-q", "-f", out["loop"])
    where = daemon.mount_fs(out["loop"], tmp_path / "live")
    want = populate(where, rng, 8, "x")
    run("sync", "-f", where)
    b = backup(daemon, tmp_path / "repo", "x0")
    lost = next(k for k, v in want.items() if v != "dir" and os.path.getsize(Path(where, k)))
    os.unlink(os.path.join(where, lost))
    got = jcli(
        daemon, "mount", "--repo", str(tmp_path / "repo"), "-b", b["id"], "-d", "x0", "--loop"
    )
    old = daemon.mount_fs(got["loop"], tmp_path / "old", "ro", "norecovery", "nouuid")
    assert tree(old) == want
    Path(where, lost).write_bytes(Path(old, lost).read_bytes())
    assert md5(Path(where, lost).read_bytes()) == want[lost]
    daemon.umount(old)
    daemon.cli("umount", "-b", b["id"], "-d", "x0")


def test_backup_of_a_device_while_it_hydrates(daemon: Daemon, tmp_path: Path) -> None:
    """A full backup taken of an instant-restored device before its copy
    ran: the snapshot's image reads the backup where the target has nothing
    yet (through the hydrate filter), and the new backup restores to the
    backup plus the writes."""
    rng = random.Random(4)
    data = rng.randbytes(10 * MiB) + bytes(6 * MiB)
    repo, b = backed_up_and_lost(daemon, tmp_path, "h0", data)
    got = instant(daemon, repo, b, "h0", tmp_path / "h0.target", "--paused")
    model = bytearray(data)
    for off, length in ((MiB + 512 * 1024, 4096), (7 * MiB, 2 * MiB), (12 * MiB, 65536)):
        chunk = rng.randbytes(length)
        direct_write(got["path"], off, chunk)
        model[off : off + length] = chunk
    before = hydration(daemon, "h0")["done"]
    full = backup(daemon, repo, "h0", "--full")
    assert full["devices"][0]["kind"] == "full"
    out = tmp_path / "full.img"
    daemon.cli("restore", "--repo", str(repo), "-b", full["id"], "-d", "h0", "--to", str(out))
    assert md5(out.read_bytes()) == md5(bytes(model))
    assert hydration(daemon, "h0")["done"] > before  # (the image's reads filled units)
    daemon.cli("ctl", "-d", "h0", "--filter", "hydrate", "resume")
    wait_hydrated(daemon, "h0")
    assert md5((tmp_path / "h0.target").read_bytes()) == md5(bytes(model))


def test_a_worker_taking_over_without_the_repository_fails_only_what_is_missing(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The repository gone when blksnapd's worker is killed: the new worker
    serves the device on, regions restored read as before, regions not
    restored fail with EIO (never zeros), and once the repository is back
    the hydration carries on and ends right."""
    rng = random.Random(8)
    data = rng.randbytes(16 * MiB)
    repo, b = backed_up_and_lost(daemon, tmp_path, "g0", data)
    target = tmp_path / "g0.target"
    got = instant(daemon, repo, b, "g0", target, "--paused")
    path = got["path"]
    assert direct_read(path, 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]  # (now restored)
    os.rename(repo, tmp_path / "away")
    kill_worker(daemon)
    assert direct_read(path, 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    with pytest.raises(OSError) as exc:
        direct_read(path, 9 * MiB, 4096)
    assert exc.value.errno == errno.EIO
    assert "cannot be read" in daemon.log_text() or "not opened again" in daemon.log_text()
    os.rename(tmp_path / "away", repo)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # (the source is tried again every few seconds)
        try:
            assert direct_read(path, 9 * MiB, 4096) == data[9 * MiB : 9 * MiB + 4096]
            break
        except OSError:
            time.sleep(0.5)
    else:
        raise AssertionError("the repository back, the device still fails")
    daemon.cli("ctl", "-d", "g0", "--filter", "hydrate", "resume")
    wait_hydrated(daemon, "g0")
    assert md5(target.read_bytes()) == md5(data)


def test_a_mounted_encrypted_backup_outlives_a_worker_kill(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup of a passphrase repository mounted with a loop device: the
    worker killed, the new one opens the repository again with the key the
    supervisor held (the passphrase is not in its environment), and the
    same file and loop device read the backup on."""
    rng = random.Random(12)
    data = rng.randbytes(6 * MiB) + bytes(2 * MiB)
    src = tmp_path / "k0.src"
    src.write_bytes(data)
    add_device(daemon, str(src), "k0", loop=False)
    daemon.cli("attach", "-d", "k0")
    repo = tmp_path / "repo"
    monkeypatch.setenv("BLKSNAP_PASSPHRASE", "a mounted secret")
    daemon.cli("key", "create", "--repo", str(repo))
    b = backup(daemon, repo, "k0")
    got = jcli(daemon, "mount", "--repo", str(repo), "-b", b["id"], "-d", "k0", "--loop")
    monkeypatch.delenv("BLKSNAP_PASSPHRASE")
    for where in (got["path"], got["loop"]):
        assert direct_read(where, MiB, 4096) == data[MiB : MiB + 4096]
    kill_worker(daemon)
    for where in (got["path"], got["loop"]):
        for off in (0, 3 * MiB + 8192, 7 * MiB):  # (chunks not read before the kill too)
            assert direct_read(where, off, 65536) == data[off : off + 65536], (where, off)
    assert jcli(daemon, "daemon", "status")["mounted_backups"] == [f"{b['id']}/k0"]
    daemon.cli("umount", "-b", b["id"], "-d", "k0")
    assert got["loop"] not in jcli(daemon, "daemon", "status")["loops"]
