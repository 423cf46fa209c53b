"""How many FUSE reader threads blksnapd needs: a sweep of ``--fuse-threads``.

Each reader thread of blksnapd's FUSE session serves a request start to
finish, so a copy-on-write write waiting for its chunk (its copy, or another
thread's copy of the same chunk) holds its thread; the others must keep the
device served meanwhile. One blksnapd per thread count, all running side by
side (each with its own work directory, device file and loop device; one
diff-storage file they take turns on), measured in interleaved rounds:

- copy-on-write: a snapshot taken, an fio iolog of one 4 KiB write in every
  chunk of the device (chunks in random order), replayed at queue depth 32:
  every write copies a chunk nobody has copied yet;
- passthrough: 4 KiB random writes, queue depth 32, no filter.

Before every run the device's and the storage's page cache is written back
and dropped (``posix_fadvise``, those files only), so that a copy reads its
chunk from the disk and waits, which is what the threads are for.

The pick: the smallest count whose copy-on-write median is within
:data:`WITHIN` of the best count's (the passthrough's requests never wait:
more threads only add contention there; its rate at the pick is shown).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fiojobs import RAND_W, BenchError, Result, drop_cache, fio_replay, fio_timed, first_write_log
from harness import MiB, incompressible_file, size_text, table

from blksnap.errors import BlksnapError
from blksnap.tools import sandbox

COUNTS = (2, 4, 8, 16, 32)
#: A count is as good as the best when its median is within this fraction.
WITHIN = 0.05


@dataclass
class Sweep:
    counts: tuple[int, ...]
    size: int
    rounds: int
    runtime: float
    first_ios: int = 0
    #: (count, "cow" | "pass") -> results, one per round
    runs: dict[tuple[int, str], list[Result]] = field(default_factory=dict)

    def median(self, count: int, kind: str) -> float:
        rs = self.runs.get((count, kind), [])
        return statistics.median(r.iops for r in rs) if rs else float("nan")

    def cpu_us(self, count: int, kind: str) -> float:
        vals = [u for r in self.runs.get((count, kind), []) if (u := r.cpu_us) is not None]
        return statistics.median(vals) if vals else float("nan")

    def best(self, kind: str) -> float:
        return max(self.median(n, kind) for n in self.counts)

    def pick(self) -> int:
        """The smallest count within :data:`WITHIN` of the best on copy-on-write,
        the workload whose requests wait (the passthrough's never do)."""
        best = self.best("cow")
        return next(n for n in self.counts if self.median(n, "cow") >= (1 - WITHIN) * best)


def run_sweep(
    workdir: str,
    size: int,
    rounds: int,
    runtime: float,
    rng: random.Random,
    progress: Callable[[str], None],
    counts: Sequence[int] = COUNTS,
) -> Sweep:
    """The sweep, every daemon started under ``workdir`` and stopped again."""
    out = Sweep(tuple(counts), size, rounds, runtime)
    storage = os.path.join(workdir, "sweep-storage.img")
    incompressible_file(storage, size, rng)
    boxes: dict[int, sandbox.Sandbox] = {}
    loops: dict[int, str] = {}
    files: dict[int, str] = {}
    t0 = time.perf_counter()
    try:
        for n in counts:
            root = os.path.join(workdir, f"threads-{n}")
            os.makedirs(root)
            files[n] = os.path.join(root, "dev.img")
            incompressible_file(files[n], size, rng)
            try:
                box = sandbox.start(
                    root,
                    ["--log-level", "WARNING", "--fuse-threads", str(n)],
                    timeout=30,
                    client_timeout=300,
                )
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
            boxes[n] = box
            loops[n] = box.client.add_device(files[n], "sweep", loop=True)["loop"]
            box.client.attach("sweep")
        progress(
            f"thread sweep: {len(counts)} daemons, {size_text(size)} devices, "
            f"{time.perf_counter() - t0:.1f}s"
        )
        for _ in range(rounds):
            jobs = [(n, kind) for n in counts for kind in ("cow", "pass")]
            rng.shuffle(jobs)
            for n, kind in jobs:
                box = boxes[n]
                pid = box.proc.pid
                drop_cache([files[n], storage])  # copies read the disk, as they would
                if kind == "pass":
                    res = fio_timed(loops[n], RAND_W, size, runtime, pid)
                else:
                    res = _first_writes(out, box, loops[n], storage, size, rng, pid, workdir)
                out.runs.setdefault((n, kind), []).append(res)
        progress(f"thread sweep: {time.perf_counter() - t0:.1f}s")
    finally:
        for box in boxes.values():
            try:
                box.stop()
            except BlksnapError as exc:
                progress(f"thread sweep: blksnapd stop: {exc}")
    return out


def _first_writes(
    out: Sweep,
    box: sandbox.Sandbox,
    loop: str,
    storage: str,
    size: int,
    rng: random.Random,
    pid: int,
    workdir: str,
) -> Result:
    client = box.client
    sid = client.snapshot_create(["sweep"], storage=storage)
    try:
        client.snapshot_take(sid)
        snap = client.snapshot_collect(sid)[0]
        log = os.path.join(workdir, "sweep.iolog")
        out.first_ios = first_write_log(log, loop, size, int(snap["chunk_size"]), rng)
        res = fio_replay(log, pid)
        snap = client.snapshot_collect(sid)[0]
        stored = int(snap["devices"][0]["chunks_stored"])
        if snap["state"] != "taken" or stored != out.first_ios:
            raise BenchError(f"thread sweep: {stored} chunks stored, not {out.first_ios}")
    finally:
        client.snapshot_destroy(sid)
    return res


def sweep_report(sw: Sweep, default: int) -> list[str]:
    rows = []
    for n in sw.counts:
        cells = [str(n) + (" (default)" if n == default else "")]
        for kind in ("cow", "pass"):
            m = sw.median(n, kind)
            cells += [
                f"{m / 1000:,.1f} kIOPS",
                f"{m / sw.best(kind):.2f}",
                f"{sw.cpu_us(n, kind):.0f}",
            ]
        rows.append(cells)
    pick = sw.pick()
    lines = [
        "**Reader threads** (`blksnapd --fuse-threads N`, one daemon per count side by "
        f"side, {sw.rounds} interleaved round(s), medians): copy-on-write = a snapshot "
        f"taken, one 4 KiB write in each of the {sw.first_ios:,} chunks of a "
        f"{size_text(sw.size)} device in random order at queue depth 32 (every write "
        f"copies a chunk); passthrough = {sw.runtime:g} s of 4 KiB random writes, no "
        "filter; page cache of the device and storage files dropped before each run, so "
        "copies wait for the disk. CPU = blksnapd's CPU µs per request.",
        "",
        table(
            [
                "threads",
                "copy-on-write",
                "÷ best",
                "CPU µs",
                "passthrough",
                "÷ best",
                "CPU µs",
            ],
            rows,
        ),
        "",
    ]
    if pick == default:
        verdict = "the default"
    else:
        verdict = f"the default is {default}, " + (
            "more than these requests need" if default > pick else "fewer than they need"
        )
    lines += [
        f"The smallest count within {WITHIN:.0%} of the best copy-on-write rate: **{pick}** "
        f"({verdict}); the passthrough runs at {sw.median(pick, 'pass') / sw.best('pass'):.2f} "
        "of its best count's rate with it.",
        "",
    ]
    return lines


def sweep_size(size: int, quick: bool) -> int:
    return min(size, (16 if quick else 128) * MiB)
