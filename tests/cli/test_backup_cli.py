"""The repository commands of ``blksnap`` (backups, restore, verify, prune) on a
repository written with the Python API: they need no daemon; progress bars
appear on a terminal and never in a pipe."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import random
import select
import subprocess
import sys
import time
from pathlib import Path

from blksnap.backup.repo import DeviceRecord, Repository

BLOCK = 64 * 1024
SIZE = 64 * BLOCK + 1000  # an odd-sized last block
CLI = [sys.executable, "-m", "blksnap.cli"]


def make_repo(path: Path) -> tuple[Repository, list[bytes]]:
    """A full and an incremental backup of one device; the device at each."""
    rng = random.Random(11)
    dev = bytearray(rng.randbytes(SIZE))
    dev[10 * BLOCK : 20 * BLOCK] = bytes(10 * BLOCK)
    versions = []
    repo = Repository.init(path, chunk_size=BLOCK)  # a chunk per block
    for kind, blocks in (("full", range(65)), ("incremental", [3, 4, 40, 64])):
        if kind == "incremental":
            for b in blocks:
                dev[b * BLOCK : b * BLOCK + 100] = rng.randbytes(100)
        parent = repo.latest("disk0")
        with repo.begin(kind) as w:
            w.add_device(
                DeviceRecord(
                    name="disk0",
                    size=SIZE,
                    block_size=BLOCK,
                    generation_id="g1",
                    changes_number=len(versions) + 1,
                    kind=kind,
                    parent=parent.id if parent else None,
                )
            )
            for b in blocks:
                w.put("disk0", b, bytes(dev[b * BLOCK : (b + 1) * BLOCK]))
            w.commit()
        versions.append(bytes(dev))
        time.sleep(0.01)
    return repo, versions


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)


def test_backups_restore_verify_prune_without_a_daemon(tmp_path: Path) -> None:
    repo, versions = make_repo(tmp_path / "repo")
    listed = json.loads(cli("--json", "backups", "--repo", repo.path).stdout)
    assert [b["kind"] for b in listed] == ["full", "incremental"]
    assert listed[1]["devices"][0]["parent"] == listed[0]["id"]
    table = cli("backups", "--repo", repo.path).stdout
    assert "incremental" in table and listed[0]["id"] in table
    # One backup's devices: the text view and the JSON document of that backup.
    one = cli("backups", "--repo", repo.path, "-b", "latest")
    assert one.returncode == 0, one.stderr
    assert f"backup {listed[1]['id']}: incremental, ok" in one.stdout
    assert "disk0" in one.stdout and listed[0]["id"] in one.stdout  # its parent
    doc = json.loads(cli("--json", "backups", "--repo", repo.path, "-b", listed[0]["id"]).stdout)
    assert doc["id"] == listed[0]["id"] and doc["devices"][0]["kind"] == "full"
    assert cli("backups", "--repo", repo.path, "-b", "nope").returncode == 1
    for b, want in zip(listed, versions, strict=True):
        out = tmp_path / f"r-{b['id']}"
        r = cli("--json", "restore", "--repo", repo.path, "-b", b["id"], "-d", "disk0",
                "--to", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # no progress bar in a pipe
        doc = json.loads(r.stdout)
        assert (
            doc["sha256"]
            == hashlib.sha256(want).hexdigest()
            == hashlib.sha256(out.read_bytes()).hexdigest()
        )
    ok = cli("verify", "--repo", repo.path)
    assert ok.returncode == 0 and "every chunk checks" in ok.stdout
    # Unknown backup / device: the errno is named.
    bad = cli("restore", "--repo", repo.path, "-b", "nope", "-d", "disk0", "--to", "x")
    assert bad.returncode == 1 and "ENOENT" in bad.stderr
    bad = cli("restore", "--repo", repo.path, "-b", "latest", "-d", "disk9", "--to", "x")
    assert bad.returncode == 1 and "ENOENT" in bad.stderr
    # Prune keeping one: every index is whole, so the full goes and the
    # incremental still restores; gc then frees the chunks only the full had.
    pr = json.loads(cli("--json", "prune", "--repo", repo.path, "--keep", "1").stdout)
    assert pr["removed"] == [listed[0]["id"]] and pr["kept"] == [listed[1]["id"]]
    gc = json.loads(cli("--json", "gc", "--repo", repo.path, "--grace", "0").stdout)
    assert gc["chunks_removed"] == 4  # the four chunks the incremental rewrote
    out = tmp_path / "after-gc"
    r = cli("restore", "--repo", repo.path, "-b", "latest", "-d", "disk0", "--to", str(out))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(versions[1]).hexdigest()
    assert cli("verify", "--repo", repo.path).returncode == 0
    assert cli("backups", "--repo", str(tmp_path / "missing")).returncode == 1


def run_in_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; (rc, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["COLUMNS"] = "120"
        os.execv(args[0], args)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    repo, _ = make_repo(tmp_path / "repo")
    restore = [*CLI, "restore", "--repo", repo.path, "-b", "latest", "-d", "disk0", "--to"]
    rc, text = run_in_pty([*restore, str(tmp_path / "out")])
    assert rc == 0, text
    # rich's bar: the bar itself and bytes done of the total.
    assert "\u2501" in text and "4.0/4.0 MiB" in text, text
    rc, text = run_in_pty([*restore, str(tmp_path / "out2"), "--no-progress"])
    assert rc == 0 and "\u2501" not in text and "MiB/s" not in text, text


def test_a_version_1_repository_is_refused_and_upgraded(tmp_path: Path) -> None:
    from tests.backup.test_repo_v2 import V1_INCR, make_v1_repository

    old = tmp_path / "v1"
    contents = make_v1_repository(old, "zstd")
    listed = cli("--json", "backups", "--repo", str(old))
    assert listed.returncode == 1
    err = json.loads(listed.stderr.strip().splitlines()[-1])
    assert err["error"] == "EPROTONOSUPPORT" and "blksnap repo upgrade" in err["message"], err
    new = tmp_path / "v2"
    up = cli("--json", "repo", "upgrade", "--repo", str(old), "--to", str(new))
    assert up.returncode == 0, up.stderr
    report = json.loads(up.stdout)
    assert report["converted"] == 2 and len(report["not_converted"]) == 1
    assert cli("verify", "--repo", str(new)).returncode == 0
    out = tmp_path / "sda.img"
    r = cli("restore", "--repo", str(new), "-b", V1_INCR, "-d", "sda", "--to", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == contents[V1_INCR]["sda"]
    again = cli("--json", "repo", "upgrade", "--repo", str(old), "--to", str(new))
    again = json.loads(again.stdout)
    assert again["converted"] == 0 and again["skipped"] == 2
