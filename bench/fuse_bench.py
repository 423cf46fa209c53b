#!/usr/bin/env python3
"""Block-layer benchmark: fio on loop devices, blksnapd's FUSE front-end
against the raw backing file and against a do-nothing pyfuse3 file system.

Everything is measured side by side in one run, in interleaved trials (every
variant once per trial, in a fresh random order), and reported as ratios
taken within a trial; the report gives the median over trials and the range.

Variants (each a loop device, 4096-byte sectors; fio with ``ioengine=libaio``,
``direct=1``, queue depth 32):

- ``raw``: a loop device over a plain backing file, attached exactly as
  blksnapd attaches its own (``blksnap.control.loop.attach``: direct I/O on). This is
  the reference of the targets: the same loop device with blksnapd taken out.
- ``raw-buffered``: the same without direct I/O: the loop device writes into
  the backing file's page cache, which is where blksnapd's engine writes go
  too. Shown for scale, not used by the targets.
- ``null``: a loop device (direct I/O) over ``bench/nullfs.py``, a pyfuse3
  file system whose write returns at once: the ceiling of any pyfuse3
  front-end on this machine.
- ``pass``: blksnapd serving a device with no filter, loop device from
  ``blksnap device add --loop``.
- ``tracker``: the same with the ``blksnap`` filter attached (CBT, no snapshot).
- snapshot taken: first writes (every chunk copied to diff storage), then
  rewrites (chunks already stored); image reads vs device reads.

``bench/run.py`` runs it after the engine sections (``make bench``); run alone
it prints the section (``--output`` writes it to a file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import KiB, MiB, Spread, incompressible_file, size_text, table

from blksnap.control import loop as losetup
from blksnap.control.client import Client
from blksnap.errors import BlksnapError
from blksnap.tools import sandbox

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECTION = "## Block layer: fio on loop devices"

QD = 32


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    rw: str
    bs: int

    @property
    def is_read(self) -> bool:
        return "read" in self.rw


SEQ_W = Workload("seqw", "seq 1 MiB write", "write", 1 * MiB)
RAND_W = Workload("randw", "rand 4 KiB write", "randwrite", 4 * KiB)
SEQ_R = Workload("seqr", "seq 1 MiB read", "read", 1 * MiB)


@dataclass(frozen=True)
class Result:
    """One fio run."""

    bw: float  # bytes per second
    iops: float
    ios: int
    seconds: float

    def rate(self, wl: Workload) -> float:
        return self.iops if wl is RAND_W else self.bw

    def text(self, wl: Workload) -> str:
        if wl is RAND_W:
            return f"{self.iops / 1000:,.1f} kIOPS"
        return f"{self.bw / MiB:,.0f} MiB/s"


@dataclass(frozen=True)
class Config:
    size: int
    runtime: float
    trials: int
    warmup: bool
    tmpdir: str
    seed: int
    quick: bool
    daemon_args: tuple[str, ...] = ()
    #: Restrict the trials to these variants (and sessions); empty: all.
    only: tuple[str, ...] = ()


class BenchError(RuntimeError):
    pass


def why_not() -> str | None:
    """Why this benchmark cannot run here, or None."""
    why = sandbox.why_not()
    if why:
        return why
    for tool in ("fio", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not (BIN / "blksnapd").exists():
        return f"no blksnapd next to {sys.executable}"
    return None


# -- fio ----------------------------------------------------------------------------


def fio(args: list[str]) -> dict:
    cmd = ["fio", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stderr}{out.stdout[-2000:]}")
    text = out.stdout
    return json.loads(text[text.index("{") :])  # fio may print notes before the JSON


def parse(doc: dict, wl: Workload) -> Result:
    job = doc["jobs"][0]
    side = job["read" if wl.is_read else "write"]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    return Result(
        float(side["bw_bytes"]),
        float(side["iops"]),
        int(side["total_ios"]),
        float(side["runtime"]) / 1000.0,
    )


def fio_job(target: str, wl: Workload, size: int) -> list[str]:
    """fio's arguments for ``wl`` over the first ``size`` bytes of ``target``."""
    return [
        "--name=bench",
        f"--filename={target}",
        "--ioengine=libaio",
        "--direct=1",
        f"--iodepth={QD}",
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--size={size}",
    ]


def fio_timed(target: str, wl: Workload, size: int, runtime: float) -> Result:
    """``runtime`` seconds of ``wl`` over the first ``size`` bytes of ``target``."""
    args = [
        *fio_job(target, wl, size),
        "--time_based",
        f"--runtime={round(runtime * 1000)}ms",
        "--norandommap",
        "--randrepeat=0",
    ]
    return parse(fio(args), wl)


def fio_once(target: str, wl: Workload, size: int) -> Result:
    """``wl`` once over ``size`` bytes (sequential first writes)."""
    return parse(fio(fio_job(target, wl, size)), wl)


def fio_replay(log: str) -> Result:
    """Replay an iolog as fast as the device allows (random first writes)."""
    args = [
        "--name=bench",
        "--ioengine=libaio",
        "--direct=1",
        f"--iodepth={QD}",
        f"--read_iolog={log}",
        "--replay_no_stall=1",
    ]
    return parse(fio(args), RAND_W)


def first_write_log(path: str, target: str, size: int, chunk: int, rng: random.Random) -> int:
    """An fio iolog: one 4 KiB write at a random aligned offset inside every
    chunk of the device, chunks in random order, so every write copies
    exactly one chunk nobody has copied yet. Returns the number of writes."""
    chunks = list(range(size // chunk))
    rng.shuffle(chunks)
    per = chunk // RAND_W.bs
    with open(path, "w") as f:
        f.write(f"fio version 2 iolog\n{target} add\n{target} open\n")
        for c in chunks:
            f.write(f"{target} write {c * chunk + rng.randrange(per) * RAND_W.bs} {RAND_W.bs}\n")
        f.write(f"{target} close\n")
    return len(chunks)


# -- the rig: files, processes, loop devices ---------------------------------------------


class Rig:
    """blksnapd with three devices, the do-nothing file system, and the raw
    loop devices, all under one work directory; ``close`` removes every
    loop device, mount and process it made (processes by pid)."""

    DEVICES = ("pass", "tracker", "snap")

    def __init__(self, cfg: Config, workdir: str, rng: random.Random) -> None:
        self.cfg = cfg
        self.dir = workdir
        self.rng = rng
        self.my_loops: list[str] = []
        self.box: sandbox.Sandbox | None = None
        self.client: Client | None = None
        self.null: subprocess.Popen[bytes] | None = None
        self.files: dict[str, str] = {}
        self.loops: dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # -- start --

    def start(self, progress: Callable[[str], None]) -> None:
        size = self.cfg.size
        for name in ("raw", "raw-buffered", *self.DEVICES, "storage"):
            self.files[name] = self.path(f"{name}.img")
            incompressible_file(self.files[name], size, self.rng)
        progress(f"fio: {len(self.files)} files of {size_text(size)} in {self.dir}")
        self.loops["raw"] = self._loop(self.files["raw"], direct_io=True)
        self.loops["raw-buffered"] = self._loop(self.files["raw-buffered"], direct_io=False)
        self._start_null()
        self._start_daemon()
        assert self.client is not None
        for name in self.DEVICES:
            self.loops[name] = self.client.add_device(self.files[name], name, loop=True)["loop"]
        self.client.attach("tracker")
        self.client.attach("snap")
        for name, lp in self.loops.items():
            dio = Path(f"/sys/block/{os.path.basename(lp)}/loop/dio").read_text().strip()
            want = "0" if name == "raw-buffered" else "1"
            if dio != want:
                raise BenchError(f"{name}: {lp} has dio={dio}, expected {want}")

    def _loop(self, path: str, *, direct_io: bool) -> str:
        lp = losetup.attach(path, direct_io=direct_io)
        self.my_loops.append(lp)
        return lp

    def _start_null(self) -> None:
        mnt = self.path("null-mnt")
        os.makedirs(mnt)
        log = open(self.path("nullfs.log"), "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "nullfs.py"), mnt, "--size", str(self.cfg.size)],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.null = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise BenchError(f"nullfs did not start: {Path(self.path('nullfs.log')).read_text()}")
        self.loops["null"] = self._loop(os.path.join(mnt, "disk"), direct_io=True)

    def _start_daemon(self) -> None:
        """blksnapd in a sandbox of the work directory (its socket, mount,
        state and log there too)."""
        try:
            self.box = sandbox.start(
                self.dir,
                ["--log-level", "WARNING", *self.cfg.daemon_args],
                timeout=30,
                client_timeout=300,
            )
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        self.client = self.box.client

    def daemon_log(self) -> str:
        try:
            return Path(self.path("blksnapd.log")).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- between runs --

    def settle(self) -> None:
        """Untimed: write back what the last run dirtied, so that no variant
        pays for another's writeback."""
        for path in self.files.values():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def check_alive(self) -> None:
        for proc in (self.null, self.box.proc if self.box else None):
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{proc.args[0]} exited with {proc.returncode}")

    # -- stop --

    def close(self) -> None:
        """Our loop devices, the do-nothing fs (by its pid), then blksnapd:
        nothing left mounted or attached under the work directory."""
        errors: list[str] = []
        for lp in reversed(self.my_loops):
            with contextlib.suppress(BlksnapError):
                losetup.detach(lp)
        proc = self.null
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                errors.append(f"{proc.args[0]} (pid {proc.pid}) killed")
                proc.kill()
                proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        if self.box is not None and self.box.proc.poll() is None:
            try:
                self.box.stop()
            except BlksnapError as exc:
                errors.append(f"blksnapd stop: {exc}")
        sandbox.cleanup_under(self.dir)
        if errors:
            print("fuse bench cleanup: " + "; ".join(errors), file=sys.stderr)


# -- trials ------------------------------------------------------------------------------


@dataclass
class Trial:
    #: (variant, workload key) -> results (the passthrough runs twice)
    runs: dict[tuple[str, str], list[Result]] = field(default_factory=dict)

    def add(self, variant: str, wl: Workload, result: Result) -> None:
        self.runs.setdefault((variant, wl.key), []).append(result)

    def rate(self, variant: str, wl: Workload) -> float | None:
        """Mean rate of the variant's runs in this trial (None: not run)."""
        rs = self.runs.get((variant, wl.key))
        return statistics.fmean(r.rate(wl) for r in rs) if rs else None


class FuseBench:
    def __init__(self, cfg: Config, rig: Rig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rig = rig
        self.rng = rng
        self.trials: list[Trial] = []
        self.chunk_size = 0
        self.first_ios = 0
        self.verbose = bool(os.environ.get("BLKSNAP_BENCH_VERBOSE"))
        self.costs: Costs | None = None
        #: 1-minute load average before and after the trials (this machine is shared).
        self.load: list[float] = []

    @property
    def client(self) -> Client:
        assert self.rig.client is not None
        return self.rig.client

    def timed(self, variant: str, wl: Workload, runtime: float | None = None) -> Result:
        t0 = time.perf_counter()
        res = fio_timed(self.rig.loops[variant], wl, self.cfg.size, runtime or self.cfg.runtime)
        t1 = time.perf_counter()
        self.rig.settle()
        if self.verbose:
            print(
                f"  {variant:13} {wl.label:17} {res.text(wl):>13}  fio {t1 - t0:.1f}s"
                f" settle {time.perf_counter() - t1:.1f}s",
                file=sys.stderr,
            )
        return res

    # -- snapshot sessions --

    def _create(self, loop: bool) -> tuple[str, dict]:
        sid = self.client.snapshot_create(["snap"], storage=self.rig.files["storage"])
        take = self.client.snapshot_take(sid, loop=loop)
        return sid, take

    def _stored(self, sid: str) -> tuple[str, int, int]:
        snap = self.client.snapshot_collect(sid)[0]
        dev = snap["devices"][0]
        return snap["state"], int(dev["chunks_stored"]), int(snap["chunk_size"])

    def _check_all_stored(self, sid: str, what: str) -> None:
        state, stored, cs = self._stored(sid)
        want = self.cfg.size // cs
        if state != "taken" or stored != want:
            raise BenchError(f"{what}: snapshot {state}, {stored} chunks stored, not {want}")

    def seq_session(self, out: Trial) -> None:
        """Take with images on loop devices: image vs device reads with no
        chunk stored, sequential first writes, rewrites, image reads again."""
        sid, take = self._create(loop=True)
        img = take["images"]["snap"]["loop"]
        dev = self.rig.loops["snap"]
        try:
            _, stored, cs = self._stored(sid)
            self.chunk_size = cs
            if stored:
                raise BenchError(f"fresh snapshot with {stored} chunks stored")
            order = [("dev-read", dev), ("image-read", img)]
            self.rng.shuffle(order)
            for key, target in order:
                out.add(key, SEQ_R, fio_timed(target, SEQ_R, self.cfg.size, self.cfg.runtime))
            out.add("snap-first", SEQ_W, fio_once(dev, SEQ_W, self.cfg.size))
            self._check_all_stored(sid, "sequential first writes")
            self.rig.settle()
            out.add("snap-rewrite", SEQ_W, self.timed("snap", SEQ_W))
            out.add(
                "image-read-stored", SEQ_R, fio_timed(img, SEQ_R, self.cfg.size, self.cfg.runtime)
            )
            self._check_all_stored(sid, "sequential rewrites")
        finally:
            self.client.snapshot_destroy(sid)
        self.rig.settle()

    def rand_session(self, out: Trial) -> None:
        """Random 4 KiB first writes (one per chunk), then rewrites."""
        sid, _ = self._create(loop=False)
        try:
            _, _, cs = self._stored(sid)
            log = self.rig.path("first.iolog")
            self.first_ios = first_write_log(
                log, self.rig.loops["snap"], self.cfg.size, cs, self.rng
            )
            out.add("snap-first", RAND_W, fio_replay(log))
            self._check_all_stored(sid, "random first writes")
            self.rig.settle()
            out.add("snap-rewrite", RAND_W, self.timed("snap", RAND_W))
            self._check_all_stored(sid, "random rewrites")
        finally:
            self.client.snapshot_destroy(sid)
        self.rig.settle()

    # -- one trial --

    def trial(self) -> Trial:
        out = Trial()
        # The passthrough twice: it is the reference of most ratios.
        jobs: list[tuple[str, Workload | None]] = [
            (v, wl)
            for v in ("raw", "raw-buffered", "null", "pass", "pass", "tracker")
            for wl in (SEQ_W, RAND_W)
        ]
        jobs += [("seq-session", None), ("rand-session", None)]
        if self.cfg.only:
            jobs = [j for j in jobs if j[0] in self.cfg.only]
        self.rng.shuffle(jobs)
        for variant, wl in jobs:
            self.rig.check_alive()
            if variant == "seq-session":
                self.seq_session(out)
            elif variant == "rand-session":
                self.rand_session(out)
            else:
                assert wl is not None
                out.add(variant, wl, self.timed(variant, wl))
        return out

    def warm_up(self) -> None:
        """Every front-end once, briefly: thread pools, caches, code paths."""
        for variant in ("raw", "raw-buffered", "null", "pass", "tracker", "snap"):
            for wl in (SEQ_W, RAND_W):
                self.timed(variant, wl, runtime=0.5)

    def run(self, progress: Callable[[str], None]) -> None:
        self.load.append(os.getloadavg()[0])
        if self.cfg.warmup:
            t0 = time.perf_counter()
            self.warm_up()
            progress(f"fio warm-up: {time.perf_counter() - t0:.1f}s")
        for t in range(self.cfg.trials):
            t0 = time.perf_counter()
            self.trials.append(self.trial())
            progress(f"fio trial {t + 1}/{self.cfg.trials}: {time.perf_counter() - t0:.1f}s")
        self.load.append(os.getloadavg()[0])


# -- in process: what one request costs the event loop's thread -------------------------


@dataclass
class Costs:
    """Microseconds per call, medians of interleaved rounds, in this process."""

    pwrite: float = 0.0
    pwrite_dirty: float = 0.0
    #: The clean-page pwrite again, while fio drives the do-nothing fs.
    pwrite_busy: float = 0.0
    engine: float = 0.0
    engine_tracker: float = 0.0
    pool_handoff: float = 0.0
    to_thread_handoff: float = 0.0


def request_costs(
    cfg: Config, workdir: str, rng: random.Random, busy_target: str | None = None
) -> Costs:
    """The pieces of a 4 KiB write on the loop thread, measured without FUSE:
    a bare ``os.pwrite``, ``Device.write`` with no filter and with the tracker
    (what the front-end's fast path runs), and the round trip of a no-op
    through the front-end's worker pool and through ``trio.to_thread``.

    Every write goes to a distinct page, and the files are written back before
    each round, so a write dirties a clean cached page, as most writes of a
    short fio run do (dirtying a clean page costs the kernel far more than
    overwriting a dirty one; the bare ``pwrite`` is also timed on pages its
    own previous round left dirty, and while fio runs 4 KiB random writes on
    ``busy_target``, the do-nothing fs, so that the CPUs also carry FUSE and
    loop traffic as they do in the daemon)."""
    import trio

    import blksnap
    from blksnap.frontends.fuse import WorkerPool

    calls = 2000 if cfg.quick else 10000
    rounds = 3 if cfg.quick else 7
    size = min(cfg.size, 64 * MiB)
    eng = blksnap.Engine(os.path.join(workdir, "costs-state"))
    fds: list[int] = []
    try:
        devs = {}
        for name in ("plain", "engine", "engine_tracker"):
            path = os.path.join(workdir, f"costs-{name}.img")
            incompressible_file(path, size, rng)
            if name == "plain":
                fds.append(os.open(path, os.O_RDWR))
            else:
                devs[name] = eng.add_device(path, name=name)
        eng.attach("engine_tracker")
        data = rng.randbytes(RAND_W.bs)
        pages = size // RAND_W.bs
        offs = [p * RAND_W.bs for p in rng.sample(range(pages), min(calls, pages))]
        fd = fds[0]
        ops: dict[str, Callable[[int], object]] = {
            "pwrite": lambda off: os.pwrite(fd, data, off),
            "engine": lambda off: devs["engine"].write(off, data),
            "engine_tracker": lambda off: devs["engine_tracker"].write(off, data),
        }
        samples: dict[str, list[float]] = {
            k: [] for k in (*ops, "pwrite_dirty", "pool", "to_thread")
        }

        def timed_loop(op: Callable[[int], object]) -> float:
            t0 = time.perf_counter()
            for off in offs:
                op(off)
            return (time.perf_counter() - t0) / len(offs) * 1e6

        for _ in range(rounds):
            order = list(ops)
            rng.shuffle(order)
            for key in order:
                os.fsync(fd)
                for dev in devs.values():
                    dev.flush()
                samples[key].append(timed_loop(ops[key]))
                if key == "pwrite":
                    samples["pwrite_dirty"].append(timed_loop(ops[key]))

        pool = WorkerPool(4)

        def nothing() -> None:
            return None

        async def handoffs() -> None:
            n = calls // 4
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(n):
                    await pool.run(nothing)
                samples["pool"].append((time.perf_counter() - t0) / n * 1e6)
                t0 = time.perf_counter()
                for _ in range(n):
                    await trio.to_thread.run_sync(nothing)
                samples["to_thread"].append((time.perf_counter() - t0) / n * 1e6)

        try:
            trio.run(handoffs)
        finally:
            pool.close()
        if busy_target is not None:
            samples["pwrite_busy"] = busy_pwrite(busy_target, fd, offs, ops["pwrite"], rounds)
    finally:
        for fd in fds:
            os.close(fd)
        eng.close()
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    return Costs(
        pwrite=med["pwrite"],
        pwrite_dirty=med["pwrite_dirty"],
        pwrite_busy=med.get("pwrite_busy", float("nan")),
        engine=med["engine"],
        engine_tracker=med["engine_tracker"],
        pool_handoff=med["pool"],
        to_thread_handoff=med["to_thread"],
    )


def busy_pwrite(
    target: str, fd: int, offs: list[int], op: Callable[[int], object], rounds: int
) -> list[float]:
    """µs per clean-page ``pwrite`` while fio keeps ``target`` busy."""
    out: list[float] = []
    seconds = 1.0 + 0.3 * rounds
    proc = subprocess.Popen(
        [
            "fio",
            "--name=busy",
            f"--filename={target}",
            "--ioengine=libaio",
            "--direct=1",
            f"--iodepth={QD}",
            "--rw=randwrite",
            f"--bs={RAND_W.bs}",
            "--time_based",
            f"--runtime={round(seconds * 1000)}ms",
            "--norandommap",
            "--randrepeat=0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + seconds - 0.7
        while time.monotonic() < deadline or not out:
            os.fsync(fd)
            t0 = time.perf_counter()
            for off in offs:
                op(off)
            out.append((time.perf_counter() - t0) / len(offs) * 1e6)
    finally:
        proc.wait(timeout=120)
    return out


# -- report ------------------------------------------------------------------------------

LABELS = {
    "raw": "raw: loop (direct I/O) over the plain file",
    "raw-buffered": "raw, buffered: loop (no direct I/O) over the plain file",
    "null": "do-nothing pyfuse3 fs (write returns at once)",
    "pass": "blksnapd, no filter (passthrough)",
    "tracker": "blksnapd, tracker attached",
    "snap-first": "blksnapd, snapshot taken: first writes",
    "snap-rewrite": "blksnapd, snapshot taken: rewrites",
    "dev-read": "blksnapd device read (snapshot taken)",
    "image-read": "blksnapd image read, no chunk stored",
    "image-read-stored": "blksnapd image read, every chunk stored",
}


@dataclass(frozen=True)
class Ratio:
    label: str
    wl: Workload
    num: str
    den: str
    target: float | None

    def values(self, trials: Sequence[Trial]) -> list[float]:
        out = []
        for t in trials:
            a, b = t.rate(self.num, self.wl), t.rate(self.den, self.wl)
            if a is not None and b is not None:
                out.append(a / b)
        return out


RATIOS = (
    Ratio("passthrough ÷ raw", SEQ_W, "pass", "raw", 0.90),
    Ratio("passthrough ÷ raw", RAND_W, "pass", "raw", 0.20),
    Ratio("passthrough ÷ do-nothing fs", RAND_W, "pass", "null", 0.80),
    Ratio("passthrough ÷ do-nothing fs", SEQ_W, "pass", "null", None),
    Ratio("tracker ÷ passthrough", SEQ_W, "tracker", "pass", 0.95),
    Ratio("tracker ÷ passthrough", RAND_W, "tracker", "pass", 0.95),
    Ratio("image read ÷ device read (no chunk stored)", SEQ_R, "image-read", "dev-read", 0.90),
    Ratio(
        "image read ÷ device read (every chunk stored)",
        SEQ_R,
        "image-read-stored",
        "dev-read",
        None,
    ),
    Ratio("snapshot first writes ÷ passthrough", SEQ_W, "snap-first", "pass", None),
    Ratio("snapshot first writes ÷ passthrough", RAND_W, "snap-first", "pass", None),
    Ratio("snapshot rewrites ÷ passthrough", SEQ_W, "snap-rewrite", "pass", None),
    Ratio("snapshot rewrites ÷ passthrough", RAND_W, "snap-rewrite", "pass", None),
    Ratio("do-nothing fs ÷ raw", SEQ_W, "null", "raw", None),
    Ratio("do-nothing fs ÷ raw", RAND_W, "null", "raw", None),
    Ratio("passthrough ÷ raw, buffered", SEQ_W, "pass", "raw-buffered", None),
    Ratio("passthrough ÷ raw, buffered", RAND_W, "pass", "raw-buffered", None),
)


def median_result(trials: Sequence[Trial], variant: str, wl: Workload) -> str:
    rate = median_rate(trials, variant, wl)
    if rate != rate:  # NaN: not run
        return "—"
    if wl is RAND_W:
        return f"{rate / 1000:,.1f} kIOPS"
    return f"{rate / MiB:,.0f} MiB/s"


def findings(bench: FuseBench) -> dict[str, float]:
    out = {}
    for r in RATIOS:
        vals = r.values(bench.trials)
        if vals:
            out[f"{r.label} / {r.wl.label}"] = statistics.median(vals)
    return out


def report(bench: FuseBench, elapsed: float) -> str:
    cfg = bench.cfg
    trials = bench.trials
    lines = [SECTION, ""]
    if cfg.quick:
        lines += ["**`--quick` smoke run: the numbers mean little.**", ""]
    lines += [
        "fio on loop devices, every variant side by side in one run. "
        f"fio: `ioengine=libaio`, `direct=1`, `iodepth={QD}`, one job; "
        f"{cfg.runtime:g} s per time-based run over a {size_text(cfg.size)} device; "
        f"{'a short warm-up of every variant, then ' if cfg.warmup else ''}"
        f"{cfg.trials} trial(s), every variant once per trial (the passthrough twice, "
        "its mean being the reference within the trial) in a fresh random order; "
        "ratios taken within a trial, median in bold, range over trials. Backing "
        "files are full of random data and written back (`fsync`) after every run, "
        "outside the timed region. Load average (1 min) before and after: "
        + " and ".join(f"{x:.2f}" for x in bench.load)
        + f" on {os.cpu_count()} CPUs.",
        "",
        "- **Raw** (the reference of the targets): a loop device over the plain "
        "backing file, attached as blksnapd attaches its own (`blksnap.control.loop.attach`: "
        "4096-byte sectors, direct I/O on); so the only difference from the blksnapd rows "
        "is the FUSE file and the daemon in between. Its writes go to the disk with "
        "O_DIRECT, while blksnapd's engine writes the backing file through the page "
        "cache, which flatters blksnapd on small writes; the buffered raw row (a loop "
        "device without direct I/O: also page-cache writes, one kernel worker) is given "
        "for scale.",
        "- **Do-nothing fs**: `bench/nullfs.py`, a pyfuse3 file system whose write "
        "returns at once, same mount options, same `direct_io` files, loop device with "
        "direct I/O, served by `pyfuse3.main` like blksnapd: the ceiling of a pyfuse3 "
        "front-end here.",
        "- **blksnapd**: started by the benchmark with its own socket, mount and state "
        "dir; devices added with `--loop`. *tracker*: `blksnap attach`. *Snapshot*: "
        "diff storage a preallocated file of the device's size; sequential first "
        "writes write the whole device once (every chunk copied), random first writes "
        f"replay an fio iolog of one 4 KiB write in every chunk ({bench.first_ios:,} "
        "writes, chunks in random order); rewrites then run on the same snapshot; the "
        "snapshot is checked to have every chunk stored and to be uncorrupted. Reads: "
        "the device and its image (loop device from `snapshot take --loop`) right "
        "after take, then the image again with every chunk in diff storage.",
        "",
    ]
    rows = []
    for r in RATIOS:
        vals = r.values(trials)
        if not vals:
            continue
        s = Spread.of(vals)
        if r.target is None:
            target, met = "—", ""
        else:
            target = f"≥ {r.target:.2f}"
            met = "yes" if s.median >= r.target else "**no**"
        rows.append(
            [
                r.label,
                r.wl.label,
                median_result(trials, r.num, r.wl),
                median_result(trials, r.den, r.wl),
                s.ratio_text(),
                s.range_text(),
                target,
                met,
            ]
        )
    lines += [
        table(
            ["ratio", "workload", "measured", "reference", "ratio", "range", "target", "met"], rows
        ),
        "",
    ]
    abs_rows = []
    for variant, label in LABELS.items():
        cells = [median_result(trials, variant, wl) for wl in (SEQ_W, RAND_W, SEQ_R)]
        if any(c != "—" for c in cells):
            abs_rows.append([label, *cells])
    lines += [
        "**Absolute numbers** (medians over the trials)",
        "",
        table(["variant", SEQ_W.label, RAND_W.label, SEQ_R.label], abs_rows),
        "",
    ]
    if bench.costs is not None:
        c = bench.costs
        lines += [
            "**One 4 KiB write, in process** (no FUSE, no fio: the pieces of a request "
            "on the event loop's thread; medians of interleaved rounds, µs per call)",
            "",
            table(
                ["what", "µs"],
                [
                    ["`os.pwrite` of 4 KiB dirtying a clean cached page", f"{c.pwrite:.1f}"],
                    ["`os.pwrite` of 4 KiB over a page already dirty", f"{c.pwrite_dirty:.1f}"],
                    [
                        "`os.pwrite` dirtying a clean page while fio drives the do-nothing fs",
                        f"{c.pwrite_busy:.1f}",
                    ],
                    ["`Device.write`, no filter (the fast path's engine call)", f"{c.engine:.1f}"],
                    ["`Device.write`, tracker attached", f"{c.engine_tracker:.1f}"],
                    [
                        "round trip of a no-op through the front-end's `WorkerPool` "
                        "(latency, one call at a time)",
                        f"{c.pool_handoff:.1f}",
                    ],
                    ["the same through `trio.to_thread.run_sync`", f"{c.to_thread_handoff:.1f}"],
                ],
            ),
            "",
        ]
    lines += notes(bench)
    lines += [f"_Block-layer section: {elapsed:.0f} s._", ""]
    return "\n".join(lines)


def median_rate(trials: Sequence[Trial], variant: str, wl: Workload) -> float:
    rs = [r for t in trials if (r := t.rate(variant, wl)) is not None]
    return statistics.median(rs) if rs else float("nan")


def per_request_us(trials: Sequence[Trial], variant: str, wl: Workload) -> float:
    """Microseconds per request at the median rate (queue depth hides the
    latency, so this is the cost of a request to the busiest thread)."""
    rate = median_rate(trials, variant, wl)
    if wl is not RAND_W:
        rate /= wl.bs
    return 1e6 / rate


def notes(bench: FuseBench) -> list[str]:
    f = findings(bench)
    trials = bench.trials

    def get(label: str, wl: Workload) -> float:
        return f.get(f"{label} / {wl.label}", float("nan"))

    costs = bench.costs
    us_null = per_request_us(trials, "null", RAND_W)
    us_pass = per_request_us(trials, "pass", RAND_W)
    us_trk = per_request_us(trials, "tracker", RAND_W)
    out = [
        "**Reading.** "
        f"The do-nothing file system reaches {get('do-nothing fs ÷ raw', SEQ_W):.2f} of raw "
        f"for 1 MiB sequential writes and {get('do-nothing fs ÷ raw', RAND_W):.2f} for 4 KiB "
        "random writes: that is what the FUSE round trip and pyfuse3's per-request work "
        "(a trio scheduling round with an epoll registration, a read of /dev/fuse, the "
        "handler, a reply written back, all on one Python thread holding the GIL) leave of "
        "the loop device, before blksnapd does anything: "
        f"{us_null:.0f} µs of that thread per 4 KiB request. blksnapd's passthrough reaches "
        f"{get('passthrough ÷ do-nothing fs', SEQ_W):.2f} (sequential) and "
        f"{get('passthrough ÷ do-nothing fs', RAND_W):.2f} (random) of that ceiling: "
        f"{us_pass:.0f} µs per 4 KiB request against {us_null:.0f} µs. The difference is "
        "the engine's write itself (bounds, gate, filter stack, a `pwrite` into the "
        "backing file's page cache"
        + (f": {costs.engine:.0f} µs in process, table above" if costs else "")
        + "). It runs on the event loop's thread (the front-end's fast path, "
        "`blksnap/frontends/fuse.py`), because handing it to a worker thread and back "
        "costs the loop more than the write. Writes that may copy chunks (device in a "
        "snapshot) and all reads go to worker threads: that is why snapshot rewrites, "
        "which copy nothing, still run well below the passthrough.",
        "",
    ]
    raw_rand = [r for t in trials if (r := t.rate("raw", RAND_W)) is not None]
    raw_seq = [r for t in trials if (r := t.rate("raw", SEQ_W)) is not None]
    if raw_rand and raw_seq:
        out += [
            "*The raw reference is the disk* (direct I/O), which other work on this "
            "machine shares: over the trials of this run it ranged from "
            f"{min(raw_rand) / 1000:,.1f} to {max(raw_rand) / 1000:,.1f} kIOPS (4 KiB) and "
            f"{min(raw_seq) / MiB:,.0f} to {max(raw_seq) / MiB:,.0f} MiB/s (1 MiB), while "
            "blksnapd and the do-nothing fs are bound by CPU. Ratios to raw move with the "
            "disk; the ratios to the do-nothing fs and between blksnapd variants are the "
            "steadier measure of the front-end.",
            "",
        ]
    misses = []
    for r in RATIOS:
        if r.target is None:
            continue
        v = get(r.label, r.wl)
        if v == v and v < r.target:  # not NaN, missed
            misses.append((r, v))
    if not misses:
        return out
    null_raw = get("do-nothing fs ÷ raw", RAND_W)
    why = {
        ("passthrough ÷ raw", SEQ_W.key): (
            f"the do-nothing fs itself reaches {get('do-nothing fs ÷ raw', SEQ_W):.2f} of raw; "
            "blksnapd adds one more copy of every byte (FUSE buffer → Python bytes → "
            "backing file page cache), and the loop device splits 1 MiB into requests of "
            "at most 128 segments, so FUSE sees ~512 KiB writes"
        ),
        ("passthrough ÷ raw", RAND_W.key): (
            f"even the do-nothing fs reaches only {null_raw:.2f} of raw: every 4 KiB request "
            "is a full FUSE round trip through one Python event loop, while raw is the "
            "kernel's loop driver alone. A front-end in Python with pyfuse3 cannot close "
            "this gap; the target needs the ceiling to be well above it"
        ),
        ("passthrough ÷ do-nothing fs", RAND_W.key): (
            f"a request costs the loop thread {us_pass - us_null:.0f} µs more than the "
            f"{us_null:.0f} µs of the empty one; 0.80 allows "
            f"{us_null / 0.8 - us_null:.0f} µs"
            + (
                f". In process the engine's write costs {costs.engine:.0f} µs on a quiet "
                f"machine ({costs.pwrite:.0f} µs of it the `pwrite`, which costs "
                f"{costs.pwrite_busy:.0f} µs while fio drives the do-nothing fs); in the "
                "daemon it runs on the thread that also carries the FUSE traffic (its "
                "cache misses, its interrupts), where the extra cost per request is "
                f"{(us_pass - us_null) / max(costs.engine, 1e-9):.0f} times that"
                if costs is not None
                else ""
            )
            + ". Moving the write off the loop thread costs more than it saves (worker "
            "threads gave about 0.65x the fast path's IOPS, side by side, during development)"
        ),
        ("tracker ÷ passthrough", SEQ_W.key): (
            f"per MiB the passthrough takes {per_request_us(trials, 'pass', SEQ_W):.0f} "
            "µs here (FUSE requests of about 512 KiB)"
            + (
                ", and in process the tracker changes the cost of a request by "
                f"{costs.engine_tracker - costs.engine:+.1f} µs: the difference is this "
                "shared machine's noise between runs"
                if costs is not None
                else ""
            )
        ),
        ("tracker ÷ passthrough", RAND_W.key): (
            f"here the tracker seems to add {us_trk - us_pass:.1f} µs per request to "
            f"{us_pass:.0f} µs, and 0.95 allows {us_pass / 0.95 - us_pass:.1f} µs"
            + (
                "; in process it changes the cost of a request by "
                f"{costs.engine_tracker - costs.engine:+.1f} µs "
                f"({costs.engine:.1f} → {costs.engine_tracker:.1f} µs per `Device.write`), "
                "so most of the difference is this shared machine's noise between runs"
                if costs is not None
                else ""
            )
        ),
        ("image read ÷ device read (no chunk stored)", SEQ_R.key): (
            "an image read also looks its chunks up in the diff area, before and after "
            "the device read"
        ),
    }
    out.append("**Targets missed, and why.**")
    out.append("")
    for r, v in misses:
        reason = why.get((r.label, r.wl.key), "")
        assert r.target is not None
        if max(r.values(trials)) >= r.target:
            reason += " (some trials reached the target: this one is within the noise)"
        out.append(f"- {r.label}, {r.wl.label}: {v:.3f} < {r.target:.2f}: {reason}.")
    out.append("")
    return out


# -- entry points ----------------------------------------------------------------------


def make_config(
    quick: bool,
    tmpdir: str,
    seed: int,
    *,
    trials: int | None = None,
    runtime: float | None = None,
    size_mib: int | None = None,
    daemon_args: Sequence[str] = (),
    only: Sequence[str] = (),
) -> Config:
    return Config(
        size=(size_mib or (32 if quick else 256)) * MiB,
        runtime=runtime or (0.5 if quick else 2.0),
        trials=trials or (1 if quick else 3),
        warmup=not quick,
        tmpdir=tmpdir,
        seed=seed,
        quick=quick,
        daemon_args=tuple(daemon_args),
        only=tuple(only),
    )


@contextlib.contextmanager
def rig(cfg: Config, rng: random.Random, progress: Callable[[str], None]) -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(dir=cfg.tmpdir, prefix="blksnap-fio-") as workdir:
        r = Rig(cfg, workdir, rng)
        try:
            r.start(progress)
            yield r
        except BaseException:
            print(f"blksnapd log:\n{r.daemon_log()}", file=sys.stderr)
            raise
        finally:
            r.close()


def run_section(cfg: Config, progress: Callable[[str], None]) -> tuple[str, FuseBench | None]:
    """The Markdown section (a short note when it cannot run here)."""
    reason = why_not()
    if reason:
        return f"{SECTION}\n\nNot run: {reason}.\n", None
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    with rig(cfg, rng, progress) as r:
        bench = FuseBench(cfg, r, rng)
        bench.run(progress)
        t1 = time.perf_counter()
        bench.costs = request_costs(cfg, r.dir, rng, busy_target=r.loops["null"])
        progress(f"request costs in process: {time.perf_counter() - t1:.1f}s")
    return report(bench, time.perf_counter() - t0), bench


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="blksnap block-layer benchmark (fio, loop, FUSE)")
    ap.add_argument("--output", "-o", help="write the Markdown section here")
    ap.add_argument("--quick", action="store_true", help="smoke run, a few seconds per variant")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--runtime", type=float, help="seconds per time-based fio run")
    ap.add_argument("--size", type=int, help="device size in MiB")
    ap.add_argument(
        "--tmpdir", default=os.environ.get("BLKSNAP_BENCH_TMPDIR", "/var/tmp"), help="work dir"
    )
    ap.add_argument("--seed", type=int, default=20260101)
    ap.add_argument(
        "--daemon-arg", action="append", default=[], help="extra blksnapd argument (repeatable)"
    )
    ap.add_argument("--json", help="also write the medians as JSON here")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated variants to run (raw, raw-buffered, null, pass, tracker, "
        "seq-session, rand-session); default all",
    )
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args(argv)
    cfg = make_config(
        args.quick,
        args.tmpdir,
        args.seed,
        trials=args.trials,
        runtime=args.runtime,
        size_mib=args.size,
        daemon_args=args.daemon_arg,
        only=[v for v in args.only.split(",") if v],
    )
    if args.no_warmup:
        cfg = dataclasses.replace(cfg, warmup=False)
    t_start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    text, bench = run_section(cfg, progress)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    if args.json and bench is not None:
        with open(args.json, "w") as f:
            json.dump(findings(bench), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
