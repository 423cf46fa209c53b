"""blksnapd's worker dies (SIGKILL at a random moment) or is replaced
(``blksnap daemon restart``) while file systems run on its devices: the
supervisor holds the FUSE connection and the control socket, a new worker
takes over the devices, the loop devices and the connection, and nothing
above notices -- fio with crc32c verification, a writer fsyncing files on
ext4, fsck afterwards, the kernel log.

The default run kills the worker a few times; ``-m slow`` runs the long
loop (``BLKSNAP_KILLS``, default 20)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blksnap.hostinfo import proc_stat
from tests.integration.conftest import BIN, SKIP, Daemon, run
from tests.integration.helpers import (
    MiB,
    Writer,
    add_device,
    create,
    direct_write,
    kill_worker,
    queue_limit,
    sha256_file,
    storage_dir,
    take_full,
    wait_new_worker,
    worker_pid,
)

FIO_SIZE = 48 * MiB


def kernel_log_lines() -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines() if out.returncode == 0 else []


BAD_KERNEL_LINE = re.compile(
    r"I/O error|EXT4-fs error|EXT4-fs warning|Aborting journal|read-only|"
    r"blk_update_request|critical medium error|Buffer I/O"
)


def io_errors_since(before: int, loops: list[str]) -> list[str]:
    names = [os.path.basename(lp) for lp in loops]
    return [
        line
        for line in kernel_log_lines()[before:]
        if any(n in line for n in names) and BAD_KERNEL_LINE.search(line)
    ]


def fio_verify(
    target: str, name: str, rw: str, bs: str, depth: int, seconds: float, size: int = FIO_SIZE
) -> list[str]:
    """fio writing ``size`` bytes of ``target`` for ``seconds`` and reading
    back every block it wrote as it goes (``verify_backlog``), each checked
    against its crc32c."""
    return [
        "fio", f"--name={name}", f"--filename={target}", "--ioengine=libaio", "--direct=1",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}",
        "--verify=crc32c", "--verify_fatal=1", "--verify_backlog=256", "--verify_state_save=0",
        f"--runtime={seconds:.0f}", "--time_based", "--output-format=json",
    ]  # fmt: skip


def check_fio(proc: subprocess.Popen[str], out: str, err: str) -> None:
    """A :func:`fio_verify` run ended without an error and verified something."""
    assert proc.returncode == 0, f"fio failed ({proc.returncode}): {err[-2000:]}"
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] > 0, "fio verified nothing"


@contextlib.contextmanager
def fio_verified(target: str, name: str, seconds: float, size: int = FIO_SIZE) -> Iterator[None]:
    """fio writing and verifying ``target`` for ``seconds`` around the
    block; after it, fio is waited for and checked (:func:`check_fio`). It
    is killed (by its pid) if the block fails."""
    proc = subprocess.Popen(fio_verify(target, name, "randwrite", "4k", 32, seconds, size),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        yield
        out, err = proc.communicate(timeout=seconds + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_fio(proc, out, err)


# xfsprogs >= 5.19 refuses file systems under 300 MiB; the files are sparse.
FS_SIZE = {"ext4": 192 * MiB, "xfs": 320 * MiB}
MKFS = {"ext4": ["mkfs.ext4", "-q"], "xfs": ["mkfs.xfs", "-q", "-f"]}
FSCK = {"ext4": ["fsck.ext4", "-fn"], "xfs": ["xfs_repair", "-n"]}


def mounted(daemon: Daemon, backing, tmp_path: Path, fs: str) -> tuple[str, str, str]:
    """``fs`` on the loop device of device ``a`` (tracker attached), mounted;
    a second device ``b`` for raw fio. (The daemon fixture stops blksnapd
    and clears up after the test, whatever happened.)"""
    if SKIP:
        pytest.skip(SKIP)
    la = add_device(daemon, backing("a.img", FS_SIZE[fs]), "a")["loop"]
    lb = add_device(daemon, backing("b.img", FIO_SIZE + 16 * MiB), "b")["loop"]
    daemon.cli("attach", "-d", "a")
    run(*MKFS[fs], la)
    mnt = daemon.mount_fs(la, tmp_path / "fs")
    return la, lb, mnt


@pytest.fixture
def mounted_ext4(daemon: Daemon, backing, tmp_path: Path) -> tuple[str, str, str]:
    return mounted(daemon, backing, tmp_path, "ext4")


BLOCK = 4096
_STAMP = struct.Struct("<4sIQ")


def stamp(block: int, seq: int) -> bytes:
    """Block ``block`` as write ``seq`` leaves it (seq 0: the fill): its
    number and the write's, then bytes that depend on both."""
    head = _STAMP.pack(b"BSNP", block, seq)
    body = hashlib.sha256(head).digest() * (BLOCK // 32)
    return head + body[len(head) :]


class StampWriter(threading.Thread):
    """Rewrites random 4 KiB blocks of ``path`` one at a time (O_DIRECT),
    each stamped with its number and the write's sequence number, until
    stopped; ``log[i]`` is the block of write ``i + 1``. ``done``: writes
    acknowledged; ``started``: writes begun."""

    def __init__(self, path: str, blocks: int, seed: int) -> None:
        super().__init__(name="stamp-writer", daemon=True)
        self.path, self.blocks = path, blocks
        self.rng = random.Random(seed)
        self.log: list[int] = []
        self.done = self.started = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()
        for first in range(0, blocks, 256):  # the fill: seq 0 everywhere
            n = min(256, blocks - first)
            direct_write(
                path, first * BLOCK, b"".join(stamp(b, 0) for b in range(first, first + n))
            )

    def run(self) -> None:
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            while not self.halt.is_set():
                block = self.rng.randrange(self.blocks)
                seq = len(self.log) + 1
                buf[:] = stamp(block, seq)
                self.started = seq
                if os.pwrite(fd, buf, block * BLOCK) != BLOCK:
                    raise OSError("short write")
                self.log.append(block)
                self.done = seq
        except BaseException as exc:  # (reported by stop)
            self.error = exc
        finally:
            os.close(fd)
            buf.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(60)
        assert not self.is_alive() and self.error is None, self.error

    def check_image(self, image: bytes, begun: int, returned: int) -> None:
        """``image`` is the device as it was after the first T writes, for
        one T between ``begun`` (writes acknowledged when the take was
        asked for) and ``returned`` (writes begun when it returned); every
        block whole and in its place."""
        seqs = []
        for b in range(self.blocks):
            piece = image[b * BLOCK : (b + 1) * BLOCK]
            magic, block, seq = _STAMP.unpack_from(piece)
            assert magic == b"BSNP" and block == b and piece == stamp(b, seq), f"block {b}"
            seqs.append(seq)
        cut = max(begun, max(seqs) + 1)
        assert cut <= returned + 1, (cut, begun, returned)
        last = [0] * self.blocks
        for i, b in enumerate(self.log[: cut - 1]):
            last[b] = i + 1
        wrong = [b for b in range(self.blocks) if last[b] != seqs[b]]
        assert not wrong, f"blocks {wrong[:5]} are not the device after write {cut - 1}"


class SnapshotRounds:
    """Around each kill, besides the load, one of: copy-on-write into a
    taken snapshot of device ``c`` (a :class:`StampWriter` rewrites it), a
    read of its image, a backup of ``a``, a take and a destroy of the
    snapshot. The image is checked against the stamps at take and must read
    the same after every kill. Every fifth event is a ``daemon restart``
    instead of a SIGKILL."""

    ACTIONS = ("cow", "read", "backup", "take", "destroy")

    def __init__(self, daemon: Daemon, lc: str, root: Path, repo: str, seed: str) -> None:
        self.daemon, self.root, self.repo = daemon, root, repo
        self.rng = random.Random(seed)
        self.writer = StampWriter(lc, 16 * MiB // BLOCK, seed=self.rng.randrange(1 << 30))
        self.writer.start()
        self.sid: str | None = None
        self.digest = ""
        self.takes = 0
        self.done: list[str] = []
        #: The cause of each event, as status reports it.
        self.causes: list[str] = []

    def image(self) -> str:
        return os.path.join(self.daemon.mount, "images", str(self.sid), "c")

    def event(self) -> None:
        """The worker killed, or every fifth time replaced (``daemon restart``)."""
        if len(self.causes) % 5 == 4:
            old = worker_pid(self.daemon)
            self.daemon.cli("daemon", "restart")
            wait_new_worker(self.daemon, old)
            self.causes.append("daemon restart")
        else:
            kill_worker(self.daemon)
            self.causes.append("killed by SIGKILL")

    def create(self) -> str:
        self.takes += 1
        return create(self.daemon, ["c"], storage_dir(self.root, f"snap{self.takes}"), "64M")

    def taken(self, sid: str, begun: int) -> None:
        """``sid`` was taken after ``begun`` stamp writes were acknowledged
        (and before now): its image checked against the stamps."""
        returned = self.writer.started
        self.sid = sid
        with open(self.image(), "rb") as f:
            data = f.read()
        self.writer.check_image(data, begun, returned)
        self.digest = hashlib.sha256(data).hexdigest()

    def take(self) -> None:
        sid = self.create()
        begun = self.writer.done
        self.daemon.cli("snapshot", "take", "-i", sid)
        self.taken(sid, begun)

    def check(self) -> None:
        assert self.daemon.client.snapshot_collect(self.sid)[0]["state"] == "taken"
        assert sha256_file(self.image()) == self.digest, "the image changed"

    def around_kill(self, kill: int) -> None:
        """Action ``kill % 5``, and the event (:meth:`event`) in it."""
        action = self.ACTIONS[kill % len(self.ACTIONS)]
        if self.sid is None and action not in ("backup", "take"):
            self.take()
        cmd = [str(BIN / "blksnap"), "--socket", self.daemon.sock]
        if action == "cow":  # the stamp writer's first writes copy chunks
            self.event()
            self.check()
        elif action == "take":
            if self.sid is not None:
                self.daemon.cli("snapshot", "destroy", "-i", self.sid)
                self.sid = None
            sid = self.create()
            begun = self.writer.done
            take = [*cmd, "snapshot", "take", "-i", sid]
            proc = subprocess.Popen(take, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
            time.sleep(self.rng.uniform(0.1, 0.3))  # (the CLI starts in about 0.15 s)
            self.event()
            proc.communicate(timeout=60)  # done, or cut
            snap = self.daemon.client.snapshot_collect(sid)[0]
            if snap["state"] == "taken":
                self.taken(sid, begun)
            else:  # not begun (created), or cut in the middle (corrupted, saying so)
                assert snap["state"] == "created" or "cut short" in snap["reason"], snap
                self.daemon.cli("snapshot", "destroy", "-i", sid)
            action += f" ({snap['state']})"
        elif action == "read":
            got: list[str] = []
            reader = threading.Thread(target=lambda: got.append(sha256_file(self.image())))
            reader.start()
            time.sleep(self.rng.uniform(0.0, 0.05))
            self.event()
            reader.join(120)
            assert got == [self.digest], "an image read across the kill differs"
        elif action == "backup":
            proc = subprocess.Popen([*cmd, "--json", "backup", "-d", "a", "--repo", self.repo,
                                     "--no-progress"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(self.rng.uniform(0.05, 0.5))
            self.event()
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert json.loads(out)["kind"] == "incremental", out
        else:
            destroy = [*cmd, "snapshot", "destroy", "-i", str(self.sid)]
            proc = subprocess.Popen(destroy, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
            time.sleep(self.rng.uniform(0.0, 0.05))
            self.event()
            proc.communicate(timeout=60)  # done, or cut (and then finished, or not begun)
            left = self.daemon.client.snapshot_collect()
            if left:
                self.check()
                self.daemon.cli("snapshot", "destroy", "-i", str(self.sid))
            self.sid = None
        self.done.append(action)

    def finish(self) -> None:
        self.writer.stop()
        if self.sid is not None:
            self.check()
            self.daemon.cli("snapshot", "destroy", "-i", self.sid)
        st = self.daemon.client.status()
        assert not st["lost_snapshots"] and st["snapshots"] == 0, st


def kill_under_load(
    daemon: Daemon, backing, la: str, lb: str, mnt: str, kills: int, seed: str, fs: str = "ext4"
) -> str:
    """Kill the worker ``kills`` times under fio and a writer on ``fs``, and
    with snapshots taken, read, backed up and destroyed around the kills
    (:class:`SnapshotRounds`); a full backup of ``a`` before, an incremental
    after (it must be one: the CBT carried on), restored and compared with
    the device by sha256."""
    rng = random.Random(seed)
    gen = daemon.client.cbt_info("a").generation_id
    root = Path(mnt).parent
    repo = str(root / "repo")
    full = json.loads(daemon.cli("--json", "backup", "-d", "a", "--repo", repo).stdout)
    assert full["kind"] == "full", full
    lc = add_device(daemon, backing("c.img", 16 * MiB), "c")["loop"]
    log_before = len(kernel_log_lines())
    stop = root / "stop-writer"
    stop.unlink(missing_ok=True)
    writer = Writer(mnt, stop, keep=20, maxsize=256 * 1024)
    rounds = SnapshotRounds(daemon, lc, root, repo, seed)
    seconds = kills * 3.0 + 4
    fio = [
        subprocess.Popen(fio_verify(lb, "rand", "randwrite", "4k", 32, seconds),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(fio_verify(f"{mnt}/seq.dat", "seq", "write", "1m", 8, seconds),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]  # fmt: skip
    try:
        restarts = daemon.client.status()["restarts"]
        for k in range(kills):
            time.sleep(rng.uniform(0.2, 1.0))
            rounds.around_kill(k)
            restarts += 1
            st = daemon.client.status()
            assert st["restarts"] == restarts and st["last_restart_cause"] == rounds.causes[-1]
            assert st["devices"] == 3 and st["fuse"] == "up", st
        rounds.finish()
    finally:
        try:
            results = [p.communicate(timeout=seconds + 120) for p in fio]
        finally:
            for p in fio:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            rc = writer.stop()
            rounds.writer.halt.set()
    print(f"{kills} kills around: {', '.join(rounds.done)}; {rounds.writer.done} stamped writes")
    for p, (out, err) in zip(fio, results, strict=True):
        check_fio(p, out, err)
    assert rc == 0 and not writer.errors(), (rc, writer.errors(), writer.err[-5:])
    assert writer.count() > kills, "the writer made no progress across the kills"
    for name, digest in writer.files().items():
        with open(os.path.join(mnt, name), "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == digest, name
    os.unlink(os.path.join(mnt, "seq.dat"))
    run("sync", "-f", mnt)
    run("umount", mnt)
    daemon.mounted.remove(mnt)
    fsck = run(*FSCK[fs], la, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    errors = io_errors_since(log_before, [la, lb, lc])
    assert not errors, errors
    assert daemon.client.cbt_info("a").generation_id == gen
    # The file system unmounted, the device holds still: an incremental
    # (the CBT carried on across the kills) restores to exactly the device.
    inc = json.loads(
        daemon.cli("--json", "backup", "-d", "a", "--repo", repo, "--incremental").stdout
    )
    assert inc["kind"] == "incremental", inc
    restored = root / "restored.img"
    daemon.cli("restore", "--repo", repo, "--backup", inc["id"], "-d", "a", "--to", str(restored))
    assert sha256_file(restored) == sha256_file(root / "backing" / "a.img")
    return gen


@pytest.mark.slow
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_worker_killed_under_load_nothing_notices(daemon: Daemon, backing, tmp_path, fs) -> None:
    """A few kills by default; BLKSNAP_KILLS=20 for the long run."""
    la, lb, mnt = mounted(daemon, backing, tmp_path, fs)
    kills = int(os.environ.get("BLKSNAP_KILLS", "3"))
    kill_under_load(daemon, backing, la, lb, mnt, kills=kills, seed=f"kill-{kills}", fs=fs)


def test_cbt_carries_on_across_worker_kills(daemon: Daemon, backing, tmp_path) -> None:
    """The CBT lives in memory the supervisor holds: after a kill the same
    generation, every block marked before it still marked, and marks made
    after it on top; a take after the kill reports them all."""
    lp = add_device(daemon, backing("a.img", 64 * MiB), "a")["loop"]
    daemon.cli("attach", "-d", "a")
    info = daemon.client.cbt_info("a")
    bs = info.block_size
    before = [3, 17, 200]
    for b in before:
        direct_write(lp, b * bs, os.urandom(4096))
    kill_worker(daemon)
    after = [5, 300]
    for b in after:
        direct_write(lp, b * bs, os.urandom(4096))
    kill_worker(daemon)
    assert daemon.client.cbt_info("a").generation_id == info.generation_id
    sid = create(daemon, ["a"], storage_dir(tmp_path), "16M")
    take_full(daemon, sid)
    taken = daemon.client.cbt_info("a")
    assert taken.generation_id == info.generation_id
    cbt = daemon.client.cbt_map("a")
    marked = {i for i, n in enumerate(cbt) if n > info.changes_number}
    assert marked == set(before + after), sorted(marked)
    daemon.cli("snapshot", "destroy", "-i", sid)
    # Detached, the region goes: attached again, a new generation.
    daemon.cli("detach", "-d", "a")
    daemon.cli("attach", "-d", "a")
    assert daemon.client.cbt_info("a").generation_id != info.generation_id


def test_daemon_restart_under_a_writer(daemon: Daemon, mounted_ext4) -> None:
    la, _lb, mnt = mounted_ext4
    stop = Path(mnt).parent / "stop-writer"
    writer = Writer(mnt, stop, keep=10, maxsize=64 * 1024)
    try:
        time.sleep(0.5)
        before = writer.count()
        out = json.loads(daemon.cli("--json", "daemon", "restart").stdout)
        assert out["restarted"] is True and out["worker_pid"] != out["old_worker_pid"], out
        assert out["pid"] == daemon.proc.pid  # the supervisor: blksnapd's pid stays
        time.sleep(0.5)
        st = daemon.client.status()
        assert st["restarts"] == 1 and st["last_restart_cause"] == "daemon restart", st
        assert st["loops"] and la in st["loops"]
        text = daemon.cli("daemon", "status").stdout
        assert f"worker {st['worker_pid']}, 1 restart(s), last: daemon restart" in text
    finally:
        rc = writer.stop()
    assert rc == 0 and not writer.errors(), (rc, writer.errors())
    assert writer.count() > before
    run("umount", mnt)
    daemon.mounted.remove(mnt)
    fsck = run("fsck.ext4", "-fn", la, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _thread_in(pid: int, words: tuple[str, ...]) -> bool:
    """Is a thread of process ``pid`` in a kernel function named in ``words``?"""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stack") as f:
                stack = f.read()
        except OSError:
            continue
        if any(w in stack for w in words):
            return True
    return False


def test_worker_killed_with_a_file_system_frozen_for_a_take(
    daemon: Daemon, mounted_ext4, tmp_path
) -> None:
    """Killed while a take holds the ext4 on one of its devices frozen (its
    freeze still flushing dirty pages through the FUSE file): the dying
    worker's thread waits in the kernel for I/O only the next worker can
    serve, so the next one must take over before the dying one can be
    reaped; and it thaws the file system the dead one froze. The writer
    goes on, fsck is clean. (Both hung before: the supervisor waited for
    the dying worker, and nobody thawed.)"""
    la, _lb, mnt = mounted_ext4
    stop = Path(mnt).parent / "stop-writer"
    writer = Writer(mnt, stop, keep=10, maxsize=64 * 1024)
    try:
        for attempt in range(3):
            # Dirty pages for the freeze to flush: it stays in the kernel a while.
            with open(os.path.join(mnt, "dirty.dat"), "wb") as f:
                f.write(os.urandom(64 * MiB))
            sid = create(daemon, ["a"], storage_dir(tmp_path, f"s{attempt}"), "160M")
            old = worker_pid(daemon)
            take = [str(BIN / "blksnap"), "--socket", daemon.sock, "snapshot", "take", "-i", sid]
            proc = subprocess.Popen(take, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
            deadline = time.monotonic() + 20
            while not _thread_in(old, ("freeze_super", "blkdev_fsync")):
                assert time.monotonic() < deadline and proc.poll() is None, "no freeze seen"
                time.sleep(0.001)
            os.kill(old, signal.SIGKILL)
            st = wait_new_worker(daemon, old, timeout=30)
            proc.communicate(timeout=60)
            assert st["devices"] == 2 and not st["lost_snapshots"], st
            before = writer.count()
            deadline = time.monotonic() + 20
            while writer.count() <= before + 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert writer.count() > before + 3, "the file system stayed frozen"
            for snap in daemon.client.snapshot_collect():
                daemon.cli("snapshot", "destroy", "-i", snap["id"])
            os.unlink(os.path.join(mnt, "dirty.dat"))
    finally:
        rc = writer.stop()
    assert rc == 0 and not writer.errors(), (rc, writer.errors())
    run("umount", mnt)
    daemon.mounted.remove(mnt)
    fsck = run("fsck.ext4", "-fn", la, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_snapshots_carry_on_across_daemon_restart_and_kill(
    daemon: Daemon, backing, tmp_path
) -> None:
    """Two snapshots (one taken, with chunks stored and a loop device over
    its image; one created, not yet taken) across a ``daemon restart`` and
    a SIGKILL of the worker: the image reads what the device held at take,
    the chunks stored stay stored, the loop device over the image is kept,
    writes after the restart still copy, and the created one can be taken."""
    size = 32 * MiB
    la = add_device(daemon, backing("a.img", size), "a")["loop"]
    add_device(daemon, backing("b.img", size), "b")
    _fill(la, size, 1)
    at_take = sha256_file(la)
    sid = create(daemon, ["a"], storage_dir(tmp_path), "32M")
    img_loop = take_full(daemon, sid)["images"]["a"]["loop"]
    second = create(daemon, ["b"], storage_dir(tmp_path, "second"), "32M")
    rng = random.Random(2)
    for off in range(0, size // 2, MiB):  # half the device changes: chunks stored
        direct_write(la, off, rng.randbytes(MiB))
    stored = int(daemon.client.snapshot_collect(sid)[0]["devices"][0]["chunks_stored"])
    assert stored > 0
    for i, how in enumerate(("restart", "kill")):
        # as a blksnapd from before loop.unsteer left them: the new worker
        # unsteers them once it serves
        for lp in (la, img_loop):
            Path(f"/sys/block/{os.path.basename(lp)}/queue/rq_affinity").write_text("1")
        old = worker_pid(daemon)
        if how == "restart":
            daemon.cli("daemon", "restart")
            st = wait_new_worker(daemon, old)
        else:
            st = kill_worker(daemon)
        assert st["snapshots"] == 2 and not st["lost_snapshots"], st
        snap = daemon.client.snapshot_collect(sid)[0]
        assert snap["state"] == "taken", snap
        assert int(snap["devices"][0]["chunks_stored"]) >= stored, snap
        assert daemon.client.snapshot_collect(second)[0]["state"] == "created"
        assert img_loop in st["loops"], st
        deadline = time.monotonic() + 10
        while any(queue_limit(lp, "rq_affinity") for lp in (la, img_loop)):
            assert time.monotonic() < deadline, f"{how}: loop devices still steered"
            time.sleep(0.05)
        assert sha256_file(img_loop) == at_take, how
        assert sha256_file(os.path.join(daemon.mount, "images", sid, "a")) == at_take
        for off in range(size // 2 + i * MiB, size, 4 * MiB):  # copies in the new worker
            direct_write(la, off, rng.randbytes(MiB))
        now = int(daemon.client.snapshot_collect(sid)[0]["devices"][0]["chunks_stored"])
        assert now > stored, (now, stored)
        stored = now
        assert sha256_file(img_loop) == at_take, how
    take_full(daemon, second)
    daemon.cli("snapshot", "destroy", "-i", sid)
    daemon.cli("snapshot", "destroy", "-i", second)
    st = daemon.client.status()
    assert st["snapshots"] == 0 and not st["lost_snapshots"], st


def test_killed_supervisor_takes_its_worker_along(daemon: Daemon, backing) -> None:
    add_device(daemon, backing("a.img", 8 * MiB), "a")
    worker = worker_pid(daemon)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}"), "the worker outlived its supervisor"


def test_supervisor_imports_no_engine() -> None:
    code = (
        "import sys, blksnap.control.supervisor\n"
        "print([m for m in sys.modules if m.startswith('blksnap.engine')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="nbdinfo (libnbd-bin) not installed")
def test_nbd_clients_connect_across_a_worker_kill(nbd_daemon: Daemon, backing) -> None:
    """The supervisor holds the NBD listening socket: a client connecting
    while no worker runs waits in the backlog and is served by the next."""
    add_device(nbd_daemon, backing("a.img", 8 * MiB), "a")
    uri = f"nbd+unix:///a?socket={nbd_daemon.nbd}"
    assert json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["export-size"] == 8 * MiB
    old = worker_pid(nbd_daemon)
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    while os.path.exists(f"/proc/{old}/stat") and "Z" not in _state(old):
        time.sleep(0.005)  # the worker is gone: no process accepts now
    info = run("nbdinfo", "--json", uri)  # connects now, answered by the next worker
    took = time.monotonic() - t0
    assert json.loads(info.stdout)["exports"][0]["export-size"] == 8 * MiB
    st = nbd_daemon.client.status()
    assert st["worker_pid"] != old and st["restarts"] == 1, st
    assert st["nbd_listen"] == [f"unix:{nbd_daemon.nbd}"], st
    assert took < 30


def _state(pid: int) -> str:
    fields = proc_stat(pid)
    return fields[0] if fields is not None else "gone"


def _fill(dev: str, size: int, seed: int) -> None:
    """Random data over the whole device, 1 MiB at a time (direct I/O)."""
    rng = random.Random(seed)
    for off in range(0, size, MiB):
        direct_write(dev, off, rng.randbytes(MiB))


def test_backup_across_a_worker_kill_completes(daemon: Daemon, backing, tmp_path) -> None:
    """A backup reading its snapshot's image when the worker is killed goes
    on (the snapshot carries on, the image's reads in flight are resent to
    the next worker) and completes; it restores to exactly the device, and
    the next backup is incremental (the CBT carried on too)."""
    size = 256 * MiB
    path = backing("a.img", size)
    lp = add_device(daemon, path, "a")["loop"]
    daemon.cli("attach", "-d", "a")
    gen = daemon.client.cbt_info("a").generation_id
    _fill(lp, size, 1)
    repo = str(tmp_path / "repo")
    full = json.loads(daemon.cli("--json", "backup", "-d", "a", "--repo", repo).stdout)
    assert full["kind"] == "full", full
    _fill(lp, size, 2)  # every block changed: the next backup reads the whole image
    cmd = [str(BIN / "blksnap"), "--socket", daemon.sock, "--json", "backup", "-d", "a",
           "--repo", repo, "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            snaps = daemon.client.snapshot_collect()
            if any(s["state"] == "taken" for s in snaps):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the backup ended before the kill: " + proc.stderr.read()
        os.kill(proc.pid, signal.SIGSTOP)  # held mid-read while the worker dies
        try:
            st = kill_worker(daemon)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert st["snapshots"] == 1 and not st["lost_snapshots"], st
    cut = json.loads(out)
    assert cut["kind"] == "incremental", cut
    restored = tmp_path / "restored.img"
    daemon.cli("restore", "--repo", repo, "--backup", cut["id"], "-d", "a", "--to",
               str(restored))  # fmt: skip
    assert sha256_file(restored) == sha256_file(path)
    assert daemon.client.cbt_info("a").generation_id == gen
    assert daemon.client.status()["snapshots"] == 0  # the backup destroyed its snapshot
    again = json.loads(daemon.cli("--json", "backup", "-d", "a", "--repo", repo).stdout)
    assert again["kind"] == "incremental", again


def test_worker_killed_during_copy_on_write_fio_sees_nothing(
    daemon: Daemon, backing, tmp_path
) -> None:
    """Killed while fio's writes copy chunks to a taken snapshot's diff
    storage: the writes in flight are resent to the next worker, which
    carries the snapshot on (a chunk whose copy was cut counts as not
    stored and is copied again); fio's crc32c verification passes, and the
    image still reads exactly what the device held at take."""
    size = 320 * MiB  # 4,096 chunks under fio: copies go on for seconds
    lp = add_device(daemon, backing("b.img", size), "b")["loop"]
    daemon.cli("attach", "-d", "b")
    gen = daemon.client.cbt_info("b").generation_id
    _fill(lp, size, 3)
    at_take = sha256_file(lp)
    sid = create(daemon, ["b"], storage_dir(tmp_path), "320M")
    img_loop = take_full(daemon, sid)["images"]["b"]["loop"]
    log_before = len(kernel_log_lines())
    kills = 3

    def stored() -> int:
        return int(daemon.client.snapshot_collect(sid)[0]["devices"][0]["chunks_stored"])

    with fio_verified(lp, "cow", kills * 1.5 + 3, size - 64 * MiB):
        for _ in range(kills):
            before = stored()
            deadline = time.monotonic() + 10
            while stored() < before + 20 and time.monotonic() < deadline:
                time.sleep(0.02)  # until copies are under way
            assert stored() >= before + 20, (before, stored())
            st = kill_worker(daemon)
            assert st["snapshots"] == 1 and not st["lost_snapshots"], st
            assert daemon.client.snapshot_collect(sid)[0]["state"] == "taken"
    assert not io_errors_since(log_before, [lp, img_loop]), io_errors_since(log_before, [lp])
    assert daemon.client.cbt_info("b").generation_id == gen
    assert sha256_file(img_loop) == at_take
    daemon.cli("snapshot", "destroy", "-i", sid)


def test_worker_killed_during_take_and_destroy(daemon: Daemon, backing, tmp_path) -> None:
    """Killed while a take drains the device or a destroy releases the
    snapshot, at varying moments: fio's writes and verification go on
    without an error (the new worker has no drained gate); a take cut
    leaves the snapshot created (not begun), taken (done) or corrupted with
    the reason (cut in the middle: the instant cannot be proven), never
    lost; a destroy cut is finished by the next worker or not begun; the
    CBT keeps its generation and a take after the kills works."""
    lp = add_device(daemon, backing("c.img", FIO_SIZE + 16 * MiB), "c")["loop"]
    daemon.cli("attach", "-d", "c")
    gen = daemon.client.cbt_info("c").generation_id
    log_before = len(kernel_log_lines())
    rng = random.Random(7)
    rounds = 6
    seen: set[str] = set()
    with fio_verified(lp, "take", rounds * 2.0 + 3):
        for i in range(rounds):
            sid = create(daemon, ["c"], storage_dir(tmp_path, f"t{i}"), "96M")
            verb = "take" if i % 2 == 0 else "destroy"
            if verb == "destroy":
                take_full(daemon, sid)
            cmd = [str(BIN / "blksnap"), "--socket", daemon.sock, "snapshot", verb, "-i", sid]
            op = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0.1, 0.3))  # (the CLI starts in about 0.15 s)
            old = worker_pid(daemon)
            os.kill(old, signal.SIGKILL)
            op.communicate(timeout=60)  # done before the kill, or cut by it: either is fine
            st = wait_new_worker(daemon, old)
            assert st["devices"] == 1 and not st["lost_snapshots"], st
            left = daemon.client.snapshot_collect()
            assert len(left) <= 1, left
            if verb == "take":
                assert len(left) == 1, left
                snap = left[0]
                assert snap["state"] in ("created", "taken", "corrupted"), snap
                if snap["state"] == "corrupted":
                    assert "cut short" in snap["reason"], snap
                seen.add(snap["state"])
            else:
                assert not left or left[0]["state"] == "taken", left
                seen.add("destroyed" if not left else "not destroyed")
            if left:
                daemon.cli("snapshot", "destroy", "-i", sid)
    print("after the kills:", ", ".join(sorted(seen)))
    assert not io_errors_since(log_before, [lp]), io_errors_since(log_before, [lp])
    assert daemon.client.cbt_info("c").generation_id == gen
    sid = create(daemon, ["c"], storage_dir(tmp_path, "after"), "96M")
    take_full(daemon, sid)
    assert daemon.client.snapshot_collect(sid)[0]["state"] == "taken"
    daemon.cli("snapshot", "destroy", "-i", sid)
