"""Helpers shared by the integration tests of issue 3's "Proof it works" list:
devices and snapshots through the CLI, file trees with their md5 sums,
O_DIRECT I/O on block devices, and background processes that are always
reaped (by their own pid, never by name)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.conftest import Daemon, run

KiB = 1 << 10
MiB = 1 << 20

# -- daemon, through the CLI -------------------------------------------------------


def queue_limit(dev: str, name: str) -> int:
    """Block device ``dev``'s queue attribute ``name`` (sysfs)."""
    return int(Path(f"/sys/block/{os.path.basename(dev)}/queue/{name}").read_text())


def add_device(daemon: Daemon, path: str, name: str, loop: bool = True) -> dict:
    args = ["--json", "device", "add", path, "--name", name] + (["--loop"] if loop else [])
    out = json.loads(daemon.cli(*args).stdout)
    assert out["name"] == name
    assert out["path"] == os.path.join(daemon.mount, "dev", name)
    if loop:
        assert out["loop"] and out["loop"].startswith("/dev/loop"), out
    return out


def create(daemon: Daemon, names: list[str], storage: str | Path, limit: str) -> str:
    args = ["--json", "snapshot", "create"]
    for n in names:
        args += ["-d", n]
    out = json.loads(daemon.cli(*args, "-f", str(storage), "-l", limit).stdout)
    return out["id"]


def take(daemon: Daemon, sid: str) -> dict[str, dict]:
    """``snapshot take --loop``: the images, name -> {"path", "loop"}."""
    return take_full(daemon, sid)["images"]


def take_full(daemon: Daemon, sid: str) -> dict:
    out = json.loads(daemon.cli("--json", "snapshot", "take", "-i", sid, "--loop").stdout)
    assert out["id"] == sid
    for name, img in out["images"].items():
        assert img["path"] == os.path.join(daemon.mount, "images", sid, name)
        assert img["loop"] and img["loop"].startswith("/dev/loop"), img
    return out


def collect(daemon: Daemon, sid: str | None = None) -> list[dict]:
    args = ["--json", "snapshot", "collect"] + (["-i", sid] if sid else [])
    return json.loads(daemon.cli(*args).stdout)


def storage_dir(tmp_path: Path, name: str = "diff") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return d


# -- files and trees -----------------------------------------------------------------


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    """sha256 of a file or block device (its first ``limit`` bytes)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(4 * MiB if left is None else min(4 * MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def write_file(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (fsync'd); its md5."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return md5(data)


def tree(root: str | Path) -> dict[str, str]:
    """Every entry under ``root`` (but lost+found): files -> md5, dirs -> "dir"."""
    root = str(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = md5_file(full)
    return out


def populate(root: str | Path, rng: random.Random, count: int, prefix: str) -> dict[str, str]:
    """``count`` files of odd sizes (0 bytes to ~1.5 MiB) in ``root`` and one
    subdirectory; the tree they make (relative path -> md5 or "dir")."""
    sizes = [0, 1, 511, 4095, 4097, 65535, 65537, 300 * KiB + 7, 1536 * KiB + 3]
    out: dict[str, str] = {}
    for i in range(count):
        sub = "sub" if i % 3 == 2 else ""
        rel = os.path.join(sub, f"{prefix}{i:03d}.bin")
        size = sizes[i % len(sizes)] if i < len(sizes) else rng.randint(1, 700 * KiB)
        out[rel] = write_file(os.path.join(str(root), rel), rng.randbytes(size))
        if sub:
            out[sub] = "dir"
    return out


# -- O_DIRECT block device I/O --------------------------------------------------------


@contextlib.contextmanager
def opened(path: str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def direct_write(path: str, offset: int, data: bytes) -> None:
    """One O_DIRECT write from a page-aligned (mmap) buffer, then fsync."""
    buf = mmap.mmap(-1, len(data))
    try:
        buf[:] = data
        with opened(path, os.O_WRONLY | os.O_DIRECT) as fd, memoryview(buf) as view:
            n = os.pwrite(fd, view, offset)
            assert n == len(data), (path, offset, n)
            os.fsync(fd)
    finally:
        buf.close()


def direct_read(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` with O_DIRECT into a page-aligned buffer."""
    buf = mmap.mmap(-1, length)
    try:
        with opened(path, os.O_RDONLY | os.O_DIRECT) as fd, memoryview(buf) as view:
            done = 0
            while done < length:
                with view[done:] as rest:
                    n = os.preadv(fd, [rest], offset + done)
                assert n > 0, (path, offset + done, n)
                done += n
        return bytes(buf)
    finally:
        buf.close()


def block_size(dev: str) -> int:
    return int(run("blockdev", "--getss", dev).stdout)


def fsck_ext4(dev: str) -> subprocess.CompletedProcess[str]:
    return run("fsck.ext4", "-fn", dev, check=False)


# -- background processes ---------------------------------------------------------------


class Background:
    """A subprocess whose stdout lines are collected by a thread. Stopped by
    its own pid (terminate, then kill) in :meth:`reap`."""

    def __init__(self, args: list[str], **kw) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            **kw,
        )
        self.lines: list[tuple[float, str]] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, None), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink) -> None:
        for line in stream:
            with self._cond:
                if sink is None:
                    self.err.append(line.rstrip("\n"))
                else:
                    sink.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()

    def snapshot(self) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines]

    def wait_for(self, pred, timeout: float) -> bool:
        """Until ``pred(lines)`` holds (True) or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred([line for _, line in self.lines]):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive_pumps()):
                    return pred([line for _, line in self.lines])
                self._cond.wait(min(left, 0.2))
            return True

    def _alive_pumps(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def finish(self) -> None:
        for t in self._threads:
            t.join(timeout=10)

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.finish()

    def describe(self) -> str:
        return (
            f"{[a for a in self.args if len(a) < 200]} rc={self.proc.poll()}\nstdout tail: "
            f"{self.snapshot()[-5:]}\nstderr tail: {self.err[-5:]}"
        )


#: A writer on a mounted file system: creates files ``wNNNNNN`` of random
#: sizes, fsyncs each, appends "name size" to ``log`` and fsyncs it, then
#: prints ``ok NAME MD5``. With ``keep`` > 0 the oldest files beyond ``keep``
#: are deleted (``del NAME``). Stops (``done N``) when ``stop`` exists; on an
#: I/O error prints ``err ERRNO ...`` and exits 3.
WRITER = r"""
import hashlib, os, random, sys, time
d, stop = sys.argv[1], sys.argv[2]
keep, maxsize, pause = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
rng = random.Random(os.getpid())
def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
i = 0
try:
    log = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    while not os.path.exists(stop):
        name = "w%06d" % i
        data = rng.randbytes(rng.randint(1, maxsize))
        fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_all(log, ("%s %d\n" % (name, len(data))).encode())
        os.fsync(log)
        print("ok", name, hashlib.md5(data).hexdigest(), flush=True)
        if keep and i >= keep:
            old = "w%06d" % (i - keep)
            os.unlink(os.path.join(d, old))
            print("del", old, flush=True)
        i += 1
        if pause:
            time.sleep(pause)
except OSError as exc:
    print("err", exc.errno, exc.strerror, flush=True)
    sys.exit(3)
print("done", i, flush=True)
"""


class Writer(Background):
    def __init__(
        self, directory: str | Path, stop: str | Path, keep: int, maxsize: int, pause: float = 0
    ) -> None:
        self.directory = str(directory)
        self.stop_file = str(stop)
        super().__init__(
            [
                sys.executable,
                "-c",
                WRITER,
                self.directory,
                self.stop_file,
                str(keep),
                str(maxsize),
                str(pause),
            ]
        )

    def files(self) -> dict[str, str]:
        """Files the writer reported complete (fsync'd) and not deleted."""
        out: dict[str, str] = {}
        for line in self.snapshot():
            parts = line.split()
            if parts[0] == "ok":
                out[parts[1]] = parts[2]
            elif parts[0] == "del":
                out.pop(parts[1], None)
        return out

    def count(self) -> int:
        return sum(1 for line in self.snapshot() if line.startswith("ok "))

    def errors(self) -> list[str]:
        return [line for line in self.snapshot() if line.startswith("err ")]

    def stop(self, timeout: float = 30) -> int | None:
        Path(self.stop_file).touch()
        return self.wait(timeout)


# -- fio -------------------------------------------------------------------------------


def fio_verify(filename: str, size: str, runtime: int, name: str = "verify") -> subprocess.Popen:
    """fio writing 4 KiB blocks at random into ``filename`` (QD 32, O_DIRECT)
    for ``runtime`` seconds, each block checked against its crc32c as it
    goes (JSON on stdout: :func:`fio_json`)."""
    return subprocess.Popen(
        ["fio", f"--name={name}", f"--filename={filename}", f"--size={size}",
         "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=32",
         "--verify=crc32c", "--verify_fatal=1", "--verify_backlog=256",
         "--verify_state_save=0", f"--runtime={runtime}", "--time_based",
         "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def fio_json(out: str) -> dict:
    """The first job of fio's JSON output (after whatever it printed first)."""
    return json.loads(out[out.index("{") :])["jobs"][0]


# -- blksnapd's worker ---------------------------------------------------------------


def worker_pid(d: Daemon) -> int:
    return d.client.status()["worker_pid"]


def wait_new_worker(d: Daemon, old: int, timeout: float = 60) -> dict:
    """The status once a worker other than ``old`` answers (the client asks
    again while the socket's connections break)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = d.client.status()
        if st["worker_pid"] != old:
            return st
        time.sleep(0.05)
    raise AssertionError(f"worker {old} not replaced within {timeout} s")


def kill_worker(d: Daemon) -> dict:
    old = worker_pid(d)
    os.kill(old, signal.SIGKILL)
    return wait_new_worker(d, old)


def kill_daemon(d: Daemon) -> None:
    """kill -9 of every process of blksnapd ``d`` (its worker and its
    supervisor, ours, by pid), then its dead mount and loop devices cleared."""
    from blksnap.tools import sandbox

    pids = [d.client.status()["worker_pid"], d.proc.pid]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        d.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pids[0]}") and time.monotonic() < deadline:
            time.sleep(0.02)
        d.client.close()
    finally:
        sandbox.cleanup_under(str(d.root))
