"""``blksnap demo``: the main job end to end, in-process, on sample devices.

The scenario a backup vendor runs, with every result checked:

1. two sparse sample files are served as devices, the tracker is attached;
2. recognisable data is written to both;
3. writer threads start and keep writing to both devices, at any alignment,
   for the rest of the run (they pause only for the instant of each take,
   so the demo knows what the devices held at that instant);
4. snapshot 1 of both devices (diff storage in a directory, with a limit),
   taken; each image is read under load and must equal the device at take;
   a full backup copies each image to a file; snapshot 1 is destroyed;
5. more writes; snapshot 2, taken, verified the same way;
6. an incremental backup reads only the blocks whose CBT number is greater
   than the ``changes_number`` kept from snapshot 1 (same generation),
   applies them onto the full backup, and the result must equal image 2
   byte for byte; snapshot 2 is destroyed.

Everything the demo made is removed at the end, even on failure. The exit
code is 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .device import Device
from .engine import Engine
from .errors import BlksnapError, InvalidArgument
from .units import KiB, MiB, format_size, parse_size

NAMES = ("disk0", "disk1")
#: Unit of comparison: device content at take is kept as one sha256 per piece.
PIECE = 4 * MiB
#: Smallest sample device the scenario makes sense on.
MIN_SIZE = 1 * MiB
#: Pause between two writes of one writer thread (keeps the load realistic and
#: the diff storage small; the writers still do hundreds of writes a second).
WRITER_INTERVAL = 0.002
#: Odd request size for verification reads: nothing lines up with a chunk.
ODD_READ = 3 * MiB + 517


# -- the report -----------------------------------------------------------------


@dataclass
class Report:
    """Steps and checks, printed as they happen (text) or at the end (JSON)."""

    as_json: bool
    steps: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    _current: dict[str, Any] | None = None

    def step(self, title: str, **data: Any) -> None:
        self._current = {"step": len(self.steps) + 1, "title": title, "lines": [], **data}
        self.steps.append(self._current)
        self.say(f"[{self._current['step']}] {title}")

    def line(self, text: str) -> None:
        if self._current is not None:
            self._current["lines"].append(text)
        self.say(f"    {text}")

    def data(self, **data: Any) -> None:
        if self._current is not None:
            self._current.update(data)

    def data_for(self, key: str, name: str, value: Any) -> None:
        if self._current is not None:
            self._current.setdefault(key, {})[name] = value

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        ok = bool(ok)
        if name in self.checks:  # keep names unique: a later check never hides a failure
            n = 2
            while f"{name} #{n}" in self.checks:
                n += 1
            name = f"{name} #{n}"
        self.checks[name] = ok
        if detail:
            self.details[name] = detail
        if self._current is not None:
            self._current.setdefault("checks", {})[name] = ok
        self.say(f"    {'OK  ' if ok else 'FAIL'} {name}" + (f" ({detail})" if detail else ""))
        return ok

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]

    def say(self, text: str) -> None:
        if self.as_json:
            return
        try:
            print(text, flush=True)
        except BrokenPipeError:
            # The reader went away (a pager quit): carry on, and clean up, silently.
            self.as_json = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


# -- content of a device or an image ----------------------------------------------------


@dataclass
class Digest:
    """sha256 of a whole device or image, and of each ``PIECE`` of it."""

    total: str
    pieces: list[str]

    def first_difference(self, other: Digest) -> str:
        for i, (a, b) in enumerate(zip(self.pieces, other.pieces, strict=False)):
            if a != b:
                return f"first difference in bytes {i * PIECE}..{(i + 1) * PIECE}"
        if len(self.pieces) != len(other.pieces):
            return "sizes differ"
        return "identical" if self.total == other.total else "totals differ"


def digest(read: Callable[[int, int], bytes], size: int, request: int = PIECE) -> Digest:
    """Read ``size`` bytes in requests of ``request`` bytes; hash them whole and
    per ``PIECE`` (so digests read with different request sizes compare)."""
    total = hashlib.sha256()
    pieces: list[str] = []
    buf = bytearray()
    off = 0
    while off < size:
        n = min(request, size - off)
        data = read(off, n)
        if len(data) != n:
            raise BlksnapError(f"short read at {off}: {len(data)} of {n} bytes")
        total.update(data)
        buf += data
        off += n
        while len(buf) >= PIECE or (off >= size and buf):
            pieces.append(hashlib.sha256(buf[:PIECE]).hexdigest())
            del buf[:PIECE]
    return Digest(total.hexdigest(), pieces)


def file_digest(path: str, size: int) -> Digest:
    with open(path, "rb") as f:

        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        return digest(read, size)


def pattern_block(rng: random.Random, name: str, offset: int, length: int, tag: str) -> bytes:
    """Recognisable data: a text header (device, offset, tag), then random bytes."""
    head = f"blksnap-demo {name} @{offset:#x} {tag}\n".encode()[:length]
    return head + rng.randbytes(length - len(head))


# -- writers ------------------------------------------------------------------------


class Writer(threading.Thread):
    """Keeps writing random data at random offsets and alignments to one device.

    It holds ``lock`` during each write, so whoever holds the lock knows no
    write of this writer is in flight. ``log`` lists the (offset, length) of
    every write since it was last swapped out.
    """

    def __init__(self, dev: Device, seed: int) -> None:
        super().__init__(name=f"demo-writer-{dev.name}", daemon=True)
        self.dev = dev
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.log: list[tuple[int, int]] = []
        self.writes = 0
        self.bytes = 0
        self.error: BaseException | None = None

    def _next(self) -> tuple[int, int]:
        rng, size = self.rng, self.dev.size
        if rng.random() < 0.5:  # file-system like: 4 KiB aligned, 4-64 KiB
            length = min(size, 4 * KiB * rng.randint(1, 16))
            offset = rng.randrange(0, size - length + 1) & ~(4 * KiB - 1)
        else:  # anything: odd offset, odd length, may straddle chunks
            length = min(size, rng.randint(1, 100_000))
            offset = rng.randrange(0, size - length + 1)
        return offset, length

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                offset, length = self._next()
                data = pattern_block(self.rng, self.dev.name, offset, length, "writer")
                with self.lock:
                    self.dev.write(offset, data)
                    self.log.append((offset, length))
                    self.writes += 1
                    self.bytes += length
                self.stopping.wait(WRITER_INTERVAL)
        except BaseException as exc:  # reported as a failed check
            self.error = exc

    def take_log(self) -> list[tuple[int, int]]:
        """The writes since the last call (call with ``lock`` held)."""
        log, self.log = self.log, []
        return log

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


@contextmanager
def paused(writers: list[Writer]) -> Iterator[None]:
    """No writer writes inside this block."""
    with ExitStack() as stack:
        for w in writers:
            stack.enter_context(w.lock)
        yield


# -- the scenario ---------------------------------------------------------------------


@dataclass
class Backup:
    """What a backup tool keeps about the last backup of one device."""

    path: str
    size: int
    generation_id: str
    changes_number: int


class Demo:
    def __init__(self, workdir: str, size: int, report: Report) -> None:
        self.workdir = workdir
        self.size = size
        self.report = report
        self.seed = random.SystemRandom().randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.eng: Engine | None = None
        self.writers: list[Writer] = []
        self.devs: dict[str, Device] = {}
        self.backups: dict[str, Backup] = {}
        #: Ranges written to each device since the last take (for the CBT check).
        self.since_take: dict[str, list[tuple[int, int]]] = {n: [] for n in NAMES}

    # -- helpers --

    @property
    def engine(self) -> Engine:
        assert self.eng is not None
        return self.eng

    def writer_totals(self) -> tuple[int, int]:
        return sum(w.writes for w in self.writers), sum(w.bytes for w in self.writers)

    def take(self, sid: str) -> dict[str, Digest]:
        """Pause the writers, record what the devices hold, take, resume."""
        with paused(self.writers):
            for w in self.writers:
                self.since_take[w.dev.name].extend(w.take_log())
            at_take = {n: digest(d.read, d.size) for n, d in self.devs.items()}
            t0 = time.monotonic()
            self.engine.snapshot_take(sid)
            pause_ms = (time.monotonic() - t0) * 1000
        self.report.line(
            f"take: writers paused, content of both devices recorded, take in {pause_ms:.1f} ms"
        )
        return at_take

    def verify_images(self, sid: str, at_take: dict[str, Digest]) -> dict[str, Digest]:
        """Read each image under load (odd request sizes) and compare with the take."""
        w0, b0 = self.writer_totals()
        t0 = time.monotonic()
        seen: dict[str, Digest] = {}
        for name in NAMES:
            img = self.engine.image(sid, name)
            d = digest(img.read, img.size, ODD_READ)
            seen[name] = d
            self.report.check(
                f"{sid[:8]} image {name} == {name} at take",
                img.size == self.size and d.total == at_take[name].total,
                "" if d.total == at_take[name].total else d.first_difference(at_take[name]),
            )
        w1, b1 = self.writer_totals()
        self.report.line(
            f"read both images ({format_size(2 * self.size)}) in "
            f"{time.monotonic() - t0:.2f} s while the writers did {w1 - w0} writes "
            f"({format_size(b1 - b0)})"
        )
        return seen

    def diff_storage(self, sid: str) -> None:
        info = self.engine.snapshot_collect(sid)[0]
        chunks = {d["name"]: d["chunks_stored"] for d in info["devices"]}
        st = info["storage"]
        self.report.line(
            "diff storage: "
            + ", ".join(f"{n} {c} chunks" for n, c in chunks.items())
            + f" copied; {format_size(st['used'])} used of {format_size(st['capacity'])}"
        )
        self.report.data(chunks_copied=chunks, diff_storage_used=st["used"])
        events = []
        while (ev := self.engine.wait_event(sid, timeout=0)) is not None:
            events.append(ev.code)
        self.report.line(f"events: {', '.join(events) or 'none'}")
        self.report.data(events=events)
        self.report.check(
            f"{sid[:8]} state is taken (not corrupted)",
            info["state"] == "taken" and "corrupted" not in events,
            f"state {info['state']}, error {info['error']}",
        )

    def destroy(self, sid: str) -> None:
        img = self.engine.image(sid, NAMES[0])
        self.engine.snapshot_destroy(sid)
        try:
            img.read(0, 512)
            gone, how = False, "the image still reads"
        except BlksnapError as exc:
            gone, how = True, exc.errname
        listed = any(s["id"] == sid for s in self.engine.snapshot_collect())
        self.report.check(
            f"{sid[:8]} destroyed: images gone", gone and not listed, f"image read -> {how}"
        )

    # -- the steps --

    def run(self) -> None:
        r = self.report
        size = self.size

        r.step("setup", directory=self.workdir, device_size=size, seed=self.seed)
        paths = {}
        for name in NAMES:
            path = os.path.join(self.workdir, f"{name}.img")
            with open(path, "wb") as f:
                f.truncate(size)
            paths[name] = path
        self.eng = Engine(os.path.join(self.workdir, "state"))
        for name in NAMES:
            self.devs[name] = self.engine.add_device(paths[name], name=name)
            self.engine.attach(name)
        info = self.engine.cbt_info(NAMES[0])
        r.line(f"devices {', '.join(NAMES)}: sparse files of {format_size(size)} in {self.workdir}")
        r.line(
            f"tracker attached: CBT block {format_size(info.block_size)}, "
            f"{info.block_count} blocks per device; COW chunk "
            f"{format_size(self.engine.params.chunk_size)}"
        )

        r.step("write initial data")
        block = 64 * KiB
        slots = size // block
        count = max(1, min(64, slots // 4))
        written = 0
        for name, dev in self.devs.items():
            chosen = sorted(self.rng.sample(range(slots), count))
            for s in chosen:
                length = min(block, size - s * block)
                dev.write(s * block, pattern_block(self.rng, name, s * block, length, "initial"))
                written += length
            dev.flush()
        r.line(f"{count} blocks of {format_size(block)} per device, {format_size(written)} total")
        r.data(bytes_written=written)

        r.step("start writers")
        for i, dev in enumerate(self.devs.values()):
            self.writers.append(Writer(dev, self.seed + i + 1))
        for w in self.writers:
            w.start()
        r.line(
            f"{len(self.writers)} threads write 1 B..98 KiB at random offsets and alignments, "
            f"one every {WRITER_INTERVAL * 1000:.0f} ms each, until the end"
        )

        # -- snapshot 1: full backup --
        storage = os.path.join(self.workdir, "diff-storage")
        os.mkdir(storage)
        limit = 2 * size
        r.step("snapshot 1: create and take")
        sid1 = self.engine.snapshot_create(list(NAMES), storage=storage, limit=limit)
        r.line(f"snapshot {sid1}: diff storage in directory {storage}, limit {format_size(limit)}")
        r.data(snapshot=sid1)
        at_take1 = self.take(sid1)
        cbt1 = {n: self.engine.cbt_info(n) for n in NAMES}
        for n in NAMES:
            self.since_take[n] = []
        r.line(
            "CBT after take: "
            + ", ".join(f"{n} changes_number {c.changes_number}" for n, c in cbt1.items())
            + f", generation {cbt1[NAMES[0]].generation_id[:8]}"
        )

        r.step("snapshot 1: verify images while the devices are written")
        self.verify_images(sid1, at_take1)

        r.step("full backup of snapshot 1")
        os.mkdir(os.path.join(self.workdir, "backup"))
        for name in NAMES:
            img = self.engine.image(sid1, name)
            path = os.path.join(self.workdir, "backup", f"{name}.full")
            h = hashlib.sha256()
            with open(path, "wb") as f:
                off = 0
                while off < img.size:
                    data = img.read(off, min(PIECE, img.size - off))
                    f.write(data)
                    h.update(data)
                    off += len(data)
            c = cbt1[name]
            self.backups[name] = Backup(path, img.size, c.generation_id, c.changes_number)
            r.check(
                f"full backup {name} sha256 == {name} at take 1",
                h.hexdigest() == at_take1[name].total,
                f"read {format_size(img.size)}, sha256 {h.hexdigest()[:16]}",
            )
        r.line(f"kept per device: generation_id and changes_number {cbt1[NAMES[0]].changes_number}")
        r.data(bytes_read={n: self.size for n in NAMES})
        self.diff_storage(sid1)

        r.step("snapshot 1: destroy")
        self.destroy(sid1)

        r.step("more writes")
        written = 0
        for name, dev in self.devs.items():
            ranges = []
            for s in sorted(self.rng.sample(range(slots), max(1, min(16, slots // 8)))):
                length = min(block, size - s * block)
                ranges.append((s * block, length))
            # and one unaligned write straddling two tracking blocks
            if size > block + 5000:
                ranges.append((block - 3000, 5000))
            for off, length in ranges:
                dev.write(off, pattern_block(self.rng, name, off, length, "second"))
                written += length
            self.since_take[name].extend(ranges)
        r.line(f"{format_size(written)} in {len(ranges)} writes per device, writers still going")
        r.data(bytes_written=written)

        # -- snapshot 2: incremental --
        r.step("snapshot 2: create, take, verify")
        sid2 = self.engine.snapshot_create(list(NAMES), storage=storage, limit=limit)
        r.line(f"snapshot {sid2}")
        r.data(snapshot=sid2)
        at_take2 = self.take(sid2)  # moves the writers' logs into since_take
        self.verify_images(sid2, at_take2)

        r.step("incremental backup from the CBT")
        for name in NAMES:
            self.incremental(sid2, name, at_take2[name])
        self.diff_storage(sid2)

        r.step("snapshot 2: destroy")
        self.destroy(sid2)

    def incremental(self, sid: str, name: str, at_take: Digest) -> None:
        r = self.report
        prev = self.backups[name]
        info = self.engine.cbt_info(name)
        same = info.generation_id == prev.generation_id
        r.check(
            f"CBT {name}: same generation as the full backup",
            same,
            f"changes_number {prev.changes_number} -> {info.changes_number}",
        )
        cbt = np.frombuffer(self.engine.cbt_map(name), dtype=np.uint8)
        changed = np.flatnonzero(cbt > prev.changes_number) if same else np.arange(len(cbt))
        bs = info.block_size
        # No change missed: every block written since take 1 is in the map.
        written = np.zeros(len(cbt), dtype=bool)
        for off, length in self.since_take[name]:
            written[off // bs : (off + length - 1) // bs + 1] = True
        missed = np.flatnonzero(written & (cbt <= prev.changes_number))
        r.check(
            f"CBT {name}: every block written since backup 1 is marked",
            len(missed) == 0,
            f"{int(written.sum())} blocks written, {len(missed)} missed"
            + (f", first {int(missed[0])}" if len(missed) else ""),
        )
        # Read the changed blocks, in runs of adjacent ones, onto the full backup.
        img = self.engine.image(sid, name)
        read = 0
        max_run = max(1, PIECE // bs)
        with open(prev.path, "r+b") as f:
            i = 0
            while i < len(changed):
                j = i + 1
                while j < len(changed) and changed[j] == changed[j - 1] + 1 and j - i < max_run:
                    j += 1
                off = int(changed[i]) * bs
                length = min((j - i) * bs, img.size - off)
                data = img.read(off, length)
                f.seek(off)
                f.write(data)
                read += length
                i = j
        pct = 100.0 * read / img.size if img.size else 0.0
        r.line(
            f"{name}: {len(changed)}/{len(cbt)} blocks changed; read {format_size(read)} "
            f"instead of {format_size(img.size)} for a full backup ({pct:.1f}%)"
        )
        r.data_for(
            "incremental",
            name,
            {
                "blocks_changed": len(changed),
                "blocks_total": len(cbt),
                "bytes_read": read,
                "bytes_full": img.size,
            },
        )
        merged = file_digest(prev.path, img.size)
        now = digest(img.read, img.size)
        r.check(
            f"full + incremental {name} == image 2 (sha256)",
            merged.total == now.total == at_take.total,
            merged.first_difference(at_take) if merged.total != at_take.total else "",
        )

    def close(self) -> list[str]:
        """Stop the writers, close the engine; the problems met on the way."""
        problems = []
        for w in self.writers:
            w.stop()
            if w.is_alive():
                problems.append(f"writer {w.dev.name} did not stop")
        for w in self.writers:
            self.report.check(
                f"writer {w.dev.name}: every write succeeded",
                w.error is None,
                f"{w.writes} writes, {format_size(w.bytes)}"
                + (f"; {type(w.error).__name__}: {w.error}" if w.error else ""),
            )
        if self.eng is not None:
            try:
                self.eng.close()
            except Exception as exc:
                problems.append(f"engine close: {exc}")
        return problems


# -- entry point ------------------------------------------------------------------------


def run_demo(directory: str | None, size: str, as_json: bool) -> int:
    """Run the scenario; 0 when every check passed, 1 otherwise."""
    nbytes = parse_size(size)
    if nbytes < MIN_SIZE or nbytes % 512:
        raise InvalidArgument(
            f"sample device size {size!r}: at least {format_size(MIN_SIZE)}, a multiple of 512"
        )
    made_root = False
    if directory is not None and not os.path.isdir(directory):
        if os.path.exists(directory):
            raise InvalidArgument(f"{directory} is not a directory")
        os.mkdir(directory)
        made_root = True
    report = Report(as_json=as_json)
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="blksnap-demo-", dir=directory)
    report.say(
        f"blksnap demo: two {format_size(nbytes)} sample devices in {workdir}, removed at the end"
    )
    demo = Demo(workdir, nbytes, report)
    error: str | None = None
    try:
        demo.run()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        report.check("scenario ran to the end", False, error)
        if not as_json:
            traceback.print_exc(file=sys.stderr)
    finally:
        problems = demo.close()
        shutil.rmtree(workdir, ignore_errors=True)
        report.step("clean up")
        if made_root:
            try:
                os.rmdir(directory)  # type: ignore[arg-type]
            except OSError as exc:
                problems.append(f"rmdir {directory}: {exc.strerror}")
        report.check(
            "everything the demo made is removed",
            not problems and not os.path.exists(workdir),
            "; ".join(problems),
        )
    seconds = time.monotonic() - t0
    failed = report.failed
    if as_json:
        doc = {
            "ok": not failed,
            "directory": workdir,
            "device_size": nbytes,
            "devices": list(NAMES),
            "seed": demo.seed,
            "seconds": round(seconds, 3),
            "steps": report.steps,
            "checks": report.checks,
            "details": report.details,
            "failed": failed,
            "error": error,
        }
        print(json.dumps(doc, indent=2))
    else:
        passed = len(report.checks) - len(failed)
        print(f"\n{passed}/{len(report.checks)} checks passed in {seconds:.1f} s", flush=True)
        if failed:
            print("FAILED:", flush=True)
            for name in failed:
                detail = report.details.get(name, "")
                print(f"  - {name}" + (f": {detail}" if detail else ""), flush=True)
        else:
            print("demo OK", flush=True)
    return 0 if not failed else 1
