"""fio runs for the block-layer benchmarks (``bench/fuse_bench.py`` and its
extras): workloads, one run's result, and the CPU time a server process
spent during the run (utime + stime of all its threads and of the
processes below it, from ``/proc/PID/stat``), so that a result also says what a request cost it.

Every job: ``ioengine=libaio``, ``direct=1``, queue depth :data:`QD`, one job.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from harness import KiB, MiB

QD = 32
_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    rw: str
    bs: int

    @property
    def is_read(self) -> bool:
        return "read" in self.rw

    @property
    def small(self) -> bool:
        """4 KiB requests: measured in IOPS (else in bytes per second)."""
        return self.bs < MiB


SEQ_W = Workload("seqw", "seq 1 MiB write", "write", 1 * MiB)
RAND_W = Workload("randw", "rand 4 KiB write", "randwrite", 4 * KiB)
SEQ_R = Workload("seqr", "seq 1 MiB read", "read", 1 * MiB)
RAND_R = Workload("randr", "rand 4 KiB read", "randread", 4 * KiB)
WORKLOADS = (RAND_W, RAND_R, SEQ_W, SEQ_R)


def rate_text(wl: Workload, rate: float) -> str:
    if wl.small:
        return f"{rate / 1000:,.1f} kIOPS"
    return f"{rate / MiB:,.0f} MiB/s"


@dataclass(frozen=True)
class Result:
    """One fio run."""

    bw: float  # bytes per second
    iops: float
    ios: int
    seconds: float
    #: CPU seconds the server process spent during the run (None: not measured).
    cpu: float | None = None
    #: Involuntary context switches of the server's threads during the run.
    preempted: int | None = None

    def rate(self, wl: Workload) -> float:
        return self.iops if wl.small else self.bw

    def text(self, wl: Workload) -> str:
        return rate_text(wl, self.rate(wl))

    @property
    def cpu_us(self) -> float | None:
        """The server's CPU µs per request fio completed."""
        if self.cpu is None or not self.ios:
            return None
        return self.cpu / self.ios * 1e6

    @property
    def preempted_per_request(self) -> float | None:
        if self.preempted is None or not self.ios:
            return None
        return self.preempted / self.ios


def _stat(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parens


def _tree(pid: int) -> tuple[list[int], dict[int, int]]:
    """Process ``pid`` and every process below it; the CPU ticks (utime +
    stime, of all their threads, live and ended) of every process."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat(entry)
        except OSError:  # gone meanwhile
            continue
        child = int(entry)
        children.setdefault(int(fields[1]), []).append(child)
        ticks[child] = int(fields[11]) + int(fields[12])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out, ticks


def _preempted(procs: list[int]) -> int:
    """Involuntary context switches (the thread was runnable and the
    scheduler gave its CPU to another) of every live thread of ``procs``."""
    total = 0
    for p in procs:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("nonvoluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except OSError:  # ended meanwhile
                continue
    return total


@dataclass(frozen=True)
class Usage:
    """What a server process and the processes below it spent: blksnapd is a
    supervisor whose worker process serves, and a worker may be replaced."""

    cpu: float  # utime + stime, seconds, of all their threads (live and ended)
    preempted: int  # involuntary context switches of their live threads

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.preempted - other.preempted)


def usage(pid: int) -> Usage:
    procs, ticks = _tree(pid)
    return Usage(sum(ticks.get(p, 0) for p in procs) / _TICK, _preempted(procs))


def fio(args: list[str], pid: int | None = None) -> tuple[dict, Usage | None]:
    """fio's JSON document, and what process ``pid`` spent meanwhile."""
    cmd = ["fio", "--output-format=json", *args]
    u0 = usage(pid) if pid else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    spent = usage(pid) - u0 if pid and u0 is not None else None
    if out.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stderr}{out.stdout[-2000:]}")
    text = out.stdout
    return json.loads(text[text.index("{") :]), spent  # fio may print notes before the JSON


def parse(doc: dict, wl: Workload, spent: Usage | None = None) -> Result:
    job = doc["jobs"][0]
    side = job["read" if wl.is_read else "write"]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    return Result(
        float(side["bw_bytes"]),
        float(side["iops"]),
        int(side["total_ios"]),
        float(side["runtime"]) / 1000.0,
        None if spent is None else spent.cpu,
        None if spent is None else spent.preempted,
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


def fio_timed(
    target: str, wl: Workload, size: int, runtime: float, pid: int | None = None
) -> Result:
    """``runtime`` seconds of ``wl`` over the first ``size`` bytes of ``target``."""
    args = [
        *fio_job(target, wl, size),
        "--time_based",
        f"--runtime={round(runtime * 1000)}ms",
        "--norandommap",
        "--randrepeat=0",
    ]
    return parse(*_run(args, wl, pid))


def fio_once(target: str, wl: Workload, size: int, pid: int | None = None) -> Result:
    """``wl`` once over ``size`` bytes (sequential first writes, whole-device reads)."""
    return parse(*_run(fio_job(target, wl, size), wl, pid))


def fio_replay(log: str, pid: int | None = None) -> Result:
    """Replay an iolog as fast as the device allows (random first writes)."""
    args = [
        "--name=bench",
        "--ioengine=libaio",
        "--direct=1",
        f"--iodepth={QD}",
        f"--read_iolog={log}",
        "--replay_no_stall=1",
    ]
    return parse(*_run(args, RAND_W, pid))


def _run(args: list[str], wl: Workload, pid: int | None) -> tuple[dict, Workload, Usage | None]:
    doc, spent = fio(args, pid)
    return doc, wl, spent


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


def warm_cache(paths: Sequence[str]) -> None:
    """Read these files through once, so that every page is in the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)


def drop_cache(paths: Sequence[str]) -> None:
    """Write back, then drop the page cache of these files only
    (``posix_fadvise(DONTNEED)``; nothing global)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
