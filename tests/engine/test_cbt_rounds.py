"""Change-block tracking across snapshot rounds, as a backup tool uses it.

A backup made at take n keeps the image's bytes and ``changes_number(n)``.
The next backup reads only the blocks whose read-map number is greater; the
previous backup plus those blocks must be the new image exactly (SPEC,
semantics 6). The read map is frozen at take; image writes and
``mark_dirty`` mark blocks for the backup under way and the next one; numbers
wrap after 255 with a new generation.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import blksnap
from blksnap.units import KiB, MiB

DEV_SIZE = 4 * MiB + 1024  # a partial last block and chunk (whole sectors)


@dataclass
class Env:
    eng: blksnap.Engine
    dev: blksnap.Device
    storage: str


@dataclass
class Backup:
    """What a backup tool keeps of one take."""

    sid: str
    info: blksnap.CbtInfo
    read_map: np.ndarray
    data: bytes


def make_env(tmp_path: Path, params: blksnap.Params, size: int = DEV_SIZE) -> Iterator[Env]:
    eng = blksnap.Engine(tmp_path / "state", params=params)
    try:
        path = tmp_path / "disk.img"
        with open(path, "wb") as f:
            f.truncate(size)
        dev = eng.add_device(path, name="disk")
        (tmp_path / "diff").mkdir()
        yield Env(eng, dev, str(tmp_path / "diff"))
    finally:
        eng.close()


@pytest.fixture(
    params=[
        blksnap.Params(chunk_size=16 * KiB),  # 64 KiB tracking blocks
        blksnap.Params(chunk_size=64 * KiB, tracking_block_minimum_shift=12),  # 4 KiB blocks
    ],
    ids=["block64K-chunk16K", "block4K-chunk64K"],
)
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    yield from make_env(tmp_path, request.param)


@pytest.fixture
def small_env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, blksnap.Params(chunk_size=16 * KiB), size=1 * MiB)


def take(env: Env, keep: bool = True) -> Backup:
    """Create and take a snapshot of the device; read the CBT right after."""
    sid = env.eng.snapshot_create(["disk"], storage=env.storage, limit=2 * env.dev.size)
    env.eng.snapshot_take(sid)
    info = env.eng.cbt_info("disk")
    read_map = np.frombuffer(env.eng.cbt_map("disk"), dtype=np.uint8).copy()
    assert len(read_map) == info.block_count
    data = env.eng.image(sid, "disk").read(0, env.dev.size) if keep else b""
    return Backup(sid, info, read_map, data)


def blocks_of(extents: list[tuple[int, int]], block_size: int) -> set[int]:
    out: set[int] = set()
    for off, length in extents:
        out.update(range(off // block_size, (off + length - 1) // block_size + 1))
    return out


def random_writes(
    dev: blksnap.Device, rng: random.Random, count: int, threads: int = 3
) -> list[tuple[int, int]]:
    """Unaligned random writes from several threads; returns the extents."""
    extents = []
    for _ in range(count):
        off = rng.randrange(dev.size)
        length = rng.randint(1, min(dev.size - off, 100 * KiB))
        extents.append((off, length))
    payloads = [rng.randbytes(length) for _, length in extents]
    # Extents may overlap: the order of the writes does not matter to CBT.
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda e, d: dev.write(e[0], d), extents, payloads))
    return extents


def incremental(prev: Backup, new: Backup, image: blksnap.Image) -> bytes:
    """The previous backup plus the blocks the read map marks since it,
    read from the new image: what an incremental backup restores to."""
    bs = new.info.block_size
    out = bytearray(prev.data)
    for b in np.flatnonzero(new.read_map > prev.info.changes_number):
        a = int(b) * bs
        n = min(bs, image.size - a)
        out[a : a + n] = image.read(a, n)
    return bytes(out)


def test_read_map_is_frozen_while_a_snapshot_is_held(env: Env) -> None:
    rng = random.Random(1)
    env.eng.attach("disk")  # tracking starts here
    first = random_writes(env.dev, rng, 10)
    b1 = take(env, keep=False)
    bs = b1.info.block_size
    assert b1.info.changes_number >= 1
    assert all(b1.read_map[b] > 0 for b in blocks_of(first, bs))

    held = random_writes(env.dev, rng, 40)
    assert env.eng.cbt_map("disk") == b1.read_map.tobytes()
    assert env.eng.cbt_info("disk") == b1.info
    env.eng.snapshot_destroy(b1.sid)
    assert env.eng.cbt_map("disk") == b1.read_map.tobytes()  # until the next take

    # ... and yet the writes were tracked: the next take shows them.
    b2 = take(env, keep=False)
    assert b2.info.generation_id == b1.info.generation_id
    assert b2.info.changes_number > b1.info.changes_number
    changed = set(np.flatnonzero(b2.read_map > b1.info.changes_number).tolist())
    assert blocks_of(held, bs) <= changed
    assert changed != set(range(b2.info.block_count)), "every block marked: CBT is useless"
    env.eng.snapshot_destroy(b2.sid)


def test_incremental_rounds_reproduce_each_image(env: Env) -> None:
    rng = random.Random(2)
    env.dev.write(0, rng.randbytes(env.dev.size))
    prev = take(env)
    for _ in range(3):
        # Changes while the previous snapshot is held, and after it is gone.
        extents = random_writes(env.dev, rng, 8)
        env.eng.snapshot_destroy(prev.sid)
        extents += random_writes(env.dev, rng, 4)
        new = take(env)
        image = env.eng.image(new.sid, "disk")
        info = new.info
        assert info.generation_id == prev.info.generation_id
        assert info.block_size == prev.info.block_size
        assert info.device_capacity == env.dev.size
        assert info.block_count == -(-env.dev.size // info.block_size)
        assert info.changes_number > prev.info.changes_number

        marked = new.read_map > prev.info.changes_number
        assert blocks_of(extents, info.block_size) <= set(np.flatnonzero(marked).tolist())
        assert not marked.all(), "every block marked: the test would prove nothing"
        assert incremental(prev, new, image) == new.data, "previous backup + changes != image"
        # And the blocks not marked are the same in both images.
        bs = info.block_size
        for b in np.flatnonzero(~marked):
            a = int(b) * bs
            assert prev.data[a : a + bs] == new.data[a : a + bs], f"block {b} changed unmarked"
        prev = new
    env.eng.snapshot_destroy(prev.sid)


def test_255_takes_then_a_new_generation(small_env: Env) -> None:
    env = small_env
    rng = random.Random(3)
    first = take(env, keep=False)
    env.eng.snapshot_destroy(first.sid)
    generation = first.info.generation_id
    bs, count = first.info.block_size, first.info.block_count
    assert first.info.changes_number == 1
    numbers = [1]
    last_round = dict.fromkeys(range(count), 0)  # block -> take its last change went into
    for n in range(2, 256):
        block = rng.randrange(count)
        env.dev.write(block * bs + rng.randrange(bs), b"\xa5")
        last_round[block] = n
        b = take(env, keep=False)
        env.eng.snapshot_destroy(b.sid)
        assert b.info.generation_id == generation, f"take {n}: generation changed early"
        numbers.append(b.info.changes_number)
        # Against a backup made at any earlier take j of this generation.
        for j in (n - 1, n // 2, 1):
            since = numbers[j - 1]
            marked = set(np.flatnonzero(b.read_map > since).tolist())
            assert {k for k, r in last_round.items() if r > j} <= marked, (
                f"take {n}: a block changed since take {j} is not marked"
            )
        assert b.read_map[block] > numbers[-2]
        assert (b.read_map > numbers[-2]).sum() < count
    assert numbers == list(range(1, 256))

    env.dev.write(0, b"\x5a")
    wrapped = take(env, keep=False)
    env.eng.snapshot_destroy(wrapped.sid)
    assert wrapped.info.generation_id != generation, "take 256 kept the generation"
    assert wrapped.info.changes_number == 1
    assert wrapped.read_map[0] > 0  # written in the new generation
    # Numbering goes on in the new generation.
    env.dev.write(bs, b"\x5a")
    after = take(env, keep=False)
    env.eng.snapshot_destroy(after.sid)
    assert after.info.generation_id == wrapped.info.generation_id
    assert after.info.changes_number == 2
    assert after.read_map[1] > wrapped.info.changes_number


def test_image_writes_are_marked_now_and_next_round(env: Env) -> None:
    rng = random.Random(4)
    env.dev.write(0, rng.randbytes(env.dev.size))
    b1 = take(env)
    env.eng.snapshot_destroy(b1.sid)
    env.dev.write(0, b"\x01" * 100)  # only block 0 changes on the device
    b2 = take(env, keep=False)
    bs = b2.info.block_size
    img = env.eng.image(b2.sid, "disk")
    map_before = b2.read_map
    target = 5 * bs - 300  # crosses blocks 4 and 5, far from block 0
    assert map_before[4] <= b1.info.changes_number and map_before[5] <= b1.info.changes_number
    device_before = env.dev.read(0, env.dev.size)
    img.write(target, b"\xee" * 600)
    assert env.dev.read(0, env.dev.size) == device_before, "an image write reached the device"

    map_after = np.frombuffer(env.eng.cbt_map("disk"), dtype=np.uint8)
    assert map_after[4] > b1.info.changes_number and map_after[5] > b1.info.changes_number
    assert map_after[4] <= b2.info.changes_number
    others = np.ones(len(map_after), dtype=bool)
    others[[4, 5]] = False
    assert (map_after[others] == map_before[others]).all()
    assert env.eng.cbt_info("disk") == b2.info

    # The backup of take 2, made now, holds the image write ...
    b2.data = img.read(0, img.size)
    b2.read_map = map_after.copy()
    assert incremental(b1, b2, img) == b2.data
    # ... which the device never had: the next round must re-read those blocks.
    env.eng.snapshot_destroy(b2.sid)
    b3 = take(env)
    assert b3.read_map[4] > b2.info.changes_number and b3.read_map[5] > b2.info.changes_number
    assert incremental(b2, b3, env.eng.image(b3.sid, "disk")) == b3.data
    assert b3.data == device_before
    env.eng.snapshot_destroy(b3.sid)


def test_mark_dirty_marks_the_ranges(env: Env) -> None:
    # Before any take: the ranges go into the first take's map.
    env.eng.attach("disk")
    bs = env.eng.cbt_info("disk").block_size
    env.eng.mark_dirty("disk", [(7 * bs - 1, 2)])  # blocks 6 and 7
    b1 = take(env)
    assert b1.read_map[6] > 0 and b1.read_map[7] > 0
    assert (np.delete(b1.read_map, [6, 7]) == 0).all()
    env.eng.snapshot_destroy(b1.sid)

    b2 = take(env, keep=False)
    assert not (b2.read_map > b1.info.changes_number).any()  # nothing changed since
    ranges = [(2 * bs + 17, bs), (10 * bs, 1), (env.dev.size - 5, 5)]
    dirty = blocks_of(ranges, bs)
    assert dirty == {2, 3, 10, b2.info.block_count - 1}

    # A bad range anywhere in the list: EINVAL and nothing marked.
    for bad in ([(env.dev.size - 5, 6)], [(-1, 10)], [(env.dev.size, 1)]):
        with pytest.raises(blksnap.BlksnapError) as exc:
            env.eng.mark_dirty("disk", [*ranges, *bad])
        assert exc.value.errno == errno.EINVAL
        assert env.eng.cbt_map("disk") == b2.read_map.tobytes()
    with pytest.raises(blksnap.BlksnapError) as exc:
        env.eng.mark_dirty("nosuch", ranges)
    assert exc.value.errno == errno.ENOENT

    env.eng.mark_dirty("disk", ranges)
    now = np.frombuffer(env.eng.cbt_map("disk"), dtype=np.uint8)
    marked = set(np.flatnonzero(now > b1.info.changes_number).tolist())
    assert dirty <= marked, "mark_dirty must mark its blocks for the backup under way"
    assert len(marked) < len(now)
    env.eng.snapshot_destroy(b2.sid)
    b3 = take(env, keep=False)
    assert dirty <= set(np.flatnonzero(b3.read_map > b2.info.changes_number).tolist())
    env.eng.snapshot_destroy(b3.sid)
