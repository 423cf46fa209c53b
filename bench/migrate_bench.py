#!/usr/bin/env python3
"""The ``migrate`` filter: how fast it moves a device, and what it costs the
device's writers meanwhile.

- **Throughput**: a blksnapd device over a file of random data; the time
  from ``attach --filter migrate --opt target=NEW`` (a sparse file of the
  device's size on the same file system) until ``ctl status`` says
  ``switched`` (the copy, the target's fsync and the switch), against
  ``cp --reflink=never`` of the same file to a new file followed by an
  fsync of it, and ``dd bs=1M conv=fsync``. The source's page cache is
  dropped (``posix_fadvise(DONTNEED)`` on that file only) before each copy:
  every copy reads from the disk and writes to it. After a migration the
  device (now on the target) is removed and a fresh one added over the
  source for the next.
- **Writes during a migration**: fio (libaio, direct, QD 32, time-based) on
  a loop device over a blksnapd device, without a migration and while one
  runs with a ``rate`` limit low enough that it is still copying when fio
  ends (checked); then it is aborted and detached. 4 KiB random writes and
  1 MiB sequential writes; the migration's own copy rate during the fio run.

Trials are interleaved (every variant once per trial, in a random order;
the copies after a warm-up trial that is not kept); ratios are taken within
a trial. ``bench/run.py`` adds the section (``make bench``); alone:
``migrate_bench.py [--quick] [--tmpdir DIR]``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from fiojobs import QD, RAND_W, SEQ_W, Workload, drop_cache, fio_timed  # noqa: E402
from harness import (  # noqa: E402
    MiB,
    Spread,
    fs_type,
    fsync_path,
    incompressible_file,
    main_with_tmpdir,
    size_text,
    table,
)

from blksnap.errors import BlksnapError  # noqa: E402
from blksnap.tools import sandbox  # noqa: E402

SECTION = "## Migration: moving a live device vs cp and dd; writes meanwhile"
#: Give up on a migration that has not switched after this long.
TIMEOUT = 300.0
#: How often the status is asked while waiting for the switch.
POLL = 0.01
#: Lines of blksnapd's log that are expected here (the bench aborts migrations).
EXPECTED_LOG = ("aborted by request", "aborted: detached")


def _sync_fs(path: Path) -> None:
    """Commit the file system of ``path`` (after deleting a copy: its
    freeing and discards are not left to the next measurement)."""
    sandbox.run("sync", "-f", str(path))


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


class Bench:
    def __init__(self, work: Path, size: int, progress: Callable[[str], None]) -> None:
        self.work = work
        self.size = size
        self.progress = progress
        self.src = work / "src.img"
        self.target = work / "target.img"
        self.copy = work / "copy.img"
        #: Times the status answered "not attached" while a migration was
        #: switching (before its last status was kept).
        self.status_gaps = 0
        incompressible_file(str(self.src), size, random.Random(20261201))
        self.box = sandbox.start(work / "d")

    def close(self) -> None:
        self.box.stop()

    def status(self, name: str) -> dict[str, Any] | None:
        """The migration's ``ctl status`` (after the switch: its last one);
        None if it answered "not attached" (counted)."""
        try:
            return self.box.client.ctl(name, "migrate", "status")
        except BlksnapError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self.status_gaps += 1
            return None

    # -- 1. throughput -----------------------------------------------------------

    def migrate(self, check: bool) -> tuple[float, float]:
        """One migration of a fresh device over the source: (wall seconds
        from attach to "switched" seen, the status's "seconds")."""
        client = self.box.client
        drop_cache([str(self.src)])
        client.add_device(str(self.src), "m")
        try:
            _sparse(self.target, self.size)
            t0 = time.monotonic()
            client.attach("m", "migrate", {"target": str(self.target)})
            while True:
                st = self.status("m")
                if st is not None and st["state"] != "copying":
                    break
                if time.monotonic() - t0 > TIMEOUT:
                    raise RuntimeError(f"migration not done after {TIMEOUT:.0f} s: {st}")
                time.sleep(POLL)
            wall = time.monotonic() - t0
            assert st is not None
            if st["state"] != "switched" or st["copied"] != self.size:
                raise RuntimeError(f"migration did not switch: {st}")
            (dev,) = [d for d in client.devices() if d["name"] == "m"]
            if dev["backing"] != str(self.target) or dev["filters"]:
                raise RuntimeError(f"after the switch the device is {dev}")
        finally:
            client.remove_device("m")
        if check and _digest(self.target) != _digest(self.src):
            raise RuntimeError("the migrated copy differs from the source")
        self.target.unlink()
        _sync_fs(self.work)
        return wall, float(st["seconds"])

    def plain(self, cmd: list[str], fsync: bool) -> float:
        drop_cache([str(self.src)])
        t0 = time.monotonic()
        sandbox.run(*cmd)
        if fsync:
            fsync_path(self.copy)
        took = time.monotonic() - t0
        self.copy.unlink()
        _sync_fs(self.work)
        return took

    def throughput(self, trials: int, rng: random.Random) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"wall": [], "status": [], "cp": [], "dd": []}
        cp = ["cp", "--reflink=never", str(self.src), str(self.copy)]
        dd = ["dd", f"if={self.src}", f"of={self.copy}", "bs=1M", "conv=fsync", "status=none"]
        # Trial 0 is a warm-up, not kept (the first reads of a new file were
        # slower here); its migration is checked against the source.
        for t in range(trials + 1):
            for what in rng.sample(["migrate", "cp", "dd"], 3):
                if what == "migrate":
                    wall, secs = self.migrate(check=t == 0)
                    out["wall"].append(wall)
                    out["status"].append(secs)
                elif what == "cp":
                    out["cp"].append(self.plain(cp, fsync=True))
                else:
                    out["dd"].append(self.plain(dd, fsync=False))
            if t == 0:
                for v in out.values():
                    v.clear()
                continue
            self.progress(
                f"migrate bench: copy trial {t}/{trials}: migrate "
                f"{self.size / out['wall'][-1] / MiB:.0f} MiB/s, cp "
                f"{self.size / out['cp'][-1] / MiB:.0f} MiB/s, dd "
                f"{self.size / out['dd'][-1] / MiB:.0f} MiB/s"
            )
        return out

    # -- 2. writes during a migration ------------------------------------------------

    def writes(
        self, trials: int, runtime: float, rate: int, rng: random.Random
    ) -> dict[str, dict[str, list[float]]]:
        client = self.box.client
        loop = client.add_device(str(self.src), "w", loop=True)["loop"]
        out: dict[str, dict[str, list[float]]] = {
            wl.key: {"without": [], "during": [], "rate": []} for wl in (RAND_W, SEQ_W)
        }
        try:
            for t in range(trials):
                runs = [(wl, during) for wl in (RAND_W, SEQ_W) for during in (False, True)]
                for wl, during in rng.sample(runs, len(runs)):
                    drop_cache([str(self.src)])
                    if not during:
                        res = fio_timed(loop, wl, self.size, runtime)
                        out[wl.key]["without"].append(res.rate(wl))
                        continue
                    _sparse(self.target, self.size)
                    client.attach("w", "migrate", {"target": str(self.target), "rate": str(rate)})
                    try:
                        s0, t0 = self.status("w"), time.monotonic()
                        res = fio_timed(loop, wl, self.size, runtime)
                        s1, t1 = self.status("w"), time.monotonic()
                        if s0 is None or s1 is None or s1["state"] != "copying":
                            raise RuntimeError(
                                f"the migration was not copying when fio ended: {s1}; "
                                f"raise the size or lower rate={rate}"
                            )
                    finally:
                        client.ctl("w", "migrate", "abort")
                        client.detach("w", "migrate")
                        self.target.unlink()
                    out[wl.key]["during"].append(res.rate(wl))
                    out[wl.key]["rate"].append((s1["copied"] - s0["copied"]) / (t1 - t0))
                    (dev,) = [d for d in client.devices() if d["name"] == "w"]
                    if dev["backing"] != str(self.src):
                        raise RuntimeError(f"after the abort the device is {dev}")
                    _sync_fs(self.work)
                r, w = out[RAND_W.key], out[SEQ_W.key]
                self.progress(
                    f"migrate bench: write trial {t + 1}/{trials}: 4 KiB "
                    f"{r['without'][-1] / 1000:.1f} -> {r['during'][-1] / 1000:.1f} kIOPS, 1 MiB "
                    f"{w['without'][-1] / MiB:.0f} -> {w['during'][-1] / MiB:.0f} MiB/s"
                )
        finally:
            client.remove_device("w")
        return out

    def log_problems(self) -> list[str]:
        lines = []
        for line in self.box.log_text().splitlines():
            bad = "ERROR" in line or "Traceback" in line or "CRITICAL" in line
            if bad and not any(x in line for x in EXPECTED_LOG):
                lines.append(line.strip())
        return lines


def _rate_text(wl: Workload, v: float) -> str:
    return f"{v / 1000:,.1f} kIOPS" if wl.small else f"{v / MiB:,.0f} MiB/s"


def report(
    size: int,
    trials: int,
    runtime: float,
    rate: int,
    thr: dict[str, list[float]],
    wr: dict[str, dict[str, list[float]]],
    notes: list[str],
    seconds: float,
    fs: str,
) -> str:
    def mib_s(key: str) -> Spread:
        return Spread.of([size / t / MiB for t in thr[key]])

    def copy_row(label: str, key: str) -> list[str]:
        v = mib_s(key)
        median = f"{statistics.median(thr[key]):.2f} s"
        return [label, f"**{v.median:,.0f}**", f"{v.low:,.0f}-{v.high:,.0f}", median]

    def ratio(mig: str, ref: str) -> Spread:
        return Spread.of([r / m for m, r in zip(thr[mig], thr[ref], strict=True)])

    ratio_rows = []
    for ref in ("cp", "dd"):
        wall, st = ratio("wall", ref), ratio("status", ref)
        by_status = f"{st.median:.2f} ({st.range_text()})"
        ratio_rows.append([f"migrate ÷ {ref}", wall.ratio_text(), wall.range_text(), by_status])
    write_rows = []
    slow: dict[str, Spread] = {}
    for wl in (RAND_W, SEQ_W):
        d = wr[wl.key]
        slow[wl.key] = r = Spread.of(
            [b / a for a, b in zip(d["without"], d["during"], strict=True)]
        )
        write_rows.append(
            [
                wl.label,
                _rate_text(wl, statistics.median(d["without"])),
                _rate_text(wl, statistics.median(d["during"])),
                r.ratio_text(),
                r.range_text(),
                f"{statistics.median(d['rate']) / MiB:,.0f} MiB/s",
            ]
        )
    vs_cp, vs_dd = ratio("wall", "cp"), ratio("wall", "dd")
    mig_rate = {k: statistics.median(wr[k]["rate"]) / MiB for k in (RAND_W.key, SEQ_W.key)}
    lines = [
        SECTION,
        "",
        "`bench/migrate_bench.py`, interleaved trials (every variant once per trial, in "
        "a random order; ratios taken within a trial: median in bold, range), "
        f"{seconds:.0f} s. A blksnapd device (no other filter) over a {size_text(size)} "
        "file of random data; targets and copies are new files on the same file system "
        f"(the temp dir's, {fs}).",
        "",
        f"**Copy throughput**, {len(thr['wall'])} trials after a warm-up trial (not "
        f"kept): MiB/s of the {size_text(size)}. *migrate (wall)*: from "
        "just before `attach --filter migrate --opt target=T` (T a sparse file of the "
        "device's size, made before) until `ctl status` (asked every "
        f"{POLL * 1000:.0f} ms) says `switched`: the copy, the target's fsync and the "
        'switch of the backing store. *status*: the status\'s own `"seconds"` (from '
        "the filter's start in the attach to the switch done). *cp*: `cp "
        "--reflink=never SRC NEW` and then an fsync of NEW; *dd*: `dd if=SRC of=NEW "
        "bs=1M conv=fsync`; each the time of the whole command, NEW a new file. Before "
        "every copy the source's page cache is dropped (`posix_fadvise(DONTNEED)` on "
        "that file only; adding the device drops it too), so each one reads the source "
        "from the disk; after each, the device (now on T) is removed, T or NEW deleted "
        "and the file system synced, outside the timing. The warm-up migration's target "
        "was checked to equal the source byte for byte. Ratios are throughput ratios "
        "(the copy's time ÷ the migration's).",
        "",
        table(
            ["copy", "MiB/s", "range", "time"],
            [
                copy_row("migrate (wall)", "wall"),
                copy_row('migrate (status `"seconds"`)', "status"),
                copy_row("`cp --reflink=never` + fsync", "cp"),
                copy_row("`dd bs=1M conv=fsync`", "dd"),
            ],
        ),
        "",
        table(["throughput", "ratio (wall)", "range", 'with status `"seconds"`'], ratio_rows),
        "",
        f"**Writes during a migration**, {trials} trials: fio (`ioengine=libaio`, `direct=1`, "
        f"`iodepth={QD}`, time-based {runtime:g} s over the whole device, one job) on "
        "the loop device over the blksnapd device (`device add --loop`), without a "
        f"migration and while one runs with `rate={rate // MiB}M`: attached just "
        "before fio starts, its status said `copying` when each fio run ended (at that "
        f"rate the {size_text(size)} take {size / rate:.0f} s), then `ctl abort` and "
        "`detach --filter migrate`. blksnapd writes the device's file (and the target) "
        "through the page cache and fio sends no flush: these rates are mostly the cost "
        "of the request path, not of the disk. The file's page cache is dropped before "
        "each run. *Migration rate*: the bytes it copied from a status just before fio "
        "started to one just after fio ended, ÷ that time.",
        "",
        table(
            ["fio", "without", "during migration", "during ÷ without", "range", "migration rate"],
            write_rows,
        ),
        "",
        f"**Reading.** Moving the device ran at {mib_s('wall').median:,.0f} MiB/s, "
        f"{vs_cp.median:.2f} times the throughput of `cp` and {vs_dd.median:.2f} times "
        "that of `dd` over the same file (disk to disk, each with its final fsync). The "
        "migration copies in one thread, one 1 MiB piece at a time (read, then written), "
        "asking the kernel to read the next 8 MiB ahead (`POSIX_FADV_WILLNEED`)"
        + (
            ": on ext4 blksnapd keeps readahead off on a device's file "
            "(`POSIX_FADV_RANDOM`) and writes a file in 128 KiB pieces, while `dd` reads "
            "with the kernel's readahead"
            if fs == "ext4"
            else ""
        )
        + ". While a migration copies, a write where the copy has passed is done on "
        "the device's file and then on the target (elsewhere on the device's file "
        "alone), under a lock per MiB that the copy also takes, and the copy shares "
        "the disk and the CPUs "
        f"({os.cpu_count()} here): 4 KiB random writes ran at "
        f"{slow[RAND_W.key].median:.2f} and 1 MiB sequential writes at "
        f"{slow[SEQ_W.key].median:.2f} of their rate without one, while the copy moved "
        f"{mig_rate[RAND_W.key]:.0f} MiB/s (4 KiB runs) and {mig_rate[SEQ_W.key]:.0f} "
        f"MiB/s (1 MiB runs) of its {rate // MiB} MiB/s limit.",
        "",
    ]
    for note in notes:
        lines += [note, ""]
    return "\n".join(lines)


def run_section(quick: bool, progress: Callable[[str], None], tmpdir: str | None = None) -> str:
    t_start = time.monotonic()
    size = (128 if quick else 512) * MiB
    trials, copy_trials = (2, 2) if quick else (3, 5)
    runtime = 2.0 if quick else 4.0
    # The migration must outlast the fio run: at this rate it needs twice as long.
    rate = size // int(2 * runtime) // MiB * MiB
    tmpdir = tmpdir or os.environ.get("BLKSNAP_BENCH_TMPDIR", "/var/tmp")
    rng = random.Random(20261202)
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="blksnap-migrate-bench-") as tmp:
        bench = Bench(Path(tmp), size, progress)
        try:
            thr = bench.throughput(copy_trials, rng)
            wr = bench.writes(trials, runtime, rate, rng)
        finally:
            bench.close()
            problems = bench.log_problems()
            for line in problems:
                progress(f"migrate bench: blksnapd log: {line}")
    notes = []
    if bench.status_gaps:
        notes.append(
            f"**Problem**: `ctl status` answered “not attached” {bench.status_gaps} "
            "time(s) at a switch (between the filter leaving the stack and its last "
            "status being kept); the bench asked again."
        )
    if problems:
        shown = "\n".join(f"    {line}" for line in problems[:10])
        notes.append(
            f"**Problem**: blksnapd's log had {len(problems)} unexpected error line(s)"
            + (" (the first 10)" if len(problems) > 10 else "")
            + f":\n\n{shown}"
        )
    seconds = time.monotonic() - t_start
    return report(size, trials, runtime, rate, thr, wr, notes, seconds, fs_type(tmpdir))


def main(argv: list[str] | None = None) -> int:
    return main_with_tmpdir(__doc__, run_section, argv)


if __name__ == "__main__":
    sys.exit(main())
