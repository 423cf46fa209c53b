"""A model of devices, snapshots and images, driven by hypothesis.

The machine keeps, for each device, the bytes it must hold, and for each
taken snapshot, the bytes of each of its images: the device at take plus the
writes made to the image since. Rules write random extents (unaligned,
crossing chunk boundaries) to devices and images from several threads at
once, read them concurrently, and create, take and destroy snapshots, some
of it while other threads write. After every step, every device and every
image must read back equal to the model.

Writes within one step touch disjoint extents of each device and of each
image, so the model does not depend on the order the threads run in; reads
in a step only cover extents no write of that step touches.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import blksnap
from blksnap.units import KiB, MiB

# Sizes: whole chunks, a partial last chunk, and a partial last sector run of
# a chunk (devices are whole 512-byte sectors: others are refused at add).
DEVICE_SIZES = (1 * MiB, 1 * MiB + 12 * KiB + 512, 1536 * KiB - 1024)
THREADS = 4


@dataclass
class SnapModel:
    names: list[str]
    taken: bool = False
    #: The model of each image once taken.
    images: dict[str, bytearray] = field(default_factory=dict)


@dataclass
class Op:
    """One I/O of a step: a write (``data``) or a read checked against ``expect``."""

    target: str  # "dev" or "img"
    sid: str | None
    name: str
    offset: int
    length: int
    data: bytes | None = None
    expect: bytes | None = None


#: What an I/O goes to: ("dev", None, name) or ("img", snapshot id, name).
Target = tuple[str, str | None, str]


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class BlksnapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="blksnap-stateful-"))
        self.pool = ThreadPoolExecutor(THREADS)
        self.eng: blksnap.Engine | None = None
        self.devices: dict[str, bytearray] = {}
        self.snaps: dict[str, SnapModel] = {}
        self.chunk = 0
        self.stores = 0

    # -- set-up and tear-down ------------------------------------------------------

    @initialize(
        chunk=st.sampled_from([4 * KiB, 16 * KiB, 64 * KiB]),
        ndev=st.integers(2, 3),
        data=st.data(),
    )
    def start(self, chunk: int, ndev: int, data: st.DataObject) -> None:
        self.chunk = chunk
        self.eng = blksnap.Engine(self.tmp / "state", params=blksnap.Params(chunk_size=chunk))
        for i in range(ndev):
            path = self.tmp / f"dev{i}.img"
            with open(path, "wb") as f:
                f.truncate(DEVICE_SIZES[i])
            self.eng.add_device(path, name=f"dev{i}")
            self.devices[f"dev{i}"] = bytearray(DEVICE_SIZES[i])
        # Most runs start with a snapshot taken, so images are there to use.
        first = data.draw(st.lists(st.sampled_from(sorted(self.devices)), unique=True))
        if first:
            self.devices[first[0]][:] = random.Random(ndev).randbytes(len(self.devices[first[0]]))
            self.engine.device(first[0]).write(0, self.devices[first[0]])
            sid = self.engine.snapshot_create(first, storage=self.storage("dir"), limit=8 * MiB)
            self.engine.snapshot_take(sid)
            self.snaps[sid] = SnapModel(
                first, taken=True, images={n: bytearray(self.devices[n]) for n in first}
            )

    def teardown(self) -> None:
        try:
            if self.eng is not None:
                self.eng.close()
        finally:
            self.pool.shutdown(wait=True)
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------

    @property
    def engine(self) -> blksnap.Engine:
        assert self.eng is not None
        return self.eng

    def busy(self) -> set[str]:
        return {n for s in self.snaps.values() for n in s.names}

    def storage(self, kind: str) -> str:
        self.stores += 1
        if kind == "dir":
            path = self.tmp / f"store{self.stores}"
            path.mkdir()
        else:
            path = self.tmp / f"store{self.stores}.diff"
            path.touch()
        return str(path)

    def extent(self, data: st.DataObject, size: int) -> tuple[int, int]:
        """An unaligned extent, often near (and across) chunk boundaries."""
        chunk = self.chunk
        where = data.draw(st.sampled_from(["boundary", "anywhere", "tail"]), label="where")
        if where == "boundary":
            k = data.draw(st.integers(1, (size - 1) // chunk), label="boundary")
            off = k * chunk + data.draw(st.integers(-700, 700), label="delta")
            off = min(max(off, 0), size - 1)
        elif where == "tail":  # the partial last chunk
            off = size - data.draw(st.integers(1, chunk + 700), label="from end")
            off = max(off, 0)
        else:
            off = data.draw(st.integers(0, size - 1), label="offset")
        room = size - off
        length = data.draw(
            st.one_of(
                st.integers(1, min(room, 600)),
                st.integers(1, min(room, 3 * chunk + 5000)),
            ),
            label="length",
        )
        return off, length

    def draw_ops(self, data: st.DataObject, targets: list[Target]) -> list[Op]:
        """Writes and reads over ``targets`` ((kind, sid, name)): writes to one
        target disjoint, reads clear of that step's writes to the target."""
        if not targets:
            return []
        wanted = data.draw(
            st.lists(
                st.tuples(st.sampled_from(targets), st.sampled_from(["write", "write", "read"])),
                min_size=1,
                max_size=10,
            ),
            label="ops",
        )
        written: dict[Target, list[tuple[int, int]]] = {}
        ops: list[Op] = []
        reads: list[tuple[Target, tuple[int, int]]] = []
        for target, what in wanted:
            ext = self.extent(data, len(self.model_of(target)))
            if what == "read":
                reads.append((target, ext))
                continue
            if any(overlaps(ext, other) for other in written.get(target, [])):
                continue
            written.setdefault(target, []).append(ext)
            seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
            payload = random.Random(seed).randbytes(ext[1])
            ops.append(Op(target[0], target[1], target[2], ext[0], ext[1], data=payload))
        for target, ext in reads:
            if any(overlaps(ext, other) for other in written.get(target, [])):
                continue
            model = self.model_of(target)
            expect = bytes(model[ext[0] : ext[0] + ext[1]])
            ops.append(Op(target[0], target[1], target[2], ext[0], ext[1], expect=expect))
        return ops

    def model_of(self, target: Target) -> bytearray:
        kind, sid, name = target
        if kind == "dev":
            return self.devices[name]
        assert sid is not None
        return self.snaps[sid].images[name]

    def do(self, op: Op) -> None:
        eng = self.engine
        io: Any = eng.device(op.name) if op.target == "dev" else eng.image(op.sid, op.name)
        if op.data is not None:
            io.write(op.offset, op.data)
        else:
            got = io.read(op.offset, op.length)
            assert got == op.expect, (
                f"{op.target} {op.sid} {op.name}: read at {op.offset}+{op.length} "
                "differs from the model"
            )

    def run(self, ops: list[Op], control: Callable[[], object] | None = None) -> None:
        """Run ``ops`` on the pool (and ``control`` alongside them), then
        apply the writes to the model."""
        futures = [self.pool.submit(self.do, op) for op in ops]
        try:
            if control is not None:
                control()
        finally:
            for fut in futures:
                fut.result()
        for op in ops:
            if op.data is not None:
                model = self.model_of((op.target, op.sid, op.name))
                model[op.offset : op.offset + op.length] = op.data

    def targets(
        self, *, devices: set[str] | None = None, skip_sid: str | None = None
    ) -> list[Target]:
        """Devices (all, or ``devices``) and the images of taken snapshots
        (but ``skip_sid``'s)."""
        out: list[Target] = [
            ("dev", None, n) for n in sorted(self.devices) if devices is None or n in devices
        ]
        for sid, snap in self.snaps.items():
            if snap.taken and sid != skip_sid:
                out += [("img", sid, n) for n in snap.names] * 2  # images: as often as devices
        return out

    # -- rules ------------------------------------------------------------------

    @rule(data=st.data())
    def io(self, data: st.DataObject) -> None:
        """Concurrent writes and reads on devices and images."""
        ops = self.draw_ops(data, self.targets())
        event("io: devices and images" if any(op.target == "img" for op in ops) else "io: devices")
        self.run(ops)

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        eng = self.engine
        names = data.draw(
            st.lists(st.sampled_from(sorted(self.devices)), min_size=1, unique=True),
            label="devices",
        )
        kind = data.draw(st.sampled_from(["dir", "file"]), label="storage")
        limit = sum(len(self.devices[n]) for n in names) + len(names) * self.chunk
        busy = set(names) & self.busy()
        event("create: busy" if busy else "create")
        if busy:
            before = eng.snapshot_collect()
            filters = {n: eng.filters(n) for n in self.devices}
            cbt = {n: eng.cbt_info(n) for n in self.devices if "blksnap" in filters[n]}
            with pytest.raises(blksnap.Busy) as exc:
                eng.snapshot_create(names, storage=self.storage(kind), limit=limit)
            assert exc.value.errno == errno.EBUSY
            assert eng.snapshot_collect() == before
            assert {n: eng.filters(n) for n in self.devices} == filters
            assert {n: eng.cbt_info(n) for n in cbt} == cbt
            for n in busy:
                assert eng.snapshot_info(n)["id"] in self.snaps
            return
        sid = eng.snapshot_create(names, storage=self.storage(kind), limit=limit)
        assert sid not in self.snaps
        self.snaps[sid] = SnapModel(list(names))
        assert all(eng.snapshot_info(n)["id"] == sid for n in names)

    @precondition(lambda self: any(not s.taken for s in self.snaps.values()))
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        """Take one created snapshot while other threads do I/O on the
        devices it does not hold and on the images of the others."""
        sid = data.draw(
            # In creation order: ids are random, their order is not.
            st.sampled_from([s for s, m in self.snaps.items() if not m.taken]),
            label="sid",
        )
        snap = self.snaps[sid]
        others = set(self.devices) - set(snap.names)
        ops = self.draw_ops(data, self.targets(devices=others))
        event("take with concurrent I/O" if ops else "take")
        self.run(ops, lambda: self.engine.snapshot_take(sid))
        snap.taken = True
        snap.images = {n: bytearray(self.devices[n]) for n in snap.names}
        with pytest.raises(blksnap.BlksnapError) as exc:
            self.engine.snapshot_take(sid)
        assert exc.value.errno == errno.EALREADY

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        """Destroy one snapshot while its devices (and everything else but
        its images) are written and read."""
        sid = data.draw(st.sampled_from(list(self.snaps)), label="sid")
        snap = self.snaps[sid]
        images = [self.engine.image(sid, n) for n in snap.names] if snap.taken else []
        ops = self.draw_ops(data, self.targets(skip_sid=sid))
        self.run(ops, lambda: self.engine.snapshot_destroy(sid))
        del self.snaps[sid]
        for n in snap.names:
            with pytest.raises(blksnap.BlksnapError) as exc:
                self.engine.image(sid, n)
            assert exc.value.errno == errno.ENOENT
        for img in images:
            with pytest.raises(blksnap.BlksnapError):
                img.read(0, 1)

    # -- the invariant ------------------------------------------------------------

    @invariant()
    def everything_reads_back_as_modelled(self) -> None:
        if self.eng is None:
            return
        eng = self.eng
        for name, model in self.devices.items():
            dev = eng.device(name)
            assert dev.size == len(model)
            assert dev.read(0, dev.size) == model, f"device {name} differs from the model"
        for sid, snap in self.snaps.items():
            info = eng.snapshot_collect(sid)[0]
            assert info["state"] == ("taken" if snap.taken else "created")
            for name, model in snap.images.items():
                img = eng.image(sid, name)
                assert img.size == len(model)
                assert img.read(0, img.size) == model, f"image {sid}/{name} differs from the model"


# A failing run is not shrunk unless BLKSNAP_SHRINK=1: shrinking runs of
# threads and files can take hypothesis's full five minutes.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
if os.environ.get("BLKSNAP_SHRINK"):
    PHASES += (Phase.shrink, Phase.explain)
BlksnapMachine.TestCase.settings = settings(
    phases=PHASES,
    max_examples=75,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBlksnapStateful = BlksnapMachine.TestCase
