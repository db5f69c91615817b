"""The node's input buffer: a one-frame slot (the newest frame wins, never a backlog) with a rate limit."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable


class FrameSlot:
    """Holds at most one pending frame; a newer frame replaces an unprocessed one (which counts as dropped).

    Args:
        max_rate_hz: frames handed out per second at most (0 = no limit).
        clock: monotonic seconds (injectable for tests).
        sleep: how to wait for the rate limit (injectable for tests).
    """

    def __init__(self, max_rate_hz: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.period = 0.0
        self.set_rate(max_rate_hz)
        self._clock, self._sleep = clock, sleep
        self._cond = threading.Condition()
        self._item: Any = None
        self._next_start = 0.0
        self._closed = False

    def set_rate(self, max_rate_hz: float) -> None:
        """Change the rate limit (0 = none)."""
        self.period = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0

    def put(self, item: Any) -> bool:
        """Store the newest frame; True if it replaced one that was never processed (a dropped frame)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify_all()
        return replaced

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a frame is pending or the slot is closed (or timeout); True if a frame is pending."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            return self._item is not None and not self._closed

    def take(self) -> Any:
        """Wait until the rate limit allows the next frame, then return the newest one (None if empty).

        Frames arriving during the wait replace the slot's content, so the frame returned is the newest.
        """
        wait = self._next_start - self._clock()
        if wait > 0:
            self._sleep(wait)
        with self._cond:
            item, self._item = self._item, None
        if item is not None:
            self._next_start = self._clock() + self.period
        return item

    def clear(self) -> None:
        """Drop the pending frame (deactivate, reset)."""
        with self._cond:
            self._item = None

    def close(self) -> None:
        """Wake every waiter for good (the worker ends)."""
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
