"""Repository v2 with blksnapd: encryption through the CLI (no plaintext of the
device anywhere in the repository), dedup where the CBT cannot help (a full
backup stores only what the repository lacks), and gc running beside a
backup that reuses the very chunks gc is sweeping."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blksnap.backup.repo import Policy, Repository
from blksnap.backup.session import run_backup
from tests.integration.conftest import Daemon
from tests.integration.helpers import sha256_file

MiB = 1 << 20
SIZE = 16 * MiB
MARKER = b"BLKSNAP-PLAINTEXT-MARKER-"


def marked_device(daemon: Daemon, tmp_path: Path, name: str, seed: int) -> str:
    """Random data with the marker written all over it (every 4 KiB)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(SIZE))
    for off in range(0, SIZE, 4096):
        data[off : off + len(MARKER) + 8] = MARKER + b"%08d" % off
    path = tmp_path / f"{name}.img"
    path.write_bytes(bytes(data))
    daemon.client.add_device(str(path), name)
    daemon.client.attach(name)
    return f"{daemon.mount}/dev/{name}"


def holds(root: Path, needle: bytes) -> list[str]:
    """Files under ``root`` whose bytes contain ``needle``."""
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if needle in p.read_bytes():
                found.append(str(p))
    return found


def cli_error(daemon: Daemon, *args: str) -> dict[str, object]:
    r = daemon.cli("--json", *args, check=False)
    assert r.returncode != 0, r.stdout
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_encrypted_repository_through_the_cli(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = marked_device(daemon, tmp_path, "d0", seed=1)
    want = sha256_file(dev)
    # Control: without encryption and compression the marker is in the chunks,
    # so the scan below can see it.
    plain = tmp_path / "plain"
    daemon.cli("backup", "-d", "d0", "--repo", str(plain), "--compress", "none", "--no-progress")
    assert holds(plain, MARKER)

    enc = tmp_path / "enc"
    monkeypatch.setenv("BLKSNAP_PASSPHRASE", "correct horse battery staple")
    made = json.loads(daemon.cli("--json", "key", "create", "--repo", str(enc)).stdout)
    assert made["mode"] == "passphrase" and len(made["key_id"]) == 32
    doc = json.loads(daemon.cli("--json", "backup", "-d", "d0", "--repo", str(enc)).stdout)
    assert doc["kind"] == "full"
    out = tmp_path / "restored"
    daemon.cli("restore", "--repo", str(enc), "-b", "latest", "-d", "d0", "--to", str(out))
    assert sha256_file(out) == want
    assert daemon.cli("verify", "--repo", str(enc)).returncode == 0
    # No plaintext of the device anywhere: chunks, indexes, manifests, REPO.json.
    assert holds(enc, MARKER) == []
    assert holds(enc, MARKER[:12]) == []
    # Chunk names are keyed digests: not the blake3 of any chunk's contents.
    names = {p.name for p in (enc / "chunks").glob("*/*")}
    plain_names = {p.name for p in (plain / "chunks").glob("*/*")}
    assert names and not names & plain_names
    # A wrong passphrase, and none at all, fail clearly.
    monkeypatch.setenv("BLKSNAP_PASSPHRASE", "wrong")
    err = cli_error(daemon, "backups", "--repo", str(enc))
    assert err["error"] == "EKEYREJECTED", err
    monkeypatch.delenv("BLKSNAP_PASSPHRASE")
    err = cli_error(daemon, "restore", "--repo", str(enc), "-b", "latest", "-d", "d0",
                    "--to", str(tmp_path / "x"))  # fmt: skip
    assert err["error"] == "ENOKEY" and "BLKSNAP_PASSPHRASE" in str(err["message"]), err

    # Key file mode: the key lives only in the file.
    kf = tmp_path / "repo.key"
    enc2 = tmp_path / "enc2"
    # A key file for a repository that does not exist yet: refused, never a
    # plain repository made silently.
    err = cli_error(daemon, "backup", "-d", "d0", "--repo", str(enc2), "--key-file", str(kf))
    assert err["error"] == "ENOENT" and "key create" in str(err["message"]), err
    assert not enc2.exists()
    daemon.cli("key", "create", "--repo", str(enc2), "--key-file", str(kf))
    assert oct(kf.stat().st_mode & 0o777) == "0o600"
    daemon.cli("backup", "-d", "d0", "--repo", str(enc2), "--key-file", str(kf), "--no-progress")
    assert holds(enc2, MARKER) == []
    assert cli_error(daemon, "verify", "--repo", str(enc2))["error"] == "ENOKEY"
    err = cli_error(daemon, "verify", "--repo", str(enc), "--key-file", str(kf))
    assert err["error"] == "EKEYREJECTED", err  # another repository's key
    out2 = tmp_path / "restored2"
    daemon.cli("restore", "--repo", str(enc2), "--key-file", str(kf), "-b", "latest", "-d", "d0",
               "--to", str(out2))  # fmt: skip
    assert sha256_file(out2) == want
    # Encryption is chosen once: key create on an existing repository refuses.
    assert cli_error(daemon, "key", "create", "--repo", str(plain))["error"] == "EEXIST"


def test_a_full_backup_stores_only_what_the_repository_lacks(
    daemon: Daemon, tmp_path: Path
) -> None:
    dev = marked_device(daemon, tmp_path, "d0", seed=2)
    repo = str(tmp_path / "repo")

    def backup(*extra: str) -> dict[str, object]:
        doc = json.loads(daemon.cli("--json", "backup", "-d", "d0", "--repo", repo, *extra).stdout)
        (d,) = doc["devices"]
        return d

    first = backup()
    assert first["kind"] == "full" and first["bytes_new"] == SIZE
    # A forced full of the unchanged device: everything read, nothing new.
    again = backup("--full")
    assert again["kind"] == "full" and again["bytes_read"] == SIZE
    assert again["bytes_new"] == 0 and again["bytes_stored"] == 0
    assert again["bytes_reused"] == SIZE
    # A new CBT generation (what a crash without write intent, or a detach,
    # gives) forces a full; with two 1 MiB chunks changed it stores just those.
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, b"new" * 1000, 3 * MiB + 10)
        os.pwrite(fd, b"new" * 1000, 9 * MiB + 10)
    finally:
        os.close(fd)
    daemon.client.detach("d0")
    daemon.client.attach("d0")
    third = backup()
    assert third["kind"] == "full" and "generation" in str(third["reason"])
    assert third["bytes_read"] == SIZE
    assert third["bytes_new"] == 2 * MiB and third["bytes_reused"] == SIZE - 2 * MiB
    out = tmp_path / "restored"
    daemon.cli("restore", "--repo", repo, "-b", "latest", "-d", "d0", "--to", str(out))
    assert sha256_file(out) == sha256_file(dev)


def test_gc_beside_a_backup_that_reuses_the_chunks_it_sweeps(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The backup of d0 reuses chunks no index names any more (their backup
    was pruned) and whose mtime is an hour old; gc with no grace runs in the
    middle of it. What gc removes before the backup reaches it is stored
    again; what the backup touched survives; the backup restores whole."""
    dev = marked_device(daemon, tmp_path, "d0", seed=3)
    marked_device(daemon, tmp_path, "d1", seed=4)
    repo = Repository.init(tmp_path / "repo", chunk_size=256 * 1024)
    run_backup(daemon.client, repo, ["d0"], "full")
    run_backup(daemon.client, repo, ["d1"], "full")
    removed = [d.id for d in repo.prune(Policy(last=1)) if not d.keep]
    assert len(removed) == 1  # d0's backup: its chunks are named by no index now
    old = time.time() - 3600
    for p in (tmp_path / "repo" / "chunks").glob("*/*"):
        os.utime(p, (old, old))
    reports = []

    @contextlib.contextmanager
    def progress(_desc: str, _total: int) -> Iterator[Callable[[int], None]]:
        seen = [0]

        def advance(n: int) -> None:
            seen[0] += n
            if not reports and seen[0] >= SIZE // 2:
                reports.append(Repository.open(repo.path).gc(grace=0))

        yield advance

    res = run_backup(
        daemon.client, repo, ["d0"], "full", progress=progress, read_size=256 * 1024, threads=1
    )
    (gc,) = reports
    assert gc.running_backups == 1
    rec = res.backup.device("d0")
    # The first half was reused and touched before gc: it survived; the
    # second half was swept by gc and stored again by the backup.
    assert rec.chunks_reused >= rec.chunk_count // 2 - 8
    assert gc.chunks_removed > 0 and gc.chunks_removed <= rec.chunks_new, (gc, rec)
    assert repo.verify() == []
    out = tmp_path / "restored"
    assert repo.restore(res.backup.id, "d0", str(out))["sha256"] == sha256_file(dev)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha256_file(dev)
