"""A drainable gate for in-flight requests, the user-space twin of a queue freeze.

Requests ``enter`` and ``leave``; ``freeze`` stops new requests and waits for
the in-flight ones to finish, ``unfreeze`` lets them go on. ``close`` makes
every later ``enter`` fail (an image whose snapshot is being destroyed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import BlksnapError


class Gate:
    __slots__ = ("_closed_error", "_cond", "_frozen", "_inflight")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inflight = 0
        self._frozen = 0
        self._closed_error: Callable[[], BlksnapError] | None = None

    def enter(self) -> None:
        with self._cond:
            while self._frozen and self._closed_error is None:
                self._cond.wait()
            if self._closed_error is not None:
                raise self._closed_error()
            self._inflight += 1

    def leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._frozen and not self._inflight:
                self._cond.notify_all()

    @contextmanager
    def request(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def freeze(self) -> None:
        """Stop new requests and wait until none is in flight."""
        with self._cond:
            self._frozen += 1
            while self._inflight:
                self._cond.wait()

    def unfreeze(self) -> None:
        with self._cond:
            self._frozen -= 1
            if not self._frozen:
                self._cond.notify_all()

    def close(self, make_error: Callable[[], BlksnapError]) -> None:
        """Fail every later request with ``make_error()`` and drain the current ones."""
        with self._cond:
            self._closed_error = make_error
            self._frozen += 1
            self._cond.notify_all()
            while self._inflight:
                self._cond.wait()

    @property
    def inflight(self) -> int:
        return self._inflight
