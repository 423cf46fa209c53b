"""A backup of one device as a :class:`~blksnap.engine.source.Source`:
what blksnapd serves for ``blksnap mount`` and hydrates from for
``blksnap restore --instant``.

The backup's index is read and checked once (:meth:`Repository.read_index`);
a read fetches the chunks it covers, checks, decrypts and decompresses them
(:meth:`ChunkStore.read`) and keeps the newest in a cache of bounded size
(``mount_cache`` of :mod:`blksnap.settings`). Two readers of one chunk wait
for one fetch. Zero chunks are never read: the index says which they are.

While a source is open it holds the repository's read lock (shared), so a
prune, which takes it exclusively, is refused (``EBUSY``) rather than
removing a backup that is being served; ``blksnap umount`` (or the end of
the hydration) lets it go.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future

from blksnap.backup.repository import ReadHold, Repository
from blksnap.engine.source import Source
from blksnap.settings import SETTINGS


class BackupSource(Source):
    """Device ``device`` of backup ``backup_id`` in ``repo``."""

    def __init__(
        self, repo: Repository, backup_id: str, device: str, cache_bytes: int | None = None
    ) -> None:
        self.repo = repo
        self._hold: ReadHold | None = repo.read_hold()
        try:
            info = repo.get(backup_id)
            record = info.device(device)
            self.digests = repo.read_index(info, device)
        except BaseException:
            self.close()
            raise
        self.info = info
        self.backup_id = info.id
        self.device = device
        self.record = record
        self.size = record.size
        self.unit = record.chunk_size
        self.description = f"backup {info.id} of device {device} in {repo.path}"
        self.identity = f"{repo.path}\0{info.id}\0{device}\0{record.index_checksum}"
        self._zero = repo.store.zero_chunks(self.digests, self.size, self.unit)
        self.cache_bytes = SETTINGS.mount_cache if cache_bytes is None else cache_bytes
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0
        self._inflight: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()

    def is_zero(self, index: int) -> bool:
        return bool(self._zero[index])

    def read_unit(self, index: int) -> bytes:
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
                return data
            fut = self._inflight.get(index)
            mine = fut is None
            if mine:
                fut = self._inflight[index] = Future()
        assert fut is not None
        if not mine:
            return fut.result()
        try:
            data = self.repo.store.read(bytes(self.digests[index]), self.unit_length(index))
        except BaseException as exc:
            with self._lock:
                del self._inflight[index]
            fut.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[index]
            if self.cache_bytes >= len(data):
                self._cache[index] = data
                self._cached += len(data)
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        fut.set_result(data)
        return data

    def close(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()
        self._cache = OrderedDict()
        self._cached = 0
