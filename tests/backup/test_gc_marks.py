"""gc's marks (``gc.Marks``): the digests the indexes name, kept by their
first 8 bytes. Never a named digest taken for garbage; an unnamed one kept
only when it begins as a named one."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blksnap.backup.format import DIGEST
from blksnap.backup.gc import Marks

POOL = [os.urandom(DIGEST) for _ in range(64)]


@settings(max_examples=60, deadline=None)
@given(
    indexes=st.lists(st.lists(st.sampled_from(POOL), max_size=20), max_size=8),
    queries=st.lists(st.sampled_from(POOL), max_size=30),
    fold=st.sampled_from([1, 3, 1 << 22]),
)
def test_marks_answer_as_the_set_of_digests(
    indexes: list[list[bytes]], queries: list[bytes], fold: int
) -> None:
    marks = Marks()
    marks.FOLD = fold  # (folds after every index, every few, or once at the end)
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
