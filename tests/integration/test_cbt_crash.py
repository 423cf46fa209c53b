"""The CBT across crashes of the whole blksnapd: random writes of random
sizes and alignments to a device, kill -9 of every blksnapd process at a
random moment (so also in the middle of a write-intent flush and of the
periodic checkpoint, which runs every 0.2 s here), a new blksnapd on the
same state dir (``--restore-devices``, as at boot). Then, against a byte
comparison of the device with the last backup's image:

* every block that differs has a number greater than that backup's
  ``changes_number``, in the same generation;
* every block marked beyond those was either written by the test since
  that backup or lies in a write-intent region the recovery marked (its
  number is one of ``recovered``), and every such region was written by
  the test since that backup: the extra re-read is bounded.

A few rounds by default; ``BLKSNAP_CRASHES=300`` for the long run."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from blksnap.errors import BlksnapError
from blksnap.tools import sandbox
from tests.integration.conftest import SKIP
from tests.integration.helpers import kill_daemon

pytestmark = pytest.mark.skipif(bool(SKIP), reason=SKIP or "")
MiB = 1 << 20
SIZE = 24 * MiB
REGION = MiB
OPTS = [
    "--restore-devices",
    "--param",
    f"cbt_intent_region_size={REGION}",
    "--param",
    "cbt_checkpoint_interval=0.2",
]


@dataclass
class Backup:
    """The last backup: the image at its take, and its CBT numbers."""

    image: np.ndarray
    generation_id: str
    changes_number: int
    #: Bytes written (or being written) by the test since its take.
    touched: np.ndarray = field(default_factory=lambda: np.zeros(SIZE, dtype=bool))


def take_backup(d: sandbox.Sandbox) -> Backup:
    sid = d.client.snapshot_create(["a"], str(d.root / "diff"), 64 * MiB)
    try:
        d.client.snapshot_take(sid)
        with open(f"{d.mount}/images/{sid}/a", "rb") as f:
            image = np.frombuffer(f.read(), dtype=np.uint8)
        info = d.client.cbt_info("a")
    finally:
        d.client.snapshot_destroy(sid)
    return Backup(image, info.generation_id, info.changes_number)


def written_map(d: sandbox.Sandbox) -> tuple[np.ndarray, object]:
    """The write map as a take freezes it (the check's own take)."""
    sid = d.client.snapshot_create(["a"], str(d.root / "diff"), 64 * MiB)
    try:
        d.client.snapshot_take(sid)
        info = d.client.cbt_info("a")
        numbers = np.frombuffer(d.client.cbt_map("a"), dtype=np.uint8)
    finally:
        d.client.snapshot_destroy(sid)
    return numbers, info


def writer(path: str, rng: random.Random, backup: Backup, stop: threading.Event) -> None:
    """Random writes until the device goes away; each range is noted as
    touched before it is sent."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return
    try:
        while not stop.is_set():
            n = rng.choice([512, 4096, 4096, 65536, rng.randrange(1, 300_000)])
            off = rng.randrange(SIZE - n)
            if rng.random() < 0.5:
                off &= ~4095
            backup.touched[off : off + n] = True
            os.pwrite(fd, rng.randbytes(n), off)
    except OSError:
        return  # (the daemon is gone)
    finally:
        with contextlib.suppress(OSError):  # (ENOTCONN: the daemon is gone)
            os.close(fd)


def start_writers(
    d: sandbox.Sandbox, rng: random.Random, backup: Backup
) -> tuple[threading.Event, list[threading.Thread]]:
    """Three writers on device ``a`` until the event is set or it goes away."""
    stop = threading.Event()
    path = f"{d.mount}/dev/a"
    threads = [
        threading.Thread(target=writer, args=(path, random.Random(rng.random()), backup, stop))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    return stop, threads


def check(d: sandbox.Sandbox, backup: Backup, disk: Path) -> int:
    numbers, info = written_map(d)
    bs = info.block_size
    count = len(numbers)
    device = np.fromfile(disk, dtype=np.uint8)

    def per_block(mask: np.ndarray) -> np.ndarray:
        padded = np.zeros(count * bs, dtype=bool)
        padded[: len(mask)] = mask
        return padded.reshape(count, bs).any(axis=1)

    changed = per_block(device != backup.image)
    touched = per_block(backup.touched)
    assert info.generation_id == backup.generation_id, "a crash started a new generation"
    marked = numbers > backup.changes_number
    missed = np.flatnonzero(changed & ~marked)
    assert not missed.size, f"blocks changed but not marked: {missed[:10].tolist()}"
    recovered = np.isin(numbers, np.array(info.recovered, dtype=np.uint8))
    extra = np.flatnonzero(marked & ~changed & ~touched & ~recovered)
    assert not extra.size, f"blocks marked beyond the writes and the intent: {extra[:10]}"
    per_region = REGION // bs
    regions_marked = np.flatnonzero(recovered.reshape(-1, per_region).any(axis=1))
    regions_touched = touched.reshape(-1, per_region).any(axis=1)
    assert regions_touched[regions_marked].all(), "intent marked a region nobody wrote"
    return int(info.changes_number)


def run_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    disk = tmp_path / "a.img"
    disk.write_bytes(rng.randbytes(SIZE))
    root = tmp_path / "d"
    (root / "diff").mkdir(parents=True)
    d = sandbox.start(root, OPTS)
    try:
        d.client.add_device(str(disk), "a")
        d.client.attach("a")
        backup = take_backup(d)
        for i in range(rounds):
            stop, threads = start_writers(d, rng, backup)
            time.sleep(rng.uniform(0.02, 0.8))
            kill_daemon(d)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            d = sandbox.start(root, OPTS)
            try:
                number = check(d, backup, disk)
            except AssertionError as exc:
                raise AssertionError(f"round {i}: {exc}") from None
            if number >= 240:
                # The numbers run short (a crash uses two, a take one): takes
                # until one reports the next generation, then a new backup.
                old = backup.generation_id
                while take_backup(d).generation_id == old:
                    pass
                backup = take_backup(d)
            elif rng.random() < 0.3:  # a new backup now and then
                backup = take_backup(d)
    finally:
        try:
            d.stop()
        except (BlksnapError, OSError):
            sandbox.cleanup_under(str(root))


CRASHES = int(os.environ.get("BLKSNAP_CRASHES", "3"))
POWERCUTS = int(os.environ.get("BLKSNAP_POWERCUTS", "2"))


@pytest.mark.slow
@pytest.mark.timeout(max(300, 10 * CRASHES))  # (a long run is seconds a round)
def test_cbt_survives_kills_of_the_whole_daemon(tmp_path: Path) -> None:
    run_rounds(tmp_path, CRASHES, seed=CRASHES)


def test_the_backup_after_a_crash_stores_only_what_changed(tmp_path: Path) -> None:
    """After a kill of the whole daemon, the next backup stays incremental:
    blocks marked only by the write intent are read, compared with the full
    backup's blake3, and only the ones that really changed are stored; the
    restore is the device, byte for byte."""
    from blksnap.backup.repo import Repository
    from blksnap.backup.session import run_backup
    from tests.integration.helpers import sha256_file

    rng = random.Random(5)
    disk = tmp_path / "a.img"
    disk.write_bytes(rng.randbytes(SIZE))
    root = tmp_path / "d"
    opts = [
        "--restore-devices",
        *("--param", f"cbt_intent_region_size={4 * MiB}"),
        *("--param", "cbt_checkpoint_interval=0"),
    ]
    repo = Repository.init(tmp_path / "repo")
    d = sandbox.start(root, opts)
    try:
        d.client.add_device(str(disk), "a")
        d.client.attach("a")
        full = run_backup(d.client, repo, ["a"], "full")
        before = np.fromfile(disk, dtype=np.uint8)
        fd = os.open(f"{d.mount}/dev/a", os.O_WRONLY)
        try:  # a few writes in three regions: the rest of them is unchanged
            for off in (MiB + 4096, 9 * MiB, 9 * MiB + 300_000, 21 * MiB + 7):
                os.pwrite(fd, rng.randbytes(5000), off)
        finally:
            os.close(fd)
        kill_daemon(d)
        d = sandbox.start(root, opts)
        info = d.client.cbt_info("a")
        assert info.generation_id == full.backup.device("a").generation_id
        hashes: dict[str, str] = {}

        def at_take(sid: str) -> None:
            hashes["a"] = sha256_file(f"{d.mount}/images/{sid}/a")

        inc = run_backup(d.client, repo, ["a"], "auto", on_take=at_take)
        rec = inc.backup.device("a")
        assert rec.kind == "incremental", rec.reason
        (plan,) = inc.plans
        cs = plan.chunk_size
        now = np.fromfile(disk, dtype=np.uint8)
        changed = int(np.count_nonzero((now != before).reshape(-1, cs).any(axis=1)))
        assert len(plan.recheck) == 3 * (4 * MiB // cs)  # three regions read again
        assert plan.recheck_bytes == len(plan.recheck) * cs
        assert rec.chunks_read == rec.chunks_new == changed  # only what really changed
        assert plan.recheck_unchanged == len(plan.recheck) - changed
        report = inc.as_dict()["devices"][0]["reread_after_crash"]
        assert report["stored"] == changed and report["chunks"] == len(plan.recheck)
        out = tmp_path / "restored"
        assert repo.restore(inc.backup.id, "a", str(out))["sha256"] == hashes["a"]
        assert sha256_file(out) == sha256_file(disk)
    finally:
        try:
            d.stop()
        except (BlksnapError, OSError):
            sandbox.cleanup_under(str(root))


def _loop(path: str) -> str:
    return sandbox.run("losetup", "-f", "--show", path).stdout.strip()


def _unmount(where: Path) -> None:
    if sandbox.run("umount", str(where), check=False).returncode != 0:
        sandbox.run("umount", "-l", str(where), check=False)


@pytest.mark.slow
@pytest.mark.timeout(max(300, 10 * POWERCUTS))
def test_cbt_survives_power_cuts_of_its_state_dir(tmp_path: Path) -> None:
    """blksnapd's state dir on ext4 over a disk that loses every write not
    flushed when the power goes (a second blksnapd's device with the
    ``powercut`` filter). Each round: random writes to the protected device,
    kill -9 of every process of the first blksnapd, the cut, the state dir's
    file system mounted again (its journal replayed on what was durable),
    the first blksnapd started again on it: the same assertions as after a
    kill. Two rounds by default; ``BLKSNAP_POWERCUTS=50`` for the long run."""
    rounds = POWERCUTS
    rng = random.Random(1000 + rounds)
    disk = tmp_path / "a.img"
    disk.write_bytes(rng.randbytes(SIZE))
    sfile = tmp_path / "s.img"
    with open(sfile, "wb") as f:
        f.truncate(64 * MiB)
    m = tmp_path / "m"
    m.mkdir()
    root = tmp_path / "d"
    (root / "diff").mkdir(parents=True)
    opts = [*OPTS, "--state-dir", str(m / "state")]
    b = sandbox.start(tmp_path / "b")
    a: sandbox.Sandbox | None = None
    lp = ""
    try:
        b.client.add_device(str(sfile), "s")
        b.client.attach("s", "powercut")
        lp = _loop(f"{b.mount}/dev/s")
        sandbox.run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", lp)
        sandbox.run("mount", lp, str(m))
        a = sandbox.start(root, opts)
        a.client.add_device(str(disk), "a")
        a.client.attach("a")
        backup = take_backup(a)
        sandbox.run("sync", "-f", str(m))  # (blksnapd's record of its devices)
        for i in range(rounds):
            stop, threads = start_writers(a, rng, backup)
            time.sleep(rng.uniform(0.05, 0.8))
            kill_daemon(a)
            a = None
            b.client.ctl("s", "powercut", "cut")
            stop.set()
            for t in threads:
                t.join(timeout=30)
            _unmount(m)
            sandbox.run("losetup", "-d", lp)
            lp = ""
            b.client.ctl("s", "powercut", "restore")
            lp = _loop(f"{b.mount}/dev/s")  # (a new loop device: no cached blocks)
            sandbox.run("mount", lp, str(m))
            a = sandbox.start(root, opts)
            try:
                check(a, backup, disk)
            except AssertionError as exc:
                raise AssertionError(f"round {i}: {exc}") from None
            if rng.random() < 0.3:
                backup = take_backup(a)
    finally:
        if a is not None:
            try:
                a.stop()
            except (BlksnapError, OSError):
                sandbox.cleanup_under(str(root))
        sandbox.cleanup_under(str(root))
        _unmount(m)
        if lp:
            sandbox.run("losetup", "-d", lp, check=False)
        b.stop()
