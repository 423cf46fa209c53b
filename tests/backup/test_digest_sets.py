"""Sets of digests in little memory (``backup.digests.SortedSet``) and their
two users: gc's marks (``gc.Marks``: the digests the indexes name, kept by
their first 8 bytes; never a named digest taken for garbage, an unnamed one
kept only when it begins as a named one) and verify's chunks to read."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blksnap.backup.digests import SortedSet
from blksnap.backup.format import DIGEST
from blksnap.backup.gc import Marks
from blksnap.backup.verify import _Wanted

POOL = [os.urandom(DIGEST) for _ in range(64)]
CS = 4096
ZERO, ZERO_SHORT = os.urandom(DIGEST), os.urandom(DIGEST)  # stand-ins for zero chunks' digests


def zero(length: int) -> bytes:
    return ZERO if length == CS else ZERO_SHORT


FIXTURE = [HealthCheck.function_scoped_fixture]


# (the fixture only sets how often the sets fold: nothing per example to reset)
@pytest.fixture(params=[1, 3, 1 << 20], ids=["fold-each", "fold-3", "fold-once"])
def fold(request: pytest.FixtureRequest) -> Iterator[int]:
    """How many values a set gathers before it folds them in."""
    old = SortedSet.FOLD
    SortedSet.FOLD = request.param
    yield request.param
    SortedSet.FOLD = old


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE)
@given(
    batches=st.lists(st.lists(st.integers(0, 40), max_size=15), max_size=10),
    queries=st.lists(st.integers(-1, 41), max_size=30),
)
def test_a_sorted_set_is_a_set(fold: int, batches: list[list[int]], queries: list[int]) -> None:
    s = SortedSet(np.int64)
    model: set[int] = set()
    for b in batches:
        s.add(np.array(b, dtype=np.int64))
        model.update(b)
    assert s.contains(np.array(queries, dtype=np.int64)).tolist() == [q in model for q in queries]
    assert s.values.tolist() == sorted(model) and len(s) == len(model)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE)
@given(
    indexes=st.lists(st.lists(st.sampled_from(POOL), max_size=20), max_size=8),
    queries=st.lists(st.sampled_from(POOL), max_size=30),
)
def test_marks_answer_as_the_set_of_digests(
    fold: int, indexes: list[list[bytes]], queries: list[bytes]
) -> None:
    marks = Marks()
    for index in indexes:
        marks.add(b"".join(index))
    named = {d for index in indexes for d in index}
    assert marks.named(b"".join(queries)).tolist() == [q in named for q in queries]
    assert len(marks) == len(named)  # (the pool's heads are distinct)


def test_a_digest_beginning_as_a_named_one_is_kept_never_the_reverse() -> None:
    marks = Marks()
    a = os.urandom(DIGEST)
    marks.add(a + os.urandom(DIGEST) + a)  # (an index naming a twice)
    twin = a[:8] + bytes(x ^ 0xFF for x in a[8:])  # other digest, same first 8 bytes
    other = os.urandom(DIGEST)
    assert marks.named(a + twin + other).tolist() == [True, True, False]
    assert len(marks) == 2


@pytest.mark.parametrize("n", [0, 1])
def test_no_index_or_one_digest(n: int) -> None:
    marks = Marks()
    digests = [os.urandom(DIGEST) for _ in range(n)]
    if digests:
        marks.add(digests[0])
    assert marks.named(b"".join(digests) + os.urandom(DIGEST)).tolist() == [True] * n + [False]


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE)
@given(
    indexes=st.lists(
        st.tuples(st.lists(st.sampled_from([*POOL[:16], ZERO, ZERO_SHORT]), max_size=12),
                  st.sampled_from([0, 100])),
        max_size=6,
    ),
)  # fmt: skip
def test_verify_wants_each_stored_digest_once_in_first_named_order(
    fold: int, indexes: list[tuple[list[bytes], int]]
) -> None:
    """verify's chunks to read (``verify._Wanted``): each stored digest
    once, with the length of its chunk where it was first named, in the
    order first named (as the backups wrote them), against a dict."""
    wanted = _Wanted()
    model: dict[bytes, int] = {}  # (insertion order: first named)
    for rows, short in indexes:
        size = len(rows) * CS - short  # (a last chunk short by ``short`` bytes)
        index = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, DIGEST)
        wanted.add(index, size, CS, zero)
        for i, d in enumerate(rows):
            length = min(CS, size - i * CS)
            if d != zero(length):
                model.setdefault(d, length)
    got = [
        (d, n)
        for digests, lengths in wanted.result()
        for d, n in zip(digests, lengths, strict=True)
    ]
    assert got == list(model.items())


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1000)), max_size=15), max_size=10
    ),
)
def test_a_sorted_set_keeps_the_payload_of_the_first_add(
    fold: int, batches: list[list[tuple[int, int]]]
) -> None:
    s = SortedSet(np.int64, np.int32)
    model: dict[int, int] = {}
    for b in batches:
        s.add(
            np.array([v for v, _ in b], dtype=np.int64), np.array([p for _, p in b], dtype=np.int32)
        )
        for v, p in b:
            model.setdefault(v, p)
    (payload,) = s.payload
    assert dict(zip(s.values.tolist(), payload.tolist(), strict=True)) == model
