"""Diff storage limits against what its file system can really hold, through
the CLI on a real tmpfs: a limit the file system cannot hold is refused at
create, and when something else fills the file system during the snapshot,
``low_free_space`` comes while there is still room, in time for
``snapshot watch --extend`` to grow the storage elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.conftest import BIN, run
from tests.integration.helpers import (
    Background,
    KiB,
    MiB,
    add_device,
    collect,
    direct_write,
    storage_dir,
    take,
)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        run("umount", "-l", str(path), check=False)


def test_limit_beyond_the_file_system_is_refused(daemon, backing, tmp_path):
    add_device(daemon, backing("d.img", 16 * MiB), "d", loop=False)
    with tmpfs(tmp_path / "tiny", "4m") as tiny:
        out = daemon.cli(
            "--json", "snapshot", "create", "-d", "d", "-f", str(tiny), "-l", "100T", check=False
        )
        assert out.returncode == 1
        err = json.loads(out.stderr.strip().splitlines()[-1])
        assert err["error"] == "ENOSPC" and "can hold only" in err["message"], err
        # Nothing changed: no snapshot, no tracker attached, nothing in the dir.
        assert collect(daemon) == []
        [dev] = json.loads(daemon.cli("--json", "device", "list").stdout)
        assert dev["filters"] == []
        assert os.listdir(tiny) == []


def test_low_free_space_comes_in_time_for_watch_to_extend(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("d.img", 32 * MiB), "d")
    with tmpfs(tmp_path / "tiny", "4m") as tiny:
        out = daemon.cli("--json", "snapshot", "create", "-d", "d", "-f", str(tiny), "-l", "3M")
        sid = json.loads(out.stdout)["id"]
        # Someone else takes most of the file system: 1 MiB is left of the
        # 3 MiB the storage was promised.
        with open(tiny / "other", "wb") as f:
            f.write(os.urandom(3 * MiB))
        take(daemon, sid)
        extend = storage_dir(tmp_path, "extend")
        watch = Background(
            [
                *(str(BIN / "blksnap"), "--socket", daemon.sock, "--json"),
                *("snapshot", "watch", "-i", sid, "--extend", str(extend), "--step", "16M"),
            ]
        )
        try:
            assert watch.wait_for(lambda lines: len(lines) >= 1, 20), watch.describe()

            def events() -> list[str]:
                return [json.loads(line)["event"] for line in watch.snapshot()]

            # 8 MiB of first writes, 256 KiB at a time, at the pace of a busy
            # device: each low_free_space must be answered before the
            # file system under the first storage runs out.
            for offset in range(0, 8 * MiB, 256 * KiB):
                direct_write(dev["loop"], offset, os.urandom(256 * KiB))
                deadline = time.monotonic() + 10
                while events().count("low_free_space") > events().count("extended"):
                    assert time.monotonic() < deadline, watch.describe()
                    time.sleep(0.02)
            [snap] = collect(daemon, sid)
            assert snap["state"] == "taken", (snap, watch.describe())
            assert "extended" in events(), watch.describe()
            low = next(json.loads(x) for x in watch.snapshot() if '"low_free_space"' in x)
            # Capacity counted what the file system could hold, not the 3 MiB
            # limit (which would have said 2 MiB free when it ran out).
            assert low["data"]["capacity"] <= 1 * MiB, low
            assert "no_space" not in events() and "corrupted" not in events()
        finally:
            watch.reap()
        daemon.cli("snapshot", "destroy", "-i", sid)
