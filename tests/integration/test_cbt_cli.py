"""CBT and snapshot bookkeeping through the CLI: cbtinfo, readcbtmap,
markdirtyblock, snapshot info, snapshot appendstorage."""

from __future__ import annotations

import json
import os

from tests.integration.helpers import (
    MiB,
    add_device,
    collect,
    create,
    direct_write,
    storage_dir,
)

SIZE = 16 * MiB
CBT_KEYS = {
    "block_size",
    "device_capacity",
    "block_count",
    "generation_id",
    "changes_number",
    "recovered",
}


def cbtinfo(daemon, name: str) -> dict:
    info = json.loads(daemon.cli("--json", "cbtinfo", "-d", name).stdout)
    assert set(info) == CBT_KEYS, info
    return info


def cbtmap(daemon, name: str, path) -> bytes:
    out = json.loads(daemon.cli("--json", "readcbtmap", "-d", name, "-f", str(path)).stdout)
    data = path.read_bytes()
    assert out["block_count"] == len(data)
    assert out["marked"] == sum(1 for b in data if b)
    return data


def marked(data: bytes, above: int = 0) -> set[int]:
    return {i for i, b in enumerate(data) if b > above}


def test_cbt_and_snapshot_commands(daemon, backing, tmp_path):
    dev = add_device(daemon, backing("c.img", SIZE), "c")
    daemon.cli("attach", "-d", "c")
    info0 = cbtinfo(daemon, "c")
    bs = info0["block_size"]
    assert info0["device_capacity"] == SIZE
    assert bs >= 4096 and bs & (bs - 1) == 0
    assert info0["block_count"] == SIZE // bs
    assert info0["changes_number"] == 0
    blocks = SIZE // bs

    # Before the first take: a device write and two marked ranges (sectors).
    direct_write(dev["loop"], 5 * bs + 4096, os.urandom(4096))
    sector = bs // 512
    out = json.loads(
        daemon.cli(
            "--json", "markdirtyblock", "-d", "c", "-r", f"{sector * 9}:1", f"{sector * 12 - 1}:2"
        ).stdout
    )
    assert out["ranges"] == [[sector * 9, 1], [sector * 12 - 1, 2]]
    # Out of range: EINVAL, nothing marked.
    r = daemon.cli("--json", "markdirtyblock", "-d", "c", "-r", f"{SIZE // 512 - 1}:2", check=False)
    assert r.returncode == 1 and json.loads(r.stderr)["error"] == "EINVAL"
    r = daemon.cli("markdirtyblock", "-d", "nope", "-r", "0:1", check=False)
    assert r.returncode == 1 and "ENOENT" in r.stderr
    r = daemon.cli("snapshot", "info", "-d", "c", check=False)
    assert r.returncode == 1 and "ENOENT" in r.stderr  # in no snapshot yet

    # Take 1.
    sid = create(daemon, ["c"], storage_dir(tmp_path), "4M")
    info = json.loads(daemon.cli("--json", "snapshot", "info", "-d", "c").stdout)
    assert info["id"] == sid and info["state"] == "created" and info["image"] is None
    daemon.cli("snapshot", "take", "-i", sid)
    info1 = cbtinfo(daemon, "c")
    assert info1["generation_id"] == info0["generation_id"]
    assert info1["changes_number"] > info0["changes_number"]
    c1 = info1["changes_number"]
    map1 = cbtmap(daemon, "c", tmp_path / "map1")
    assert len(map1) == blocks
    assert marked(map1) == {5, 9, 11, 12}, marked(map1)
    assert all(map1[i] <= c1 for i in range(blocks))

    info = json.loads(daemon.cli("--json", "snapshot", "info", "-d", "c").stdout)
    image = os.path.join(daemon.mount, "images", sid, "c")
    assert info == {**info, "id": sid, "state": "taken", "error": None, "image": image}
    assert info["loop"] is None

    # appendstorage: a regular file, 4M of it.
    extra = tmp_path / "extra.bin"
    extra.touch()
    before = collect(daemon, sid)[0]["storage"]["capacity"]
    out = json.loads(
        daemon.cli(
            "--json", "snapshot", "appendstorage", "-i", sid, "-f", str(extra), "-l", "4M"
        ).stdout
    )
    assert out["storage"]["capacity"] == before + 4 * MiB
    snap = collect(daemon, sid)[0]
    assert snap["storage"]["capacity"] == before + 4 * MiB
    assert [s["path"] for s in snap["storage"]["sources"]][-1] == str(extra)
    r = daemon.cli(
        "snapshot", "appendstorage", "-i", sid, "-f", "/nonexistent/x", "-l", "1M", check=False
    )
    assert r.returncode == 1 and "ENOENT" in r.stderr
    r = daemon.cli(
        "snapshot", "appendstorage", "-i", "nope", "-f", str(extra), "-l", "1M", check=False
    )
    assert r.returncode == 1 and "ENOENT" in r.stderr
    # A directory needs a size.
    r = daemon.cli("snapshot", "appendstorage", "-i", sid, "-f", str(tmp_path), check=False)
    assert r.returncode == 1 and "EINVAL" in r.stderr
    assert collect(daemon, sid)[0]["storage"]["capacity"] == before + 4 * MiB

    # Between takes: a device write, an image write, a marked range. The image
    # write and the mark show in the current map at once (the backup under
    # way re-reads them) and all three in the next take's map.
    direct_write(dev["loop"], 200 * bs, os.urandom(bs))
    with open(image, "r+b") as f:
        f.seek(100 * bs + 512)
        f.write(b"image write")
        f.flush()
        os.fsync(f.fileno())
    daemon.cli("markdirtyblock", "-d", "c", "-r", f"{sector * 150}:{sector}")
    now = cbtmap(daemon, "c", tmp_path / "map1b")
    assert marked(now) == {5, 9, 11, 12, 100, 150}
    assert cbtinfo(daemon, "c")["changes_number"] == c1
    daemon.cli("snapshot", "destroy", "-i", sid)

    sid2 = create(daemon, ["c"], storage_dir(tmp_path), "4M")
    daemon.cli("snapshot", "take", "-i", sid2)
    info2 = cbtinfo(daemon, "c")
    assert info2["generation_id"] == info0["generation_id"]
    assert info2["changes_number"] > c1
    map2 = cbtmap(daemon, "c", tmp_path / "map2")
    # Changed since the backup of take 1: exactly what happened after it.
    assert marked(map2, above=c1) == {100, 150, 200}, marked(map2, above=c1)
    assert marked(map2) == {5, 9, 11, 12, 100, 150, 200}
    daemon.cli("snapshot", "destroy", "-i", sid2)

    # Reattach: a new generation.
    daemon.cli("detach", "-d", "c")
    r = daemon.cli("cbtinfo", "-d", "c", check=False)
    assert r.returncode == 1 and "ENOENT" in r.stderr
    daemon.cli("attach", "-d", "c")
    assert cbtinfo(daemon, "c")["generation_id"] != info0["generation_id"]
