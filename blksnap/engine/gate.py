"""A drainable gate for in-flight requests, the user-space twin of a queue freeze.

Requests ``enter`` and ``leave``; ``freeze`` stops new requests and waits for
the in-flight ones to finish, ``unfreeze`` lets them go on. ``close`` makes
every later ``enter`` fail (an image whose snapshot is being destroyed).

A thread that must not block (the FUSE event loop serving a write inline)
submits inside ``with no_wait:``. Then a gate that is frozen refuses at once
with :class:`WouldWait` instead of waiting for the drain, and the tracker
refuses a write that would copy a chunk or wait for one (see
:meth:`blksnap.tracker.Tracker.write_may_wait`); the caller hands the request
to a worker thread. Like the kernel's ``REQ_NOWAIT``.

A gate may have compiled twins, short ways (:class:`blksnap.shortway.Way`:
requests served in C count themselves in and out of them): a device's, and
the ways of the images that read it. Every drain closes them first
(``close_ways``, which waits for their requests too); when the last drain
ends, ``on_thaw`` opens them again with what the filters then allow
(:meth:`blksnap.engine.device.Device.open_short_way`).
"""

from __future__ import annotations

import errno as _errno
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from blksnap.errors import BlksnapError
from blksnap.fileio import may_block

__all__ = ["Gate", "WouldWait", "may_block", "no_wait"]


class WouldWait(BlksnapError):
    """A request submitted inside ``with no_wait:`` would have had to wait (a
    drained gate, a chunk to copy or being copied). Nothing was done: the CBT
    is not marked, nothing written."""

    errno = _errno.EAGAIN


class _NoWait(threading.local):
    """``with no_wait:`` -- requests this thread submits meanwhile fail with
    :class:`WouldWait` rather than wait. Not nestable."""

    active = False

    def __enter__(self) -> None:
        self.active = True

    def __exit__(self, *exc: object) -> None:
        self.active = False


no_wait = _NoWait()


class Gate:
    __slots__ = ("_closed_error", "_cond", "_frozen", "_inflight", "_lock", "close_ways", "on_thaw")

    def __init__(
        self,
        close_ways: Callable[[], None] | None = None,
        on_thaw: Callable[[], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inflight = 0
        self._frozen = 0
        self._closed_error: Callable[[], BlksnapError] | None = None
        #: Closes the compiled twins and waits for their requests (at every
        #: drain), and what opens them again when the last drain ends (with
        #: the gate's lock held).
        self.close_ways = close_ways
        self.on_thaw = on_thaw

    def enter(self) -> None:
        with self._lock:  # the lock alone (C), not the condition (Python)
            if not self._frozen:  # (closed is frozen too)
                self._inflight += 1
                return
        with self._cond:
            while self._frozen and self._closed_error is None:
                if no_wait.active:
                    raise WouldWait("the device is being drained (take, attach, destroy)")
                may_block()
                self._cond.wait()
            if self._closed_error is not None:
                raise self._closed_error()
            self._inflight += 1

    def leave(self) -> None:
        with self._lock:
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
        """Stop new requests and wait until none is in flight (the compiled
        twin's too)."""
        with self._cond:
            self._frozen += 1
        if self.close_ways is not None:  # (outside the lock: their requests never take it)
            self.close_ways()
        with self._cond:
            while self._inflight:
                self._cond.wait()

    def unfreeze(self) -> None:
        with self._cond:
            self._frozen -= 1
            if not self._frozen:
                if self._closed_error is None and self.on_thaw is not None:
                    self.on_thaw()
                self._cond.notify_all()

    def refresh(self) -> None:
        """What the compiled twins may do has changed outside a drain (a
        snapshot resumed, images made): close them, wait for their requests,
        and open them again unless a drain is under way (its end does).
        Python's requests go on."""
        if self.close_ways is None:
            return
        with self._cond:
            self._frozen += 1
        self.close_ways()
        self.unfreeze()

    def close(self, make_error: Callable[[], BlksnapError]) -> None:
        """Fail every later request with ``make_error()`` and drain the current ones."""
        with self._cond:
            self._closed_error = make_error
            self._frozen += 1
            self._cond.notify_all()
        if self.close_ways is not None:
            self.close_ways()
        with self._cond:
            while self._inflight:
                self._cond.wait()

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    @property
    def inflight(self) -> int:
        return self._inflight
