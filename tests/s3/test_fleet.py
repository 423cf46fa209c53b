"""A fleet backing up into one bucket: two hosts (two blksnapd, each with its
own device), ``blksnap`` commands with ``--repo s3://BUCKET/PREFIX`` against
a real RADOS Gateway. Full, incremental and differential backups run on both
hosts at once; data the two devices share is stored once; every backup
restores, mounts and restores instantly from the bucket, on either host."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blksnap.tools import rgw, sandbox
from blksnap.tools.sandbox import Sandbox
from tests.integration.helpers import direct_read, wait_new_worker
from tests.integration.test_instant import wait_hydrated
from tests.s3.conftest import objects_of

MiB = 1 << 20
SIZE = 32 * MiB


@contextlib.contextmanager
def _sandboxes(tmp_path: Path, *names: str) -> Iterator[list[Sandbox]]:
    """A blksnapd (with the AWS variables of the environment) in each of
    ``tmp_path/NAME``; stopped after, nothing left mounted or attached."""
    why = sandbox.why_not()
    if why:
        pytest.skip(why)
    started: list[Sandbox] = []
    try:
        for name in names:
            started.append(sandbox.start(tmp_path / name))
        yield started
    finally:
        for d in started:
            d.stop()
        for name in names:
            root = str(tmp_path / name)
            assert not sandbox.mounts_under(root), sandbox.mounts_under(root)
            assert not sandbox.loops_under(root), sandbox.loops_under(root)


@pytest.fixture
def hosts(s3env: rgw.Gateway, tmp_path: Path) -> Iterator[tuple[Sandbox, Sandbox]]:
    """Two blksnapd (started with the AWS variables of ``s3env``)."""
    with _sandboxes(tmp_path, "a", "b") as (a, b):
        yield a, b


@pytest.fixture
def host(s3env: rgw.Gateway, tmp_path: Path) -> Iterator[Sandbox]:
    """One blksnapd (started with the AWS variables of ``s3env``)."""
    with _sandboxes(tmp_path, "a") as (a,):
        yield a


def jcli(host: Sandbox, *args: str) -> dict:
    return json.loads(host.cli("--json", *args).stdout)


def sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def write(host: Sandbox, name: str, offset: int, data: bytes) -> None:
    fd = os.open(f"{host.mount}/dev/{name}", os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_cmd(host: Sandbox, url: str, name: str, *mode: str) -> list[str]:
    diff = Path(host.root) / "diff"
    diff.mkdir(exist_ok=True)
    return [
        str(sandbox.BIN / "blksnap"), "--socket", host.sock, "--json", "backup", "-d", name,
        "--repo", url, "--storage", str(diff), "--no-progress", *mode,
    ]  # fmt: skip


def at_once(*cmds: list[str]) -> list[dict]:
    """Run the commands at the same time; their JSON answers."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


def test_two_hosts_one_bucket(
    hosts: tuple[Sandbox, Sandbox],
    bucket: str,
    s3env: rgw.Gateway,
    tmp_path: Path,
) -> None:
    a, b = hosts
    url = f"s3://{bucket}/fleet"
    rng = random.Random(7)
    common = rng.randbytes(SIZE // 2)
    images = {}
    for host, name in ((a, "da"), (b, "db")):
        img = tmp_path / f"{name}.img"
        img.write_bytes(common + rng.randbytes(SIZE // 2))
        host.client.add_device(str(img), name)
        host.client.attach(name)
        images[name] = host
    dev = {name: f"{host.mount}/dev/{name}" for name, host in images.items()}
    want: dict[str, str] = {}  # backup id -> sha256 of its device then

    # Full backups on both hosts at once.
    before = {name: sha(dev[name]) for name in dev}
    fa, fb = at_once(backup_cmd(a, url, "da"), backup_cmd(b, url, "db"))
    assert fa["kind"] == fb["kind"] == "full" and fa["id"] != fb["id"]
    want[fa["id"]], want[fb["id"]] = before["da"], before["db"]
    for doc in (fa, fb):
        assert doc["traffic"]["requests"] > 0 and doc["traffic"]["bytes_sent"] > SIZE // 2
    # Dedup across the hosts: 16 common chunks of 1 MiB, 16 own each.
    chunks = [k for k in objects_of(s3env, bucket, "fleet/chunks/")]
    assert len(chunks) == 48
    assert fa["devices"][0]["bytes_new"] + fb["devices"][0]["bytes_new"] == 48 * MiB

    # Incremental on both at once: one MiB changed on each.
    write(a, "da", 20 * MiB, rng.randbytes(MiB))
    write(b, "db", 3 * MiB, rng.randbytes(MiB))
    before = {name: sha(dev[name]) for name in dev}
    ia, ib = at_once(backup_cmd(a, url, "da"), backup_cmd(b, url, "db"))
    for doc, parent in ((ia, fa), (ib, fb)):
        (d,) = doc["devices"]
        assert doc["kind"] == "incremental" and d["parent"] == parent["id"]
        assert d["chunks_read"] == 1 and d["chunks_new"] == 1
    want[ia["id"]], want[ib["id"]] = before["da"], before["db"]

    # A differential on host A while host B makes a full of an unchanged device.
    write(a, "da", 30 * MiB, rng.randbytes(MiB))
    before = {name: sha(dev[name]) for name in dev}
    da_, fb2 = at_once(
        backup_cmd(a, url, "da", "--differential"), backup_cmd(b, url, "db", "--full")
    )
    assert da_["kind"] == "differential" and da_["devices"][0]["chunks_read"] == 2
    assert fb2["kind"] == "full" and fb2["devices"][0]["bytes_new"] == 0  # all there already
    want[da_["id"]], want[fb2["id"]] = before["da"], before["db"]

    listed = jcli(a, "backups", "--repo", url)
    assert {x["id"] for x in listed} == set(want)

    # Every backup restores, from either host.
    for i, (bid, digest) in enumerate(want.items()):
        host = (a, b)[i % 2]
        name = next(d["name"] for d in jcli(host, "backups", "--repo", url, "-b", bid)["devices"])
        out = tmp_path / f"restored-{bid}"
        host.cli("restore", "--repo", url, "-b", bid, "-d", name, "--to", str(out))
        assert sha(out) == digest, (bid, name)
        out.unlink()
    assert jcli(b, "verify", "--repo", url)["ok"]

    # Host A mounts host B's incremental; a prune meanwhile is refused.
    m = jcli(a, "mount", "--repo", url, "--backup", ib["id"], "-d", "db")
    assert sha(m["path"]) == want[ib["id"]]
    r = b.cli("--json", "prune", "--repo", url, "--keep-last", "2", check=False)
    assert r.returncode != 0 and json.loads(r.stderr.splitlines()[-1])["error"] == "EBUSY"
    a.cli("umount", "--backup", ib["id"], "-d", "db")

    # Host B restores host A's differential instantly onto a new file.
    target = Path(b.root) / "da-restored.img"
    jcli(b, "restore", "--instant", "--repo", url, "--backup", da_["id"], "-d", "da",
         "--to", str(target))  # fmt: skip
    assert sha(f"{b.mount}/dev/da") == want[da_["id"]]  # read through, as it hydrates
    deadline = time.monotonic() + 120
    while True:
        devs = {d["name"]: d for d in json.loads(b.cli("--json", "device", "list").stdout)}
        if not devs["da"].get("hydration") or devs["da"]["hydration"]["state"] == "done":
            break
        assert time.monotonic() < deadline, devs["da"]
        time.sleep(0.5)
    b.cli("device", "remove", "da")
    assert sha(target) == want[da_["id"]]

    # Prune and gc from host B: what only the pruned backups named goes.
    pruned = jcli(b, "prune", "--repo", url, "--keep-last", "2")
    assert len([d for d in pruned["decisions"] if not d["keep"]]) == 4
    gc = jcli(b, "gc", "--repo", url, "--grace", "0")
    assert gc["chunks_removed"] > 0
    assert jcli(a, "verify", "--repo", url)["ok"]


def test_an_encrypted_fleet_repository(
    hosts: tuple[Sandbox, Sandbox], s3env: rgw.Gateway, tmp_path: Path
) -> None:
    """key create into a bucket not made yet, a backup from host A with the
    key file, host B mounts it with the key file: no object holds plaintext."""
    a, b = hosts
    name = f"blksnap-{os.urandom(6).hex()}"
    url = f"s3://{name}/enc"
    key = tmp_path / "fleet.key"
    marker = b"BLKSNAP-PLAINTEXT-MARKER-"
    data = bytearray(8 * MiB)
    for off in range(0, len(data), 4096):
        data[off : off + len(marker) + 8] = marker + b"%08d" % off
    img = tmp_path / "secret.img"
    img.write_bytes(bytes(data))
    a.client.add_device(str(img), "secret")
    a.client.attach("secret")
    try:
        made = jcli(a, "key", "create", "--repo", url, "--key-file", str(key))
        assert made["mode"] == "keyfile"
        doc = json.loads(
            subprocess.run(
                [*backup_cmd(a, url, "secret"), "--key-file", str(key)],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        objs = objects_of(s3env, name, "enc/")
        assert any(k.startswith("enc/chunks/") for k in objs)
        assert [k for k, v in objs.items() if marker[:12] in v] == []
        r = b.cli("--json", "mount", "--repo", url, "--backup", doc["id"], "-d", "secret",
                  check=False)  # fmt: skip
        assert r.returncode != 0 and json.loads(r.stderr.splitlines()[-1])["error"] == "ENOKEY"
        m = jcli(b, "mount", "--repo", url, "--backup", doc["id"], "-d", "secret",
                 "--key-file", str(key))  # fmt: skip
        assert Path(m["path"]).read_bytes() == bytes(data)
        b.cli("umount", "--backup", doc["id"], "-d", "secret")
    finally:
        from tests.s3.conftest import empty_bucket

        empty_bucket(s3env.client(), name)


def test_a_takeover_does_not_wait_for_an_unreachable_store(
    host: Sandbox, bucket: str, s3env: rgw.Gateway, tmp_path: Path
) -> None:
    """An instant restore from the bucket and a mounted backup, the gateway
    stopped, the worker killed: the new worker serves before it has tried
    the store (its sources open in the background), the restored regions
    read as before; once the gateway is back, the device reads what was not
    restored, the mounted backup reads, the hydration ends right."""
    url = f"s3://{bucket}/takeover"
    rng = random.Random(11)
    data = rng.randbytes(16 * MiB)
    img = tmp_path / "src.img"
    img.write_bytes(data)
    host.client.add_device(str(img), "src")
    host.client.attach("src")
    b = jcli(host, "backup", "--repo", url, "-d", "src", "--storage", str(tmp_path),
             "--no-progress")  # fmt: skip
    host.cli("device", "remove", "src")  # (restored as a device of the same name)
    target = tmp_path / "restored.img"
    path = jcli(host, "restore", "--instant", "--repo", url, "-b", b["id"], "-d", "src",
                "--to", str(target), "--paused")["path"]  # fmt: skip
    assert direct_read(path, 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]  # (now restored)
    m = jcli(host, "mount", "--repo", url, "--backup", b["id"], "-d", "src")
    assert sha(m["path"]) == hashlib.sha256(data).hexdigest()
    s3env.stop_gateway()
    try:
        old = host.client.status()["worker_pid"]
        before = len(host.log_text())
        os.kill(old, 9)
        wait_new_worker(host, old)  # type: ignore[arg-type]
        taken_over = host.log_text()[before:]
        # serving, and no open of a source failed yet: it did not wait for them
        assert "cannot be opened" not in taken_over and "not opened again" not in taken_over
        assert direct_read(path, 2 * MiB, MiB) == data[2 * MiB : 3 * MiB]
    finally:
        s3env.start_gateway()
    deadline = time.monotonic() + 120
    while True:  # (a source that failed to open is tried again every few seconds)
        try:
            assert direct_read(path, 9 * MiB, 4096) == data[9 * MiB : 9 * MiB + 4096]
            break
        except OSError:
            assert time.monotonic() < deadline, "the gateway back, the device still fails"
            time.sleep(0.5)
    assert sha(m["path"]) == hashlib.sha256(data).hexdigest()
    host.cli("umount", "--backup", b["id"], "-d", "src")
    host.cli("ctl", "-d", "src", "--filter", "hydrate", "resume")
    wait_hydrated(host, "src")  # type: ignore[arg-type]
    host.cli("device", "remove", "src")
    assert sha(target) == hashlib.sha256(data).hexdigest()
