"""Large sets of digests in little memory, for gc and verify.

A repository's indexes name one digest (32 bytes) per chunk of every
backup: tens of millions in a big repository, most of them named again by
every backup. A Python ``set`` of them costs about 100 bytes a digest;
:class:`SortedSet` keeps them sorted and unique in one numpy array, as many
bytes a value as the values have, and folds new values in by batches so
that at no time more than about twice the set is in memory.
"""

from __future__ import annotations

import numpy as np


class SortedSet:
    """Unique values of one numpy dtype (``uint64``, ``V32`` ...), sorted in
    one array; :meth:`add` takes them by arrays, in any order, repeated."""

    #: Values gathered before they are folded in (or an eighth of the set,
    #: whichever is more: a fold copies the set once).
    FOLD = 1 << 20

    def __init__(self, dtype: str | np.dtype) -> None:
        self._sorted = np.empty(0, dtype=dtype)
        self._pending: list[np.ndarray] = []
        self._count = 0

    def add(self, values: np.ndarray) -> None:
        """Add ``values`` (copied)."""
        if len(values):
            self._pending.append(np.array(values, dtype=self._sorted.dtype))
            self._count += len(values)
            if self._count >= max(self.FOLD, len(self._sorted) // 8):
                self._fold()

    def _fold(self) -> None:
        """The pending values into the sorted array: sorted among
        themselves, those already there dropped, the rest inserted where
        they belong (one copy of the set, not a sort of it)."""
        if not self._pending:
            return
        batch = np.unique(np.concatenate(self._pending))
        self._pending, self._count = [], 0
        s = self._sorted
        if not len(s):
            self._sorted = batch
            return
        at = np.searchsorted(s, batch)
        new = s[np.minimum(at, len(s) - 1)] != batch
        self._sorted = np.insert(s, at[new], batch[new])

    def contains(self, values: np.ndarray) -> np.ndarray:
        """For each of ``values``: is it in the set?"""
        self._fold()
        s = self._sorted
        if not len(s):
            return np.zeros(len(values), dtype=bool)
        return s[np.minimum(np.searchsorted(s, values), len(s) - 1)] == values

    @property
    def values(self) -> np.ndarray:
        """Every value, sorted (the set's own array: do not change it)."""
        self._fold()
        return self._sorted

    def __len__(self) -> int:
        self._fold()
        return len(self._sorted)
