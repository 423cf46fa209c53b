"""Large sets of digests in little memory, for gc and verify.

A repository's indexes name one digest (32 bytes) per chunk of every
backup: tens of millions in a big repository, most of them named again by
every backup. A Python ``set`` of them costs about 100 bytes a digest;
:class:`SortedSet` keeps them sorted and unique in one numpy array, as many
bytes a value as the values have (and its payload columns), and folds new
values in by batches, each fold one copy of the set (not a sort of it): gc
and verify give what that came to, measured.
"""

from __future__ import annotations

import numpy as np


class SortedSet:
    """Unique values of one numpy dtype (``uint64``, ``V32`` ...), sorted in
    one array; :meth:`add` takes them by arrays, in any order, repeated.
    Each value may carry payload columns (one array each, of the dtypes
    given): the payload of its first :meth:`add` is kept."""

    #: Values gathered before they are folded in (or an eighth of the set,
    #: whichever is more: a fold copies the set once).
    FOLD = 1 << 20

    def __init__(self, dtype: str | type, *payload: str | type) -> None:
        self._sorted = np.empty(0, dtype=dtype)
        self._payload = [np.empty(0, dtype=p) for p in payload]
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._count = 0

    def add(self, values: np.ndarray, *payload: np.ndarray) -> None:
        """Add ``values`` (copied), with a payload array per column."""
        if len(values):
            cols = (values, *payload)
            self._pending.append(
                tuple(np.array(c, dtype=a.dtype) for c, a in zip(cols, self._arrays, strict=True))
            )
            self._count += len(values)
            if self._count >= max(self.FOLD, len(self._sorted) // 8):
                self._fold()

    @property
    def _arrays(self) -> list[np.ndarray]:
        return [self._sorted, *self._payload]

    def _fold(self) -> None:
        """The pending values into the sorted array: sorted among
        themselves (the first of equal ones kept), those already there
        dropped, the rest inserted where they belong (one copy of the set,
        not a sort of it)."""
        if not self._pending:
            return
        cols = [np.concatenate(c) for c in zip(*self._pending, strict=True)]
        self._pending, self._count = [], 0
        batch, first = np.unique(cols[0], return_index=True)
        cols = [batch, *(c[first] for c in cols[1:])]
        s = self._sorted
        if not len(s):
            self._sorted, self._payload = cols[0], cols[1:]
            return
        at = np.searchsorted(s, batch)
        new = s[np.minimum(at, len(s) - 1)] != batch
        at = at[new]
        del s  # (a column at a time, the old one let go: one column copied at once)
        self._sorted = np.insert(self._sorted, at, cols[0][new])
        for i, c in enumerate(cols[1:]):
            self._payload[i] = np.insert(self._payload[i], at, c[new])

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

    @property
    def payload(self) -> list[np.ndarray]:
        """The payload columns, in the order of :attr:`values`."""
        self._fold()
        return self._payload

    def __len__(self) -> int:
        self._fold()
        return len(self._sorted)
