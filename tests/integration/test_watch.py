"""`snapshot watch --extend`: a small diff storage grows on low_free_space, step
by step, so the snapshot survives writes far beyond its first storage; once
--max is reached it grows no more."""

from __future__ import annotations

import json
import os
import time

from tests.integration.conftest import BIN
from tests.integration.helpers import (
    Background,
    KiB,
    MiB,
    add_device,
    create,
    direct_write,
    storage_dir,
    take,
)

INITIAL, STEP, MAX = 2 * MiB, 4 * MiB, 16 * MiB
WRITE = 256 * KiB


def records(watch: Background) -> list[dict]:
    return [json.loads(line) for line in watch.snapshot()]


def test_watch_extends_storage_up_to_max(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("w.img", 64 * MiB), "w")
    sid = create(daemon, ["w"], storage_dir(tmp_path), "2M")
    take(daemon, sid)
    extend = storage_dir(tmp_path, "extend")
    watch = Background(
        [
            str(BIN / "blksnap"),
            "--socket",
            daemon.sock,
            "--json",
            "snapshot",
            "watch",
            "-i",
            sid,
            "--extend",
            str(extend),
            "--step",
            "4M",
            "--max",
            "16M",
        ]
    )
    try:
        assert watch.wait_for(lambda lines: len(lines) >= 1, 20), watch.describe()
        assert records(watch)[0] == {"event": "watching", "id": sid}

        capacities = []
        offset, limit_hit_at = 0, None
        # Fresh 256 KiB writes, each copying 4 chunks into diff storage, at the
        # pace of a busy device: on low space the watcher must keep up.
        while offset + WRITE <= 64 * MiB:
            direct_write(dev["loop"], offset, os.urandom(WRITE))
            offset += WRITE
            snap = daemon.client.snapshot_collect(sid)[0]
            if snap["state"] == "corrupted":
                break
            if limit_hit_at is None and any(r["event"] == "limit" for r in records(watch)):
                limit_hit_at = offset
            if limit_hit_at is None:
                deadline = time.monotonic() + 10
                while True:
                    snap = daemon.client.snapshot_collect(sid)[0]
                    st = snap["storage"]
                    if st["free"] * 4 >= st["capacity"] or any(
                        r["event"] == "limit" for r in records(watch)
                    ):
                        break
                    assert time.monotonic() < deadline, ("no extension", st, watch.describe())
                    time.sleep(0.02)
                assert snap["state"] == "taken", (offset, snap)
                capacities.append(st["capacity"])

        # Before --max was reached the snapshot never broke; it broke only
        # after the watcher had stopped extending (the storage really ran out).
        assert limit_hit_at is not None, watch.describe()
        assert snap["state"] == "corrupted" and snap["error"] == "ENOSPC", snap
        assert offset > INITIAL + MAX  # far beyond the first 2 MiB
        assert watch.wait(20) == 1, watch.describe()  # watch ends on corrupted
        watch.finish()

        recs = records(watch)
        kinds = [r["event"] for r in recs]
        extended = [r for r in recs if r["event"] == "extended"]
        assert [r["size"] for r in extended] == [STEP] * 4, recs
        assert [r["added"] for r in extended] == [4 * MiB, 8 * MiB, 12 * MiB, 16 * MiB]
        assert all(r["path"] == str(extend) for r in extended)
        assert kinds.count("low_free_space") >= 5, kinds
        first_limit = kinds.index("limit")
        assert "extended" not in kinds[first_limit:], kinds
        assert kinds[-1] == "corrupted", kinds
        assert recs[-1]["data"]["error"] == "ENOSPC"
        # Capacity grew 2M -> 6M -> 10M -> 14M -> 18M and no further.
        assert sorted(set(capacities)) == [INITIAL + k * STEP for k in range(5)], capacities
        snap = daemon.client.snapshot_collect(sid)[0]
        assert snap["storage"]["capacity"] == INITIAL + MAX
        assert len(snap["storage"]["sources"]) == 5
        assert os.listdir(extend) == []  # anonymous files
    finally:
        watch.reap()
    daemon.cli("snapshot", "destroy", "-i", sid)


def test_watch_reports_gone_when_snapshot_destroyed(daemon, backing, tmp_path):
    add_device(daemon, backing("g.img", 8 * MiB), "g", loop=False)
    sid = create(daemon, ["g"], storage_dir(tmp_path), "4M")
    take_json = daemon.cli("--json", "snapshot", "take", "-i", sid).stdout
    assert json.loads(take_json)["images"]["g"]["loop"] is None
    watch = Background(
        [str(BIN / "blksnap"), "--socket", daemon.sock, "--json", "snapshot", "watch", "-i", sid]
    )
    try:
        assert watch.wait_for(lambda lines: len(lines) >= 1, 20), watch.describe()
        daemon.cli("snapshot", "destroy", "-i", sid)
        assert watch.wait(20) == 0, watch.describe()
        watch.finish()
        assert [r["event"] for r in records(watch)] == ["watching", "gone"]
    finally:
        watch.reap()
