"""Measurement plumbing for ``bench/run.py``: threads, workloads, statistics,
the machine description and Markdown tables.

Nothing here knows the engine: a workload is a list of byte offsets per
thread, and an operation is a callable taking one offset. The engine side and
the plain side of a comparison run the very same offsets through the very
same loop, so the only difference between them is what the callable does.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50

#: Device capacities the CBT table is computed for.
CBT_CAPACITIES = (1 * GiB, 128 * GiB, 1 * TiB, 16 * TiB, 128 * TiB, 1 * PiB)


# -- workloads ------------------------------------------------------------------


def seq_ops(size: int, io_size: int, threads: int) -> list[list[int]]:
    """Sequential writes: thread ``t`` walks the ``t``-th contiguous slice of
    the device from start to end, ``io_size`` at a time."""
    offsets = list(range(0, size - io_size + 1, io_size))
    per = (len(offsets) + threads - 1) // threads
    return [offsets[t * per : (t + 1) * per] for t in range(threads)]


def rand_block_ops(
    size: int, io_size: int, threads: int, rng: random.Random, count: int | None = None
) -> list[list[int]]:
    """Random writes: ``count`` distinct ``io_size``-aligned blocks in random
    order (every block of the device when ``count`` is None), dealt round-robin
    to the threads."""
    blocks = size // io_size
    picked = rng.sample(range(blocks), count if count is not None else blocks)
    offsets = [b * io_size for b in picked]
    return [offsets[t::threads] for t in range(threads)]


def rand_first_ops(
    size: int, chunk_size: int, io_size: int, threads: int, rng: random.Random
) -> list[list[int]]:
    """Random first writes: one ``io_size`` write at a random aligned offset
    inside *every* chunk of the device, chunks in random order. Each write
    lands on a chunk nobody has copied yet, so every write pays one full
    chunk copy, and afterwards every chunk is stored."""
    chunks = list(range(size // chunk_size))
    rng.shuffle(chunks)
    per_chunk = chunk_size // io_size
    offsets = [c * chunk_size + rng.randrange(per_chunk) * io_size for c in chunks]
    return [offsets[t::threads] for t in range(threads)]


def op_count(per_thread: Sequence[Sequence[int]]) -> int:
    return sum(len(ops) for ops in per_thread)


# -- timing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One timed run: ``ops`` operations moving ``nbytes`` in ``seconds``."""

    seconds: float
    ops: int
    nbytes: int

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds

    @property
    def kiops(self) -> float:
        return self.ops / 1000.0 / self.seconds

    @property
    def rate(self) -> float:
        """Operations per second: the number ratios are taken of."""
        return self.ops / self.seconds


def run_threads(per_thread: Sequence[Sequence[int]], op: Callable[[int], object]) -> float:
    """Run ``op(offset)`` for every offset, one thread per list, all released
    together; the wall time from release to the last thread's end."""
    threads = len(per_thread)
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(offsets: Sequence[int]) -> None:
        start.wait()
        try:
            for off in offsets:
                op(off)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(ops,), daemon=True) for ops in per_thread]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Keep the benchmark's own heap (op lists, samples) out of the collector
    while a measurement runs: the engine allocates containers and so triggers
    collections, plain ``os.pwrite`` does not, and it must not pay for ours."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def timed(per_thread: Sequence[Sequence[int]], op: Callable[[int], object], io_size: int) -> Sample:
    with quiet_gc():
        seconds = run_threads(per_thread, op)
    n = op_count(per_thread)
    return Sample(seconds, n, n * io_size)


# -- statistics -----------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def ratio_text(self) -> str:
        return f"**{self.median:.2f}**"

    def range_text(self) -> str:
        return f"{self.low:.2f}-{self.high:.2f}"


# -- the machine ------------------------------------------------------------------


def _first_line(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def fs_type(path: str) -> str:
    """File system type of the mount holding ``path`` (longest mount prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mnt, typ = fields[1], fields[2]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


def page_fault_us(rounds: int = 20) -> float:
    """Cost of first-touching one fresh anonymous 4 KiB page (fault + zeroing),
    in microseconds: it prices every freshly allocated large buffer."""
    page = mmap.PAGESIZE
    size = 1 * MiB
    t0 = time.perf_counter()
    for _ in range(rounds):
        m = mmap.mmap(-1, size)
        for i in range(0, size, page):
            m[i] = 1
        m.close()
    return (time.perf_counter() - t0) / rounds / (size // page) * 1e6


def git_revision(repo: str) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "--", "blksnap"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in blksnap/" if dirty else "")


def machine(tmpdir: str, repo: str) -> dict[str, str]:
    import numpy

    mem_kib = _first_line("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu": _first_line("/proc/cpuinfo", "model name"),
        "memory": f"{int(mem_kib) // 1024} MiB" if mem_kib.isdigit() else "?",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "temp dir": f"{tmpdir} ({fs_type(tmpdir)})",
        "engine revision": git_revision(repo),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "page fault (fresh 4 KiB anonymous page)": f"{page_fault_us():.1f} µs",
    }


# -- tables ---------------------------------------------------------------------


def incompressible_file(path: str, size: int, rng: random.Random) -> None:
    """A file full of incompressible data (no holes: copy-on-write must
    really read), written back to disk so every run starts from clean pages."""
    block = rng.randbytes(MiB)
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            f.write(block[: min(MiB, size - off)])
        f.flush()
        os.fsync(f.fileno())


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded so it also reads well on a terminal."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = [
        all(_numeric(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]

    def fmt(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)
    )
    return "\n".join([fmt(cells[0]), sep + "|", *(fmt(r) for r in cells[1:])])


def _numeric(cell: str) -> bool:
    text = cell.strip("* ").replace(",", "").replace("-", "").replace(".", "").replace(" ", "")
    for unit in ("MiB/s", "kIOPS", "KiB", "MiB", "GiB", "TiB", "PiB", "B", "µs", "%", "x"):
        text = text.removesuffix(unit)
    return text.isdigit()


def size_text(n: float) -> str:
    for unit, factor in (("PiB", 1 << 50), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync the file at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main_alone(
    doc: str,
    run: Callable[[argparse.Namespace, Callable[[str], None]], str],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """A bench section run on its own: ``--quick`` and the section's own
    arguments, skipped (with why) where blksnapd cannot run, the markdown on
    stdout and progress on stderr."""
    from blksnap.tools import sandbox

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    why = sandbox.why_not()
    if why:
        print(f"skipped: {why}")
        return 0
    print(run(args, lambda m: print(m, file=sys.stderr, flush=True)))
    return 0


def main_with_output(doc: str, run: Callable[..., str], argv: Sequence[str] | None = None) -> int:
    """A section run on its own whose ``run(quick, progress=...)`` says
    itself why it skipped: ``--quick``, ``--output FILE`` (the markdown is
    also printed), progress on stderr."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", "-o")
    args = p.parse_args(argv)
    text = run(args.quick, progress=lambda s: print(s, file=sys.stderr, flush=True))
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


def main_with_tmpdir(
    doc: str,
    run_section: Callable[[bool, Callable[[str], None], str | None], str],
    argv: Sequence[str] | None = None,
) -> int:
    """:func:`main_alone` for a section whose files go in ``--tmpdir``."""
    return main_alone(
        doc,
        lambda a, progress: run_section(a.quick, progress, a.tmpdir),
        lambda p: p.add_argument(
            "--tmpdir", help="for the files (default: $BLKSNAP_BENCH_TMPDIR or /var/tmp)"
        ),
        argv,
    )
