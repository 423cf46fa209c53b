#!/usr/bin/env python3
"""Engine-level benchmark of blksnap: in process (``blksnap.Engine``), no
daemon, no FUSE.

What it measures, every time side by side in one run and as a ratio to plain
I/O on the same backing file (the machine is shared and noisy; a ratio taken
within one trial cancels most of that noise, and the report gives the median
over the trials):

1. write throughput through the engine with a snapshot taken (copy-on-write),
   for first writes (every chunk copied) and rewrites (chunks already stored),
   sequential 1 MiB and random 4 KiB, and with the tracker alone (no snapshot);
2. image reads vs device reads, sequential 1 MiB, with none, half or all of
   the image's chunks in diff storage;
3. the chunk size sweep of copy-on-write first writes (16K .. 1M);
4. memory: chunk-map bytes per stored chunk (and the RSS it costs), CBT bytes
   per TiB of device;
5. where the time goes: cProfile of the hot paths of this engine revision;
6. the cost of a diff-storage slot as storage sources accumulate;

and then, through the real block layer (``bench/fuse_bench.py``: blksnapd,
FUSE and loop devices, fio), the section "Block layer: fio on loop devices",
and the sections of ``nbd_bench``, ``backup_bench``, ``repo_bench``, ``instant_bench``,
``s3_bench``, ``restart_bench``, ``migrate_bench`` and ``cbt_bench``.

``make bench`` runs ``bench/run.py --output BENCHMARKS.md``; ``--quick`` is a
smoke run of a few seconds whose numbers mean little. ``--only NAME ...``
runs only the sections named (``engine`` for sections 1-6 above, else the
names in :data:`SECTIONS`); into an existing ``--output`` file it replaces
those sections and keeps every other one.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib
import json
import logging
import math
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from harness import (
    CBT_CAPACITIES,
    GiB,
    KiB,
    MiB,
    Sample,
    Spread,
    TiB,
    incompressible_file,
    machine,
    quiet_gc,
    rand_block_ops,
    rand_first_ops,
    seq_ops,
    size_text,
    table,
    timed,
)

import blksnap
from blksnap.engine.cbt import CbtMap, tracking_block_shift
from blksnap.engine.params import Params

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
#: What the header of a ``--quick`` report says.
QUICK_MARK = "**This is a `--quick` smoke run: the numbers mean little.**"

SEQ = "seq 1 MiB"
RAND = "rand 4 KiB"
IO_SIZE = {SEQ: 1 * MiB, RAND: 4 * KiB}


class BenchError(RuntimeError):
    """The engine did something that makes a measurement meaningless."""


@dataclass(frozen=True)
class Config:
    size: int
    trials: int
    warmup: int
    threads: int
    rand_ops: int
    chunk_sizes: tuple[int, ...]
    read_passes: int
    mem_chunks: int
    mem_worst_chunks: int
    tmpdir: str
    seed: int
    quick: bool
    block_layer: bool = True
    #: Only these sections (``engine`` and names of :data:`SECTIONS`); empty: all.
    only: tuple[str, ...] = ()

    def runs(self, name: str) -> bool:
        if self.only:
            return name in self.only
        return name == "engine" or self.block_layer

    @property
    def default_chunk(self) -> int:
        return Params().chunk_size


# -- setup --------------------------------------------------------------------------


# -- 1 + 3: writes --------------------------------------------------------------------


@dataclass
class WriteTrial:
    """Samples of one trial of one workload."""

    plain: list[Sample] = field(default_factory=list)
    tracker: Sample | None = None
    first: dict[int, Sample] = field(default_factory=dict)
    rewrite: dict[int, Sample] = field(default_factory=dict)
    raw: dict[int, Sample] = field(default_factory=dict)
    #: COW first writes at the default chunk size into a fresh anonymous file.
    fresh: Sample | None = None

    @property
    def plain_rate(self) -> float:
        return statistics.fmean(s.rate for s in self.plain)


class WriteBench:
    """Plain pwrite, tracker-only, copy-on-write (one engine per chunk size)
    and a raw copy-on-write floor, all on the same backing file."""

    def __init__(
        self, cfg: Config, workdir: str, dev_path: str, store_path: str, rng: random.Random
    ) -> None:
        self.cfg = cfg
        self.dir = workdir
        self.rng = rng
        self.fd = os.open(dev_path, os.O_RDWR)
        self.store_path = store_path
        self.store_fd = os.open(store_path, os.O_RDWR)
        self.engines: dict[int, blksnap.Engine] = {}
        self.devs = {}
        for cs in cfg.chunk_sizes:
            eng = blksnap.Engine(os.path.join(workdir, f"state-{cs}"), Params(chunk_size=cs))
            self.engines[cs] = eng
            self.devs[cs] = eng.add_device(dev_path, name="d0")
        # The tracker-only variant: tracker attached, no snapshot.
        self.engines[cfg.default_chunk].attach("d0")
        self.data = rng.randbytes(MiB)
        self.trials: dict[str, list[WriteTrial]] = {SEQ: [], RAND: []}

    def close(self) -> None:
        for eng in self.engines.values():
            eng.close()
        os.close(self.fd)
        os.close(self.store_fd)

    def settle(self) -> None:
        """Untimed, between variants: write back what the last one dirtied."""
        os.fsync(self.fd)
        os.fsync(self.store_fd)

    # -- workloads --

    def plain_ops(self, pattern: str) -> list[list[int]]:
        io = IO_SIZE[pattern]
        if pattern == SEQ:
            return seq_ops(self.cfg.size, io, self.cfg.threads)
        return rand_block_ops(self.cfg.size, io, self.cfg.threads, self.rng, self.cfg.rand_ops)

    def first_ops(self, pattern: str, cs: int) -> list[list[int]]:
        io = IO_SIZE[pattern]
        if pattern == SEQ:
            return seq_ops(self.cfg.size, io, self.cfg.threads)
        return rand_first_ops(self.cfg.size, cs, io, self.cfg.threads, self.rng)

    # -- variants --

    def run_plain(self, ops: list[list[int]], io: int) -> Sample:
        fd, data = self.fd, self.data[:io]
        return timed(ops, lambda off: os.pwrite(fd, data, off), io)

    def run_tracker(self, ops: list[list[int]], io: int) -> Sample:
        dev, data = self.devs[self.cfg.default_chunk], self.data[:io]
        return timed(ops, lambda off: dev.write(off, data), io)

    def run_cow(
        self,
        cs: int,
        first: list[list[int]],
        rewrite: list[list[int]] | None,
        io: int,
        fresh: bool,
    ) -> tuple[Sample, Sample | None]:
        """``fresh``: diff storage is a new anonymous file in the directory (as
        ``snapshot create -f DIR``); else the warm, preallocated storage file."""
        eng, dev, data = self.engines[cs], self.devs[cs], self.data[:io]
        storage, limit = (self.dir, 2 * self.cfg.size) if fresh else (self.store_path, None)
        sid = eng.snapshot_create(["d0"], storage=storage, limit=limit)
        try:
            eng.snapshot_take(sid)
            snap = eng.snapshot(sid)
            area = snap.members["d0"].diff_area
            assert area is not None
            s_first = timed(first, lambda off: dev.write(off, data), io)
            stored = area.chunks_stored
            s_rewrite = None
            if rewrite is not None:
                s_rewrite = timed(rewrite, lambda off: dev.write(off, data), io)
            want = self.cfg.size // cs
            if snap.state != "taken" or stored != want or area.chunks_stored != want:
                raise BenchError(
                    f"chunk {cs}: snapshot {snap.state}, {stored} chunks stored by the "
                    f"first writes and {area.chunks_stored} after the rewrites, not {want}"
                )
        finally:
            eng.snapshot_destroy(sid)
        return s_first, s_rewrite

    def run_raw(self, cs: int, ops: list[list[int]], io: int) -> Sample:
        """The least copy-on-write can cost: read the chunks under the write
        with one pread, put them in the diff storage file with one pwrite, then
        write. No chunk map, no locks but one, no events."""
        fd, store, data = self.fd, self.store_fd, self.data[:io]
        lock = threading.Lock()
        cursor = [0]

        def op(off: int) -> None:
            first, last = off // cs, (off + io - 1) // cs
            n = last - first + 1
            orig = os.pread(fd, n * cs, first * cs)
            with lock:
                slot = cursor[0]
                cursor[0] += n
            os.pwrite(store, orig, slot * cs)
            os.pwrite(fd, data, off)

        return timed(ops, op, io)

    # -- one trial --

    def trial(self, pattern: str) -> WriteTrial:
        io = IO_SIZE[pattern]
        plain_ops = self.plain_ops(pattern)
        first = {cs: self.first_ops(pattern, cs) for cs in self.cfg.chunk_sizes}
        jobs: list[tuple[str, int]] = [("plain", 0), ("plain", 1), ("tracker", 0)]
        jobs += [(kind, cs) for cs in self.cfg.chunk_sizes for kind in ("cow", "raw")]
        jobs.append(("fresh", self.cfg.default_chunk))
        self.rng.shuffle(jobs)
        out = WriteTrial()
        for kind, cs in jobs:
            if kind == "plain":
                out.plain.append(self.run_plain(plain_ops, io))
            elif kind == "tracker":
                out.tracker = self.run_tracker(plain_ops, io)
            elif kind == "cow":
                out.first[cs], rewritten = self.run_cow(cs, first[cs], plain_ops, io, fresh=False)
                assert rewritten is not None
                out.rewrite[cs] = rewritten
            elif kind == "fresh":
                out.fresh, _ = self.run_cow(cs, first[cs], None, io, fresh=True)
            else:
                out.raw[cs] = self.run_raw(cs, first[cs], io)
            self.settle()
        return out

    def run(self, progress: Callable[[str], None]) -> None:
        total = self.cfg.warmup + self.cfg.trials
        for t in range(total):
            # The warm-up touches every engine, file and code path once: the
            # sequential pattern is enough for that.
            for pattern in (SEQ,) if t < self.cfg.warmup else (SEQ, RAND):
                t0 = time.perf_counter()
                result = self.trial(pattern)
                label = "warm-up" if t < self.cfg.warmup else f"trial {t - self.cfg.warmup + 1}"
                progress(
                    f"writes {label}/{self.cfg.trials} {pattern}: {time.perf_counter() - t0:.1f}s"
                )
                if t >= self.cfg.warmup:
                    self.trials[pattern].append(result)


# -- 2: reads -------------------------------------------------------------------------

READ_PHASES = ("none", "half", "all")
READ_KINDS = ("dev", "img", "raw")


class ReadBench:
    """Sequential 1 MiB reads of the image, the device (engine) and the file."""

    def __init__(
        self, cfg: Config, workdir: str, dev_path: str, store_path: str, rng: random.Random
    ) -> None:
        self.cfg = cfg
        self.dir = workdir
        self.rng = rng
        self.fd = os.open(dev_path, os.O_RDWR)
        self.store_path = store_path
        self.eng = blksnap.Engine(os.path.join(workdir, "state-read"), Params())
        self.dev = self.eng.add_device(dev_path, name="r0")
        self.data = rng.randbytes(MiB)
        #: samples[phase][kind] -> one Sample per trial
        self.samples: dict[str, dict[str, list[Sample]]] = {
            p: {k: [] for k in READ_KINDS} for p in READ_PHASES
        }

    def close(self) -> None:
        self.eng.close()
        os.close(self.fd)

    def measure(self, phase: str, img: blksnap.Image, record: bool) -> None:
        ops = [[off for _ in range(self.cfg.read_passes) for off in range(0, self.cfg.size, MiB)]]
        fd, dev = self.fd, self.dev
        readers: dict[str, Callable[[int], object]] = {
            "dev": lambda off: dev.read(off, MiB),
            "img": lambda off: img.read(off, MiB),
            "raw": lambda off: os.pread(fd, MiB, off),
        }
        kinds = list(READ_KINDS)
        self.rng.shuffle(kinds)
        for kind in kinds:
            sample = timed(ops, readers[kind], MiB)
            if record:
                self.samples[phase][kind].append(sample)

    def trial(self, record: bool) -> None:
        cs = self.eng.params.chunk_size
        sid = self.eng.snapshot_create(["r0"], storage=self.store_path)
        try:
            self.eng.snapshot_take(sid)
            img = self.eng.image(sid, "r0")
            area = self.eng.snapshot(sid).members["r0"].diff_area
            assert area is not None
            self.measure("none", img, record)
            piece = self.data[:cs]
            for off in range(0, self.cfg.size, 2 * cs):
                self.dev.write(off, piece)
            half = area.chunks_stored
            self.measure("half", img, record)
            for off in range(0, self.cfg.size, MiB):
                self.dev.write(off, self.data)
            want = self.cfg.size // cs
            if area.chunks_stored != want or half != want // 2:
                raise BenchError(f"reads: {half} then {area.chunks_stored} chunks stored")
            self.measure("all", img, record)
            if self.eng.snapshot(sid).state != "taken":
                raise BenchError(f"reads: snapshot {self.eng.snapshot(sid).state}")
        finally:
            self.eng.snapshot_destroy(sid)
        os.fsync(self.fd)

    def run(self, progress: Callable[[str], None]) -> None:
        for t in range(self.cfg.warmup + self.cfg.trials):
            t0 = time.perf_counter()
            self.trial(record=t >= self.cfg.warmup)
            label = "warm-up" if t < self.cfg.warmup else f"trial {t - self.cfg.warmup + 1}"
            progress(f"reads {label}/{self.cfg.trials}: {time.perf_counter() - t0:.1f}s")


# -- 4: memory ------------------------------------------------------------------------


def memory_probe(cfg: Config, scenario: str, chunks: int, trace: bool) -> dict[str, object]:
    cmd = [
        sys.executable,
        os.path.join(HERE, "memory_probe.py"),
        "--scenario",
        scenario,
        "--chunks",
        str(chunks),
        "--tmpdir",
        cfg.tmpdir,
        "--seed",
        str(cfg.seed),
    ]
    if trace:
        cmd.append("--tracemalloc")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"memory probe {scenario} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["state"] != "taken" or result["chunks_stored"] != chunks:
        raise BenchError(f"memory probe {scenario}: {result}")
    return result


def cbt_rows() -> list[dict[str, int | bool]]:
    params = Params()
    rows = []
    for cap in CBT_CAPACITIES:
        shift = tracking_block_shift(cap, params)
        blocks = (cap + (1 << shift) - 1) >> shift
        rule = 2 * blocks  # one byte in the write map, one in the read map
        cbt = CbtMap(cap, params)  # np.zeros: address space only, nothing touched
        held = int(cbt.write_map.nbytes + cbt.read_map.nbytes)
        del cbt
        rows.append(
            {
                "capacity": cap,
                "block_size": 1 << shift,
                "blocks": blocks,
                "bytes": rule,
                "held": held,
                "per_tib": rule * TiB // cap,
            }
        )
    return rows


# -- 5: where the time goes ----------------------------------------------------------


@dataclass
class Hotspots:
    title: str
    requests: int
    seconds: float
    #: (function, calls per request, share of own time, own µs per request)
    rows: list[tuple[str, float, float, float]]


def _func_name(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":
        return name.replace("<built-in method ", "").rstrip(">").replace("<method ", "")
    rel = os.path.relpath(file, REPO)
    if rel.startswith(".."):
        rel = os.path.basename(file)
    return f"{rel}:{line} {name}"


def profile(title: str, requests: int, work: Callable[[], object], top: int = 6) -> Hotspots:
    prof = cProfile.Profile()
    with quiet_gc():
        t0 = time.perf_counter()
        prof.enable()
        work()
        prof.disable()
        seconds = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    ranked = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    rows = [
        (_func_name(key), val[1] / requests, val[2] / total, val[2] / requests * 1e6)
        for key, val in ranked
    ]
    return Hotspots(title, requests, seconds, rows)


def each(offsets: Sequence[int], op: Callable[[int], object]) -> None:
    """Run ``op`` over ``offsets``, dropping results as a real reader would."""
    for off in offsets:
        op(off)


def hotspots(
    cfg: Config, workdir: str, dev_path: str, store_path: str, rng: random.Random
) -> list[Hotspots]:
    """cProfile of the engine's hot paths, one thread, default chunk size."""
    size = min(cfg.size, 64 * MiB)
    eng = blksnap.Engine(os.path.join(workdir, "state-prof"), Params())
    cs = eng.params.chunk_size
    data = rng.randbytes(MiB)
    small = data[: 4 * KiB]
    out = []
    try:
        dev = eng.add_device(dev_path, name="p0")

        def snapshot() -> str:
            sid = eng.snapshot_create(["p0"], storage=store_path, limit=size)
            eng.snapshot_take(sid)
            return sid

        seq = range(0, size, MiB)
        sid = snapshot()
        img = eng.image(sid, "p0")
        out.append(
            profile(
                "img.read 1 MiB, no chunk stored",
                len(seq),
                lambda: each(seq, lambda off: img.read(off, MiB)),
            )
        )
        out.append(
            profile(
                "seq 1 MiB COW first writes",
                len(seq),
                lambda: each(seq, lambda off: dev.write(off, data)),
            )
        )
        out.append(
            profile(
                "img.read 1 MiB, every chunk stored",
                len(seq),
                lambda: each(seq, lambda off: img.read(off, MiB)),
            )
        )
        eng.snapshot_destroy(sid)
        first = rand_first_ops(size, cs, 4 * KiB, 1, rng)[0]
        sid = snapshot()
        out.append(
            profile(
                "rand 4 KiB COW first writes",
                len(first),
                lambda: each(first, lambda off: dev.write(off, small)),
            )
        )
        again = rand_block_ops(size, 4 * KiB, 1, rng, min(size // (4 * KiB), cfg.rand_ops))[0]
        out.append(
            profile(
                "rand 4 KiB rewrites (chunks stored)",
                len(again),
                lambda: each(again, lambda off: dev.write(off, small)),
            )
        )
        eng.snapshot_destroy(sid)
    finally:
        eng.close()
    return out


# -- 6: diff storage sources ------------------------------------------------------------


def alloc_scaling(cfg: Config, workdir: str) -> list[tuple[int, float]]:
    """µs per ``DiffStorage.alloc()`` with n sources, all but the last full:
    what every copied chunk pays once storage has been appended n - 1 times
    (``snapshot appendstorage``, ``snapshot watch --extend``)."""
    import resource

    from blksnap.engine.diff_storage import DiffStorage

    params = Params()
    slot = params.chunk_size
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    counts = (1, 10, 100) if cfg.quick else (1, 10, 100, 1000)
    calls = 500 if cfg.quick else 4000
    need = max(counts) + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    out = []
    for n in counts:
        if soft != resource.RLIM_INFINITY and n + 64 > soft:
            break
        runs = []
        for _ in range(3):
            storage = DiffStorage(params)
            try:
                for _ in range(n - 1):
                    storage.add(workdir, size=slot)
                storage.add(workdir, size=(calls + 1) * slot)
                for _ in range(n - 1):
                    storage.alloc()
                t0 = time.perf_counter()
                for _ in range(calls):
                    storage.alloc()
                runs.append((time.perf_counter() - t0) / calls * 1e6)
            finally:
                storage.release()
        out.append((n, statistics.median(runs)))
    return out


# -- report -----------------------------------------------------------------------------


def spread(values: Sequence[float]) -> Spread:
    return Spread.of(values)


def fmt_rate(pattern: str, samples: Sequence[Sample]) -> str:
    if pattern == SEQ:
        return f"{statistics.median(s.mib_s for s in samples):,.0f} MiB/s"
    return f"{statistics.median(s.kiops for s in samples):,.1f} kIOPS"


def kib(n: int) -> str:
    return f"{n // KiB}K" if n < MiB else f"{n // MiB}M"


class Report:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.parts: list[str] = []
        self.findings: dict[str, object] = {}

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text, flush=True)

    # -- section 1 --

    def writes(self, wb: WriteBench) -> None:
        cfg = self.cfg
        d = cfg.default_chunk
        rows = []
        for pattern in (SEQ, RAND):
            trials = wb.trials[pattern]
            plain = [s for t in trials for s in t.plain]
            variants: list[tuple[str, str, list[Sample]]] = [
                (
                    "tracker",
                    "tracker only, no snapshot",
                    [t.tracker for t in trials if t.tracker],
                ),
                (
                    "first",
                    "COW first writes (every write copies)",
                    [t.first[d] for t in trials],
                ),
                (
                    "fresh",
                    "COW first writes, diff storage a fresh file (directory)",
                    [t.fresh for t in trials if t.fresh],
                ),
                (
                    "rewrite",
                    "COW rewrites (chunks already stored)",
                    [t.rewrite[d] for t in trials],
                ),
                (
                    "raw",
                    "raw COW floor: pread + pwrite, no engine",
                    [t.raw[d] for t in trials],
                ),
            ]
            for key, label, samples in variants:
                ratios = spread(
                    [s.rate / t.plain_rate for s, t in zip(samples, trials, strict=True)]
                )
                rows.append(
                    [
                        pattern,
                        label,
                        fmt_rate(pattern, plain),
                        fmt_rate(pattern, samples),
                        ratios.ratio_text(),
                        ratios.range_text(),
                    ]
                )
                self.findings[f"{pattern}/{key}"] = ratios.median
            floor = spread([t.first[d].rate / t.raw[d].rate for t in trials])
            self.findings[f"{pattern}/floor"] = floor.median
        self.add(f"## 1. Copy-on-write write throughput (chunk size {kib(d)}, the default)\n")
        self.add(
            table(
                ["workload", "writes", "plain pwrite", "through the engine", "ratio", "range"],
                rows,
            )
        )
        self.add("")
        f = {
            k: self.findings[f"{SEQ}/{k}"]
            for k in ("tracker", "first", "fresh", "rewrite", "raw", "floor")
        }
        g = {k: self.findings[f"{RAND}/{k}"] for k in f}
        rand_trials = wb.trials[RAND]
        rew_trk = statistics.median(
            t.rewrite[d].rate / t.tracker.rate for t in rand_trials if t.tracker
        )
        plain_rand = [x for t in rand_trials for x in t.plain]
        plain_seq = [x for t in wb.trials[SEQ] for x in t.plain]
        self.add(
            "**Reading.** The ratio is engine throughput over plain `os.pwrite` throughput "
            "in the same trial (1.00 = free, 0.25 = four times slower). With the tracker "
            f"alone the engine keeps {f['tracker']:.2f} of plain speed for sequential 1 MiB "
            f"writes and {g['tracker']:.2f} for random 4 KiB writes: a 4 KiB page-cache "
            "write costs only a few microseconds, so the per-request Python path (gate, "
            "filter stack, CBT mark) is a large share of it, while a 1 MiB write hides it. "
            f"First writes after a take run at {f['first']:.2f} (sequential) and "
            f"{g['first']:.2f} (random) of plain speed. Part of that is the copy itself, "
            "which no implementation avoids: the raw floor (one pread of the chunks under "
            "the write, one pwrite into the diff storage file, then the write) reaches "
            f"{f['raw']:.2f} and {g['raw']:.2f}, so the engine runs at {f['floor']:.2f} and "
            f"{g['floor']:.2f} of the floor; the rest is its own cost per chunk and per "
            "request. Diff storage in a fresh anonymous file (a directory given as "
            f"storage) gives {f['fresh']:.2f} and {g['fresh']:.2f}: every chunk then also "
            "needs new page-cache pages and new file blocks. Rewrites of chunks already "
            f"stored reach {f['rewrite']:.2f} and {g['rewrite']:.2f}: they copy nothing, "
            "so they should cost what the tracker alone costs plus one chunk-map lookup; "
            f"a random 4 KiB rewrite runs at {rew_trk:.2f} of the tracker-only rate "
            "(section 5 shows the per-request chunk-map work).\n"
        )
        self.add(
            "*Noise.* Plain writes alone ranged from "
            f"{min(s.kiops for s in plain_rand):,.0f} to {max(s.kiops for s in plain_rand):,.0f} "
            f"kIOPS (random 4 KiB) and {min(s.mib_s for s in plain_seq):,.0f} to "
            f"{max(s.mib_s for s in plain_seq):,.0f} MiB/s (sequential) over the trials of "
            "this run. The engine's 4 KiB path is bound by the GIL and varies less, so the "
            "random-write ratios move with the plain side: compare ratios within one "
            "report, and read differences inside the ranges as noise.\n"
        )

    # -- section 2 --

    def reads(self, rb: ReadBench) -> None:
        labels = {
            "none": "none (fresh snapshot)",
            "half": "half (every other chunk)",
            "all": "all",
        }
        rows = []
        for phase in READ_PHASES:
            s = rb.samples[phase]
            ratios = spread([i.rate / dv.rate for i, dv in zip(s["img"], s["dev"], strict=True)])
            rows.append(
                [
                    labels[phase],
                    fmt_rate(SEQ, s["dev"]),
                    fmt_rate(SEQ, s["img"]),
                    ratios.ratio_text(),
                    ratios.range_text(),
                    fmt_rate(SEQ, s["raw"]),
                ]
            )
            self.findings[f"read/{phase}"] = ratios.median
        cs = kib(self.cfg.default_chunk)
        self.add(f"## 2. Image read vs device read (sequential 1 MiB, 1 thread, chunk {cs})\n")
        self.add(
            table(
                [
                    "image chunks in diff storage",
                    "dev.read",
                    "img.read",
                    "img ÷ dev",
                    "range",
                    "plain os.pread",
                ],
                rows,
            )
        )
        self.add("")
        none, half, full = (self.findings[f"read/{p}"] for p in READ_PHASES)
        self.add(
            "**Reading.** With no chunk stored an image read is a device read plus the "
            f"diff area's bookkeeping: it runs at {none:.2f} of `dev.read`. With every "
            f"chunk in diff storage it runs at {full:.2f}, and with every other chunk "
            f"stored at {half:.2f}: stored chunks are read one by one from diff storage "
            "and joined. The reads are page-cache warm on both sides, so this is CPU "
            "cost per MiB, not disk speed; section 5 shows where it goes.\n"
        )

    # -- section 3 --

    def sweep(self, wb: WriteBench) -> None:
        cfg = self.cfg
        self.add("## 3. Chunk size sweep: copy-on-write first writes\n")
        scores: dict[int, dict[str, float]] = {}
        ranges: dict[tuple[int, str], Spread] = {}
        for pattern in (SEQ, RAND):
            trials = wb.trials[pattern]
            io = IO_SIZE[pattern]
            rows = []
            for cs in cfg.chunk_sizes:
                first = [t.first[cs] for t in trials]
                ratio = spread([t.first[cs].rate / t.plain_rate for t in trials])
                floor = spread([t.first[cs].rate / t.raw[cs].rate for t in trials])
                rew = spread([t.rewrite[cs].rate / t.plain_rate for t in trials])
                copied = max(cs, io) if pattern == SEQ else cs
                per_write = (
                    f"{copied // cs} x {kib(cs)}" if pattern == SEQ else f"{cs // io} x the write"
                )
                rows.append(
                    [
                        kib(cs) + (" (default)" if cs == cfg.default_chunk else ""),
                        per_write,
                        fmt_rate(pattern, first),
                        ratio.ratio_text(),
                        ratio.range_text(),
                        fmt_rate(pattern, [t.raw[cs] for t in trials]),
                        f"{floor.median:.2f}",
                        f"{rew.median:.2f}",
                    ]
                )
                scores.setdefault(cs, {})[pattern] = ratio.median
                ranges[(cs, pattern)] = ratio
                scores[cs][pattern + "/floor"] = floor.median
            copy_head = "copied per write" if pattern == SEQ else "bytes copied"
            self.add(f"**{pattern} first writes** ({cfg.threads} threads)\n")
            self.add(
                table(
                    [
                        "chunk",
                        copy_head,
                        "engine",
                        "ratio to plain",
                        "range",
                        "raw COW floor",
                        "engine ÷ floor",
                        "rewrite ratio",
                    ],
                    rows,
                )
            )
            self.add("")
        best_seq = max(scores, key=lambda c: scores[c][SEQ])

        def ties(best: int, pattern: str) -> str:
            """Chunk sizes whose range of ratios overlaps the best one's."""
            if cfg.trials < 3:
                return "too few trials to tell noise from difference"
            top = ranges[(best, pattern)]
            near = [
                kib(c)
                for c in cfg.chunk_sizes
                if c != best and ranges[(c, pattern)].high >= top.low
            ]
            if not near:
                return "clearly ahead of the others"
            return "within the range of " + ", ".join(near)

        best_rand = max(scores, key=lambda c: scores[c][RAND])
        best_both = max(scores, key=lambda c: math.sqrt(scores[c][SEQ] * scores[c][RAND]))
        geo = {c: math.sqrt(scores[c][SEQ] * scores[c][RAND]) for c in scores}
        self.findings["sweep"] = scores
        self.findings["best"] = {"seq": best_seq, "rand": best_rand, "both": best_both}
        rows = [
            [
                kib(c) + (" (default)" if c == cfg.default_chunk else ""),
                f"{scores[c][SEQ]:.2f}",
                f"{scores[c][RAND]:.2f}",
                f"**{geo[c]:.2f}**",
                f"{c // (4 * KiB)}x",
                size_text(8 * GiB // c),
            ]
            for c in cfg.chunk_sizes
        ]
        self.add("**Summary per chunk size**\n")
        self.add(
            table(
                [
                    "chunk",
                    "seq 1 MiB ratio",
                    "rand 4 KiB ratio",
                    "geometric mean",
                    "diff storage per random 4 KiB write",
                    "chunk map per GiB copied",
                ],
                rows,
            )
        )
        self.add("")
        d = cfg.default_chunk
        self.add(
            "**Reading.** Sequential 1 MiB first writes do best with "
            f"{kib(best_seq)} chunks ({scores[best_seq][SEQ]:.2f} of plain; "
            f"{ties(best_seq, SEQ)}), random 4 KiB first writes with {kib(best_rand)} "
            f"chunks ({scores[best_rand][RAND]:.2f}; {ties(best_rand, RAND)}); "
            + (
                f"the best geometric mean of the two is the default, {kib(d)} ({geo[d]:.2f}). "
                if best_both == d
                else f"the best geometric mean of the two is {kib(best_both)} "
                f"({geo[best_both]:.2f}; the default {kib(d)} scores {geo[d]:.2f}). "
            )
            + "Small chunks pay the engine's per-chunk work (section 5) many times per "
            "1 MiB write; large "
            "chunks make every small random write copy a whole chunk, and use diff "
            "storage in proportion: a random 4 KiB write on a never-copied chunk "
            "consumes a full chunk of diff storage, so with 1 MiB chunks a random-write "
            "workload fills the storage 256 times faster than the data it changes. "
            "The *engine ÷ floor* column is how close the engine comes to the least "
            "copy-on-write can cost at that chunk size: far from 1 at small chunks, "
            "where the per-chunk work dominates. For comparison, the kernel blksnap "
            "module's default chunk is 256 KiB (`chunk_minimum_shift` = 18).\n"
        )

    # -- section 4 --

    def memory(self, mem: list[dict[str, object]], cbt: list[dict[str, int | bool]]) -> None:
        self.add("## 4. Memory\n")
        self.add("**Chunk map** (4 KiB chunks; the map holds one int64 per chunk, any size)\n")
        names = {
            "dense": "dense: consecutive chunks",
            "random": "random chunks on a 64 GiB device",
            "one-per-page": "one chunk per map page (worst case)",
        }
        rows = []
        for r in mem:
            n = int(r["chunks_stored"])  # type: ignore[call-overload]
            traced = r["traced_retained"]
            rows.append(
                [
                    names[str(r["scenario"])],
                    f"{n:,}",
                    size_text(int(r["map_bytes"])),  # type: ignore[call-overload]
                    f"{int(r['map_bytes']) / n:,.1f} B",  # type: ignore[call-overload]
                    f"{int(traced) / n:,.1f} B" if traced is not None else "—",  # type: ignore[call-overload]
                    f"{int(r['rss_delta']) / n:,.1f} B",  # type: ignore[call-overload]
                    size_text(max(0, int(r["peak_rss_delta"]))),  # type: ignore[call-overload]
                ]
            )
            self.findings[f"mem/{r['scenario']}"] = int(r["map_bytes"]) / n  # type: ignore[call-overload]
        self.add(
            table(
                [
                    "chunks stored",
                    "count",
                    "map_bytes",
                    "map bytes / chunk",
                    "tracemalloc kept / chunk",
                    "RSS growth / chunk",
                    "peak RSS growth",
                ],
                rows,
            )
        )
        self.add("")
        page = Params().chunk_map_page
        dense = self.findings.get("mem/dense", 8.0)
        rand = self.findings.get("mem/random", 0.0)
        worst = self.findings.get("mem/one-per-page", 0.0)
        by_name = {str(r["scenario"]): r for r in mem}

        def rss_per_chunk(name: str) -> float:
            r = by_name[name]
            return int(r["rss_delta"]) / int(r["chunks_stored"])  # type: ignore[call-overload]

        rss_rand, rss_worst = rss_per_chunk("random"), rss_per_chunk("one-per-page")
        traced_text = " and ".join(
            f"{int(r['traced_retained']) / int(r['map_bytes']):.2f} ({r['scenario']})"  # type: ignore[call-overload]
            for r in mem
            if r["traced_retained"] is not None
        )
        self.add(
            f"The map lives in a sparse shared-memory region (a memfd, so that it outlives "
            f"a crash of blksnapd's worker), in pages of {page:,} int64 (32 KiB each); a "
            f"page's memory is made when its first chunk is stored. Chunks stored side by "
            f"side cost "
            f"{dense:.1f} B each; chunks scattered over a large device cost a whole page "
            f"per page touched: {rand:,.0f} B per chunk for random chunks over 16 Mi "
            f"chunks (what a 1 TiB device has at 64 KiB chunks), and {worst:,.0f} B per "
            "chunk when each sits in a page of its own. Where the map is large enough "
            f"to stand out, RSS grows with it: {rss_rand:,.0f} B per chunk (random) and "
            f"{rss_worst:,.0f} B (one per page), next to their `map_bytes`; the peak "
            "also counts the I/O buffers in flight. The map is outside Python's heap: "
            f"what Python allocations the writes left behind (tracemalloc) comes to "
            f"{traced_text} of `map_bytes`, what the write path keeps besides the map "
            "(fixed costs weigh more in small runs).\n"
        )
        params = Params()
        cs, page = params.chunk_size, params.chunk_map_page
        bound_rows = []
        for cap in (1 * TiB, 16 * TiB, 128 * TiB):
            chunks = cap // cs
            pages = max(1, chunks // page)
            bound_rows.append(
                [
                    size_text(cap),
                    f"{chunks:,}",
                    size_text(chunks * 8),
                    f"{pages:,}",
                    f"{pages * math.log(pages) + 0.5772 * pages:,.0f}",
                ]
            )
        self.add(
            f"**Chunk map bound** at the default {kib(cs)} chunk: the map can grow to "
            "8 B per chunk of the device, and it takes only one stored chunk per page "
            "(a few random writes per page) to get there\n"
        )
        self.add(
            table(
                [
                    "device",
                    "chunks",
                    "full map",
                    "map pages",
                    "random 4 KiB first writes to touch every page (expected)",
                ],
                bound_rows,
            )
        )
        self.add("")
        self.add(
            "**CBT map** (the block size rule of `blksnap/cbt.py`, default parameters; "
            "2 bytes per block: write map + read map)\n"
        )
        rows = [
            [
                size_text(r["capacity"]),
                size_text(r["block_size"]),
                f"{r['blocks']:,}",
                size_text(r["bytes"]) + ("" if r["held"] == r["bytes"] else " (!)"),
                size_text(r["per_tib"]),
            ]
            for r in cbt
        ]
        self.add(
            table(["device", "tracking block", "blocks", "CBT bytes", "per TiB of device"], rows)
        )
        self.add("")
        one = next(r for r in cbt if r["capacity"] == TiB)
        sixteen = next(r for r in cbt if r["capacity"] == 16 * TiB)
        self.add(
            "The block doubles from 64 KiB while the device would have more than 2 Mi "
            "blocks, so from 128 GiB up to 128 TiB the map stays at 2 Mi blocks = 4 MiB "
            f"(1 TiB: {size_text(one['bytes'])}, {size_text(one['per_tib'])} per TiB; "
            f"16 TiB: {size_text(sixteen['bytes'])}, {size_text(sixteen['per_tib'])} per "
            "TiB); past 128 TiB the 64 MiB block cap makes it grow again linearly. A take "
            "copies the write map into a new read map, so for a moment three maps exist. "
            "Every row was cross-checked against a `CbtMap` built for that capacity.\n"
        )

    # -- section 5 --

    def hotspots(self, spots: list[Hotspots]) -> None:
        self.add(
            "## 5. Where the time goes (cProfile, 1 thread, default chunk size)\n\n"
            "Own time per function, top entries; the profiler inflates the cost of every "
            "Python call, so read the shares, not the absolute microseconds.\n"
        )
        for spot in spots:
            per = spot.seconds / spot.requests * 1e6
            self.add(
                f"**{spot.title}**: {spot.requests:,} requests, {per:,.0f} µs each "
                "under the profiler\n"
            )
            rows = [
                [name, f"{calls:,.1f}", f"{share * 100:.0f}%", f"{us:,.1f}"]
                for name, calls, share, us in spot.rows
            ]
            self.add(table(["function", "calls / request", "own time", "µs / request"], rows))
            self.add("")

    # -- section 6 --

    def alloc_scaling(self, rows: list[tuple[int, float]]) -> None:
        base = rows[0][1]
        cs = kib(self.cfg.default_chunk)
        self.add("## 6. Diff storage: cost of one chunk slot vs the number of storage sources\n")
        self.add(
            table(
                ["sources (all but the last full)", "alloc() per chunk", "vs 1 source"],
                [[f"{n:,}", f"{us:,.1f} µs", f"{us / base:,.1f}x"] for n, us in rows],
            )
        )
        self.add("")
        n, us = rows[-1]
        self.add(
            "**Reading.** Every copied chunk takes one slot. Storage grows by appending "
            "sources (`snapshot appendstorage`, `snapshot watch --extend` in steps), and "
            f"with {n:,} sources one slot costs {us:,.0f} µs, {us / base:,.0f} times the "
            "cost with one. A random 4 KiB first write copies one chunk and allocates "
            f"once, so this alone caps such writes near {1 / (us * 1e-6) / 1000:,.1f} "
            "kIOPS whatever the thread count (the allocation holds the storage lock); "
            "sequential writes share one allocation per run of chunks "
            f"(at {cs}, 16 chunks per 1 MiB write).\n"
        )


# -- main -----------------------------------------------------------------------------


def header(cfg: Config, env: dict[str, str], started: datetime.datetime) -> str:
    rows = [[k, v] for k, v in env.items()]
    return "\n".join(
        [
            "# blksnap engine benchmarks",
            "",
            "Generated by `make bench` (`bench/run.py`); do not edit by hand, run it again."
            + (f" {QUICK_MARK}" if cfg.quick else ""),
            "",
            f"Date: {started:%Y-%m-%d %H:%M %Z}".rstrip(),
            "",
            table(["machine", ""], rows),
            "",
            "## Method",
            "",
            "- In process: `blksnap.Engine`, no daemon, no FUSE. Every engine number is "
            "compared with plain `os.pread`/`os.pwrite` on **the same backing file**, "
            "same request sizes, same offsets where the workload allows, same thread "
            "count, same Python loop.",
            f"- Device: one {size_text(cfg.size)} file of random data. Writes: "
            f"{cfg.threads} threads (pread/pwrite release the GIL). Sequential 1 MiB: "
            "each thread writes its own contiguous quarter in order. Random 4 KiB: "
            f"{cfg.rand_ops:,} distinct 4 KiB blocks in random order for plain writes, "
            "the tracker and rewrites; for *first* writes one 4 KiB write at a random "
            "offset inside every chunk of the device, chunks in random order, so every "
            "write copies exactly one never-copied chunk (the count therefore is device "
            "size ÷ chunk size). Reads: 1 thread, "
            f"{cfg.read_passes} sequential passes over the device.",
            "- Copy-on-write variants: a snapshot is created and taken, the first writes "
            "are timed, then the rewrites on the same snapshot, then it is destroyed; the "
            "engine is checked to have stored every chunk exactly once and to be "
            "uncorrupted. One engine per chunk size (`Params(chunk_size=...)`), all "
            "serving the same file. Diff storage is a regular file of the device's size, "
            "filled and fsync'ed like the device, so that its pages are as warm as the "
            "device's and both sides overwrite cached pages. One extra variant gives a "
            "directory instead (a fresh anonymous file per snapshot, as `snapshot create "
            "-f DIR` does), which adds new page-cache pages and block allocation to "
            "every copy.",
            "- *Raw COW floor*: the same first writes with no engine: one `pread` of the "
            "chunks under the write, one `pwrite` of them into the diff storage file, "
            "then the write. The least any copy-on-write can cost at that chunk size.",
            f"- Trials: {cfg.warmup} warm-up trial (discarded), then {cfg.trials} "
            "trials. Within a trial every variant of a workload runs once (plain twice), "
            "in a fresh random order; the ratio is taken within the trial (variant ÷ mean "
            "of that trial's two plain runs) and the tables give the median over trials "
            "(bold) and the range. Absolute numbers are medians too.",
            "- Page cache: **warm on both sides.** The device file is fsync'ed before "
            "the run and after every variant (outside the timed region), so each variant "
            "starts with clean pages and none pays for another's writeback; nothing is "
            "dropped from the cache (that needs root and would measure the disk). These "
            "numbers are therefore CPU cost per request (Python, syscalls, page-cache "
            "copies): the engine's own overhead at its most visible. On a real disk "
            "the copy's extra I/O (one read and one more write per first write) would "
            "dominate both sides.",
            "- The garbage collector is frozen over the benchmark's own objects while "
            "a measurement runs (`gc.freeze()`), so the engine, which allocates and so "
            "triggers collections, does not pay for traversing the benchmark's heap.",
            "- Memory (section 4) runs in child processes (`bench/memory_probe.py`) so "
            "peak RSS starts clean; CBT sizes are computed from the block size rule and "
            "checked against a real `CbtMap`.",
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> tuple[Config, str | None]:
    ap = argparse.ArgumentParser(description="blksnap engine benchmark")
    ap.add_argument("--output", "-o", help="write the Markdown report here")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few seconds")
    ap.add_argument("--trials", type=int, help="timed trials (default 5, quick 1)")
    ap.add_argument("--size", type=int, help="device size in MiB (default 256, quick 16)")
    ap.add_argument("--threads", type=int, default=4, help="writer threads (default 4)")
    ap.add_argument(
        "--tmpdir",
        default=os.environ.get("BLKSNAP_BENCH_TMPDIR", "/var/tmp"),
        help="where the device and diff storage files go (default /var/tmp)",
    )
    ap.add_argument("--seed", type=int, default=20260101)
    ap.add_argument(
        "--no-block-layer",
        action="store_true",
        help="skip the fio / loop device / FUSE section (bench/fuse_bench.py)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=["engine", *SECTIONS],
        metavar="NAME",
        help="run only these sections: engine (1-6, in process) or "
        f"{', '.join(SECTIONS)}; an existing --output file keeps its other sections",
    )
    args = ap.parse_args(argv)
    quick = args.quick
    default_cs = Params().chunk_size
    sizes = sorted({16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, default_cs})
    size = (args.size or (16 if quick else 256)) * MiB
    if size % max(sizes) or size < 4 * max(sizes) * args.threads:
        ap.error(f"--size must be a multiple of {max(sizes) // MiB} MiB, at least 4 per thread")
    cfg = Config(
        size=size,
        trials=args.trials or (1 if quick else 5),
        warmup=0 if quick else 1,
        threads=args.threads,
        rand_ops=min(size // (4 * KiB), 1024 if quick else 16384),
        chunk_sizes=tuple(sizes),
        read_passes=1 if quick else 2,
        mem_chunks=2000 if quick else 100_000,
        mem_worst_chunks=64 if quick else 2048,
        tmpdir=args.tmpdir,
        seed=args.seed,
        quick=quick,
        block_layer=not args.no_block_layer,
        only=tuple(args.only or ()),
    )
    if cfg.only and args.output and os.path.exists(args.output):
        with open(args.output) as f:
            text = f.read()
        if quick and QUICK_MARK not in text:
            ap.error(f"--quick --only would put smoke-run numbers into {args.output}, a full run")
    return cfg, args.output


def main(argv: Sequence[str] | None = None) -> int:
    cfg, output = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("blksnap").setLevel(logging.ERROR)
    started = datetime.datetime.now().astimezone()
    t_start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    env = machine(cfg.tmpdir, REPO)
    report = Report(cfg)
    if cfg.runs("engine"):
        report.add(header(cfg, env, started))
        engine_sections(cfg, report, progress)
    else:
        report.add(partial_header(cfg, env, started))
    failed = False
    for name, (_, section) in SECTIONS.items():
        if cfg.runs(name):
            failed = not section(cfg, report, progress) or failed

    elapsed = time.perf_counter() - t_start
    report.add(f"_Whole run: {elapsed:.0f} s._\n")
    if output:
        if cfg.only and os.path.exists(output):
            with open(output) as f:
                old = f.read()
            text = merge_sections(old, report.parts[1:-1])
            what = f"sections {', '.join(cfg.only)} of {output} (the others kept)"
        else:
            text = "\n".join(report.parts).rstrip() + "\n"
            what = output
        with open(output, "w") as f:
            f.write(text)
        progress(f"wrote {what}")
    return 1 if failed else 0


def engine_sections(cfg: Config, report: Report, progress: Callable[[str], None]) -> None:
    """Sections 1-6: the engine in process."""
    rng = random.Random(cfg.seed)
    with tempfile.TemporaryDirectory(dir=cfg.tmpdir, prefix="blksnap-bench-") as workdir:
        dev_path = os.path.join(workdir, "dev0")
        incompressible_file(dev_path, cfg.size, rng)
        store_path = os.path.join(workdir, "diff-storage")
        incompressible_file(store_path, cfg.size, rng)
        progress(f"device and diff storage file, {size_text(cfg.size)} each, in {workdir}")

        wb = WriteBench(cfg, workdir, dev_path, store_path, rng)
        try:
            wb.run(progress)
        finally:
            wb.close()
        report.writes(wb)

        rb = ReadBench(cfg, workdir, dev_path, store_path, rng)
        try:
            rb.run(progress)
        finally:
            rb.close()
        report.reads(rb)
        report.sweep(wb)
        t0 = time.perf_counter()
        spots = hotspots(cfg, workdir, dev_path, store_path, rng)
        progress(f"profiles: {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        scaling = alloc_scaling(cfg, workdir)
        progress(f"diff storage sources: {time.perf_counter() - t0:.1f}s")

    mem = []
    for scenario, chunks, trace in (
        ("dense", cfg.mem_chunks, True),
        ("random", cfg.mem_chunks, False),
        ("one-per-page", cfg.mem_worst_chunks, True),
    ):
        t0 = time.perf_counter()
        result = memory_probe(cfg, scenario, chunks, trace=False)
        if trace:
            # A run of its own: tracemalloc's tables would inflate the RSS figures.
            traced = memory_probe(cfg, scenario, chunks, trace=True)
            result["traced_retained"] = traced["traced_retained"]
            result["traced_peak"] = traced["traced_peak"]
        mem.append(result)
        progress(f"memory {scenario}: {time.perf_counter() - t0:.1f}s")
    report.memory(mem, cbt_rows())
    report.hotspots(spots)
    report.alloc_scaling(scaling)


def partial_header(cfg: Config, env: dict[str, str], started: datetime.datetime) -> str:
    """The head of a report of some sections only (``--only``) in a new file."""
    return "\n".join(
        [
            "# blksnap benchmarks: some sections",
            "",
            f"Generated by `bench/run.py --only {' '.join(cfg.only)}`."
            + (f" {QUICK_MARK}" if cfg.quick else ""),
            "",
            f"Date: {started:%Y-%m-%d %H:%M %Z}".rstrip(),
            "",
            table(["machine", ""], [[k, v] for k, v in env.items()]),
            "",
        ]
    )


def merge_sections(old: str, parts: Sequence[str]) -> str:
    """``old`` (a report) with each of ``parts`` (sections, each starting
    with its ``## `` heading) in place of the section of the same heading; a
    section ``old`` lacks goes after the last section that comes before it in
    the order of :data:`SECTIONS`, else before the closing "_Whole run" line.
    Everything else of ``old`` is kept as it was."""
    # Blocks: the text before the first heading, then one per "## " heading.
    blocks: list[list[str]] = [[]]
    for line in old.rstrip("\n").split("\n"):
        if line.startswith("## ") or line.startswith("_Whole run:"):
            blocks.append([])
        blocks[-1].append(line)

    def heading(lines: Sequence[str]) -> str:
        return lines[0] if lines else ""

    # The new sections, one block per "## " heading (a part may hold several).
    news: list[list[str]] = []
    for part in parts:
        for line in part.strip("\n").split("\n"):
            if line.startswith("## ") or not news:
                if news:
                    news[-1].append("")
                news.append([])
            news[-1].append(line)
    if news:
        news[-1].append("")
    order = [importlib.import_module(module).SECTION for module, _ in SECTIONS.values()]
    for new in news:
        head = heading(new)
        at = [i for i, b in enumerate(blocks) if i and heading(b) == head]
        if at:
            blocks[at[0]] = new
            continue
        before = order[: order.index(head)] if head in order else order
        after = [i for i, b in enumerate(blocks) if i and heading(b) in before]
        if after:
            blocks.insert(after[-1] + 1, new)
        else:
            tail = [i for i, b in enumerate(blocks) if heading(b).startswith("_Whole run:")]
            blocks.insert(tail[0] if tail else len(blocks), new)
    return "\n".join(line for b in blocks for line in b).rstrip("\n") + "\n"


def block_layer(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """The fio / loop device / FUSE section; False if it failed (the report
    then says how, and the engine sections are still written)."""
    import fuse_bench

    fcfg = fuse_bench.make_config(cfg.quick, cfg.tmpdir, cfg.seed)
    return _sub_section(
        report,
        progress,
        fuse_bench,
        "block-layer",
        lambda: fuse_bench.run_section(fcfg, progress)[0],
    )


def _sub_section(
    report: Report,
    progress: Callable[[str], None],
    module: ModuleType,
    what: str,
    make: Callable[[], str],
) -> bool:
    """Add the section ``make()`` writes; if it raises, say so in the report
    under ``module.SECTION`` (the other sections are still written)."""
    try:
        report.add(make())
    except Exception as exc:  # keep the other sections; say what broke
        progress(f"{what} benchmark failed: {exc!r}")
        report.add(f"{module.SECTION}\n\n**Failed**: `{exc!r}`\n")
        return False
    return True


def nbd_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """nbdcopy against blksnapd's NBD exports and qemu-nbd (bench/nbd_bench.py)."""
    import nbd_bench

    return _sub_section(
        report, progress, nbd_bench, "NBD", lambda: nbd_bench.run_nbd_bench(cfg.quick, progress)
    )


def backup_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """blksnap backup vs qemu-img convert; incremental cost (bench/backup_bench.py)."""
    import backup_bench

    return _sub_section(
        report,
        progress,
        backup_bench,
        "backup",
        lambda: backup_bench.run_backup_bench(cfg.quick, progress),
    )


def repo_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """Repository v2: dedup, encryption, restore, verify, chunk size (bench/repo_bench.py)."""
    import repo_bench

    return _sub_section(
        report,
        progress,
        repo_bench,
        "repository",
        lambda: repo_bench.run_repo_bench(cfg.quick, progress),
    )


def instant_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """Instant restore: time to first read, hydration vs restore, read latency
    (bench/instant_bench.py)."""
    import instant_bench

    return _sub_section(
        report,
        progress,
        instant_bench,
        "instant restore",
        lambda: instant_bench.run_instant_bench(cfg.quick, progress),
    )


def restart_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """The I/O stall at a worker kill and at daemon restart (bench/restart_bench.py)."""
    import restart_bench

    return _sub_section(
        report,
        progress,
        restart_bench,
        "restart",
        lambda: restart_bench.run_section(cfg.quick, progress),
    )


def migrate_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """Moving a live device (the migrate filter) vs cp and dd, and the writes
    meanwhile (bench/migrate_bench.py)."""
    import migrate_bench

    return _sub_section(
        report,
        progress,
        migrate_bench,
        "migrate",
        lambda: migrate_bench.run_section(cfg.quick, progress, cfg.tmpdir),
    )


def cbt_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """Write intent's cost to writers, and the re-read and the bytes stored
    after a crash (bench/cbt_bench.py)."""
    import cbt_bench

    return _sub_section(
        report,
        progress,
        cbt_bench,
        "cbt",
        lambda: cbt_bench.run_section(cfg.quick, progress, cfg.tmpdir),
    )


def s3_section(cfg: Config, report: Report, progress: Callable[[str], None]) -> bool:
    """The repository in an object store (a RADOS Gateway) vs a local
    directory: throughput, requests, chunk size (bench/s3_bench.py)."""
    import s3_bench

    return _sub_section(
        report,
        progress,
        s3_bench,
        "S3 repository",
        lambda: s3_bench.run_s3_bench(cfg.quick, progress),
    )


#: The sections after the engine's, in the order they run: ``--only`` names
#: them; the module (its ``SECTION`` is the heading) and the function.
SECTIONS: dict[str, tuple[str, Callable[[Config, Report, Callable[[str], None]], bool]]] = {
    "block-layer": ("fuse_bench", block_layer),
    "nbd": ("nbd_bench", nbd_section),
    "backup": ("backup_bench", backup_section),
    "repo": ("repo_bench", repo_section),
    "instant": ("instant_bench", instant_section),
    "s3": ("s3_bench", s3_section),
    "restart": ("restart_bench", restart_section),
    "migrate": ("migrate_bench", migrate_section),
    "cbt": ("cbt_bench", cbt_section),
}


if __name__ == "__main__":
    sys.exit(main())
