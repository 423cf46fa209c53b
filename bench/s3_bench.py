#!/usr/bin/env python3
"""Repository in an object store: ``blksnap backup`` and ``blksnap restore``
with the repository in a bucket of a RADOS Gateway (``s3://BUCKET/PREFIX``)
against the same commands with the repository in a local directory, side by
side in one run.

One throwaway Ceph cluster (``blksnap/tools/rgw.py``: a monitor, one OSD on
``memstore``, ``radosgw``) on this machine; one blksnapd (sandbox) serving a
512 MiB device (``synthetic()`` of ``repo_bench``: a quarter random, a
quarter text, half zeroes) with its tracker attached. Each trial makes a
bucket, and, in an order rotated from trial to trial:

- **full backup** (``blksnap backup --full --storage DIR``: the snapshot's
  diff storage in the same directory whatever the repository, so only the
  repository differs) into a new local directory repository, into
  ``s3://BUCKET/p`` (default chunk size, 1 MiB) and into ``s3://BUCKET/p4m``
  (``--chunk-size 4M``); all unencrypted, zstd. Wall time of the command;
  the ratio S3 ÷ local is taken within the trial. From ``--json``: the
  ``traffic`` (requests, bytes sent and received, retries) and
  ``bytes_stored``;
- **restore** (``blksnap restore --to FILE``) from each, sha256 checked
  against the device; then, for request counts (the CLI does not print the
  restore's), the same restore in process (``Repository.open(url).restore``,
  then ``repo.traffic()``);
- **incremental**: 1 % of the device rewritten in scattered 64 KiB writes
  (``os.pwrite`` on ``<mount>/dev/d0``, then fsync), then ``blksnap backup
  --incremental`` into each repository: requests and bytes sent;
- CPU seconds of the command, blksnapd, radosgw and the OSD for each.

Then, once: the latency of single requests (boto3, one at a time), and one
full backup of each kind in process (``run_backup`` through the same
blksnapd) with every storage call timed: where the time goes.

``run_s3_bench(quick, progress)`` returns the Markdown section
(``bench/run.py`` hooks it in); ``python bench/s3_bench.py [--quick]`` runs
it alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from harness import GiB, KiB, MiB, Spread, main_with_output, table  # noqa: E402
from instant_bench import make_device  # noqa: E402
from repo_bench import cli, synthetic  # noqa: E402

from blksnap.backup.repo import Repository  # noqa: E402
from blksnap.backup.s3 import S3Storage  # noqa: E402
from blksnap.tools import rgw, sandbox  # noqa: E402

SECTION = "## Repository in an object store (RADOS Gateway)"
#: The scattered writes before the incremental.
WRITE = 64 * KiB
CHANGED = 0.01
LOCAL, S3, S3_4M = "local", "s3", "s3-4M"
VARIANTS = (LOCAL, S3, S3_4M)
LABEL = {LOCAL: "local directory", S3: "S3, 1 MiB chunks", S3_4M: "S3, 4 MiB chunks"}
CHUNK = {LOCAL: MiB, S3: MiB, S3_4M: 4 * MiB}
#: ``--chunk-size`` of each (none: the default, 1 MiB).
CHUNK_ARGS: dict[str, tuple[str, ...]] = {LOCAL: (), S3: (), S3_4M: ("--chunk-size", "4M")}
#: Processes whose CPU time is counted around each command.
PROCS = ("blksnapd", "radosgw", "ceph-osd")


class BenchError(RuntimeError):
    """Something that makes a measurement meaningless."""


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` (so in blksnapd's, the commands' and this
    process's boto3 clients), the old values put back after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``spans`` was under way."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(spans):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Run:
    """One timed command: wall seconds, its ``--json`` document, CPU seconds
    of the command (``blksnap``) and of each of :data:`PROCS` meanwhile."""

    seconds: float
    doc: dict[str, Any]
    cpu: dict[str, float]


@dataclass
class Trial:
    full: dict[str, Run] = field(default_factory=dict)
    restore: dict[str, Run] = field(default_factory=dict)
    incr: dict[str, Run] = field(default_factory=dict)
    #: In-process restore: (seconds, requests, bytes received).
    restore_traffic: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    #: Objects under the repository's prefix after the full backup.
    objects: dict[str, int] = field(default_factory=dict)


class CallTimes:
    """Every call a storage makes timed (outermost calls only: a call one
    method makes to another is part of the first), summed over threads."""

    METHODS = (
        "get",
        "get_range",
        "put",
        "put_if_absent",
        "list_dirs",
        "delete",
        "stat",
        "touch",
        "now",
        "flush",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: name -> (start, end) of each call, perf_counter seconds.
        self.calls: dict[str, list[tuple[float, float]]] = {}
        self.depth = threading.local()

    def add(self, name: str, t0: float) -> None:
        t1 = time.perf_counter()
        with self.lock:
            self.calls.setdefault(name, []).append((t0, t1))

    def wrap(self, storage: Any) -> None:
        for name in self.METHODS:
            setattr(storage, name, self._timed(name, getattr(storage, name)))
        orig_list = storage.list

        def listed(prefix: str) -> Iterator[Any]:
            t0 = time.perf_counter()
            items = list(orig_list(prefix))
            self.add("list", t0)
            return iter(items)

        storage.list = listed

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            depth = getattr(self.depth, "n", 0)
            self.depth.n = depth + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.depth.n = depth
                if depth == 0:
                    self.add(name, t0)

        return call


class S3Bench:
    """A gateway, a blksnapd and one tracked device; the repositories."""

    def __init__(self, work: Path, size: int, seed: int, stack: contextlib.ExitStack) -> None:
        self.work, self.size = work, size
        self.rng = random.Random(seed)
        t0 = time.perf_counter()
        self.gw = rgw.Gateway.start(work / "ceph")
        self.gw_start = time.perf_counter() - t0
        stack.callback(self.gw.stop)
        stack.enter_context(
            environ(
                {
                    "AWS_ACCESS_KEY_ID": self.gw.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.gw.secret_key,
                    "AWS_DEFAULT_REGION": "default",
                    "BLKSNAP_S3_ENDPOINT": self.gw.endpoint,
                }
            )
        )
        self.s3: Any = self.gw.client()
        # The gateway's first writes make its pools (seconds): not in any number.
        t0 = time.perf_counter()
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="warm-up", Body=b"x")
        self.s3.get_object(Bucket=bucket, Key="warm-up")["Body"].read()
        self.drop_bucket(bucket)
        self.gw_warm = time.perf_counter() - t0
        self.box = sandbox.start(work / "daemon")
        stack.callback(self.box.stop)
        self.dev_file = work / "d0.img"
        self.read = synthetic(size, seed)
        make_device(self.dev_file, size, self.read)
        self.dev_sha = sha256(self.dev_file)
        self.box.client.add_device(str(self.dev_file), "d0")
        self.box.client.attach("d0")
        self.dev = f"{self.box.mount}/dev/d0"
        self.diff = work / "diff"
        self.diff.mkdir()
        self.pids = {
            "blksnapd": self.box.proc.pid,
            "radosgw": self.gw.procs["rgw"].pid,
            "ceph-osd": self.gw.procs["osd"].pid,
        }

    # -- buckets --

    def new_bucket(self) -> str:
        name = f"blksnap-bench-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str) -> int:
        n = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            n += len(page.get("Contents", []))
        return n

    def drop_bucket(self, bucket: str) -> None:
        """Delete every object of ``bucket`` (and unfinished uploads), then it."""
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        for up in self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            self.s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        self.s3.delete_bucket(Bucket=bucket)

    # -- commands --

    def cpu(self) -> dict[str, float]:
        out = {name: proc_cpu(pid) for name, pid in self.pids.items()}
        out["blksnap"] = children_cpu()
        return out

    def run(self, *args: str) -> Run:
        before = self.cpu()
        dt, doc = cli(self.box, *args)
        after = self.cpu()
        return Run(dt, doc, {k: after[k] - before[k] for k in after})

    def backup(self, url: str, mode: str, extra: tuple[str, ...] = ()) -> Run:
        r = self.run(
            "backup", "-d", "d0", "--repo", url, f"--{mode}", "--storage", str(self.diff),
            *extra, "--no-progress",
        )  # fmt: skip
        kinds = [d.get("kind") for d in r.doc.get("devices", [])]
        if kinds != [mode]:
            raise BenchError(f"{mode} backup into {url} made {kinds}")
        return r

    def restore(self, url: str, to: Path) -> Run:
        return self.run(
            "restore", "--repo", url, "-b", "latest", "-d", "d0", "--to", str(to), "--no-progress"
        )

    def restore_in_process(self, url: str, to: Path) -> tuple[float, int, int]:
        """(seconds, requests, bytes received) of a restore in this process,
        counted by the repository's storage from after its opening."""
        repo = Repository.open(url)
        try:
            before = repo.traffic()
            t0 = time.perf_counter()
            repo.restore("latest", "d0", str(to))
            dt = time.perf_counter() - t0
            t = repo.traffic().since(before)
        finally:
            repo.storage.close()
            to.unlink(missing_ok=True)
        return dt, t.requests, t.bytes_received

    def scatter(self, fraction: float) -> list[int]:
        """Rewrite ``fraction`` of the device in random 64 KiB blocks (random
        bytes, so every chunk touched is new), then fsync; the blocks."""
        blocks = self.rng.sample(
            range(self.size // WRITE), max(1, round(self.size / WRITE * fraction))
        )
        self._write(blocks, lambda _: self.rng.randbytes(WRITE))
        return blocks

    def unscatter(self, blocks: list[int]) -> None:
        """Put the device's own bytes back into ``blocks`` (through the device,
        tracked): every trial backs up the same data."""
        self._write(blocks, lambda b: self.read(b * WRITE, WRITE))

    def _write(self, blocks: list[int], data: Callable[[int], bytes]) -> None:
        fd = os.open(self.dev, os.O_RDWR)
        try:
            for b in blocks:
                os.pwrite(fd, data(b), b * WRITE)
            os.fsync(fd)
        finally:
            os.close(fd)

    def chunk_counts(self, cs: int) -> tuple[int, int]:
        """(chunks holding data, distinct ones among them) of the device at
        chunk size ``cs``: the GETs a restore needs, without and with reuse."""
        seen: set[bytes] = set()
        data = 0
        for off in range(0, self.size, cs):
            piece = self.read(off, min(cs, self.size - off))
            if piece.count(0) != len(piece):
                data += 1
                seen.add(hashlib.blake2b(piece, digest_size=16).digest())
        return data, len(seen)

    # -- where the time goes --

    def latency(self, bucket: str, n: int) -> dict[str, list[float]]:
        """Milliseconds of single requests, one at a time (boto3; a fresh key
        for each PUT)."""
        s3, small, big = self.s3, os.urandom(4 * KiB), os.urandom(MiB)
        kinds: dict[str, Callable[[int], object]] = {
            "PUT 4 KiB": lambda i: s3.put_object(Bucket=bucket, Key=f"lat/s/{i}", Body=small),
            "PUT 4 KiB, If-None-Match: *": lambda i: s3.put_object(
                Bucket=bucket, Key=f"lat/c/{i}", Body=small, IfNoneMatch="*"
            ),
            "PUT 1 MiB": lambda i: s3.put_object(Bucket=bucket, Key=f"lat/b/{i}", Body=big),
            "GET 1 MiB": lambda i: s3.get_object(Bucket=bucket, Key=f"lat/b/{i}")["Body"].read(),
            "HEAD": lambda i: s3.head_object(Bucket=bucket, Key=f"lat/s/{i}"),
            "LIST (10 keys)": lambda i: s3.list_objects_v2(
                Bucket=bucket, Prefix="lat/s/", MaxKeys=10
            ),
        }
        out: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(n):
            for what, fn in kinds.items():
                t0 = time.perf_counter()
                fn(i)
                out[what].append((time.perf_counter() - t0) * 1000)
        return out

    def concurrent_puts(self, bucket: str, n: int, inflight: int) -> tuple[list[float], float]:
        """``n`` PUTs of 1 MiB, ``inflight`` at a time (one client, as blksnap
        has): milliseconds of each, and PUTs (MiB) per second together."""
        import boto3
        from botocore.config import Config

        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=self.gw.endpoint,
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=2 * inflight),
        )
        body = os.urandom(MiB)

        def put(i: int) -> float:
            t0 = time.perf_counter()
            s3.put_object(Bucket=bucket, Key=f"par/{i}", Body=body)
            return (time.perf_counter() - t0) * 1000

        try:
            with ThreadPoolExecutor(inflight) as pool:
                list(pool.map(put, range(-inflight, 0)))  # connections opened, untimed
                t0 = time.perf_counter()
                ms = list(pool.map(put, range(n)))
                rate = n / (time.perf_counter() - t0)
            s3.delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": f"par/{i}"} for i in range(-inflight, n)]},
            )
        finally:
            s3.close()
        return ms, rate

    def startup(self, url: str, n: int = 3) -> float:
        """Median seconds of ``blksnap backups --repo URL``: the fixed cost of
        a command (start-up, imports, opening the repository)."""
        return statistics.median(cli(self.box, "backups", "--repo", url)[0] for _ in range(n))

    def profile(self, url: str) -> dict[str, Any]:
        """One full backup in process (``run_backup`` through the same blksnapd)
        with every storage call timed; process and server CPU meanwhile."""
        from blksnap.backup.session import run_backup

        repo = Repository.init(url, chunk_size=MiB)
        times = CallTimes()
        times.wrap(repo.storage)
        cpu0, own0 = self.cpu(), time.process_time()
        t0 = time.perf_counter()
        try:
            res = run_backup(self.box.client, repo, ["d0"], "full", storage=str(self.diff))
        finally:
            wall = time.perf_counter() - t0
            repo.storage.close()
        cpu1, own1 = self.cpu(), time.process_time()
        cpu = {k: cpu1[k] - cpu0[k] for k in PROCS}
        cpu["this process"] = own1 - own0
        return {
            "wall": wall,
            "calls": times.calls,
            "cpu": cpu,
            "requests": res.traffic.requests if res.traffic else 0,
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.box.client.remove_device("d0")


def trial(b: S3Bench, t: int, problems: list[str]) -> Trial:
    out = Trial()
    bucket = b.new_bucket()
    local = b.work / f"local-{t}"
    urls = {LOCAL: str(local), S3: f"s3://{bucket}/p", S3_4M: f"s3://{bucket}/p4m"}
    k = t % len(VARIANTS)
    order = list(VARIANTS[k:] + VARIANTS[:k])
    try:
        for v in order:
            out.full[v] = b.backup(urls[v], "full", CHUNK_ARGS[v])
        for v in (S3, S3_4M):
            out.objects[v] = b.objects(bucket, urls[v].rsplit("/", 1)[1])
        for v in order:
            to = b.work / f"restored-{v}"
            try:
                out.restore[v] = r = b.restore(urls[v], to)
                if r.doc.get("sha256") != b.dev_sha:
                    problems.append(f"trial {t + 1}: restore from {v}: sha256 differs")
            finally:
                to.unlink(missing_ok=True)
        for v in (S3, S3_4M):
            out.restore_traffic[v] = b.restore_in_process(urls[v], b.work / "restored-ip")
        blocks = b.scatter(CHANGED)
        for v in order:
            out.incr[v] = b.backup(urls[v], "incremental")
        b.unscatter(blocks)
    finally:
        shutil.rmtree(local, ignore_errors=True)
        b.drop_bucket(bucket)
    return out


def run_s3_bench(quick: bool, progress: Callable[[str], None] = print) -> str:
    why = sandbox.why_not() or rgw.why_not()
    if why:
        return f"{SECTION}\n\nSkipped: {why}.\n"
    t_start = time.perf_counter()
    size = (64 if quick else 512) * MiB
    trials = 1 if quick else 3
    lat_n = 20 if quick else 100
    work = Path(tempfile.mkdtemp(prefix="blksnap-s3bench-", dir="/var/tmp"))
    results: list[Trial] = []
    problems: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            b = S3Bench(work, size, seed=23, stack=stack)
            stack.callback(b.close)
            progress(
                f"s3: gateway up in {b.gw_start:.1f} s at {b.gw.endpoint}, its first "
                f"writes {b.gw_warm:.1f} s"
            )
            for t in range(trials):
                t0 = time.perf_counter()
                r = trial(b, t, problems)
                results.append(r)
                progress(
                    f"s3 trial {t + 1}/{trials} ({time.perf_counter() - t0:.0f} s): full "
                    + ", ".join(f"{v} {size / r.full[v].seconds / MiB:.0f}" for v in VARIANTS)
                    + " MiB/s; restore "
                    + ", ".join(f"{v} {size / r.restore[v].seconds / MiB:.0f}" for v in VARIANTS)
                    + " MiB/s"
                )
            bucket = b.new_bucket()
            try:
                lat = b.latency(bucket, lat_n)
                sweep = {
                    k: b.concurrent_puts(bucket, 64 if quick else 256, k)
                    for k in (1, 4, S3Storage.parallelism, 2 * S3Storage.parallelism)
                }
                chunks = {cs: b.chunk_counts(cs) for cs in (MiB, 4 * MiB)}
                urls = {LOCAL: str(work / "profile-local"), S3: f"s3://{bucket}/profile"}
                prof = {v: b.profile(url) for v, url in urls.items()}
                info = {f"startup {v}": b.startup(url) for v, url in urls.items()}
            finally:
                b.drop_bucket(bucket)
            progress(
                "s3: in process, full backup local "
                f"{prof[LOCAL]['wall']:.1f} s, S3 {prof[S3]['wall']:.1f} s; PUT 4 KiB "
                f"{statistics.median(lat['PUT 4 KiB']):.1f} ms"
            )
            info["gateway start"], info["gateway warm-up"] = b.gw_start, b.gw_warm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["section"] = time.perf_counter() - t_start
    return report(size, results, lat, sweep, chunks, prof, info, problems)


def report(
    size: int,
    res: list[Trial],
    lat: dict[str, list[float]],
    sweep: dict[int, tuple[list[float], float]],
    chunks: dict[int, tuple[int, int]],
    prof: dict[str, dict[str, Any]],
    info: dict[str, float],
    problems: list[str],
) -> str:
    """The Markdown section. ``lat``: milliseconds of single requests;
    ``sweep``: PUTs of 1 MiB k at a time -> (milliseconds, PUTs per second);
    ``chunks``: chunk size -> (chunks holding data, distinct ones); ``prof``:
    the in-process backups; ``info``: seconds of the gateway's start and
    warm-up, of a command's start-up on each repository, of the section."""
    med = statistics.median
    gib = size / GiB
    cpus = os.cpu_count() or 1
    inflight = S3Storage.parallelism

    def secs(kind: str, v: str) -> list[float]:
        return [getattr(r, kind)[v].seconds for r in res]

    def ratio(kind: str, v: str) -> Spread:
        return Spread.of([a / b for a, b in zip(secs(kind, LOCAL), secs(kind, v), strict=True)])

    def mr(values: list[float], fmt: str = ".0f") -> str:
        """The median and, over several trials, the range."""
        if len(values) == 1:
            return f"{values[0]:{fmt}}"
        return f"{med(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    def traffic(run: Run) -> dict[str, int]:
        return run.doc.get("traffic") or {}

    def stored(run: Run) -> int:
        return sum(d.get("bytes_stored", 0) for d in run.doc.get("devices", []))

    def per_v(fn: Callable[[Trial, str], float], fmt: str = ".0f") -> list[str]:
        return [mr([fn(r, v) for r in res], fmt) for v in (S3, S3_4M)]

    def full_req(v: str) -> float:
        return med(traffic(r.full[v])["requests"] / gib for r in res)

    def restore_req(v: str) -> float:
        return med(r.restore_traffic[v][1] / gib for r in res)

    def incr_sent(v: str) -> float:
        return med(traffic(r.incr[v])["bytes_sent"] for r in res)

    speed_rows = []
    for kind, label in (("full", "full backup"), ("restore", "restore")):
        for v in (S3, S3_4M):
            sp = ratio(kind, v)
            speed_rows.append(
                [
                    f"{label}, {LABEL[v]}",
                    f"{size / med(secs(kind, LOCAL)) / MiB:.0f}",
                    f"{size / med(secs(kind, v)) / MiB:.0f}",
                    sp.ratio_text(),
                    sp.range_text(),
                ]
            )
    req_rows = [
        ["full backup MiB/s", *per_v(lambda r, v: size / r.full[v].seconds / MiB)],
        ["restore MiB/s", *per_v(lambda r, v: size / r.restore[v].seconds / MiB)],
        [
            "full backup: requests per GiB of device",
            *per_v(lambda r, v: traffic(r.full[v])["requests"] / gib),
        ],
        [
            "full backup: requests per GiB stored",
            *per_v(lambda r, v: traffic(r.full[v])["requests"] / (stored(r.full[v]) / GiB)),
        ],
        [
            "full backup: MiB sent / stored",
            *[
                f"{med(traffic(r.full[v])['bytes_sent'] / MiB for r in res):.0f} / "
                f"{med(stored(r.full[v]) / MiB for r in res):.0f}"
                for v in (S3, S3_4M)
            ],
        ],
        ["objects in the repository after the full", *per_v(lambda r, v: r.objects[v])],
        [
            f"incremental after {CHANGED:.0%} rewritten in 64 KiB blocks: requests",
            *per_v(lambda r, v: traffic(r.incr[v])["requests"]),
        ],
        [
            "incremental: MiB sent",
            *per_v(lambda r, v: traffic(r.incr[v])["bytes_sent"] / MiB, ".1f"),
        ],
        ["incremental: seconds (command)", *per_v(lambda r, v: r.incr[v].seconds, ".2f")],
        [
            "restore: requests per GiB restored (counted in process)",
            *per_v(lambda r, v: r.restore_traffic[v][1] / gib),
        ],
        [
            "restore: requests (chunks holding data / distinct ones)",
            *[
                mr([r.restore_traffic[v][1] for r in res])
                + f" ({chunks[CHUNK[v]][0]} / {chunks[CHUNK[v]][1]})"
                for v in (S3, S3_4M)
            ],
        ],
        [
            "restore in process (no command start-up) MiB/s",
            *per_v(lambda r, v: size / r.restore_traffic[v][0] / MiB),
        ],
    ]
    retries = sum(
        traffic(run).get("retries", 0) for r in res for d in (r.full, r.incr) for run in d.values()
    )
    cpu_rows = []
    for kind, label in (("full", "full backup"), ("restore", "restore")):
        for v in VARIANTS:
            runs = [getattr(r, kind)[v] for r in res]
            busy = [sum(x.cpu.values()) / (x.seconds * cpus) for x in runs]
            cpu_rows.append(
                [
                    f"{label}, {LABEL[v]}",
                    f"{med(x.seconds for x in runs):.2f}",
                    *(f"{med(x.cpu[p] for x in runs):.2f}" for p in ("blksnap", *PROCS)),
                    f"{med(busy):.0%}",
                ]
            )
    lat_rows = [
        [what, str(len(ms)), f"{med(ms):.2f}", f"{pct(ms, 0.9):.2f}"] for what, ms in lat.items()
    ]
    sweep_rows = [
        [str(k), str(len(ms)), f"{med(ms):.1f}", f"{pct(ms, 0.9):.1f}", f"{rate:.0f}"]
        for k, (ms, rate) in sweep.items()
    ]

    def prof_rows(p: dict[str, Any]) -> list[list[str]]:
        rows = []
        for name, spans in sorted(p["calls"].items(), key=lambda kv: -covered(kv[1])):
            total = sum(t1 - t0 for t0, t1 in spans)
            rows.append(
                [
                    name,
                    str(len(spans)),
                    f"{total:.2f}",
                    f"{total / len(spans) * 1000:.2f}",
                    f"{total / p['wall']:.1f}",
                    f"{covered(spans):.2f}",
                ]
            )
        return rows

    def prof_text(p: dict[str, Any]) -> str:
        cpu = ", ".join(f"{k} {v:.1f} s" for k, v in p["cpu"].items())
        return f"{p['wall']:.2f} s wall, {p['requests']} requests; CPU seconds: {cpu}"

    prof_head = [
        "storage call",
        "calls",
        "seconds",
        "mean ms",
        "in flight",
        "wall s, ≥ 1 in flight",
    ]
    lines = [
        SECTION,
        "",
        f"One {size // MiB} MiB device (a quarter random, a quarter text, half zeroes, "
        "synthetic() of repo_bench) served by blksnapd with its tracker attached; "
        "`blksnap backup --full` and `blksnap restore` (to a file, sha256 checked) with the "
        "repository in a local directory (on the same file system as the device) and in a "
        "bucket of a RADOS Gateway (`s3://BUCKET/p`, endpoint and keys from the environment), "
        "unencrypted, zstd, chunk size 1 MiB (and 4 MiB: `--chunk-size 4M`, a repository of "
        "its own); the snapshot's diff storage in one directory (`--storage`) in every case, "
        f"so only the repository differs. {len(res)} trial(s), a new bucket each, the "
        "variants in an order rotated from trial to trial, the device's bytes the same in "
        "every trial; ratios taken within a trial, medians (range). The gateway is a one-node "
        "Ceph cluster on this machine (monitor, one OSD on memstore, radosgw with beast on "
        f"127.0.0.1): started in {info['gateway start']:.1f} s, its first writes (making its "
        f"pools) {info['gateway warm-up']:.1f} s, neither in any number below. {cpus} CPUs. "
        f"Section time {info['section']:.0f} s.",
        "",
        table(["", "local MiB/s", "S3 MiB/s", "ratio S3 ÷ local", "range"], speed_rows),
        "",
        "Requests and the chunk size (S3):",
        "",
        table(["measure", "1 MiB chunks", "4 MiB chunks"], req_rows),
        "",
        "Requests are the repository's own count: every attempt of every S3 call, "
        "listings and lookups included (the `traffic` of `backup --json`; for the restore, "
        "which the command does not print, the same restore run in this process, "
        "`Repository.open(url).restore()`, and `repo.traffic()` counted from after the "
        "opening). The incremental follows "
        f"{round(size / WRITE * CHANGED)} writes of 64 KiB of random bytes at random "
        "offsets of the device, fsynced: each chunk they touch is read from the image and "
        "stored whole (the device's own bytes are written back after it). Retries over all "
        f"backups: {retries}.",
        "",
        "CPU seconds per command, the command and the servers (medians; busy = their sum "
        f"÷ (wall time · {cpus} CPUs)):",
        "",
        table(
            ["command", "wall s", "blksnap", "blksnapd", "radosgw", "ceph-osd", "busy"],
            cpu_rows,
        ),
        "",
        "Requests to the gateway (boto3), one at a time:",
        "",
        table(["request", "n", "median ms", "p90 ms"], lat_rows),
        "",
        "PUTs of 1 MiB from one client, k at a time:",
        "",
        table(["k", "n", "median ms", "p90 ms", "MiB/s together"], sweep_rows),
        "",
        "Where the time goes: one full backup in process (`run_backup` through the same "
        "blksnapd, 1 MiB chunks, into a new repository), every storage call timed "
        "(outermost calls; seconds summed over threads; in flight = seconds ÷ wall; the last "
        "column: wall time with at least one such call under way). Into S3: "
        f"{prof_text(prof[S3])}.",
        "",
        table(prof_head, prof_rows(prof[S3])),
        "",
        f"Into a local directory: {prof_text(prof[LOCAL])}.",
        "",
        table(prof_head, prof_rows(prof[LOCAL])),
        "",
    ]
    # -- the words --
    fr, rr = ratio("full", S3), ratio("restore", S3)
    ps3 = prof[S3]

    def calls(name: str) -> list[tuple[float, float]]:
        return list(ps3["calls"].get(name, []))

    puts, lists = calls("put_if_absent"), calls("list") + calls("list_dirs")
    put_busy = sum(t1 - t0 for t0, t1 in puts)
    put_mean = put_busy / max(1, len(puts)) * 1000
    list_sum = sum(t1 - t0 for t0, t1 in lists)
    list_wall = covered(lists)
    n_req = med(traffic(r.full[S3])["requests"] for r in res)
    put_ms = med(lat["PUT 1 MiB"])
    serial = n_req * put_ms / 1000
    gap = med(secs("full", S3)) - med(secs("full", LOCAL))
    s3_full = [r.full[S3] for r in res]
    busy = med(sum(x.cpu.values()) / (x.seconds * cpus) for x in s3_full)
    own = med(x.cpu["blksnap"] for x in s3_full) / med(r.full[LOCAL].cpu["blksnap"] for r in res)
    startup = info["startup s3"] - info["startup local"]
    at_50ms = full_req(S3) * 0.05 / inflight
    levels = sorted(sweep)
    top = max(rate for _, rate in sweep.values())
    knee = min(k for k in levels if sweep[k][1] >= 0.9 * top)
    restored = med(r.restore_traffic[S3][1] for r in res)
    data_chunks, distinct = chunks[MiB]
    lines += [
        "**What this measures.** The same backup and restore of one device with the "
        "repository in an S3 bucket instead of a local directory: here a full backup runs at "
        f"{fr.median:.2f} times and a restore at {rr.median:.2f} times the local speed. The "
        "gateway runs on the same machine as blksnap, over the loopback interface, with its "
        "only disk (OSD) in memory (memstore): a small PUT answers in "
        f"{med(lat['PUT 4 KiB']):.1f} ms, a 1 MiB PUT in {put_ms:.1f} ms. These numbers are "
        "therefore a best case for latency and bandwidth. A real S3 service adds tens of ms "
        "to every request and moves data at the network's speed: there the number of "
        "requests per GiB dominates. With 1 MiB chunks a full backup makes "
        f"{full_req(S3):.0f} requests per GiB of device and a restore {restore_req(S3):.0f} "
        f"per GiB restored; at 50 ms a request and {inflight} requests in flight (blksnap's "
        f"default for an object store) the requests alone take about {at_50ms:.1f} s per GiB "
        f"of device backed up. 4 MiB chunks cut that to {full_req(S3_4M):.0f} requests per "
        f"GiB for a full backup and {restore_req(S3_4M):.0f} for a restore, but an "
        "incremental after scattered small writes sends "
        f"{incr_sent(S3_4M) / max(1, incr_sent(S3)):.1f} times the bytes (each 64 KiB changed "
        "costs a whole chunk).",
        "",
        f"**Where the time goes.** The full backup into S3 takes {gap:.1f} s more than into "
        "the local directory. Requests times latency "
        + ("explains much of it" if serial / inflight >= 0.5 * gap else "does not explain it")
        + f": its {n_req:.0f} requests at {put_ms:.1f} ms each (a 1 MiB PUT alone) are "
        f"{serial:.1f} s one after the other, {serial / inflight:.2f} s with {inflight} in "
        "flight. "
        + (
            ("What bounds it is" if covered(puts) >= 0.5 * ps3["wall"] else "Part of it is")
            + f" the gateway's throughput: it takes at most about {top:.0f} PUTs of 1 MiB per "
            f"second, reached at {knee} at a time (more in flight only wait longer)"
            if sweep[levels[-1]][1] < 1.3 * sweep[levels[1]][1]
            else f"The gateway takes more PUTs per second the more are in flight (up to "
            f"{top:.0f} PUTs of 1 MiB per second)"
        )
        + f", and in process the backup's chunk PUTs take {put_mean:.0f} ms each on average, "
        f"{put_busy / ps3['wall']:.1f} at a time, over {covered(puts):.1f} s of its "
        f"{ps3['wall']:.1f} s. "
        + ("Before them," if lists and puts and max(lists)[1] <= min(puts)[0] else "Besides,")
        + " the backup lists the chunks the repository "
        f"already has: {len(lists)} listings, {list_wall:.2f} s of wall time "
        + (
            "(one after the other)"
            if list_wall > 0.8 * list_sum
            else f"({list_sum:.2f} s summed over threads)"
        )
        + f", a listing answering in {med(lat['LIST (10 keys)']):.0f} ms on this gateway "
        "against a few ms for a PUT or GET. "
        + ("The machine is not out of CPU" if busy < 0.8 else "The machine is short of CPU")
        + f" (all of it {busy:.0%} busy over the S3 backup), and the command's own CPU time is "
        f"{own:.1f} times the local one (HTTP requests, "
        "each body hashed for its signature and checksum). "
        "Each command also pays a fixed cost to open an S3 repository (start-up, boto3, its "
        f"first requests): `blksnap backups` takes {info['startup s3']:.2f} s on the bucket "
        f"against {info['startup local']:.2f} s on the directory, {startup:+.2f} s of the "
        f"{gap:.1f} s. A restore "
        + (
            f"GETs every chunk of the device that holds data ({data_chunks} at 1 MiB, "
            f"{restored:.0f} requests in all) although only {distinct} of them are distinct: "
            "a chunk the device repeats is fetched each time."
            if restored >= data_chunks and distinct < data_chunks
            else f"makes {restored:.0f} requests for {data_chunks} chunks holding data "
            f"({distinct} distinct)."
        ),
        "",
    ]
    if problems:
        lines += ["**Problems seen**:", "", *(f"- {p}" for p in problems), ""]
    return "\n".join(lines)


def main() -> int:
    return main_with_output(__doc__, run_s3_bench)


if __name__ == "__main__":
    sys.exit(main())
