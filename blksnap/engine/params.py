"""Tunables of the engine, each with its documented default.

The kernel module exposes these as module parameters; here they are fields of
:class:`Params`, passed to :class:`blksnap.Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from blksnap.errors import InvalidArgument
from blksnap.units import GiB, KiB, MiB


@dataclass(frozen=True)
class Params:
    #: CBT: the tracking block starts at 2**tracking_block_minimum_shift bytes (64 KiB) ...
    tracking_block_minimum_shift: int = 16
    #: ... and doubles while the device would have more blocks than this (2**21) ...
    tracking_block_maximum_count: int = 1 << 21
    #: ... but never beyond 2**tracking_block_maximum_shift bytes (64 MiB).
    tracking_block_maximum_shift: int = 26
    #: Copy-on-write unit. Chosen by `make bench` (see BENCHMARKS.md): small
    #: enough that a 4 KiB random write does not copy much, large enough that
    #: sequential first writes are not dominated by per-chunk cost.
    chunk_size: int = 64 * KiB
    #: ... doubled for a snapshot whose largest device would have more chunks
    #: than this, which bounds the chunk map (8 bytes a chunk) at 128 MiB.
    chunk_maximum_count: int = 1 << 24
    #: Chunks per page of the lazily allocated chunk map (memory grows by pages
    #: of chunks touched, never with device size).
    chunk_map_page: int = 4096
    #: A ``low_free_space`` event is queued when free diff storage falls below
    #: this many bytes ...
    low_free_space_bytes: int = 1 * GiB
    #: ... or below this fraction of the storage capacity, whichever is smaller.
    low_free_space_fraction: float = 0.25
    #: Growing diff storage (a directory's file, a regular file) is capped at
    #: what its file system can still hold (statvfs). While that file system
    #: has more than this to spare beyond what the storage may take ...
    storage_fs_spare: int = 1 * GiB
    #: ... it is looked at no more often than every this many seconds
    #: (closer to full, at every allocation).
    storage_fs_recheck: float = 0.05
    #: A device whose backing store fails requests is logged, and a
    #: ``device_error`` event queued, at most once per this many seconds
    #: (the later reports say how many failures they stand for).
    device_error_report_interval: float = 10.0
    #: Largest single request the engine splits work into (bounded memory).
    max_io_size: int = 8 * MiB
    #: Trust a CBT checkpoint of a block device after blksnapd stopped
    #: cleanly: nothing tells whether it was written meanwhile, so off by
    #: default (a new generation, the next backup full).
    cbt_trust_block_devices: bool = False
    #: Write intent (see :mod:`blksnap.engine.cbt_intent`): the region size.
    #: The first write to a region since the last checkpoint waits for its
    #: byte in the intent file to be durable; after a crash every region set
    #: there is read again by the next backup. Chosen by `make bench`
    #: (BENCHMARKS.md, "CBT across crashes"). 0: no write intent (the CBT
    #: then survives a clean stop only).
    cbt_intent_region_size: int = 64 * MiB
    #: A device written since its last CBT checkpoint gets a new one (and
    #: its write intent starts afresh) every this many seconds; also at each
    #: take. 0: only at takes and at a clean stop.
    cbt_checkpoint_interval: float = 30.0

    def chunk_size_for(self, capacity: int) -> int:
        """The COW unit for a device of ``capacity`` bytes."""
        size = self.chunk_size
        while (capacity + size - 1) // size > self.chunk_maximum_count:
            size <<= 1
        return size

    def __post_init__(self) -> None:
        cs = self.chunk_size
        if cs < 4096 or cs & (cs - 1):
            raise InvalidArgument(f"chunk_size {cs} is not a power of two >= 4096")
        if not 9 <= self.tracking_block_minimum_shift <= self.tracking_block_maximum_shift:
            raise InvalidArgument("tracking block shifts out of order")
        if not 0.0 <= self.low_free_space_fraction < 1.0:
            raise InvalidArgument("low_free_space_fraction must be in [0, 1)")
        if self.chunk_maximum_count <= 0:
            raise InvalidArgument("chunk_maximum_count must be positive")
        ri = self.cbt_intent_region_size
        if ri and (ri < 4096 or ri & (ri - 1)):
            raise InvalidArgument(f"cbt_intent_region_size {ri} is not 0 or a power of two >= 4096")
        if self.cbt_checkpoint_interval < 0:
            raise InvalidArgument("cbt_checkpoint_interval must be >= 0")
        if self.chunk_map_page <= 0 or self.max_io_size < cs:
            raise InvalidArgument("bad chunk_map_page or max_io_size")
