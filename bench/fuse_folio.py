"""4 KiB writes into large page-cache folios: what a sequential read or
write costs the random writes after it.

ext4 (with large folios) caches a file read or written sequentially in
folios of up to a few MiB; a 4 KiB write into such a folio costs the writer
in proportion to the folio (ext4 walks its buffer heads). blksnapd's engine
reads and writes its backing file through the page cache, so it keeps the
folios of a backing file on ext4 small (``blksnap/engine/device.py``,
``SMALL_FOLIO_FS``): no readahead on its fd, writes in pieces of at most
``WRITE_PIECE``, the file's clean cache dropped when the device is added.
This section shows whether that holds; the buffered raw loop device (the
kernel alone) is the comparison.

Per variant (a loop device over a backing file) and round, in random order:

- ``cold``: the backing file's page cache written back and dropped
  (``posix_fadvise(DONTNEED)``, that file only), then 4 KiB random writes;
- ``seq-read``: the same, then one sequential 1 MiB read of the whole device
  through the variant (filling the cache the way a backup would), then the
  4 KiB random writes;
- ``seq-read+dontneed``: the same, with the backing file's cache dropped
  between the read and the writes (from outside the daemon): whatever the
  read left in the cache is gone again;
- ``seq-write``: one sequential 1 MiB write of the whole device instead of
  the read.

After every run the backing file is written back (``fsync``), timed: large
dirty folios also write back more bytes.

And the system call alone (:func:`pwrite_costs`): 4 KiB ``pwrite`` at random
pages of a file in this process, from one thread and from as many as
blksnapd has readers, cache cold, after a sequential read, after a
sequential write: CPU µs per call, no FUSE, no loop device.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fiojobs import RAND_W, SEQ_R, SEQ_W, Result, drop_cache, fio_once, fio_timed
from harness import fsync_path, table

CONDITIONS = ("cold", "seq-read", "seq-read+dontneed", "seq-write")
LABELS = {
    "cold": "cache cold",
    "seq-read": "after a sequential read of the device",
    "seq-read+dontneed": "after the read, its cache dropped",
    "seq-write": "after a sequential write of the device",
}


@dataclass(frozen=True)
class FolioTarget:
    name: str
    label: str
    loop: str
    backing: str
    pid: int | None


@dataclass
class Folio:
    targets: tuple[FolioTarget, ...]
    rounds: int
    runtime: float
    #: (target, condition) -> (result, seconds of write-back after it)
    runs: dict[tuple[str, str], list[tuple[Result, float]]] = field(default_factory=dict)
    #: (threads, condition) -> CPU µs per 4 KiB ``pwrite`` in process, one per round
    pwrite: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def pwrite_us(self, threads: int, cond: str) -> float:
        vals = self.pwrite.get((threads, cond), [])
        return statistics.median(vals) if vals else float("nan")

    @property
    def pwrite_threads(self) -> list[int]:
        return sorted({n for n, _ in self.pwrite})

    def median(self, name: str, cond: str) -> float:
        rs = self.runs.get((name, cond), [])
        return statistics.median(r.iops for r, _ in rs) if rs else float("nan")

    def ratios(self, name: str, cond: str) -> list[float]:
        """Per round: the condition's IOPS ÷ the cold IOPS of the same round."""
        a, b = self.runs.get((name, cond), []), self.runs.get((name, "cold"), [])
        return [x.iops / y.iops for (x, _), (y, _) in zip(a, b, strict=False)]

    def cpu_us(self, name: str, cond: str) -> float:
        vals = [u for r, _ in self.runs.get((name, cond), []) if (u := r.cpu_us) is not None]
        return statistics.median(vals) if vals else float("nan")

    def writeback(self, name: str, cond: str) -> float:
        vals = [s for _, s in self.runs.get((name, cond), [])]
        return statistics.median(vals) if vals else float("nan")


def run_folio(
    targets: Sequence[FolioTarget],
    size: int,
    rounds: int,
    runtime: float,
    rng: random.Random,
    scratch: str | None = None,
    threads: Sequence[int] = (1, 16),
) -> Folio:
    """The fio runs on ``targets``; with ``scratch`` (a file of ``size``
    bytes), :func:`pwrite_costs` on it too."""
    out = Folio(tuple(targets), rounds, runtime)
    if scratch is not None:
        out.pwrite = pwrite_costs(scratch, size, rounds, rng, threads)
    for _ in range(rounds):
        jobs = [(t, c) for t in targets for c in CONDITIONS]
        rng.shuffle(jobs)
        for t, cond in jobs:
            drop_cache([t.backing])
            if cond.startswith("seq-read"):
                fio_once(t.loop, SEQ_R, size)
            if cond == "seq-read+dontneed":
                drop_cache([t.backing])
            if cond == "seq-write":
                fio_once(t.loop, SEQ_W, size)
                fsync_path(t.backing)
            res = fio_timed(t.loop, RAND_W, size, runtime, t.pid)
            t0 = time.perf_counter()
            fsync_path(t.backing)
            out.runs.setdefault((t.name, cond), []).append((res, time.perf_counter() - t0))
    for t in targets:
        drop_cache([t.backing])
    return out


PWRITE_CONDITIONS = ("cold", "seq-read", "seq-write")
PWRITE_LABELS = {
    "cold": "cache cold",
    "seq-read": "after a sequential read",
    "seq-write": "after a sequential write",
}


def pwrite_costs(
    path: str,
    size: int,
    rounds: int,
    rng: random.Random,
    threads: Sequence[int] = (1, 16),
    writes: int = 16384,
) -> dict[tuple[int, str], list[float]]:
    """CPU µs per 4 KiB ``pwrite`` at distinct random pages of ``path``
    (``size`` bytes), in this process, from ``threads`` threads at once (as
    blksnapd's reader threads write), by the state of the file's page cache:
    dropped; after ``pread`` of the whole file 1 MiB at a time; after
    ``pwrite`` of the whole file 1 MiB at a time (written back)."""
    out: dict[tuple[int, str], list[float]] = {}
    data = rng.randbytes(RAND_W.bs)
    block = rng.randbytes(SEQ_W.bs)
    pages = size // RAND_W.bs
    fd = os.open(path, os.O_RDWR)

    def writer(offs: Sequence[int]) -> None:
        for off in offs:
            os.pwrite(fd, data, off)

    try:
        for _ in range(rounds):
            jobs = [(n, c) for n in threads for c in PWRITE_CONDITIONS]
            rng.shuffle(jobs)
            for n, cond in jobs:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                for off in range(0, size, SEQ_W.bs):
                    if cond == "seq-read":
                        os.pread(fd, SEQ_W.bs, off)
                    elif cond == "seq-write":
                        os.pwrite(fd, block, off)
                os.fsync(fd)
                offs = [p * RAND_W.bs for p in rng.sample(range(pages), min(writes, pages // 2))]
                pool = [threading.Thread(target=writer, args=(offs[i::n],)) for i in range(n)]
                c0 = _cpu()
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
                out.setdefault((n, cond), []).append((_cpu() - c0) / len(offs) * 1e6)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def folio_report(f: Folio) -> list[str]:
    rows = []
    for t in f.targets:
        for cond in CONDITIONS:
            rs = f.ratios(t.name, cond)
            cpu = f.cpu_us(t.name, cond)
            rows.append(
                [
                    t.label,
                    LABELS[cond],
                    f"{f.median(t.name, cond) / 1000:,.1f} kIOPS",
                    f"{statistics.median(rs):.2f}" if rs else "—",
                    f"{min(rs):.2f}-{max(rs):.2f}" if rs else "—",
                    f"{cpu:.0f}" if cpu == cpu else "—",
                    f"{f.writeback(t.name, cond):.2f}",
                ]
            )
    lines = [
        f"**4 KiB writes after a sequential read** (large folios; {f.runtime:g} s of 4 KiB "
        f"random writes at queue depth 32, {f.rounds} interleaved round(s), medians; "
        "÷ cold within a round; CPU = the server's CPU µs per request; write-back = the "
        "`fsync` of the backing file right after the run)",
        "",
        table(
            [
                "variant",
                "backing file's page cache",
                "4 KiB writes",
                "÷ cold",
                "range",
                "CPU µs",
                "write-back s",
            ],
            rows,
        ),
        "",
    ]
    if f.pwrite:
        rows = []
        for n in f.pwrite_threads:
            cold = f.pwrite_us(n, "cold")
            rows.append(
                [
                    str(n),
                    *(
                        f"{f.pwrite_us(n, c):.1f} ({f.pwrite_us(n, c) / cold:.1f}x)"
                        for c in PWRITE_CONDITIONS
                    ),
                ]
            )
        lines += [
            "The system call alone, in process: CPU µs per 4 KiB `pwrite` at distinct "
            "random pages of a file of the device's size (16,384 of them, or half), "
            "from 1 thread or as many as blksnapd's readers at once, medians of "
            f"{f.rounds} round(s):",
            "",
            table(["threads", *(PWRITE_LABELS[c] for c in PWRITE_CONDITIONS)], rows),
            "",
        ]
    return lines
