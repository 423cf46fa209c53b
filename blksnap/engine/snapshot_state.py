"""What a snapshot keeps in regions (:mod:`blksnap.engine.regions`) so that
a process taking over finds it whole: under ``snap/ID``

* a header (its state: created, taking, taken, destroying; when it was
  created and taken) and one row per diff storage source: where its next
  free slot is and how many it has handed out, written under the storage's
  lock before a slot is used, so no slot is ever handed out twice;
* ``snap/ID/desc``: its devices and chunk size (JSON), written at create;
* ``snap/ID/src/N``: source N's description (JSON), and ``snap/ID/src/N/fd``
  (and ``/hold`` for storage mapped on a served device) the descriptors, all
  kept *before* the source is put in service;
* ``snap/ID/area/NAME``: the chunk map of device NAME (:class:`DiffArea`).

With regions that end with the process only the header and the chunk maps
are made (as plain memory); nothing else is kept.
"""

from __future__ import annotations

import json
import mmap
import time
from typing import Any

import numpy as np

from blksnap.engine.regions import Regions

#: Header states.
S_CREATED, S_TAKING, S_TAKEN, S_DESTROYING = 1, 2, 3, 4
STATE_NAMES = {S_CREATED: "created", S_TAKING: "taking", S_TAKEN: "taken",
               S_DESTROYING: "destroying"}  # fmt: skip
_MAGIC = 0x62736E6170733031  # "bsnaps01"
_ROWS_AT = 512  # int64 index of source row 0 (the header is 4 KiB)
_ROW = 4  # next range index, offset in it, slots used, slots total
#: Diff storage sources a snapshot can have (as :data:`diff_storage.MAX_SOURCES`).
MAX_SOURCES = 1 << 14


def prefix(sid: str) -> str:
    return f"snap/{sid}"


def drop_regions(regions: Regions, sid: str) -> None:
    """Let every region and descriptor of snapshot ``sid`` go."""
    key = prefix(sid)
    for held in list(regions.held_keys()):
        if held.startswith(f"{key}/"):
            regions.drop(held)
    regions.drop(key)


class SnapshotState:
    """The regions of snapshot ``sid`` (made anew, or found: :meth:`find`)."""

    def __init__(self, regions: Regions, sid: str, header: mmap.mmap) -> None:
        self.regions = regions
        self.sid = sid
        self.key = prefix(sid)
        self._header = header
        self.words = np.frombuffer(header, dtype=np.int64)

    @classmethod
    def create(cls, regions: Regions, sid: str, desc: dict[str, Any]) -> SnapshotState:
        region, existed = regions.open(prefix(sid), (_ROWS_AT + _ROW * MAX_SOURCES) * 8)
        state = cls(regions, sid, region)
        if existed:  # (a fresh one is zeroes, its pages not yet made)
            state.words[:] = 0
        state.words[3] = int(time.time() * 1e6)
        regions.put_blob(f"{state.key}/desc", json.dumps(desc).encode())
        state.words[1] = S_CREATED
        state.words[0] = _MAGIC  # last: a header without it is no snapshot
        return state

    @staticmethod
    def cut_short(regions: Regions, sid: str) -> bool:
        """Is the state of ``sid`` there but without its magic (written last
        by :meth:`create`): a create cut short, which never was a snapshot?"""
        region = regions.find(prefix(sid))
        return region is not None and (len(region) < 8 or not any(region[:8]))

    @classmethod
    def find(cls, regions: Regions, sid: str) -> SnapshotState | None:
        region = regions.find(prefix(sid))
        if region is None or len(region) < (_ROWS_AT + _ROW * MAX_SOURCES) * 8:
            return None
        state = cls(regions, sid, region)
        return state if int(state.words[0]) == _MAGIC else None

    # -- header ----------------------------------------------------------------

    @property
    def state(self) -> int:
        return int(self.words[1])

    def set_state(self, code: int) -> None:
        if code == S_TAKEN:
            self.words[2] = int(time.time() * 1e6)
        self.words[1] = code

    @property
    def created(self) -> float:
        return int(self.words[3]) / 1e6

    @property
    def taken_at(self) -> float | None:
        return int(self.words[2]) / 1e6 if self.words[2] else None

    def desc(self) -> dict[str, Any] | None:
        blob = self.regions.get_blob(f"{self.key}/desc")
        return json.loads(blob) if blob else None

    # -- diff storage -----------------------------------------------------------

    def row(self, index: int) -> np.ndarray:
        """Source ``index``'s allocation row (a view: stores go straight in)."""
        at = _ROWS_AT + _ROW * index
        return self.words[at : at + _ROW]

    def keep_source(self, index: int, desc: dict[str, Any], fd: int, hold_fd: int) -> None:
        """Source ``index``: its descriptors, then its description (found
        only when both are there)."""
        key = f"{self.key}/src/{index}"
        self.regions.hold(f"{key}/fd", fd)
        if hold_fd >= 0:
            self.regions.hold(f"{key}/hold", hold_fd)
        self.regions.put_blob(key, json.dumps(desc).encode())

    def sources(self) -> list[tuple[dict[str, Any], int, int]]:
        """(description, fd, hold fd or -1) of each source kept, in order;
        the fds are the regions' own (duplicate them to keep them)."""
        out = []
        while True:
            key = f"{self.key}/src/{len(out)}"
            blob = self.regions.get_blob(key)
            fd = self.regions.held_fd(f"{key}/fd")
            if blob is None or fd is None:
                return out
            hold = self.regions.held_fd(f"{key}/hold")
            out.append((json.loads(blob), fd, -1 if hold is None else hold))

    # -- chunk maps -------------------------------------------------------------

    def area_key(self, name: str) -> str:
        return f"{self.key}/area/{name}"

    # -- end --------------------------------------------------------------------

    def drop(self) -> None:
        """Let every region and descriptor of the snapshot go."""
        drop_regions(self.regions, self.sid)
