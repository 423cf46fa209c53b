#!/usr/bin/env python3
"""Block-layer benchmark: fio on loop devices, blksnapd's FUSE front-end (our
own FUSE session) against the raw backing file and against do-nothing FUSE
file systems: our session's do-nothing mode, and pyfuse3's, the old
reference.

Everything is measured side by side in one run, in interleaved trials (every
variant once per trial, in a fresh random order), and reported as ratios
taken within a trial; the report gives the median over trials and the range.

Variants (each a loop device, 4096-byte sectors; fio with ``ioengine=libaio``,
``direct=1``, queue depth 32; 4 KiB random writes and reads, 1 MiB
sequential writes and reads):

- ``raw``: a loop device over a plain backing file, attached exactly as
  blksnapd attaches its own (``blksnap.control.loop.attach``: direct I/O on,
  completions not steered to the submitting CPU).
  The reference of the targets: the same loop device with blksnapd taken out.
- ``raw-buffered``: the same without direct I/O: the loop device writes into
  the backing file's page cache, which is where blksnapd's engine writes go
  too. Shown for scale, not used by the targets.
- ``own-null``: a loop device (direct I/O) over ``bench/ownnull.py``, our
  FUSE session (:mod:`blksnap.frontends.fuse_session`, blksnapd's reader
  threads) serving a file whose write returns at once: the ceiling of
  blksnapd's requests served in Python on this machine.
- ``own-pwrite``: the same session serving a backing file of its own with a
  bare ``pread``/``pwrite`` per request (``ownnull.py --file``): no engine,
  the ceiling of any engine in Python behind this session.
- ``c-null``, ``c-pwrite``: the same two served by ``bench/cserver.c``,
  the request loop compiled (built here with the C compiler; skipped when
  there is none): what the kernel's side of FUSE, and the backing file's
  page cache, cost without Python: what blksnapd's compiled short way
  (``blksnap/_shortway.c``) is measured against.
- ``null``: the same over ``bench/nullfs.py``, the do-nothing pyfuse3 file
  system: the old front-end's ceiling, kept as the reference the session is
  measured against.
- ``pass``: blksnapd serving a device with no filter, loop device from
  ``blksnap device add --loop`` (its reads and writes served by the
  compiled short way when built, as ``make bench`` does).
- ``tracker``: the same with the ``blksnap`` filter attached (CBT, no snapshot).
- snapshot taken: first writes (every chunk copied to diff storage), then
  rewrites (chunks already stored); image reads vs device reads.

Every run also samples the CPU time (utime + stime, all threads, and those
of its child processes: blksnapd's worker) of the process serving the
variant (blksnapd, or either do-nothing server) before and after fio, and
divides by the requests fio completed: CPU µs per request.

After the trials: the reader-thread sweep (``bench/fuse_threads.py``), 4 KiB
writes after a sequential read (large page-cache folios,
``bench/fuse_folio.py``), and for every target missed a profile of the
requests it measures (``bench/fuse_profile.py``).

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fiojobs import (
    QD,
    RAND_R,
    RAND_W,
    SEQ_R,
    SEQ_W,
    WORKLOADS,
    BenchError,
    Result,
    Workload,
    drop_cache,
    fio_once,
    fio_replay,
    fio_timed,
    first_write_log,
    rate_text,
    warm_cache,
)
from fuse_folio import Folio, FolioTarget, folio_report, run_folio
from fuse_profile import ENGINE, Profile, profile, profile_report
from fuse_threads import Sweep, run_sweep, sweep_report, sweep_size
from harness import MiB, Spread, incompressible_file, size_text, table

from blksnap.control import loop as losetup
from blksnap.control.client import Client
from blksnap.engine.device import WRITE_PIECE
from blksnap.errors import BlksnapError
from blksnap.settings import SETTINGS
from blksnap.tools import sandbox

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SECTION = "## Block layer: fio on loop devices"

__all__ = ["SECTION", "BenchError", "make_config", "run_section"]

#: The previous run's numbers, which the targets are stated against.
OLD_PASS_VS_NULL = 0.59
OLD_FIRST_WRITES_IOPS = 2900.0


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
    #: The extras after the trials.
    sweep: bool = True
    folio: bool = True
    profiles: bool = True


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


# -- the rig: files, processes, loop devices ---------------------------------------------


def build_cserver(workdir: str, progress: Callable[[str], None]) -> str | None:
    """``bench/cserver.c`` built into ``workdir`` (None, said why: no C
    compiler here, or it failed)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        progress("fio: no C compiler: the variants of the loop in C are skipped")
        return None
    out = os.path.join(workdir, "cserver")
    cmd = [cc, "-O2", "-Wall", "-pthread", "-o", out, str(HERE / "cserver.c")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        progress(f"fio: building bench/cserver.c failed, its variants skipped: {done.stderr}")
        return None
    return out


class Rig:
    """blksnapd with three devices, the two do-nothing file systems, and the
    raw loop devices, all under one work directory; ``close`` removes every
    loop device, mount and process it made (processes by pid)."""

    DEVICES = ("pass", "tracker", "snap")
    #: variant -> the script serving it, all with ``MOUNTPOINT --size BYTES``
    #: (``own-pwrite`` also with ``--file`` of its own backing file)
    SERVERS = {"null": "nullfs.py", "own-null": "ownnull.py", "own-pwrite": "ownnull.py"}
    #: variants served by ``bench/cserver.c`` (``c-pwrite`` with a file)
    COMPILED = ("c-null", "c-pwrite")

    def __init__(self, cfg: Config, workdir: str, rng: random.Random) -> None:
        self.cfg = cfg
        self.dir = workdir
        self.rng = rng
        self.my_loops: list[str] = []
        self.box: sandbox.Sandbox | None = None
        self.client: Client | None = None
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[str, str] = {}
        self.loops: dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def pid(self, variant: str) -> int | None:
        """The process serving ``variant`` (None: the kernel's loop driver)."""
        if variant in self.servers:
            return self.servers[variant].pid
        if variant.startswith("raw"):
            return None
        assert self.box is not None
        return self.box.proc.pid

    # -- start --

    def start(self, progress: Callable[[str], None]) -> None:
        size = self.cfg.size
        for name in ("raw", "raw-buffered", "own-pwrite", "c-pwrite", *self.DEVICES, "storage"):
            self.files[name] = self.path(f"{name}.img")
            incompressible_file(self.files[name], size, self.rng)
        progress(f"fio: {len(self.files)} files of {size_text(size)} in {self.dir}")
        self.loops["raw"] = self._loop(self.files["raw"], direct_io=True)
        self.loops["raw-buffered"] = self._loop(self.files["raw-buffered"], direct_io=False)
        for variant, script in self.SERVERS.items():
            self._start_server(variant, [sys.executable, str(HERE / script)])
        cserver = build_cserver(self.dir, progress)
        for variant in self.COMPILED if cserver else ():
            self._start_server(variant, [cserver])
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

    def _start_server(self, variant: str, command: list[str]) -> None:
        """A do-nothing file system in a process of its own (all serve
        ``disk`` of the devices' size), and a loop device over its file."""
        mnt = self.path(f"{variant}-mnt")
        os.makedirs(mnt)
        log_path = self.path(f"{variant}.log")
        log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        if variant in self.COMPILED:
            args = [*command, mnt, str(self.cfg.size), str(SETTINGS.fuse_threads)]
            args += [self.files[variant]] if variant in self.files else []
        else:
            args = [*command, mnt, "--size", str(self.cfg.size)]
            args += ["--file", self.files[variant]] if variant in self.files else []
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.servers[variant] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise BenchError(f"{command[-1]} did not start: {Path(log_path).read_text()}")
        self.loops[variant] = self._loop(os.path.join(mnt, "disk"), direct_io=True)

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
        for proc in (*self.servers.values(), self.box.proc if self.box else None):
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{proc.args} exited with {proc.returncode}")

    # -- stop --

    def close(self) -> None:
        """Our loop devices, the do-nothing file systems (by their pids), then
        blksnapd: nothing left mounted or attached under the work directory."""
        errors: list[str] = []
        for lp in reversed(self.my_loops):
            with contextlib.suppress(BlksnapError):
                losetup.detach(lp)
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                errors.append(f"{proc.args} (pid {proc.pid}) killed")
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

#: Variants whose file a process of ours serves through the page cache
#: (raw reads with direct I/O; raw-buffered through its own loop device).
SERVED = ("pass", "tracker", "snap", "own-pwrite", "c-pwrite")

#: The time-based runs of a trial: variant -> workloads. The tracker's runs
#: (and the rewrites of the snapshot sessions) each come with a passthrough
#: run of the same workload next to them (:data:`PAIRED`): more passthrough
#: samples, and the reference of those ratios.
JOBS: dict[str, tuple[Workload, ...]] = {
    "raw": WORKLOADS,
    "raw-buffered": (SEQ_W, RAND_W),
    "null": WORKLOADS,
    "own-null": WORKLOADS,
    # (writes only: its reads would hold the turn while they wait for the
    # disk, where blksnapd's hand it on, so they are no ceiling of blksnapd's)
    "own-pwrite": (RAND_W,),
    "c-null": (RAND_W,),
    "c-pwrite": (RAND_W,),
    "pass": WORKLOADS,
    "tracker": (SEQ_W, RAND_W),
}

#: Variants measured against the passthrough run right next to each of
#: theirs (the pair in random order), not against the trial's mean: their
#: targets are a few per cent, while on this shared machine the passthrough's
#: own runs in one trial, a minute apart, differ by more than that (the
#: report gives how much, :func:`pass_spread`).
PAIRED = ("tracker", "snap-rewrite")


@dataclass
class Trial:
    #: (variant, workload key) -> results
    runs: dict[tuple[str, str], list[Result]] = field(default_factory=dict)

    #: (variant, workload key) -> (its rate, the adjacent passthrough's) per pair
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, variant: str, wl: Workload, result: Result) -> None:
        self.runs.setdefault((variant, wl.key), []).append(result)

    def add_pair(self, variant: str, wl: Workload, result: Result, ref: Result) -> None:
        """``result`` and the passthrough's ``ref`` measured next to it."""
        self.add(variant, wl, result)
        self.add("pass", wl, ref)
        self.pairs.setdefault((variant, wl.key), []).append((result.rate(wl), ref.rate(wl)))

    def pair_ratio(self, variant: str, wl: Workload) -> float | None:
        """The variant's rate ÷ its adjacent passthrough runs' (None: no pair)."""
        ps = self.pairs.get((variant, wl.key))
        if not ps:
            return None
        return statistics.fmean(a for a, _ in ps) / statistics.fmean(b for _, b in ps)

    def rate(self, variant: str, wl: Workload) -> float | None:
        """Mean rate of the variant's runs in this trial (None: not run)."""
        rs = self.runs.get((variant, wl.key))
        return statistics.fmean(r.rate(wl) for r in rs) if rs else None

    def _per_request(
        self, variant: str, wl: Workload, of: Callable[[Result], float | None]
    ) -> float | None:
        """``of`` (a server's usage in a run) per request, over the variant's
        runs that measured it."""
        runs = self.runs.get((variant, wl.key), [])
        vals = [(v, r.ios) for r in runs if (v := of(r)) is not None]
        ios = sum(n for _, n in vals)
        return sum(v for v, _ in vals) / ios if ios else None

    def cpu_us(self, variant: str, wl: Workload) -> float | None:
        """The serving process's CPU µs per request, over the variant's runs."""
        per = self._per_request(variant, wl, lambda r: r.cpu)
        return None if per is None else per * 1e6

    def preempted(self, variant: str, wl: Workload) -> float | None:
        """Involuntary context switches of the serving process's threads per
        request, over the variant's runs."""
        return self._per_request(variant, wl, lambda r: r.preempted)


class FuseBench:
    def __init__(self, cfg: Config, rig: Rig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rig = rig
        self.rng = rng
        self.trials: list[Trial] = []
        self.chunk_size = 0
        self.first_ios = 0
        self.verbose = bool(os.environ.get("BLKSNAP_BENCH_VERBOSE"))
        #: 1-minute load average before and after the trials (this machine is shared).
        self.load: list[float] = []
        self.sweep: Sweep | None = None
        self.folio: Folio | None = None
        self.profiles: list[Profile] = []
        #: What went wrong in an extra (the section is still written).
        self.extra_errors: list[str] = []

    @property
    def client(self) -> Client:
        assert self.rig.client is not None
        return self.rig.client

    def timed(self, variant: str, wl: Workload, runtime: float | None = None) -> Result:
        backing = self.rig.files.get(variant)
        if backing is not None and not wl.is_read:
            # Every write run starts with its file out of the page cache:
            # no variant's writes meet the folios another run's reads or
            # writes left (a 4 KiB write into a large folio costs several
            # times one into a small one: the folio table below).
            drop_cache([backing])
        elif backing is not None and variant in SERVED:
            warm_cache([backing])  # every read run of a served file: all cached
        t0 = time.perf_counter()
        res = fio_timed(
            self.rig.loops[variant],
            wl,
            self.cfg.size,
            runtime or self.cfg.runtime,
            self.rig.pid(variant),
        )
        t1 = time.perf_counter()
        self.rig.settle()
        if self.verbose:
            cpu = f" cpu {res.cpu_us:.0f} µs/req" if res.cpu_us is not None else ""
            if res.preempted_per_request is not None:
                cpu += f" preempted {res.preempted_per_request:.2f}/req"
            print(
                f"  {variant:13} {wl.label:17} {res.text(wl):>13}{cpu}  fio {t1 - t0:.1f}s"
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
        pid = self.rig.pid("snap")
        size, runtime = self.cfg.size, self.cfg.runtime
        try:
            _, stored, cs = self._stored(sid)
            self.chunk_size = cs
            if stored:
                raise BenchError(f"fresh snapshot with {stored} chunks stored")
            order = [("dev-read", dev), ("image-read", img)]
            self.rng.shuffle(order)
            for key, target in order:
                # (the same cache for both: whichever ran second found the
                # first one's pages in it)
                warm_cache([self.rig.files["snap"]])
                out.add(key, SEQ_R, fio_timed(target, SEQ_R, size, runtime, pid))
            out.add("snap-first", SEQ_W, fio_once(dev, SEQ_W, size, pid))
            self._check_all_stored(sid, "sequential first writes")
            self.rig.settle()
            self.pair("snap-rewrite", "snap", SEQ_W, out)
            warm_cache([self.rig.files["storage"]])
            out.add("image-read-stored", SEQ_R, fio_timed(img, SEQ_R, size, runtime, pid))
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
            out.add("snap-first", RAND_W, fio_replay(log, self.rig.pid("snap")))
            self._check_all_stored(sid, "random first writes")
            self.rig.settle()
            self.pair("snap-rewrite", "snap", RAND_W, out)
            self._check_all_stored(sid, "random rewrites")
        finally:
            self.client.snapshot_destroy(sid)
        self.rig.settle()

    def pair(self, key: str, variant: str, wl: Workload, out: Trial) -> None:
        """``variant``'s run (recorded as ``key``) and a passthrough run
        next to it, in random order (:data:`PAIRED`)."""
        order = [variant, "pass"]
        self.rng.shuffle(order)
        res = {v: self.timed(v, wl) for v in order}
        out.add_pair(key, wl, res[variant], res["pass"])

    # -- one trial --

    def trial(self) -> Trial:
        out = Trial()
        jobs: list[tuple[str, Workload | None]] = [(v, wl) for v, wls in JOBS.items() for wl in wls]
        jobs = [j for j in jobs if j[0] in self.rig.loops]  # (no compiler: no c-*)
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
            elif variant in PAIRED:
                assert wl is not None
                self.pair(variant, variant, wl, out)
            else:
                assert wl is not None
                out.add(variant, wl, self.timed(variant, wl))
        return out

    def warm_up(self) -> None:
        """Every front-end once, briefly: threads, caches, code paths."""
        for variant in ("raw", "raw-buffered", "null", "own-null", "own-pwrite", "c-null",
                        "c-pwrite", "pass", "tracker", "snap"):  # fmt: skip
            if variant not in self.rig.loops:
                continue
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

    # -- after the trials --

    def run_folio(self, progress: Callable[[str], None]) -> None:
        """4 KiB writes after a sequential read, blksnapd and raw-buffered."""
        t0 = time.perf_counter()
        rig = self.rig
        targets = [
            FolioTarget(
                "pass",
                "blksnapd passthrough",
                rig.loops["pass"],
                rig.files["pass"],
                rig.pid("pass"),
            ),
            FolioTarget(
                "raw-buffered",
                "raw, buffered",
                rig.loops["raw-buffered"],
                rig.files["raw-buffered"],
                None,
            ),
        ]
        rounds = 1 if self.cfg.quick else max(2, self.cfg.trials)
        scratch = rig.path("folio-pwrite.img")
        incompressible_file(scratch, self.cfg.size, self.rng)
        try:
            self.folio = run_folio(
                targets,
                self.cfg.size,
                rounds,
                self.cfg.runtime,
                self.rng,
                scratch,
                threads=(1, SETTINGS.fuse_threads),
            )
        finally:
            os.unlink(scratch)
        progress(f"large folios: {time.perf_counter() - t0:.1f}s")

    def run_sweep(self, progress: Callable[[str], None]) -> None:
        size = sweep_size(self.cfg.size, self.cfg.quick)
        rounds = 1 if self.cfg.quick else max(2, self.cfg.trials)
        runtime = min(self.cfg.runtime, 1.0)
        workdir = self.rig.path("sweep")
        os.makedirs(workdir)
        self.sweep = run_sweep(workdir, size, rounds, runtime, self.rng, progress)

    def run_profiles(self, progress: Callable[[str], None]) -> None:
        """A profile of the requests of every target missed."""
        seen: set[tuple[str, str]] = set()
        for r in TARGETS:
            vals = r.values(self.trials)
            if not vals or statistics.median(vals) >= (r.target or 0.0):
                continue
            key = (PROFILE_OF[r.num], r.wl.key)
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            workdir = self.rig.path("profiles")
            os.makedirs(workdir, exist_ok=True)
            self.profiles.append(
                profile(
                    key[0],
                    r.wl,
                    workdir,
                    min(self.cfg.size, 64 * MiB),
                    self.cfg.runtime,
                    SETTINGS.fuse_threads,
                    self.rng,
                )
            )
            progress(f"profile {key[0]} {r.wl.label}: {time.perf_counter() - t0:.1f}s")

    def extras(self, progress: Callable[[str], None]) -> None:
        """Sweep, folios, profiles: each may fail without losing the trials."""
        for enabled, name, step in (
            (self.cfg.folio, "large folios", self.run_folio),
            (self.cfg.sweep, "thread sweep", self.run_sweep),
            (self.cfg.profiles, "profiles", self.run_profiles),
        ):
            if not enabled:
                continue
            try:
                step(progress)
            except (BenchError, BlksnapError, OSError, RuntimeError) as exc:
                progress(f"{name} failed: {exc!r}")
                self.extra_errors.append(f"{name}: `{exc!r}`")


# -- report ------------------------------------------------------------------------------

LABELS = {
    "raw": "raw: loop (direct I/O) over the plain file",
    "raw-buffered": "raw, buffered: loop (no direct I/O) over the plain file",
    "own-null": "own session, do-nothing (`bench/ownnull.py`)",
    "own-pwrite": "own session, pread/pwrite only (`bench/ownnull.py --file`)",
    "c-null": "the session's loop in C, do-nothing (`bench/cserver.c`)",
    "c-pwrite": "the session's loop in C, pread/pwrite only (`bench/cserver.c`)",
    "null": "pyfuse3 do-nothing fs (`bench/nullfs.py`)",
    "pass": "blksnapd, no filter (passthrough)",
    "tracker": "blksnapd, tracker attached",
    "snap-first": "blksnapd, snapshot taken: first writes",
    "snap-rewrite": "blksnapd, snapshot taken: rewrites",
    "dev-read": "blksnapd device read (snapshot taken)",
    "image-read": "blksnapd image read, no chunk stored",
    "image-read-stored": "blksnapd image read, every chunk stored",
}

#: The in-process profile that shows where a variant's requests spend their CPU.
PROFILE_OF = {
    "own-null": "own-null",
    "pass": "pass",
    "tracker": "tracker",
    "snap-first": "first",
    "snap-rewrite": "rewrite",
    "image-read": "image",
}


@dataclass(frozen=True)
class Ratio:
    """``num`` ÷ ``den`` within each trial; with no ``den``, ``num``'s rate."""

    label: str
    wl: Workload
    num: str
    den: str | None
    target: float | None = None
    moonshot: float | None = None
    #: the previous run's value, for the record
    old: float | None = None
    #: a :data:`PAIRED` variant over the passthrough: against the runs next
    #: to its own (else against the trial's mean, as every other ratio)
    paired: bool = True

    def values(self, trials: Sequence[Trial]) -> list[float]:
        out = []
        for t in trials:
            if self.paired and self.num in PAIRED and self.den == "pass":
                if (r := t.pair_ratio(self.num, self.wl)) is not None:
                    out.append(r)
                continue
            a = t.rate(self.num, self.wl)
            b = t.rate(self.den, self.wl) if self.den is not None else 1.0
            if a is not None and b is not None:
                out.append(a / b)
        return out

    def fmt(self, v: float) -> str:
        return f"{v / 1000:,.1f}k" if self.den is None else f"{v:.2f}"

    def target_text(self) -> str:
        if self.target is None:
            return "—"
        text = f"≥ {self.fmt(self.target)}"
        if self.moonshot is not None:
            text += f" (moonshot {self.fmt(self.moonshot)})"
        if self.old is not None:
            text += f"; was {self.fmt(self.old)}"
        return text


TARGETS = (
    Ratio("own session do-nothing ÷ pyfuse3 do-nothing", RAND_W, "own-null", "null", 3.0),
    Ratio(
        "passthrough ÷ pyfuse3 do-nothing",
        RAND_W,
        "pass",
        "null",
        1.5,
        moonshot=2.0,
        old=OLD_PASS_VS_NULL,
    ),
    Ratio("passthrough ÷ raw", RAND_W, "pass", "raw", 0.8),
    Ratio("passthrough ÷ raw", RAND_R, "pass", "raw", 0.8),
    Ratio("passthrough ÷ raw", SEQ_W, "pass", "raw", 1.0),
    Ratio("passthrough ÷ raw", SEQ_R, "pass", "raw", 1.0),
    Ratio("tracker ÷ passthrough", RAND_W, "tracker", "pass", 0.95),
    Ratio("tracker ÷ passthrough", SEQ_W, "tracker", "pass", 0.97),
    Ratio("snapshot rewrites ÷ passthrough", RAND_W, "snap-rewrite", "pass", 0.9),
    Ratio("snapshot rewrites ÷ passthrough", SEQ_W, "snap-rewrite", "pass", 0.9),
    Ratio(
        "snapshot first writes, IOPS",
        RAND_W,
        "snap-first",
        None,
        2 * OLD_FIRST_WRITES_IOPS,
        old=OLD_FIRST_WRITES_IOPS,
    ),
    Ratio("image read ÷ device read (no chunk stored)", SEQ_R, "image-read", "dev-read", 0.95),
)

OTHERS = (
    *(Ratio("own session do-nothing ÷ pyfuse3 do-nothing", wl, "own-null", "null")
      for wl in (RAND_R, SEQ_W, SEQ_R)),
    *(Ratio("passthrough ÷ own session do-nothing", wl, "pass", "own-null") for wl in WORKLOADS),
    *(Ratio("passthrough ÷ pyfuse3 do-nothing", wl, "pass", "null")
      for wl in (RAND_R, SEQ_W, SEQ_R)),
    *(Ratio("own session do-nothing ÷ raw", wl, "own-null", "raw") for wl in WORKLOADS),
    Ratio("own session, pread/pwrite only ÷ raw", RAND_W, "own-pwrite", "raw"),
    Ratio("passthrough ÷ own session, pread/pwrite only", RAND_W, "pass", "own-pwrite"),
    Ratio("loop in C, do-nothing ÷ raw", RAND_W, "c-null", "raw"),
    Ratio("loop in C, pread/pwrite only ÷ raw", RAND_W, "c-pwrite", "raw"),
    Ratio("own session ÷ loop in C, both pread/pwrite only", RAND_W, "own-pwrite", "c-pwrite"),
    *(Ratio("pyfuse3 do-nothing ÷ raw", wl, "null", "raw") for wl in (RAND_W, SEQ_W)),
    *(Ratio("passthrough ÷ raw, buffered", wl, "pass", "raw-buffered") for wl in (RAND_W, SEQ_W)),
    *(Ratio("snapshot first writes ÷ passthrough", wl, "snap-first", "pass")
      for wl in (RAND_W, SEQ_W)),
    Ratio("image read ÷ device read (every chunk stored)", SEQ_R, "image-read-stored", "dev-read"),
    # the paired targets the way every other ratio is taken, for comparison
    *(Ratio(f"{label} (÷ the trial's mean passthrough)", wl, num, "pass", paired=False)
      for label, num in (("tracker ÷ passthrough", "tracker"),
                         ("snapshot rewrites ÷ passthrough", "snap-rewrite"))
      for wl in (RAND_W, SEQ_W)),
)  # fmt: skip

#: Rows of the CPU table: the variants a process of ours serves.
CPU_VARIANTS = (
    "null",
    "own-null",
    "own-pwrite",
    "c-null",
    "c-pwrite",
    "pass",
    "tracker",
    "snap-first",
    "snap-rewrite",
    "dev-read",
    "image-read",
    "image-read-stored",
)


def _median(vals: Iterable[float | None]) -> float:
    known = [v for v in vals if v is not None]
    return statistics.median(known) if known else float("nan")


def median_rate(trials: Sequence[Trial], variant: str, wl: Workload) -> float:
    return _median(t.rate(variant, wl) for t in trials)


def pass_spread(trials: Sequence[Trial], wl: Workload) -> float | None:
    """The largest spread of the passthrough's own runs of ``wl`` within one
    trial (fastest ÷ slowest - 1; None: fewer than two runs in every trial)."""
    spreads = []
    for t in trials:
        rates = [r.rate(wl) for r in t.runs.get(("pass", wl.key), [])]
        if len(rates) > 1 and min(rates) > 0:
            spreads.append(max(rates) / min(rates) - 1)
    return max(spreads) if spreads else None


def median_cpu(trials: Sequence[Trial], variant: str, wl: Workload) -> float:
    return _median(t.cpu_us(variant, wl) for t in trials)


def median_preempted(trials: Sequence[Trial], variant: str, wl: Workload) -> float:
    return _median(t.preempted(variant, wl) for t in trials)


def median_result(trials: Sequence[Trial], variant: str | None, wl: Workload) -> str:
    if variant is None:
        return "—"
    rate = median_rate(trials, variant, wl)
    return "—" if rate != rate else rate_text(wl, rate)


def findings(bench: FuseBench) -> dict[str, float]:
    out = {}
    for r in (*TARGETS, *OTHERS):
        vals = r.values(bench.trials)
        if vals:
            out[f"{r.label} / {r.wl.label}"] = statistics.median(vals)
    for v in CPU_VARIANTS:
        for wl in WORKLOADS:
            us = median_cpu(bench.trials, v, wl)
            if us == us:
                out[f"cpu µs per request: {v} / {wl.label}"] = us
    if bench.sweep is not None and (pick := bench.sweep.pick()) is not None:
        out["reader threads picked"] = pick
    return out


def ratio_rows(rs: Sequence[Ratio], trials: Sequence[Trial]) -> list[list[str]]:
    rows = []
    for r in rs:
        vals = r.values(trials)
        if not vals:
            continue
        s = Spread.of(vals)
        met = ""
        if r.target is not None:
            met = "yes" if s.median >= r.target else "**no**"
            if r.moonshot is not None and s.median >= r.moonshot:
                met = "yes, moonshot too"
        rows.append(
            [
                r.label,
                r.wl.label,
                median_result(trials, r.num, r.wl),
                median_result(trials, r.den, r.wl),
                f"**{r.fmt(s.median)}**",
                f"{r.fmt(s.low)}-{r.fmt(s.high)}",
                r.target_text(),
                met,
            ]
        )
    return rows


def spread_text(trials: Sequence[Trial]) -> str:
    """Why the pairs: how far apart the passthrough's own runs of a trial were."""
    parts = [
        f"{x * 100:.0f} % ({wl.label})"
        for wl in (RAND_W, SEQ_W)
        if (x := pass_spread(trials, wl)) is not None
    ]
    if not parts:
        return ""
    return (
        "The passthrough's own runs within one trial differed by up to "
        + " and ".join(parts)
        + " in this run (fastest ÷ slowest - 1), against the 3-10 % the tracker and "
        "rewrite targets leave: hence the pairs. "
    )


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
        f"{cfg.trials} trial(s), every variant once per trial in a fresh random order, "
        "the tracker's runs and the snapshot's rewrites each with a passthrough run of "
        "the same workload right next to it (the pair in random order); ratios taken "
        "within a trial (those of the tracker and the rewrites to the passthrough "
        "against the runs next to them, the others against the mean of the trial's "
        "passthrough runs), median in bold, range over trials. " + spread_text(trials) + "Backing "
        "files are full of random data and written back (`fsync`) after every run, "
        "and before every write run its file is dropped from the page cache "
        "(`posix_fadvise(DONTNEED)` of that file only), so that no variant's writes "
        "inherit the page-cache folios another run left, while before every read run "
        "of a file blksnapd serves (device or image) it is read through once, so that "
        "such reads always find it cached; all outside the timed region. "
        "Load average (1 min) before and after: "
        + " and ".join(f"{x:.2f}" for x in bench.load)
        + f" on {os.cpu_count()} CPUs. blksnapd runs with its defaults "
        f"({SETTINGS.fuse_threads} FUSE reader threads"
        + (f"; extra arguments `{' '.join(cfg.daemon_args)}`" if cfg.daemon_args else "")
        + ").",
        "",
        "- **Raw** (the reference of the targets against raw): a loop device over the "
        "plain backing file, attached as blksnapd attaches its own "
        "(`blksnap.control.loop.attach`: 4096-byte sectors, direct I/O on, completions "
        "not steered to the submitting CPU); so the only "
        "difference from the blksnapd rows is the FUSE file and the daemon in between. "
        "Its I/O goes to the disk with O_DIRECT, while blksnapd's engine reads and writes "
        "the backing file through the page cache, which flatters blksnapd on small writes "
        "and on reads of a cached file; the buffered raw row (a loop device without "
        "direct I/O: also page-cache writes, one kernel worker) is given for scale.",
        "- **Own session, do-nothing**: `bench/ownnull.py`, blksnapd's FUSE session "
        "(`blksnap/frontends/fuse_session.py`, the same reader threads, "
        f"{SETTINGS.fuse_threads} of them, mount options and direct-I/O files) serving a "
        "file whose write returns at once and whose read returns zeroes, in a process of "
        "its own: the ceiling of blksnapd's requests served in Python here.",
        "- **Loop in C**: `bench/cserver.c`, built here with the C compiler: the "
        "session's request loop compiled, with the same INIT flags, mount options, "
        f"reader threads ({SETTINGS.fuse_threads}, each reading its own cloned fd at once: "
        "there is no interpreter lock to pass) and direct-I/O files, serving a file "
        "that does nothing (*do-nothing*) or a `pread`/`pwrite` of its own backing "
        "file per request, as `bench/ownnull.py --file` (*pread/pwrite only*): what "
        "the kernel's side of FUSE and the page cache cost without Python, against "
        "which blksnapd's compiled short way (`blksnap/_shortway.c`) is measured. Not a "
        "product: a measuring stick.",
        "- **pyfuse3 do-nothing**: `bench/nullfs.py`, the same on pyfuse3 (one trio event "
        "loop), the ceiling of the old front-end: the reference the session is measured "
        "against.",
        "- **blksnapd**: started by the benchmark with its own socket, mount and state "
        "dir; devices added with `--loop`. *tracker*: `blksnap attach`. *Snapshot*: "
        "diff storage a preallocated file of the device's size; sequential first "
        "writes write the whole device once (every chunk copied), random first writes "
        f"replay an fio iolog of one 4 KiB write in every chunk ({bench.first_ios:,} "
        "writes, chunks in random order); rewrites then run on the same snapshot; the "
        "snapshot is checked to have every chunk stored. Reads: the device and its image "
        "(loop device from `snapshot take --loop`) right after take, then the image "
        "again with every chunk in diff storage.",
        "- **CPU per request**: utime + stime of the serving process (all its threads, "
        "and its child processes: blksnapd's supervisor and the worker that serves; from "
        "`/proc/PID/stat`) sampled before and after each fio run, divided by the "
        "requests fio completed (a 1 MiB request may reach FUSE as several).",
        "",
        "**Targets**",
        "",
        table(
            ["target", "workload", "measured", "reference", "median", "range", "target", "met"],
            ratio_rows(TARGETS, trials),
        ),
        "",
        "**Other ratios** (for scale)",
        "",
        table(
            ["ratio", "workload", "measured", "reference", "median", "range"],
            [r[:6] for r in ratio_rows(OTHERS, trials)],
        ),
        "",
    ]
    abs_rows = []
    for variant, label in LABELS.items():
        cells = [median_result(trials, variant, wl) for wl in WORKLOADS]
        if any(c != "—" for c in cells):
            abs_rows.append([label, *cells])
    lines += [
        "**Absolute numbers** (medians over the trials)",
        "",
        table(["variant", *(wl.label for wl in WORKLOADS)], abs_rows),
        "",
    ]
    cpu_rows = []
    for variant in CPU_VARIANTS:
        vals = [median_cpu(trials, variant, wl) for wl in WORKLOADS]
        if any(v == v for v in vals):
            cpu_rows.append([LABELS[variant], *(f"{v:,.0f}" if v == v else "—" for v in vals)])
    lines += [
        "**CPU µs per request** of the serving process (medians over the trials; "
        f"{os.cpu_count()} CPUs shared with fio and the loop devices' kernel workers)",
        "",
        table(["variant", *(wl.label for wl in WORKLOADS)], cpu_rows),
        "",
    ]
    if bench.sweep is not None:
        lines += sweep_report(bench.sweep, SETTINGS.fuse_threads)
    if bench.folio is not None:
        lines += folio_report(bench.folio)
        lines += folio_notes(bench.folio, trials)
    lines += notes(bench)
    if bench.extra_errors:
        lines += ["**Failed extras**: " + "; ".join(bench.extra_errors), ""]
    lines += [f"_Block-layer section: {elapsed:.0f} s._", ""]
    return "\n".join(lines)


def folio_notes(f: Folio, trials: Sequence[Trial]) -> list[str]:
    def med(name: str, cond: str) -> float:
        rs = f.ratios(name, cond)
        return statistics.median(rs) if rs else float("nan")

    cpu = {c: f.cpu_us("pass", c) for c in ("cold", "seq-read", "seq-read+dontneed", "seq-write")}
    text = (
        "*Large folios.* After a sequential read of the whole device through blksnapd, "
        f"its 4 KiB random writes cost blksnapd {cpu['seq-read']:.0f} µs of CPU each "
        f"against {cpu['cold']:.0f} µs with the backing file's cache cold "
        f"({cpu['seq-read'] / cpu['cold']:.1f}x), and run at {med('pass', 'seq-read'):.2f} "
        "of the cold rate (IOPS here move with the machine's load; the CPU per request is "
        "the steadier measure); after a sequential write, "
        f"{cpu['seq-write']:.0f} µs ({cpu['seq-write'] / cpu['cold']:.1f}x). The buffered "
        f"raw loop device, the kernel alone, runs at {med('raw-buffered', 'seq-read'):.2f} "
        "of its cold rate after the read."
    )
    if f.pwrite:
        n = max(f.pwrite_threads)
        one, many = f.pwrite_us(1, "cold"), f.pwrite_us(n, "cold")
        text += (
            " The `pwrite` itself (table above) costs "
            f"{f.pwrite_us(1, 'seq-read') / one:.1f}x its cold CPU after a sequential read "
            f"from one thread and {f.pwrite_us(n, 'seq-read') / many:.1f}x from {n} at once "
            f"({f.pwrite_us(1, 'seq-write') / one:.1f}x and "
            f"{f.pwrite_us(n, 'seq-write') / many:.1f}x after a sequential write)."
        )
    text += (
        " blksnapd keeps the folios of a backing file on ext4 small (no readahead on its "
        "fd, writes in pieces of at most "
        f"{WRITE_PIECE // 1024} KiB, the file's clean cache dropped when the device is "
        "added: `SMALL_FOLIO_FS` in `blksnap/engine/device.py`), so what a sequential "
        "read or write leaves in the cache should cost its later 4 KiB writes little; "
        "the ratios above to the cold cache are the check, against the raw loop "
        "device's, which takes no such care."
    )
    return [text, ""]


def notes(bench: FuseBench) -> list[str]:
    trials = bench.trials

    def ratio(label: str, wl: Workload) -> float:
        for r in (*TARGETS, *OTHERS):
            if r.label == label and r.wl is wl:
                vals = r.values(trials)
                return statistics.median(vals) if vals else float("nan")
        raise KeyError(label)

    cpu_null = median_cpu(trials, "null", RAND_W)
    cpu_own = median_cpu(trials, "own-null", RAND_W)
    cpu_pass = median_cpu(trials, "pass", RAND_W)
    cpu_trk = median_cpu(trials, "tracker", RAND_W)
    out = [
        "**Reading.** "
        f"Per 4 KiB random write the do-nothing session costs its process {cpu_own:.0f} µs "
        f"of CPU, pyfuse3's do-nothing fs {cpu_null:.0f} µs: reader threads that each "
        "read a request from their own clone of `/dev/fuse`, serve it and write the "
        "answer back, against one trio event loop (a scheduling round, an epoll "
        "registration, a task per request). The session reaches "
        f"{ratio('own session do-nothing ÷ pyfuse3 do-nothing', RAND_W):.2f}x pyfuse3's "
        f"IOPS and {ratio('own session do-nothing ÷ raw', RAND_W):.2f}x the raw loop "
        f"device's. blksnapd's passthrough, served by the compiled short way "
        "(`blksnap/_shortway.c`: every reader thread waits for requests in C; the "
        "device's gate as a counter, the `pwrite` into the backing file's page cache and "
        f"the reply, no Python), costs {cpu_pass:.0f} µs per request and reaches "
        f"{ratio('passthrough ÷ own session do-nothing', RAND_W):.2f}x the do-nothing "
        f"session in Python; the tracker's runs cost {cpu_trk - cpu_pass:+.0f} µs per "
        "request more (its CBT mark, also in C, and whatever else differed between the "
        "runs on this shared machine).",
        "",
    ]
    cpu_cnull, cpu_cpw = (
        median_cpu(trials, "c-null", RAND_W),
        median_cpu(trials, "c-pwrite", RAND_W),
    )
    if cpu_cnull == cpu_cnull and cpu_cpw == cpu_cpw:
        cpu_opw = median_cpu(trials, "own-pwrite", RAND_W)
        out[-2] += (
            f" The same loop compiled (`bench/cserver.c`) costs {cpu_cnull:.0f} µs per "
            f"do-nothing request and {cpu_cpw:.0f} µs with the `pwrite` "
            f"({cpu_own - cpu_cnull:+.0f} and {cpu_opw - cpu_cpw:+.0f} µs in Python: the "
            "session's own share), and reaches "
            f"{ratio('loop in C, pread/pwrite only ÷ raw', RAND_W):.2f}x raw with the "
            f"`pwrite`, where the session in Python reaches "
            f"{ratio('own session, pread/pwrite only ÷ raw', RAND_W):.2f}x."
        )
    raw_rand = [r for t in trials if (r := t.rate("raw", RAND_W)) is not None]
    raw_seq = [r for t in trials if (r := t.rate("raw", SEQ_W)) is not None]
    if raw_rand and raw_seq:
        out += [
            "*The raw reference is the disk* (direct I/O), which other work on this "
            "machine shares: over the trials of this run it ranged from "
            f"{min(raw_rand) / 1000:,.1f} to {max(raw_rand) / 1000:,.1f} kIOPS (4 KiB "
            f"writes) and {min(raw_seq) / MiB:,.0f} to {max(raw_seq) / MiB:,.0f} MiB/s "
            "(1 MiB writes), while blksnapd and the do-nothing servers are bound by CPU. "
            "Ratios to raw move with the disk; the ratios to the do-nothing servers and "
            "between blksnapd variants are the steadier measure of the front-end.",
            "",
        ]
    misses = []
    for r in TARGETS:
        vals = r.values(trials)
        if r.target is not None and vals and statistics.median(vals) < r.target:
            misses.append((r, vals))
    if not misses:
        out += ["Every target met.", ""]
        return out
    out += ["**Targets missed, and where the time goes.**", ""]
    for r, vals in misses:
        assert r.target is not None
        v = statistics.median(vals)
        line = f"- {r.label}, {r.wl.label}: {r.fmt(v)} < {r.fmt(r.target)}"
        if max(vals) >= r.target:
            line += " (some trials reached it: within this machine's noise)"
        cn = median_cpu(trials, r.num, r.wl)
        cd = median_cpu(trials, r.den, r.wl) if r.den else float("nan")
        if cn == cn:
            line += f". CPU per request: {cn:,.0f} µs"
            if cd == cd:
                line += f" against {cd:,.0f} µs"
        reason = why(r, bench)
        if reason:
            line += f". {reason}"
        out.append(line + ".")
    out.append("")
    if bench.profiles:
        out += [
            "Profiles of the requests behind the misses: blksnapd's FUSE files (or the "
            "do-nothing session) served in the benchmark's process, every reader thread "
            "under `cProfile` with its own CPU clock (`bench/fuse_profile.py`); own CPU "
            "time per function, merged over the threads, per fio request. The profiler "
            "inflates every Python call: read the shares.",
            "",
        ]
        for p in bench.profiles:
            out += profile_report(p)
    return out


def why(r: Ratio, bench: FuseBench) -> str:
    """What a miss of target ``r`` comes from, from this run's numbers."""
    trials = bench.trials

    def ratio(num: str, den: str, wl: Workload) -> float:
        vals = Ratio("", wl, num, den).values(trials)
        return statistics.median(vals) if vals else float("nan")

    def cpu(variant: str, wl: Workload = r.wl) -> float:
        return median_cpu(trials, variant, wl)

    ncpu = os.cpu_count()
    sw = bench.sweep
    text = ""
    if r.num == "own-null":
        text = (
            f"The session costs its process {cpu('null') / cpu('own-null'):.1f}x less CPU "
            "per request than pyfuse3, but fio, the loop device's kernel worker and the "
            f"kernel's side of FUSE share the {ncpu} CPUs and cost the same for both: the "
            f"do-nothing session reaches {ratio('own-null', 'raw', r.wl):.2f} of the raw "
            "loop device. Its own time is mostly the two system calls (profile below); "
            "the answer's `writev` also completes the loop device's request in the kernel"
        )
    elif r.num == "pass" and r.den == "null":
        text = (
            f"The passthrough (the compiled short way) costs {cpu('pass'):.0f} µs per "
            f"request against {cpu('own-null'):.0f} µs for the do-nothing session in "
            f"Python; it reaches {ratio('pass', 'own-null', r.wl):.2f} of the do-nothing "
            "session"
        )
    elif r.num == "pass" and r.den == "raw":
        text = (
            f"The do-nothing session itself reaches {ratio('own-null', 'raw', r.wl):.2f} "
            "of raw (raw is the kernel's loop driver alone; every FUSE request is a round "
            "trip through a reader thread in Python), and the passthrough, served in C, "
            f"{ratio('pass', 'own-null', r.wl):.2f} of the do-nothing session"
        )
        ceiling = ratio("own-pwrite", "raw", r.wl)
        if ceiling == ceiling:
            text += (
                f". The same session doing nothing but a `pread`/`pwrite` of its own "
                f"backing file per request ({cpu('own-pwrite'):.0f} µs of CPU) reaches "
                f"{ceiling:.2f} of raw, the passthrough {ratio('pass', 'own-pwrite', r.wl):.2f} "
                "of that"
            )
        compiled = ratio("c-pwrite", "raw", r.wl)
        if compiled == compiled:
            text += (
                f". The same loop compiled (`bench/cserver.c`, every thread serving at "
                f"once) reaches {compiled:.2f} of raw with the `pwrite` "
                f"({cpu('c-pwrite'):.0f} µs of CPU per request) and "
                f"{ratio('c-null', 'raw', r.wl):.2f} without ({cpu('c-null'):.0f} µs, "
                "the kernel's side of FUSE alone), blksnapd "
                f"{ratio('pass', 'c-pwrite', r.wl):.2f} of the first"
            )
        switched = median_preempted(trials, "pass", r.wl)
        if switched == switched:
            null = median_preempted(trials, "own-null", r.wl)
            text += (
                f". Its threads were switched out {switched:.2f} times per request against "
                "their will (involuntary context switches; the do-nothing session's "
                f"{null:.2f}): the loop device's completion, which the answer's `writev` "
                "raises as a soft interrupt, wakes `ksoftirqd`, and the scheduler gives it "
                "the serving thread's CPU (seen with `perf record -e sched:sched_switch`), "
                "while the raw loop device's completions come from the disk's interrupt"
            )
    elif r.num == "tracker":
        text = (
            f"The tracker's runs cost {cpu('tracker') - cpu('pass'):+.0f} µs per request more "
            "than the passthrough's in this run (the CBT mark, in C, and this shared "
            "machine's noise between runs)"
        )
        engine = {
            p.scenario: p.parts[ENGINE]
            for p in bench.profiles
            if p.wl is r.wl and p.scenario in ("pass", "tracker")
        }
        if len(engine) == 2:
            text += (
                "; in process, under the profiler, the engine's part of a request is "
                f"{engine['tracker'] - engine['pass']:+.0f} µs from the passthrough's"
            )
    elif r.num == "snap-rewrite":
        text = (
            f"A rewrite costs {cpu('snap-rewrite') - cpu('pass'):+.0f} µs more than a "
            "passthrough write: the tracker's CBT mark and the diff area's check that the "
            "chunks are stored (both in C)"
        )
    elif r.num == "snap-first":
        text = (
            f"Each first write copies its {size_text(bench.chunk_size or 65536)} chunk "
            "(read from the device, written to diff storage) before its own 4 KiB: "
            f"{cpu('snap-first'):.0f} µs of blksnapd's CPU per request against "
            f"{cpu('pass'):.0f} µs for a passthrough write"
        )
        if sw is not None:
            best = max(sw.counts, key=lambda n: sw.median(n, "cow"))
            text += (
                "; with the device's cache dropped the thread sweep's best count "
                f"({best}) reached {sw.median(best, 'cow') / 1000:,.1f} kIOPS"
            )
    elif r.num == "image-read":
        text = (
            f"An image read costs {cpu('image-read'):.0f} µs against "
            f"{cpu('dev-read'):.0f} µs for the device read: it also looks its chunks up "
            "in the diff area before and after the device read, in Python, where the "
            "device read is served in C (profile below)"
        )
    if r.num == "pass" and r.wl is RAND_W and sw is not None:
        few = min(sw.counts, key=lambda n: abs(n - 2))
        dflt = SETTINGS.fuse_threads
        if few != dflt and dflt in sw.counts:
            text += (
                f". In the thread sweep the passthrough ran at "
                f"{sw.median(few, 'pass') / 1000:,.1f} kIOPS and "
                f"{sw.cpu_us(few, 'pass'):.0f} µs per request with {few} reader threads, "
                f"{sw.median(dflt, 'pass') / 1000:,.1f} kIOPS and "
                f"{sw.cpu_us(dflt, 'pass'):.0f} µs with {dflt} (every thread reads in C; "
                "one at a time serves in Python)"
            )
    prof = next(
        (p for p in bench.profiles if p.scenario == PROFILE_OF.get(r.num) and p.wl is r.wl),
        None,
    )
    if prof is not None:
        top = ", ".join(f"{name} {us:,.0f}" for name, us in prof.parts.items() if us >= 0.5)
        text += f". Profiled (µs per request, under the profiler): {top}"
    return text


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
    extras: bool = True,
) -> Config:
    return Config(
        size=(size_mib or (32 if quick else 256)) * MiB,
        runtime=runtime or (0.5 if quick else 2.0),
        trials=trials or (1 if quick else 5),
        warmup=not quick,
        tmpdir=tmpdir,
        seed=seed,
        quick=quick,
        daemon_args=tuple(daemon_args),
        only=tuple(only),
        sweep=extras,
        folio=extras,
        profiles=extras,
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
        bench.extras(progress)
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
        help="comma-separated variants to run (raw, raw-buffered, null, own-null, own-pwrite, "
        "c-null, c-pwrite, pass, "
        "tracker, seq-session, rand-session); default all",
    )
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated extras to skip after the trials: sweep, folio, profiles",
    )
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
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"sweep", "folio", "profiles"}
    if unknown:
        ap.error(f"--skip: unknown {', '.join(sorted(unknown))}")
    cfg = dataclasses.replace(
        cfg,
        warmup=cfg.warmup and not args.no_warmup,
        sweep="sweep" not in skip,
        folio="folio" not in skip,
        profiles="profiles" not in skip,
    )
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
