"""Where a FUSE request's CPU goes: blksnapd's FUSE files served in this
process, every reader thread under cProfile, fio on a loop device over them.

The same objects blksnapd serves (:class:`blksnap.frontends.fuse_own.OwnFS`
over a :class:`blksnap.Engine`; or, for the do-nothing mode, a
:class:`~blksnap.frontends.fuse_session.FuseSession` over a
:class:`~blksnap.frontends.fuse_session.NullBacking`), mounted here instead
of in a daemon, so that each reader thread can run under its own
``cProfile.Profile`` timed by the thread's CPU clock (a thread blocked in
``readv`` on ``/dev/fuse`` costs nothing). The profiles of all threads are
merged; the rows are own CPU time per function per fio request. The
profiler inflates every Python call, so the shares matter more than the
microseconds.

Scenarios: ``own-null``, ``pass`` (no filter), ``tracker``, ``first``
(snapshot taken, one 4 KiB write per chunk), ``rewrite`` (snapshot taken,
every chunk stored), ``image`` (sequential reads of the image, no chunk
stored).
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fiojobs import SEQ_R, Workload, fio_replay, fio_timed, first_write_log
from harness import incompressible_file, table

from blksnap.control import loop as losetup
from blksnap.frontends import fuse_session

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "own-null": "own session, do-nothing mode",
    "pass": "blksnapd passthrough",
    "tracker": "blksnapd, tracker attached",
    "first": "blksnapd, snapshot taken, first writes",
    "rewrite": "blksnapd, snapshot taken, rewrites",
    "image": "blksnapd image read, no chunk stored",
}


@dataclass(frozen=True)
class Profile:
    scenario: str
    wl: Workload
    requests: int
    #: CPU seconds of all reader threads, under the profiler
    cpu: float
    #: (function, calls per request, share of CPU, own µs per request)
    rows: list[tuple[str, float, float, float]]
    #: part of the request -> own µs per request (every function, by :func:`part`)
    parts: dict[str, float]

    @property
    def title(self) -> str:
        return f"{SCENARIOS[self.scenario]}, {self.wl.label}"


def _name(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":
        return name.replace("<built-in method ", "").rstrip(">").replace("<method ", "")
    path = Path(file)
    with contextlib.suppress(ValueError):
        return f"{path.relative_to(REPO)}:{line} {name}"
    return f"{path.name}:{line} {name}"


@contextlib.contextmanager
def profiled_threads() -> Iterator[list[cProfile.Profile]]:
    """Every FUSE reader thread started inside the block runs under a
    profile of its own (CPU time); the list holds them once the threads end."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    serve = fuse_session.FuseSession._serve

    def wrapped(self: fuse_session.FuseSession, fd: int) -> None:
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            serve(self, fd)
        finally:
            prof.disable()
            with lock:
                profiles.append(prof)

    fuse_session.FuseSession._serve = wrapped  # type: ignore[method-assign]
    try:
        yield profiles
    finally:
        fuse_session.FuseSession._serve = serve  # type: ignore[method-assign]


FUSE_IO = "FUSE system calls (`readv` of the request, `writev` of the answer)"
BACKING_IO = "backing store system calls (`pread`, `pwrite`, `fsync`)"
SESSION = "FUSE session (Python)"
ENGINE = "engine (Python)"
OTHER = "libraries (`threading`, numpy) and the rest"
PARTS = (FUSE_IO, BACKING_IO, SESSION, ENGINE, OTHER)


def part(key: tuple[str, int, str]) -> str:
    """Which part of a request a profiled function is."""
    file, _, name = key
    if file == "~":
        if "posix.readv" in name or "posix.writev" in name:
            return FUSE_IO
        if any(f"posix.{c}" in name for c in ("pread", "pwrite", "fsync", "fdatasync")):
            return BACKING_IO
        return OTHER
    if "/blksnap/frontends/fuse_" in file:
        return SESSION
    if "/blksnap/" in file:  # the engine, targets.py, fileio.py
        return ENGINE
    return OTHER


def _rows(
    profiles: list[cProfile.Profile], requests: int, top: int
) -> tuple[float, list, dict[str, float]]:
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        stats.add(p)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1e-9
    ranked = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    rows = [
        (_name(key), val[1] / requests, val[2] / total, val[2] / requests * 1e6)
        for key, val in ranked
    ]
    # Own time per part; a built-in other than the system calls counts for
    # the part of the function that called it (``len`` in the engine: engine).
    parts = dict.fromkeys(PARTS, 0.0)
    for key, val in entries.items():
        kind = part(key)
        callers = val[4]
        if kind == OTHER and key[0] == "~" and callers:
            for caller, cval in callers.items():
                parts[part(caller)] += cval[2] / requests * 1e6
        else:
            parts[kind] += val[2] / requests * 1e6
    return total, rows, parts


def profile(
    scenario: str,
    wl: Workload,
    workdir: str,
    size: int,
    runtime: float,
    threads: int,
    rng: random.Random,
    top: int = 8,
) -> Profile:
    """Profile ``wl`` on ``scenario``, served in this process."""
    import blksnap
    from blksnap.frontends.fuse_own import OwnFS

    base = os.path.join(workdir, f"prof-{scenario}-{wl.key}")
    mnt = os.path.join(base, "mnt")
    os.makedirs(mnt)
    with contextlib.ExitStack() as stack, profiled_threads() as profiles:
        chunk = 0
        if scenario == "own-null":
            tree = fuse_session.Tree()
            tree.add_file("disk", fuse_session.NullBacking(size))
            session = fuse_session.FuseSession(tree, mnt, threads=threads)
            session.mount()
            stack.callback(session.close)
            file = os.path.join(mnt, "disk")
        else:
            dev_path = os.path.join(base, "dev.img")
            incompressible_file(dev_path, size, rng)
            eng = blksnap.Engine(os.path.join(base, "state"))
            stack.callback(eng.close)
            dev = eng.add_device(dev_path, "p")
            if scenario != "pass":
                eng.attach("p")
            sid = None
            if scenario in ("first", "rewrite", "image"):
                storage = os.path.join(base, "storage.img")
                incompressible_file(storage, 2 * size, rng)  # no "storage low" events
                sid = eng.snapshot_create(["p"], storage=storage)
                eng.snapshot_take(sid)
                stack.callback(eng.snapshot_destroy, sid)
                chunk = int(eng.snapshot_collect(sid)[0]["chunk_size"])
            if scenario == "rewrite":  # every chunk stored first, unprofiled
                data = rng.randbytes(chunk)
                for off in range(0, size, chunk):
                    dev.write(off, data)
            fs = OwnFS(eng, threads=threads)
            fs.mount(mnt)
            stack.callback(fs.close)
            fs.add_device("p")
            file = os.path.join(mnt, "dev", "p")
            if scenario == "image":
                assert sid is not None
                fs.add_snapshot(sid, ["p"])
                file = os.path.join(mnt, "images", sid, "p")
        lp = losetup.attach(file, direct_io=True)
        stack.callback(losetup.detach, lp)
        if scenario == "first":
            log = os.path.join(base, "first.iolog")
            first_write_log(log, lp, size, chunk, rng)
            res = fio_replay(log)
        elif scenario == "image":
            res = fio_timed(lp, SEQ_R, size, runtime)
        else:
            res = fio_timed(lp, wl, size, runtime)
        stack.close()  # unmount: the threads end, their profiles are complete
    requests = max(res.ios, 1)
    total, rows, parts = _rows(profiles, requests, top)
    return Profile(scenario, wl, requests, total, rows, parts)


def profile_report(p: Profile) -> list[str]:
    per = p.cpu / p.requests * 1e6
    split = "; ".join(f"{name} {us:,.0f} µs" for name, us in p.parts.items() if us >= 0.5)
    return [
        f"*{p.title}*: {p.requests:,} fio requests, {per:,.0f} µs of reader-thread CPU "
        f"each under the profiler: {split}. Top functions by own CPU time:",
        "",
        table(
            ["function", "calls / request", "share", "µs / request"],
            [[n, f"{c:,.1f}", f"{s * 100:.0f}%", f"{u:,.1f}"] for n, c, s, u in p.rows],
        ),
        "",
    ]
