#!/usr/bin/env python3
"""Our own FUSE session against pyfuse3, both doing nothing.

fio (4 KiB random writes, queue depth 32, libaio, direct) on a loop device
(direct I/O, 4096-byte sectors) over one file of either server:

- ``session``: :mod:`blksnap.frontends.fuse_session` serving a
  :class:`~blksnap.frontends.fuse_session.NullBacking` (writes return at
  once, reads return zeroes), in its own process (``bench/ownnull.py``);
- ``pyfuse3``: ``bench/nullfs.py``, the pyfuse3 do-nothing file system.

Rounds are interleaved (both servers once per round, in a fresh random
order); the report gives each round's IOPS, the medians and their ratio.
``make bench`` measures the same side by side with blksnapd
(``bench/fuse_bench.py``, variant ``own-null``); this is the quick
standalone check. Needs root, /dev/fuse, losetup and fio.

Usage: ``fuse_session_bench.py [--rounds 3] [--runtime 10] [--threads 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from blksnap.control import loop

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
SIZE = 512 * MiB


@contextlib.contextmanager
def server(kind: str, mnt: Path, threads: int) -> Iterator[Path]:
    if kind == "session":
        cmd = [sys.executable, str(HERE / "ownnull.py"), str(mnt), "--size", str(SIZE),
               "--threads", str(threads)]  # fmt: skip
    else:
        cmd = [sys.executable, str(HERE / "nullfs.py"), str(mnt), "--size", str(SIZE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        yield mnt / "disk"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def loop_device(path: Path) -> contextlib.AbstractContextManager[str]:
    """A loop device as blksnapd attaches its own: direct I/O, 4 KiB sectors."""
    return loop.attached(str(path), direct_io=True, sector_size=4096)


def fio_iops(dev: str, runtime: int) -> float:
    r = subprocess.run(
        ["fio", "--name=b", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
         "--iodepth=32", "--rw=randwrite", "--bs=4k", f"--runtime={runtime}",
         "--time_based", "--ramp_time=1", "--norandommap", "--randrepeat=0",
         "--output-format=json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    job = json.loads(r.stdout)["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio error {job['error']}")
    return float(job["write"]["iops"])


def measure(kind: str, base: Path, runtime: int, threads: int) -> float:
    mnt = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))
    try:
        with server(kind, mnt, threads) as disk, loop_device(disk) as dev:
            time.sleep(0.2)
            return fio_iops(dev, runtime)
    finally:
        os.rmdir(mnt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=10, help="seconds of fio per measurement")
    ap.add_argument("--threads", type=int, default=1, help="reader threads of the session")
    args = ap.parse_args(argv)
    kinds = ["session", "pyfuse3"]
    results: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="fuse-session-bench-") as base:
        for rnd in range(1, args.rounds + 1):
            order = random.sample(kinds, len(kinds))
            for kind in order:
                iops = measure(kind, Path(base), args.runtime, args.threads)
                results[kind].append(iops)
                print(f"round {rnd}: {kind:8} {iops / 1000:7.1f}k IOPS", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"fio 4 KiB randwrite QD32, loop (direct I/O, 4 KiB sectors), {args.rounds} rounds")
    print("| server | IOPS (median) | rounds |")
    print("|---|---|---|")
    for k in kinds:
        rounds = ", ".join(f"{v / 1000:.1f}k" for v in results[k])
        label = f"own session, {args.threads} thread(s)" if k == "session" else "pyfuse3 nullfs"
        print(f"| {label} | {med[k] / 1000:.1f}k | {rounds} |")
    ratios = [s / n for s, n in zip(results["session"], results["pyfuse3"], strict=True)]
    print(f"\nratio session / pyfuse3: {statistics.median(ratios):.2f}x "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
