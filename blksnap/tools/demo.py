"""``blksnap demo``: the main job end to end, on sample devices it makes itself.

The story a backup administrator lives, with every result checked:

1. blksnapd starts (its socket, FUSE mount and state in a work directory);
   two sample files get ext4 file systems and are served as devices with
   loop devices (``device add --loop``), and the file systems are mounted;
2. a writer keeps creating and deleting files on both file systems for the
   whole run; midway blksnapd's worker is killed with SIGKILL and its
   supervisor starts a new one: the writer and the backups carry on (the
   second kill comes while a backup reads its snapshot: the snapshot is
   carried on by the new worker and the backup completes);
3. files are written; ``blksnap backup`` makes the first backup (full: there
   is none before it); files are changed, added and deleted; an incremental
   backup; more changes; a differential backup (against the full);
4. every backup of every device is restored to a file with
   ``blksnap restore``; each restored file system must be ``fsck``-clean and
   hold exactly the files present at that backup's take (md5), and every file
   of the writer must be a prefix of what it wrote (a write cut by the take);
5. ``blksnap verify`` checks every manifest, index and chunk of the
   repository;
6. the writer stopped, an incremental, then a forced full backup: it reads
   everything and stores only what the repository lacks (the repository
   deduplicates), next to nothing;
7. a report: per backup, its kind, the bytes read from the images and the
   bytes stored.

Everything the demo made (mounts, loop devices, the daemon, files) is removed
at the end, even on failure. The exit code is 0 when every check passed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blksnap.errors import InvalidArgument, error
from blksnap.tools import sandbox
from blksnap.units import MiB, format_size, parse_size

NAMES = ("disk0", "disk1")
#: Smallest sample device an ext4 file system with the demo's files fits on.
MIN_SIZE = 32 * MiB
#: Files the writer keeps at most on each file system (it deletes older ones).
CHURN_FILES = 24


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


# -- files ----------------------------------------------------------------------


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> dict[str, str]:
    """``{relative path: md5}`` of every regular file below ``root``."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = md5_file(p)
    return out


def churn_content(seq: int) -> bytes:
    """What the writer puts in its file number ``seq``: known from ``seq`` alone."""
    rng = random.Random(seq)
    return rng.randbytes(rng.randrange(4096, 192 * 1024))


class Writer(threading.Thread):
    """Keeps creating files ``churn/<seq>`` on each file system and deleting
    old ones, until stopped: the live load the backups run under."""

    def __init__(self, roots: list[Path]) -> None:
        super().__init__(name="blksnap-demo-writer", daemon=True)
        self.roots = roots
        self.files = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        seq = 0
        try:
            for r in self.roots:
                (r / "churn").mkdir(exist_ok=True)
            while not self._halt.is_set():
                seq += 1
                data = churn_content(seq)
                for r in self.roots:
                    with open(r / "churn" / str(seq), "wb") as f:
                        # Two writes: a take may fall between them.
                        f.write(data[: len(data) // 2])
                        f.write(data[len(data) // 2 :])
                    old = r / "churn" / str(seq - CHURN_FILES)
                    if old.exists():
                        old.unlink()
                self.files += 1
                self.bytes += len(data) * len(self.roots)
                self._halt.wait(0.01)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


# -- the scenario ---------------------------------------------------------------


@dataclass
class Backup:
    id: str
    kind: str
    expected: dict[str, dict[str, str]]  # device -> {path: md5} of data/ at take
    doc: dict[str, Any]
    seconds: float


@dataclass
class Demo:
    workdir: Path
    size: int
    report: Report
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))
    box: sandbox.Sandbox | None = None
    writer: Writer | None = None
    fs: dict[str, Path] = field(default_factory=dict)
    backups: list[Backup] = field(default_factory=list)

    @property
    def repo(self) -> Path:
        return self.workdir / "repo"

    def cli_json(self, *args: str) -> Any:
        assert self.box is not None
        r = self.box.cli("--json", *args, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"blksnap {' '.join(args)} failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def run(self) -> None:
        rng = random.Random(self.seed)
        rep = self.report
        rep.step("start blksnapd and serve two ext4 devices with loop devices")
        self.box = sandbox.start(self.workdir / "daemon")
        rep.line(f"blksnapd pid {self.box.proc.pid}, socket {self.box.sock}")
        for name in NAMES:
            path = self.workdir / f"{name}.img"
            with open(path, "wb") as f:
                f.truncate(self.size)
            sandbox.run(
                *("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", name),
                *("-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)),
            )
            dev = self.cli_json("device", "add", str(path), "--name", name, "--loop")
            self.fs[name] = Path(self.box.mount_fs(dev["loop"], self.workdir / "fs" / name))
            (self.fs[name] / "data").mkdir()
            rep.line(f"{name}: {format_size(self.size)} ext4 on {dev['loop']} at {self.fs[name]}")

        rep.step("a writer keeps creating and deleting files on both file systems")
        self.writer = Writer(list(self.fs.values()))
        self.writer.start()

        rep.step("write files, then the first backup (full: there is no earlier one)")
        for name in NAMES:
            self.change(name, rng, add=30, modify=0, delete=0)
        self.backup("auto", expect_kind="full")

        rep.step("kill blksnapd's worker (SIGKILL) while the writer runs; change files")
        self.kill_worker()
        for name in NAMES:
            self.change(name, rng, add=6, modify=4, delete=3)

        rep.step("an incremental backup (the CBT outlived the worker)")
        self.backup("incremental", expect_kind="incremental")

        rep.step(
            "more changes, then a differential backup (against the full), the worker "
            "killed again while the backup reads its snapshot"
        )
        for name in NAMES:
            self.change(name, rng, add=4, modify=3, delete=2)
        self.backup("differential", expect_kind="differential", kill_midway=True)

        self.writer.stop()
        rep.check(
            "the writer ran without an error",
            self.writer.error is None,
            f"{self.writer.files} files, {format_size(self.writer.bytes)}"
            + (f"; {self.writer.error!r}" if self.writer.error else ""),
        )

        rep.step("restore every backup of every device and check it")
        for b in self.backups:
            for name in NAMES:
                self.check_restore(b, name)

        rep.step("verify every manifest, index and chunk in the repository")
        doc = self.cli_json("verify", "--repo", str(self.repo))
        rep.check("blksnap verify: every chunk checks", doc["ok"], f"{len(doc['backups'])} backups")

        rep.step(
            "the writer stopped: an incremental, then a forced full backup (everything read, "
            "only what the repository lacks stored: next to nothing)"
        )
        self.backup("incremental", expect_kind="incremental")
        doc = self.cli_json("backup", "-d", *NAMES, "--repo", str(self.repo), "--full")
        for d in doc["devices"]:
            # (what a file system writes when frozen for the take, its super
            # block and journal, may be new: a few chunks, not its files)
            rep.check(
                f"{doc['id']} {d['name']}: full, stores only new chunks",
                d["bytes_read"] == d["size"] and d["bytes_new"] <= d["size"] // 16,
                f"read {format_size(d['bytes_read'])}, new {format_size(d['bytes_new'])},"
                f" already stored {format_size(d['bytes_reused'])}",
            )

        self.instant_restore()

        rep.step("report")
        self.summary()

    def instant_restore(self) -> None:
        """disk0 is lost; its last backup (the differential) is restored
        instantly onto a new file: its file system mounted and its files
        checked while the hydration runs, then the next backup is an
        incremental against that backup."""
        assert self.box is not None
        rep, name, b = self.report, NAMES[0], self.backups[-1]
        rep.step(
            f"{name} is lost: restore its backup {b.id} instantly onto a new file and use it"
            " while it is copied in the background"
        )
        self.box.umount(self.fs[name])
        self.cli_json("device", "remove", name)
        target = self.workdir / f"{name}-restored.img"
        t0 = time.monotonic()
        got = self.cli_json(
            "restore", "--instant", "--repo", str(self.repo), "--backup", b.id, "-d", name,
            "--to", str(target), "--loop", "--rate", str(max(self.size // 16, 1 << 20)),
        )  # fmt: skip
        where = Path(self.box.mount_fs(got["loop"], self.workdir / "fs" / f"{name}-restored"))
        files = tree(where / "data")
        served = time.monotonic() - t0
        h = got["hydration"]
        now = next(d for d in self.box.client.devices() if d["name"] == name)["hydration"]
        rep.line(
            f"{name} served from {target} on {got['loop']}, mounted and read in {served:.2f} s;"
            f" hydration {now['state']}: {format_size(now['done'])} of {format_size(now['total'])}"
        )
        want = b.expected[name]
        diff = sorted(set(files) ^ set(want)) + sorted(
            k for k in set(files) & set(want) if files[k] != want[k]
        )
        rep.check(
            f"{name} instantly restored: exactly the files of {b.id} (md5), read while hydrating",
            not diff and now["state"] == "running" and now["done"] < now["total"],
            f"{len(want)} files; started with {format_size(h['done'])} copied, "
            f"{100 * now['done'] / now['total']:.0f} % when checked"
            + (f"; differ: {', '.join(diff[:5])}" if diff else ""),
        )
        new = where / "data" / "after-instant-restore.bin"
        new.write_bytes(churn_content(424242))
        sandbox.run("sync", "-f", str(where))
        self.box.cli("ctl", "-d", name, "--filter", "hydrate", "rate", "0")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            dev = next(d for d in self.box.client.devices() if d["name"] == name)
            if dev["hydration"]["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        rep.check(
            f"{name}: hydration done, an ordinary device again (tracker only)",
            dev["hydration"]["state"] == "done" and dev["filters"] == ["blksnap"],
            f"{dev['hydration']}",
        )
        doc = self.cli_json("backup", "-d", name, "--repo", str(self.repo))
        d = doc["devices"][0]
        rep.check(
            f"{doc['id']} {name}: the next backup is incremental against {b.id}",
            d["kind"] == "incremental" and d["parent"] == b.id,
            f"{d['kind']} (parent {d['parent']}): read {format_size(d['bytes_read'])} of "
            f"{format_size(d['size'])}; {d.get('reason')}",
        )
        self.box.umount(where)

    def kill_worker(self) -> None:
        assert self.box is not None
        before = self.box.client.status()
        old = before["worker_pid"]
        written = self.writer.files if self.writer else 0
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        st = before
        while st["worker_pid"] == old and time.monotonic() - t0 < 60:
            time.sleep(0.02)
            st = self.box.client.status()  # asked again while the worker is down
        seconds = time.monotonic() - t0
        self.report.line(
            f"worker {old} killed; worker {st['worker_pid']} serving after {seconds:.2f} s "
            f"(supervisor {st['pid']}, restarts {st['restarts']}: {st['last_restart_cause']})"
        )
        self.report.check(
            "a new worker took over, the devices and loop devices kept",
            st["worker_pid"] != old
            and st["restarts"] == before["restarts"] + 1
            and st["devices"] == before["devices"]
            and st["loops"] == before["loops"]
            and st["healthy"],
            f"{seconds:.2f} s",
        )
        time.sleep(0.3)
        self.report.check(
            "the writer went on across the kill",
            self.writer is not None and self.writer.error is None and self.writer.files > written,
            f"{written} -> {self.writer.files if self.writer else 0} files",
        )

    def change(self, name: str, rng: random.Random, *, add: int, modify: int, delete: int) -> None:
        data = self.fs[name] / "data"
        existing = sorted(p for p in data.iterdir() if p.is_file())
        for p in rng.sample(existing, min(delete, len(existing))):
            p.unlink()
        existing = sorted(p for p in data.iterdir() if p.is_file())
        for p in rng.sample(existing, min(modify, len(existing))):
            with open(p, "r+b") as f:
                f.seek(rng.randrange(max(1, p.stat().st_size)))
                f.write(rng.randbytes(rng.randrange(1, 64 * 1024)))
        for _ in range(add):
            p = data / f"f{rng.randrange(1 << 40):010x}"
            p.write_bytes(rng.randbytes(rng.randrange(1, 512 * 1024)))

    def backup(self, mode: str, *, expect_kind: str, kill_midway: bool = False) -> None:
        expected = {name: tree(self.fs[name] / "data") for name in NAMES}
        args = ["backup", "-d", *NAMES, "--repo", str(self.repo)]
        if mode != "auto":
            args.append(f"--{mode}")
        t0 = time.monotonic()
        doc = self.backup_killed(args) if kill_midway else self.cli_json(*args)
        seconds = time.monotonic() - t0
        b = Backup(doc["id"], doc["kind"], expected, doc, seconds)
        self.backups.append(b)
        for d in doc["devices"]:
            self.report.line(
                f"{d['name']}: {d['kind']}"
                + (f" on {d['parent']}" if d.get("parent") else "")
                + f", read {format_size(d['bytes_read'])} of {format_size(d['size'])}, "
                f"stored {format_size(d['bytes_stored'])} ({d.get('reason', '')})"
            )
        self.report.check(
            f"backup {b.id} is {expect_kind}",
            b.kind == expect_kind and all(d["kind"] == expect_kind for d in doc["devices"]),
            f"{seconds:.1f} s",
        )
        if expect_kind != "full":
            for d in doc["devices"]:
                self.report.check(
                    f"{b.id} {d['name']}: read only chunks holding changed blocks",
                    d["bytes_read"] < d["size"] and d["image_bytes_read"] <= d["bytes_read"],
                    f"{format_size(d['bytes_read'])} of {format_size(d['size'])}; "
                    f"blksnapd served {format_size(d['image_bytes_read'] or 0)}",
                )

    def backup_killed(self, args: list[str]) -> Any:
        """``blksnap backup`` with the worker killed while it reads the
        snapshot's images: once the snapshot is taken the backup is held
        (SIGSTOP) while the worker dies, then goes on. Its JSON document."""
        assert self.box is not None
        cmd = [str(sandbox.BIN / "blksnap"), "--socket", self.box.sock, "--json", *args,
               "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            taken = None
            deadline = time.monotonic() + 60
            while taken is None and proc.poll() is None and time.monotonic() < deadline:
                snaps = self.box.client.snapshot_collect()
                taken = next((s["id"] for s in snaps if s["state"] == "taken"), None)
                time.sleep(0.005)
            if taken is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    self.kill_worker()
                    st = self.box.client.status()
                    self.report.check(
                        f"snapshot {taken} carried on by the new worker",
                        st["snapshots"] == 1 and not st["lost_snapshots"],
                        "the backup was held mid-read while the worker died",
                    )
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
            else:
                self.report.line("(the backup ended before its snapshot was seen: no kill)")
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"blksnap {' '.join(args)} failed: {err.strip()}")
        return json.loads(out)

    def check_restore(self, b: Backup, name: str) -> None:
        assert self.box is not None
        target = self.workdir / "restore" / f"{b.id}-{name}.img"
        target.parent.mkdir(exist_ok=True)
        r = self.cli_json(
            "restore", "--repo", str(self.repo), "--backup", b.id, "-d", name, "--to", str(target)
        )
        fsck = sandbox.run("fsck.ext4", "-fn", str(target), check=False)
        self.report.check(
            f"{b.id} {name}: restored file system is fsck-clean",
            fsck.returncode == 0,
            f"{r['bytes_written']} bytes written"
            + ("" if fsck.returncode == 0 else f"; fsck: {fsck.stdout[-300:]}"),
        )
        where = self.workdir / "check"
        self.box.mount_fs(str(target), where, "ro", "loop", "noload")
        try:
            got = tree(where / "data")
            want = b.expected[name]
            diff = sorted(set(got) ^ set(want)) + sorted(
                k for k in set(got) & set(want) if got[k] != want[k]
            )
            self.report.check(
                f"{b.id} {name}: exactly the files present at take (md5)",
                not diff,
                f"{len(want)} files" + (f"; differ: {', '.join(diff[:5])}" if diff else ""),
            )
            bad = []
            churn = sorted((where / "churn").iterdir()) if (where / "churn").exists() else []
            for p in churn:
                data = p.read_bytes()
                if not churn_content(int(p.name)).startswith(data):
                    bad.append(p.name)
            self.report.check(
                f"{b.id} {name}: the writer's files hold what it wrote",
                not bad,
                f"{len(churn)} files" + (f"; wrong: {', '.join(bad[:5])}" if bad else ""),
            )
        finally:
            self.box.umount(where)
        target.unlink()

    def summary(self) -> None:
        rows = []
        for b in self.backups:
            read = sum(d["bytes_read"] for d in b.doc["devices"])
            stored = sum(d["bytes_stored"] for d in b.doc["devices"])
            size = sum(d["size"] for d in b.doc["devices"])
            rows.append(
                {
                    "id": b.id,
                    "kind": b.kind,
                    "size": size,
                    "read": read,
                    "stored": stored,
                    "seconds": round(b.seconds, 2),
                }
            )
            self.report.line(
                f"{b.id}  {b.kind:<12} read {format_size(read):>10} of {format_size(size)}, "
                f"stored {format_size(stored):>10}, {b.seconds:.1f} s"
            )
        self.report.data(backups=rows)

    def close(self) -> list[str]:
        problems = []
        if self.writer is not None and self.writer.is_alive():
            self.writer.stop()
            if self.writer.is_alive():
                problems.append("the writer did not stop")
        if self.box is not None:
            try:
                self.box.stop()
            except Exception as exc:
                problems.append(f"stopping blksnapd: {exc}")
        sandbox.cleanup_under(str(self.workdir))
        left = sandbox.mounts_under(str(self.workdir)) + sandbox.loops_under(str(self.workdir))
        if left:
            problems.append(f"left behind: {', '.join(left)}")
        return problems


# -- entry point ------------------------------------------------------------------------


def run_demo(directory: str | None, size: str, as_json: bool) -> int:
    """Run the scenario; 0 when every check passed, 1 otherwise."""
    nbytes = parse_size(size)
    if nbytes < MIN_SIZE or nbytes % 4096:
        raise InvalidArgument(
            f"sample device size {size!r}: at least {format_size(MIN_SIZE)}, a multiple of 4096"
        )
    why = sandbox.why_not()
    if why:
        raise error(errno.EPERM, f"the demo runs blksnapd, which {why}")
    made_root = False
    if directory is not None and not os.path.isdir(directory):
        if os.path.exists(directory):
            raise InvalidArgument(f"{directory} is not a directory")
        os.mkdir(directory)
        made_root = True
    report = Report(as_json=as_json)
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="blksnap-demo-", dir=directory))
    report.say(
        f"blksnap demo: blksnapd, two {format_size(nbytes)} ext4 devices and a backup "
        f"repository in {workdir}, all removed at the end"
    )
    demo = Demo(workdir, nbytes, report)
    err: str | None = None
    try:
        demo.run()
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        report.check("scenario ran to the end", False, err)
        if not as_json:
            traceback.print_exc(file=sys.stderr)
    finally:
        report.step("clean up")
        problems = demo.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if made_root:
            try:
                os.rmdir(directory)  # type: ignore[arg-type]
            except OSError as exc:
                problems.append(f"rmdir {directory}: {exc.strerror}")
        report.check(
            "everything the demo made is removed",
            not problems and not workdir.exists(),
            "; ".join(problems),
        )
    seconds = time.monotonic() - t0
    failed = report.failed
    if as_json:
        doc = {
            "ok": not failed,
            "directory": str(workdir),
            "device_size": nbytes,
            "devices": list(NAMES),
            "seed": demo.seed,
            "seconds": round(seconds, 3),
            "steps": report.steps,
            "checks": report.checks,
            "details": report.details,
            "failed": failed,
            "error": err,
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
