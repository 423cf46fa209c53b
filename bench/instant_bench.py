#!/usr/bin/env python3
"""Instant restore benchmark: ``blksnap restore --instant`` (the ``hydrate``
filter) against plain ``blksnap restore``, from the same encrypted backup in
the same repository, side by side in one run.

- **time to first read**: wall time from launching ``blksnap restore
  --instant --paused --to TARGET`` (a fresh target file; the background copy
  paused so it does not compete) until a 4 KiB ``O_DIRECT`` read of
  ``<mount>/dev/N`` at a random offset returns, its bytes checked against
  the source device's; for the 512 MiB device and for a 4 GiB device that is
  mostly zeroes (to show the time does not grow with the size). The offset is
  drawn from the chunks that hold data, so the read always fetches a chunk;
- **hydration throughput ÷ plain restore throughput**: hydration is timed
  from launching ``blksnap restore --instant`` until ``device list`` shows the
  hydration "done" (polled every 50 ms), plain restore is the command's wall
  time; fresh targets, the order alternates between trials (the repository's
  page cache is not dropped: alternating keeps it from favouring either),
  the ratio is taken within a trial; the hydrated target's sha256 is checked
  against the source device's;
- **random 4 KiB read latency** of an instant restore (paused): ``O_DIRECT``
  reads at random 4 KiB-aligned offsets, each in a distinct 1 MiB chunk not
  read before (data chunks: each fetches its chunk from the repository; zero
  chunks: the index says they are zero, nothing is fetched), then reads of
  those chunks again (already hydrated); and, in process, what a fill is made
  of (fetch + check + decrypt + decompress of a chunk, its write to the
  target).

``run_instant_bench(quick, progress)`` returns the Markdown section
(``bench/run.py`` hooks it in); ``python bench/instant_bench.py [--quick]``
runs it alone.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import Spread, main_with_output, table  # noqa: E402
from repo_bench import cli, synthetic  # noqa: E402

from blksnap.backup.repo import Repository  # noqa: E402
from blksnap.backup.source import BackupSource  # noqa: E402
from blksnap.engine.hydrate import FETCHERS  # noqa: E402
from blksnap.tools import sandbox  # noqa: E402

SECTION = "## Instant restore and mounted backups"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
IO = 4 * KiB
POLL = 0.05
#: Seconds a hydration may take before the benchmark gives up on it.
DEADLINE = 300.0


class BenchError(RuntimeError):
    """Something that makes a measurement meaningless."""


def make_device(path: Path, size: int, read: Callable[[int, int], bytes]) -> list[int]:
    """Write ``read``'s bytes to a sparse file (zero pieces left as holes);
    the indexes of the 1 MiB pieces that hold data."""
    return _write_pieces(path, size, read, 1)


def make_sparse(path: Path, size: int, seed: int) -> list[int]:
    """A mostly-zero device: the synthetic data in one 1 MiB piece in 32."""
    return _write_pieces(path, size, synthetic(size, seed), 32)


def _write_pieces(path: Path, size: int, read: Callable[[int, int], bytes], step: int) -> list[int]:
    """A sparse file of ``size`` holding every ``step``-th 1 MiB piece of
    ``read``; the indexes of the pieces that hold data."""
    data = []
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size // MiB, step):
            piece = read(i * MiB, MiB)
            if piece.count(0) != MiB:
                f.seek(i * MiB)
                f.write(piece)
                data.append(i)
        f.flush()
        os.fsync(f.fileno())
    return data


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


class Instant:
    """One daemon, one encrypted repository with a backup of both devices."""

    def __init__(self, work: Path, size: int, big: int, seed: int) -> None:
        self.work, self.size, self.big = work, size, big
        self.rng = random.Random(seed)
        self.served: set[str] = set()
        self.src_fd = self.big_fd = -1
        self.targets = 0
        self.box = sandbox.start(work / "daemon")
        try:
            self._setup(seed)
        except BaseException:
            self.close()
            raise

    def _setup(self, seed: int) -> None:
        size, big, work = self.size, self.big, self.work
        self.src = work / "src.img"
        self.data = make_device(self.src, size, synthetic(size, seed))
        self.zero = sorted(set(range(size // MiB)) - set(self.data))
        self.big_src = work / "big.img"
        self.big_data = make_sparse(self.big_src, big, seed + 1)
        self.src_fd = os.open(self.src, os.O_RDONLY)
        self.big_fd = os.open(self.big_src, os.O_RDONLY)
        self.src_sha = sha256(self.src)
        self.repo = work / "repo"
        self.kf = work / "repo.key"
        c = self.box.client
        for name, path in (("d0", self.src), ("b0", self.big_src)):
            c.add_device(str(path), name)
            self.served.add(name)
            c.attach(name)
        cli(self.box, "key", "create", "--repo", str(self.repo), "--key-file", str(self.kf))
        self.backup_s, doc = cli(
            self.box, "backup", "-d", "d0", "b0", "--repo", str(self.repo),
            "--key-file", str(self.kf), "--full", "--no-progress",
        )  # fmt: skip
        self.backup_id = doc.get("id") or doc.get("backup")
        # The restores serve the backup's device names: the sources go.
        for name in ("d0", "b0"):
            c.remove_device(name)
            self.served.discard(name)

    def repo_args(self) -> list[str]:
        return ["--repo", str(self.repo), "--key-file", str(self.kf), "-b", "latest"]

    def target(self) -> Path:
        self.targets += 1
        return self.work / f"target-{self.targets}"

    def instant(self, name: str, to: Path, paused: bool) -> float:
        args = ["restore", "--instant", *self.repo_args(), "-d", name, "--to", str(to)]
        self.served.add(name)  # (before: a command that fails half-way may leave it)
        dt, _ = cli(self.box, *args, *(["--paused"] if paused else []))
        return dt

    def remove(self, name: str, target: Path | None = None) -> None:
        if name in self.served:
            self.box.client.remove_device(name)
            self.served.discard(name)
        if target is not None:
            target.unlink(missing_ok=True)

    def device(self, name: str) -> dict:
        for d in self.box.client.devices():
            if d["name"] == name:
                return d
        raise BenchError(f"no device {name}")

    def expected(self, name: str, offset: int) -> bytes:
        return os.pread(self.src_fd if name == "d0" else self.big_fd, IO, offset)

    def close(self) -> None:
        try:
            for name in sorted(self.served):
                try:
                    self.box.client.remove_device(name)
                except Exception:  # (the daemon's stop removes it anyway)
                    pass
        finally:
            for fd in (self.src_fd, self.big_fd):
                if fd >= 0:
                    os.close(fd)
            self.src_fd = self.big_fd = -1
            self.box.stop()


class DirectReader:
    """4 KiB ``O_DIRECT`` reads of a served device into an aligned buffer."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, IO)

    def read(self, offset: int) -> bytes:
        n = os.preadv(self.fd, [self.buf], offset)
        if n != IO:
            raise BenchError(f"short O_DIRECT read at {offset}: {n} bytes")
        return bytes(self.buf)

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def first_read(b: Instant, name: str, problems: list[str]) -> tuple[float, float]:
    """(command → first read returned, the command alone), in seconds."""
    data = b.data if name == "d0" else b.big_data
    offset = b.rng.choice(data) * MiB + b.rng.randrange(MiB // IO) * IO
    to = b.target()
    try:
        t0 = time.perf_counter()
        cmd = b.instant(name, to, paused=True)
        r = DirectReader(f"{b.box.mount}/dev/{name}")
        try:
            got = r.read(offset)
            dt = time.perf_counter() - t0
        finally:
            r.close()
        if got != b.expected(name, offset):
            problems.append(f"first read of {name} at {offset}: bytes differ from the source")
        finish(b, name, to, problems)
    finally:
        b.remove(name, to)
    return dt, cmd


def wait_done(b: Instant, name: str, t0: float) -> tuple[float, float]:
    """Poll ``device list`` every 50 ms: (seconds since ``t0`` until the
    hydration shows "done", until the filter is off the stack)."""
    t_done = None
    while True:
        d = b.device(name)
        h = d.get("hydration") or {}
        now = time.perf_counter() - t0
        if h.get("state") == "failed":
            raise BenchError(f"{name}: hydration failed: {h.get('error')}")
        if h.get("state") == "done" and t_done is None:
            t_done = now
        if t_done is not None and "hydrate" not in d["filters"]:
            return t_done, now
        if now > DEADLINE:
            raise BenchError(f"{name}: hydration not done after {DEADLINE:.0f} s: {h}")
        time.sleep(POLL)


def finish(b: Instant, name: str, to: Path, problems: list[str]) -> None:
    """Resume a paused hydration and let it end before the device goes.

    (Removing a device whose hydration is not done leaves the live map in
    blksnapd's supervisor; the next ``restore --instant`` of the same backup
    device, even onto a fresh target, would take its units as done and never
    copy them.) The target of ``d0`` is then checked against the source."""
    b.box.client.ctl(name, "hydrate", "resume")
    wait_done(b, name, time.perf_counter())
    b.remove(name)
    if name == "d0" and sha256(to) != b.src_sha:
        problems.append("target of a paused, read, resumed hydration: sha256 differs")


def hydrate(b: Instant, problems: list[str]) -> tuple[float, float]:
    """(command → "done", command → the filter off the stack), in seconds."""
    to = b.target()
    try:
        t0 = time.perf_counter()
        b.instant("d0", to, paused=False)
        t_done, t_off = wait_done(b, "d0", t0)
        b.remove("d0")
        if sha256(to) != b.src_sha:
            problems.append("hydrated target: sha256 differs from the source device's")
    finally:
        b.remove("d0", to)
    return t_done, t_off


def plain(b: Instant, problems: list[str]) -> float:
    to = b.target()
    try:
        args = ["restore", *b.repo_args(), "-d", "d0", "--to", str(to), "--no-progress"]
        dt, doc = cli(b.box, *args)
        if sha256(to) != b.src_sha or doc.get("sha256") not in (None, b.src_sha):
            problems.append("plain restore: sha256 differs from the source device's")
    finally:
        to.unlink(missing_ok=True)
    return dt


def latency(b: Instant, n: int, problems: list[str]) -> dict[str, list[float]]:
    """Milliseconds per 4 KiB O_DIRECT read: data chunks not hydrated, zero
    chunks not hydrated, the same data chunks again (hydrated)."""
    rng = b.rng
    chunks = rng.sample(b.data, min(n, len(b.data)))
    zeros = rng.sample(b.zero, min(n, len(b.zero)))
    out: dict[str, list[float]] = {"cold": [], "zero": [], "warm": []}
    to = b.target()
    try:
        b.instant("d0", to, paused=True)
        r = DirectReader(f"{b.box.mount}/dev/d0")
        try:
            work = [("cold", c) for c in chunks] + [("zero", c) for c in zeros]
            rng.shuffle(work)
            work += [("warm", c) for c in chunks]
            for kind, c in work:
                off = c * MiB + rng.randrange(MiB // IO) * IO
                t0 = time.perf_counter()
                got = r.read(off)
                out[kind].append((time.perf_counter() - t0) * 1000)
                if got != b.expected("d0", off):
                    problems.append(f"read at {off} ({kind}): bytes differ from the source")
        finally:
            r.close()
        h = b.device("d0")["hydration"]
        want = (len(chunks) + len(zeros)) * MiB
        if h["state"] != "paused" or h["done"] != want:
            problems.append(
                f"after the latency reads: hydration {h['state']}, {h['done']} bytes done, "
                f"not {want} (each read fills its 1 MiB chunk)"
            )
        finish(b, "d0", to, problems)
    finally:
        b.remove("d0", to)
    return out


def pieces(b: Instant, n: int) -> dict[str, float]:
    """In process, the parts of a fill: the median milliseconds of fetching
    (reading, checking, decrypting, decompressing) one 1 MiB chunk and of
    writing it to a file; and the seconds the copy's fetches alone take for
    every data chunk of the device, ``FETCHERS`` threads as the copy has."""
    repo = Repository.open(str(b.repo), key_file=str(b.kf))
    fetch, write = [], []
    scratch = b.work / "scratch"
    fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    src = BackupSource(repo, b.backup_id or "latest", "d0", cache_bytes=0)
    try:
        for c in b.rng.sample(b.data, min(n, len(b.data))):
            t0 = time.perf_counter()
            data = src.read_unit(c)
            t1 = time.perf_counter()
            os.pwrite(fd, data, c * MiB)
            t2 = time.perf_counter()
            fetch.append((t1 - t0) * 1000)
            write.append((t2 - t1) * 1000)
        with ThreadPoolExecutor(FETCHERS) as pool:
            t0 = time.perf_counter()
            list(pool.map(src.read_unit, b.data))
            fetch_all = time.perf_counter() - t0
    finally:
        src.close()
        os.close(fd)
        scratch.unlink()
    return {
        "fetch": statistics.median(fetch),
        "write": statistics.median(write),
        "fetch_all": fetch_all,
    }


def run_instant_bench(quick: bool, progress: Callable[[str], None] = print) -> str:
    why = sandbox.why_not()
    if why:
        return f"{SECTION}\n\nSkipped: {why}.\n"
    t_start = time.perf_counter()
    size = (64 if quick else 512) * MiB
    big = (1 if quick else 4) * GiB
    trials = 1 if quick else 3
    per_trial = 20 if quick else 100  # reads of each kind per trial
    work = Path(tempfile.mkdtemp(prefix="blksnap-ibench-", dir="/var/tmp"))
    ttfr: dict[str, list[float]] = {"d0": [], "b0": []}
    cmd_s: dict[str, list[float]] = {"d0": [], "b0": []}
    ratio, hyd_rate, hyd_flushed_rate, plain_rate = [], [], [], []
    lat: dict[str, list[float]] = {"cold": [], "zero": [], "warm": []}
    problems: list[str] = []
    b = None
    try:
        b = Instant(work, size, big, seed=17)
        progress(
            f"instant: devices made, full backup of {size // MiB} MiB + {big // GiB} GiB "
            f"in {b.backup_s:.1f} s"
        )
        for t in range(trials):
            names = ["d0", "b0"] if t % 2 == 0 else ["b0", "d0"]
            for name in names:
                dt, cmd = first_read(b, name, problems)
                ttfr[name].append(dt)
                cmd_s[name].append(cmd)
            res: dict[str, float] = {}
            for who in ["instant", "plain"] if t % 2 == 0 else ["plain", "instant"]:
                if who == "instant":
                    res[who], flushed = hydrate(b, problems)
                    hyd_flushed_rate.append(size / flushed)
                else:
                    res[who] = plain(b, problems)
            ratio.append(res["plain"] / res["instant"])
            hyd_rate.append(size / res["instant"])
            plain_rate.append(size / res["plain"])
            for kind, ms in latency(b, per_trial, problems).items():
                lat[kind] += ms
            progress(
                f"instant trial {t + 1}/{trials}: first read {ttfr['d0'][-1]:.2f} s "
                f"({size // MiB} MiB), {ttfr['b0'][-1]:.2f} s ({big // GiB} GiB); hydration "
                f"{hyd_rate[-1] / MiB:.0f} vs restore {plain_rate[-1] / MiB:.0f} MiB/s; "
                f"cold 4 KiB read {statistics.median(lat['cold']):.1f} ms"
            )
        parts = pieces(b, per_trial // 2)
        startup = [cli(b.box, "device", "list")[0] for _ in range(3)]
    finally:
        if b is not None:
            b.close()
        shutil.rmtree(work, ignore_errors=True)

    def row(label: str, values: list[float], unit: float, fmt: str, target: str) -> list[str]:
        return [
            label,
            f"{statistics.median(values) * unit:{fmt}}",
            f"{min(values) * unit:{fmt}}-{max(values) * unit:{fmt}}",
            target,
        ]

    rr = Spread.of(ratio)
    cold = statistics.median(lat["cold"])
    lines = [
        SECTION,
        "",
        f"One {size // MiB} MiB device (a quarter random, a quarter text, half zeroes, "
        f"synthetic() of repo_bench) and one {big // GiB} GiB device (the same data in one "
        "1 MiB piece in 32, the rest zeroes), backed up in one session into an encrypted "
        "repository (`key create --key-file`, default chunk size 1 MiB, zstd level 1) on the "
        f"same file system as the targets; {trials} trial(s), instant and plain restore in "
        f"alternating order within a trial. {os.cpu_count()} CPUs. Section time "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
        table(
            ["", "instant MiB/s", "plain restore MiB/s", "ratio (≥ target)", "range"],
            [
                [
                    "hydration, command → done (target 0.8)",
                    f"{statistics.median(hyd_rate) / MiB:.0f}",
                    f"{statistics.median(plain_rate) / MiB:.0f}",
                    rr.ratio_text(),
                    rr.range_text(),
                ],
            ],
        ),
        "",
        table(
            ["measure", "median", "range", "target"],
            [
                row(
                    f"time to first read, {size // MiB} MiB device (s)", ttfr["d0"], 1, ".2f", "≤ 1"
                ),
                row(
                    f"time to first read, {big // GiB} GiB device (s)", ttfr["b0"], 1, ".2f", "≤ 1"
                ),
                row(
                    "of which `restore --instant --paused` (s)",
                    cmd_s["d0"] + cmd_s["b0"],
                    1,
                    ".2f",
                    "",
                ),
                row(
                    "hydration until the filter is off the stack (flushed): MiB/s",
                    hyd_flushed_rate,
                    1 / MiB,
                    ".0f",
                    "",
                ),
            ],
        ),
        "",
        table(
            ["4 KiB O_DIRECT read of the instant-restored device", "reads", "median ms", "p99 ms"],
            [
                [label, str(len(lat[k])), f"{statistics.median(lat[k]):.2f}", f"{p99(lat[k]):.2f}"]
                for k, label in (
                    ("cold", "not hydrated, data chunk (fetched from the repository)"),
                    ("zero", "not hydrated, zero chunk (nothing fetched)"),
                    ("warm", "already hydrated"),
                )
            ],
        ),
        "",
        "Time to first read is the wall time from launching `blksnap restore --instant "
        "--paused` onto a fresh target file until a 4 KiB `O_DIRECT` read of "
        "`<mount>/dev/N`, at a random offset in a chunk holding data, has returned (its "
        "bytes checked). Hydration is timed from launching `blksnap restore --instant` until "
        "`device list` shows it done (polled every 50 ms); plain restore is "
        "`blksnap restore` (written and synced); both sha256-checked against the source "
        "device. Each latency read is in a distinct 1 MiB chunk not read before "
        f"({per_trial} of each kind per trial, the copy paused); the hydrated reads hit the "
        "same chunks again. After each first read and each latency run the copy is resumed "
        "and the target, once hydrated, sha256-checked as well.",
        "",
        f"Where the time goes: a cold read's {cold:.2f} ms hold a chunk fetch (in process, "
        "the same repository, no daemon: reading, checking, decrypting and decompressing a "
        f"1 MiB chunk {parts['fetch']:.2f} ms), its write to the target ({parts['write']:.2f} "
        "ms in process, into the page cache) and a round trip through FUSE and the engine (a "
        f"hydrated read: {statistics.median(lat['warm']):.2f} ms). Fetching every data chunk "
        f"of the device with {FETCHERS} threads, as the copy does, takes "
        f"{parts['fetch_all']:.2f} s in process, of the hydration's "
        f"{size / statistics.median(hyd_rate):.2f} s. Every "
        "`blksnap` command pays a fixed start-up cost (Python, imports): "
        f"{statistics.median(startup) * 1000:.0f} ms here (`blksnap device list`), part "
        "of the time to first read and of both restores' times.",
        "",
    ]
    if problems:
        lines += ["**Problems seen**:", "", *(f"- {p}" for p in problems), ""]
    return "\n".join(lines)


def main() -> int:
    return main_with_output(__doc__, run_instant_bench)


if __name__ == "__main__":
    sys.exit(main())
