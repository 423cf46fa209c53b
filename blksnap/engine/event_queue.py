"""A snapshot's event queue: ``low_free_space``, ``no_space``, ``corrupted``."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

LOW_FREE_SPACE = "low_free_space"
NO_SPACE = "no_space"
CORRUPTED = "corrupted"

#: Events kept before the oldest are dropped (a watcher that never reads).
MAX_EVENTS = 1024


@dataclass(frozen=True)
class Event:
    code: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.code, "data": dict(self.data), "time": self.time}


class EventQueue:
    def __init__(self) -> None:
        self._events: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._cond = threading.Condition()
        self._closed = False

    def push(self, code: str, data: dict[str, Any] | None = None) -> None:
        with self._cond:
            self._events.append(Event(code, data or {}))
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or once closed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._events:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._events.popleft()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._events)
