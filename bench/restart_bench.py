#!/usr/bin/env python3
"""The I/O stall a file system sees when blksnapd's worker is killed
(SIGKILL) or replaced (``blksnap daemon restart``).

A probe writes 4 KiB with O_DIRECT at random offsets of a loop device over a
blksnapd device (tracker attached), one write at a time, and records when
each write started and how long it took. Meanwhile the worker is killed (or
restarted) again and again at random moments; the stall of one event is the
longest write that was in flight at the event or started within the window
after it (a write the dead worker read and never answered comes back to the
new one with ``FUSE_NOTIFY_RESEND``). Every write must succeed: a failed
write fails the bench.

``bench/run.py`` adds the section (``make bench``); alone:
``restart_bench.py [--events 20] [--quick]``.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import main_alone

from blksnap.engine.cbt import CbtMap
from blksnap.engine.params import Params
from blksnap.engine.regions import Regions
from blksnap.tools import sandbox

SECTION = "## Worker restart: the I/O stall a file system sees"
MiB = 1 << 20
BLOCK = 4096
#: After an event, writes starting this long after it still count as its stall.
WINDOW = 3.0


class Probe(threading.Thread):
    """4 KiB O_DIRECT writes, one at a time: (start, seconds) of each."""

    def __init__(self, dev: str, size: int, seed: int) -> None:
        super().__init__(name="stall-probe", daemon=True)
        self.fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        self.blocks = size // BLOCK
        self.rng = random.Random(seed)
        self.buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        self.buf.write(os.urandom(BLOCK))
        self.ops: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self.inflight: float | None = None  # start of the write under way
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                off = self.rng.randrange(self.blocks) * BLOCK
                t0 = time.monotonic()
                self.inflight = t0
                os.pwritev(self.fd, [self.buf], off)
                self.inflight = None
                self.ops.append((t0, time.monotonic() - t0))
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
        os.close(self.fd)


def stall_of(ops: list[tuple[float, float]], at: float) -> float:
    """The longest write in flight at ``at`` or started within WINDOW after."""
    worst = 0.0
    for start, took in ops:
        if start <= at < start + took or at <= start < at + WINDOW:
            worst = max(worst, took)
    return worst


def worker(box: sandbox.Sandbox) -> int:
    return int(box.client.status()["worker_pid"])


def wait_replaced(box: sandbox.Sandbox, old: int, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if worker(box) != old:
            return time.monotonic() - t0
        time.sleep(0.01)
    raise RuntimeError(f"worker {old} not replaced within {timeout} s")


def run_bench(events: int, progress: Callable[[str], None]) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="blksnap-restart-bench-") as tmp:
        box = sandbox.start(Path(tmp) / "d")
        try:
            size = 256 * MiB
            backing = Path(tmp) / "a.img"
            with open(backing, "wb") as f:
                f.truncate(size)
            dev = box.client.add_device(str(backing), "a", loop=True)["loop"]
            box.client.attach("a")
            probe = Probe(dev, size, seed=events)
            probe.start()
            out: dict[str, list[float]] = {
                "kill": [],
                "restart": [],
                "snap": [],
                "replaced": [],
                "chunks": [],
            }
            rng = random.Random(7)
            try:
                time.sleep(1.0)
                base = [took for _, took in probe.ops]
                storage = Path(tmp) / "diff"
                storage.mkdir()
                sid = None
                for kind in ("kill", "restart", "snap"):
                    for i in range(events):
                        if kind == "snap":  # a new snapshot: the probe's writes copy chunks
                            if sid is not None:
                                box.client.snapshot_destroy(sid)
                            sid = box.client.snapshot_create(["a"], str(storage), limit=size)
                            box.client.snapshot_take(sid)
                        time.sleep(rng.uniform(0.3, 0.8))
                        if kind == "snap":
                            snap = box.client.snapshot_collect(sid)[0]
                            out["chunks"].append(snap["devices"][0]["chunks_stored"])
                        old = worker(box)
                        at = time.monotonic()
                        if kind in ("kill", "snap"):
                            os.kill(old, signal.SIGKILL)
                        else:
                            box.client.restart()
                        out["replaced"].append(wait_replaced(box, old))
                        progress(f"restart bench: {kind} {i + 1}/{events}")
                        time.sleep(WINDOW)
                        if probe.error is not None:
                            raise RuntimeError(f"a probe write failed: {probe.error!r}")
                        out[kind].append(stall_of(list(probe.ops), at))
                snap = box.client.snapshot_collect(sid)[0]
                if snap["state"] != "taken" or box.client.status()["lost_snapshots"]:
                    raise RuntimeError(f"the snapshot did not carry on: {snap}")
                box.client.snapshot_destroy(sid)
            finally:
                probe.stop()
            if probe.error is not None:
                raise RuntimeError(f"a probe write failed: {probe.error!r}")
            out["base"] = base
            out["writes"] = [float(len(probe.ops))]
            return out
        finally:
            box.stop()


def report(res: dict[str, list[float]], events: int, seconds: float) -> str:
    def ms(v: float) -> str:
        return f"{v * 1000:,.0f} ms"

    rows = []
    for kind, label in (
        ("kill", "worker killed (SIGKILL)"),
        ("restart", "`daemon restart`"),
        ("snap", "worker killed, a snapshot taken (copy-on-write under way)"),
    ):
        v = res[kind]
        rows.append(
            f"| {label} | {len(v)} | {ms(statistics.median(v))} | {ms(min(v))} | {ms(max(v))} |"
        )
    base = res["base"]
    lines = [
        SECTION,
        "",
        f"`bench/restart_bench.py`, {events} events of each kind, {seconds:.0f} s. A probe "
        "writes 4 KiB O_DIRECT at random offsets of a loop device over a blksnapd device "
        "(tracker attached), one write at a time; the stall of an event is the longest write "
        f"in flight at it or started within {WINDOW:.0f} s after it. Every write succeeded "
        f"({res['writes'][0]:,.0f} writes).",
        "",
        "| event | n | stall median | min | max |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Before any event a write took {statistics.median(base) * 1e6:,.0f} µs (median). "
        "The stall is the handover: a standby worker, started and imported ahead, is given "
        "the state and the regions' fds and takes over (for `daemon restart`, a standby "
        "started from the code on disk after the asking; the old worker goes when it "
        "waits); it rebuilds from the records, sends `FUSE_NOTIFY_RESEND` and serves "
        "(the event to a new worker answering the control socket: median "
        f"{ms(statistics.median(res['replaced']))}). Without the standby, the new "
        "worker's Python start and imports (about 0.6 s of CPU here) were the stall: "
        "about 450 ms at a kill. With a snapshot taken (a new one before each kill, so "
        "that the probe's writes copy chunks across it: "
        f"{statistics.median(res['chunks']):,.0f} of 4,096 chunks stored at the kill, "
        "median) the new worker also carries it on: it maps its chunk map and diff "
        "storage from the regions the supervisor holds (the image is checked whole by "
        "the tests, not here).",
        "",
    ]
    return "\n".join(lines)


class MemfdRegions(Regions):
    """What a worker's regions are (a memfd, mapped shared), without the
    supervisor: for the cost of marking the CBT in such memory."""

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        fd = os.memfd_create(f"bench-{key}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size), False
        finally:
            os.close(fd)  # the mapping keeps the memory

    def drop(self, key: str) -> None:
        pass


class PrivateRegions(Regions):
    """The reference: the process's own private anonymous memory (what a
    CBT map lived in before it had to outlive the worker)."""

    def open(self, key: str, size: int) -> tuple[mmap.mmap, bool]:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), False

    def drop(self, key: str) -> None:
        pass


def mark_cost(trials: int, marks: int) -> list[float]:
    """Per trial: the time of ``marks`` random 4 KiB CBT marks in a memfd
    region ÷ the same in this process's anonymous memory (interleaved)."""
    params = Params()
    size = 64 << 30  # 64 GiB device: 1 Mi blocks of 64 KiB
    rng = random.Random(3)
    offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(marks)]
    maps = {
        "local": CbtMap(size, params, PrivateRegions(), "cbt/x"),
        "memfd": CbtMap(size, params, MemfdRegions(), "cbt/x"),
    }
    ratios = []
    for _ in range(trials):
        took = {}
        for name in rng.sample(sorted(maps), 2):
            mark = maps[name].mark
            t0 = time.perf_counter()
            for off in offsets:
                mark(off, BLOCK)
            took[name] = time.perf_counter() - t0
        ratios.append(took["memfd"] / took["local"])
    return ratios


def run_section(quick: bool, progress: Callable[[str], None], events: int = 20) -> str:
    events = 3 if quick else events
    t0 = time.monotonic()
    res = run_bench(events, progress)
    text = report(res, events, time.monotonic() - t0)
    ratios = mark_cost(3 if quick else 9, 20_000 if quick else 200_000)
    return text + (
        "\n**The CBT in memory that outlives the worker**: a write marks its blocks in a "
        "memfd the supervisor holds instead of the worker's own memory. In process, "
        "random 4 KiB marks of a 64 GiB device's map, interleaved trials: memfd ÷ "
        f"anonymous memory **{statistics.median(ratios):.2f}** (range {min(ratios):.2f} to "
        f"{max(ratios):.2f}): a store into shared memory, no system call, no disk write.\n"
    )


def main(argv: list[str] | None = None) -> int:
    return main_alone(
        __doc__,
        lambda a, progress: run_section(a.quick, progress, a.events),
        lambda p: p.add_argument("--events", type=int, default=20),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
