#!/usr/bin/env python3
"""NBD benchmark: ``nbdcopy`` against blksnapd's NBD exports and against
``qemu-nbd`` serving a copy of the same bytes, side by side in one run.

Rows (each trial runs every variant once, in a fresh random order; a ratio
is taken within a trial, and the report gives the median over trials and
the range, since the machine is shared and noisy):

- **image read**: ``nbdcopy nbd+unix:///ID/N null:`` from a snapshot image
  (read-only export, the backup path) vs ``nbdcopy`` from ``qemu-nbd -r``
  exporting a copy of the device. Target: blksnapd >= 0.80 of qemu-nbd.
- **device read**: the same from the device export ``N`` (for scale).
- **device write**: ``nbdcopy FILE nbd+unix:///N`` into a device export
  with the ``blksnap`` tracker attached (CBT on every write, no snapshot)
  vs into a writable ``qemu-nbd`` of a file of the same size.

Both servers listen on Unix sockets in the same directory, both files are
fully allocated and in the page cache, both advertise multi-conn, and
nbdcopy runs with its defaults (its own choice of connections and
requests). Data is random, so nothing is skipped as zeroes or holes.

``run_nbd_bench(quick)`` returns the Markdown section (``bench/run.py``
hooks it in); ``python bench/nbd_bench.py [--quick] [--output FILE]`` runs
it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fiojobs import warm_cache  # noqa: E402
from harness import Spread, table  # noqa: E402

from blksnap.tools import sandbox  # noqa: E402

BIN = Path(sys.executable).parent
SECTION = "## NBD: nbdcopy from and to blksnapd vs qemu-nbd"
MiB = 1 << 20
TARGET = 0.80


@dataclass
class Config:
    size: int
    trials: int
    seed: int = 1


def make_config(quick: bool) -> Config:
    return Config(size=128 * MiB, trials=3) if quick else Config(size=1024 * MiB, trials=9)


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (blksnapd mounts FUSE)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("nbdcopy", "qemu-nbd"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make apt: libnbd-bin, qemu-utils)"
    if not (BIN / "blksnapd").exists():
        return f"no blksnapd next to {sys.executable} (make setup)"
    return None


def version(*cmd: str) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


def write_random(path: str, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(rng.randbytes(4 * MiB))
        f.flush()
        os.fsync(f.fileno())


def write_zeroes(path: str, size: int) -> None:
    """A fully allocated file of zeroes (no holes for either server)."""
    zero = bytes(4 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(zero)):
            f.write(zero)
        f.flush()
        os.fsync(f.fileno())


def files_equal(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.05)


@dataclass
class Rig:
    """blksnapd and two qemu-nbd servers in one directory; everything it
    starts is stopped by its pid in :meth:`close`."""

    cfg: Config
    root: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    box: sandbox.Sandbox | None = None
    sid: str = ""

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def cli(self, *args: str) -> str:
        assert self.box is not None
        return self.box.cli(*args).stdout.strip()

    def start(self, progress: Callable[[str], None]) -> None:
        rng = random.Random(self.cfg.seed)
        size = self.cfg.size
        progress(f"nbd bench: preparing {size // MiB} MiB files in {self.root}")
        write_random(self.path("src.img"), size, rng)  # the device read from
        write_zeroes(self.path("dst.img"), size)  # the device written to
        write_zeroes(self.path("qdst.raw"), size)  # qemu-nbd's file written to
        write_random(self.path("input.raw"), size, rng)  # what the writes copy
        self.box = sandbox.start(self.root, ["--nbd", f"unix:{self.path('nbd.sock')}"])
        wait_for_socket(self.path("nbd.sock"), self.box.proc, "blksnapd")
        self.cli("device", "add", self.path("src.img"), "--name", "src")
        self.cli("device", "add", self.path("dst.img"), "--name", "dst")
        self.cli("attach", "-d", "dst")
        os.makedirs(self.path("diff"), exist_ok=True)
        self.sid = self.cli(
            "snapshot", "create", "-d", "src", "-f", self.path("diff"), "-l", str(size)
        )
        self.cli("snapshot", "take", "-i", self.sid)
        # The copy qemu-nbd serves: the same bytes (the device is not written).
        shutil.copyfile(self.path("src.img"), self.path("copy.raw"))
        for sock, args in (
            ("q-read.sock", ["-r", self.path("copy.raw")]),
            ("q-write.sock", [self.path("qdst.raw")]),
        ):
            self.procs.append(
                subprocess.Popen(
                    ["qemu-nbd", "-f", "raw", "-t", "-e", "16", "-k", self.path(sock), *args],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                )
            )
            wait_for_socket(self.path(sock), self.procs[-1], "qemu-nbd")
        # both servers start from the page cache
        warm_cache([self.path(name) for name in ("src.img", "copy.raw", "input.raw")])

    def uri(self, server: str, export: str = "") -> str:
        sock = {"blksnapd": "nbd.sock", "qemu-read": "q-read.sock", "qemu-write": "q-write.sock"}
        return f"nbd+unix:///{export}?socket={self.path(sock[server])}"

    def check_alive(self) -> None:
        if self.box is not None and self.box.proc.poll() is not None:
            raise RuntimeError(f"blksnapd exited with {self.box.proc.returncode}")
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}")

    def close(self) -> None:
        """qemu-nbd servers by their pid, then blksnapd (nothing left mounted)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)
        if self.box is not None:
            self.box.stop()


@contextlib.contextmanager
def rig(cfg: Config, progress: Callable[[str], None]) -> Iterator[Rig]:
    root = tempfile.mkdtemp(prefix="blksnap-nbd-bench-")
    r = Rig(cfg, root)
    try:
        r.start(progress)
        yield r
    finally:
        r.close()
        shutil.rmtree(root, ignore_errors=True)


def nbdcopy(src: str, dst: str) -> float:
    """Seconds one ``nbdcopy`` takes (the page cache of the temp dir's file
    system, where the bench's files are, flushed to disk first, outside the
    timing, so that a previous run's writeback is not billed; not a global
    sync, which would wait on every other file system of the machine)."""
    subprocess.run(["sync", "-f", tempfile.gettempdir()], check=True)
    start = time.perf_counter()
    subprocess.run(["nbdcopy", src, dst], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    ours: tuple[str, str]  # nbdcopy source, destination
    theirs: tuple[str, str]
    target: bool


def rows(r: Rig) -> list[Row]:
    return [
        Row(
            "image-read",
            "read: image export `ID/src` -> null: vs `qemu-nbd -r` copy",
            (r.uri("blksnapd", f"{r.sid}/src"), "null:"),
            (r.uri("qemu-read"), "null:"),
            True,
        ),
        Row(
            "device-read",
            "read: device export `src` -> null: vs `qemu-nbd -r` copy",
            (r.uri("blksnapd", "src"), "null:"),
            (r.uri("qemu-read"), "null:"),
            False,
        ),
        Row(
            "device-write",
            "write: file -> device export `dst` (tracker on) vs file -> `qemu-nbd`",
            (r.path("input.raw"), r.uri("blksnapd", "dst")),
            (r.path("input.raw"), r.uri("qemu-write")),
            True,
        ),
    ]


def run_nbd_bench(
    quick: bool,
    progress: Callable[[str], None] | None = None,
    *,
    size_mib: int | None = None,
    trials: int | None = None,
) -> str:
    """The Markdown section: nbdcopy against blksnapd and qemu-nbd."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    reason = why_not()
    if reason:
        return f"{SECTION}\n\nSkipped: {reason}.\n"
    cfg = make_config(quick)
    if size_mib is not None:
        cfg.size = max(4, size_mib // 4 * 4) * MiB  # whole 4 MiB pieces (write_random)
    if trials is not None:
        cfg.trials = max(1, trials)
    started = time.monotonic()
    with rig(cfg, say) as r:
        table_rows = rows(r)
        ours: dict[str, list[float]] = {row.key: [] for row in table_rows}
        theirs: dict[str, list[float]] = {row.key: [] for row in table_rows}
        ratios: dict[str, list[float]] = {row.key: [] for row in table_rows}
        order_rng = random.Random(cfg.seed)
        # One untimed round: first-connection costs, lazy allocations.
        for row in table_rows:
            nbdcopy(*row.ours)
            nbdcopy(*row.theirs)
        for trial in range(cfg.trials):
            say(f"nbd bench: trial {trial + 1}/{cfg.trials}")
            runs = [(row, side) for row in table_rows for side in ("ours", "theirs")]
            order_rng.shuffle(runs)
            got: dict[tuple[str, str], float] = {}
            for row, side in runs:
                got[(row.key, side)] = nbdcopy(*(row.ours if side == "ours" else row.theirs))
            r.check_alive()
            for row in table_rows:
                a, b = got[(row.key, "ours")], got[(row.key, "theirs")]
                ours[row.key].append(a)
                theirs[row.key].append(b)
                ratios[row.key].append(b / a)  # throughput of ours / theirs
        # The bytes were right: the image read back equals the copy qemu-nbd served.
        check = r.path("check.raw")
        nbdcopy(r.uri("blksnapd", f"{r.sid}/src"), check)
        same = files_equal(check, r.path("copy.raw"))
        nbdcopy(r.uri("blksnapd", "dst"), check)
        same = same and files_equal(check, r.path("input.raw"))
        nbd_version = version("nbdcopy", "--version")
        qemu_version = version("qemu-nbd", "--version")
    elapsed = time.monotonic() - started

    def rate(seconds: list[float]) -> str:
        return f"{cfg.size / MiB / statistics.median(seconds):,.0f} MiB/s"

    lines = []
    for row in table_rows:
        spread = Spread.of(ratios[row.key])
        verdict = ""
        if row.target:
            verdict = "met" if spread.median >= TARGET else "**missed**"
        lines.append(
            [
                row.label,
                rate(ours[row.key]),
                rate(theirs[row.key]),
                spread.ratio_text(),
                spread.range_text(),
                f">= {TARGET:.2f} {verdict}" if row.target else "-",
            ]
        )
    text = [
        SECTION,
        "",
        f"`nbdcopy` with its defaults, {cfg.size // MiB} MiB of random data, {cfg.trials} "
        "interleaved trials (each variant once per trial, random order); throughput is "
        "size / median wall time of the whole `nbdcopy` run (connection set-up included); "
        "the ratio is blksnapd / qemu-nbd throughput within a trial, median and range "
        f"over the trials. {nbd_version}; {qemu_version}; {os.cpu_count()} CPUs. "
        f"Section time {elapsed:.0f} s{' (quick run: numbers mean little)' if quick else ''}.",
        "",
        table(
            ["nbdcopy", "blksnapd", "qemu-nbd", "ratio", "range", "target"],
            lines,
        ),
        "",
        "- Both servers on Unix sockets, files fully allocated and in the page cache; "
        "`qemu-nbd -r -t -e 16` serves a byte-identical copy of the device, a writable "
        "`qemu-nbd -t -e 16` a zero-filled file of the same size.",
        "- The image export reads through the snapshot's diff area (no chunk stored: "
        "the device was not written after take); the device write path goes through "
        "the filter stack, so every write also marks the CBT.",
        f"- Data check after the trials: image read back == qemu-nbd's copy, device "
        f"read back == the written file: **{'yes' if same else 'NO'}**.",
        "",
    ]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--output", help="write the section to this file (default: stdout)")
    p.add_argument("--size", type=int, metavar="MiB", help="data size (default 1024, quick 128)")
    p.add_argument("--trials", type=int, help="timed trials (default 9, quick 3)")
    args = p.parse_args(argv)
    text = run_nbd_bench(args.quick, size_mib=args.size, trials=args.trials)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
