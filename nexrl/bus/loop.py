"""Pieces of a node's event loop: a wake-up pipe, a timer heap, a call queue, a rate limit.

    any thread ----call_soon(fn)----> CallQueue ---+
    any thread ----call_later(d, fn)-> Timers -----+--> loop thread: poll(ROUTER, SUB, wake fd,
    signal handler -----------------> Wakeup.wake()+    timeout = next timer) -> calls, timers,
                                                         messages

Ordering: calls run in the order they were queued (FIFO); timers run in (due time,
scheduling order), so two call_later with the same delay run in the order they were made;
in one turn of the loop the queued calls run first, then the timers that are due.
Everything here is safe to use from any thread; `Wakeup.wake` and `CallQueue.put` are also
safe inside a signal handler (no lock is taken: deque.append is atomic).
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
import time
from collections import deque
from typing import Callable


class Wakeup:
    """A non-blocking pipe whose read end the loop polls; `wake()` makes the poll return."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._closed = False

    def wake(self) -> None:
        if self._closed:
            return
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway
        except OSError:
            pass  # closed while the node shuts down: nothing left to wake

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._closed = True
        os.close(self.fd)
        os.close(self._w)


class CallQueue:
    """FIFO of callables for the loop thread; `put` never blocks and takes no lock."""

    def __init__(self, wakeup: Wakeup):
        self._q: deque[Callable[[], None]] = deque()
        self._wakeup = wakeup

    def put(self, fn: Callable[[], None]) -> None:
        self._q.append(fn)
        self._wakeup.wake()

    def take(self) -> list[Callable[[], None]]:
        """The calls queued so far (later ones wait for the next turn of the loop)."""
        q, out = self._q, []
        for _ in range(len(q)):
            out.append(q.popleft())
        return out

    def __len__(self) -> int:
        return len(self._q)


class Timer:
    """A scheduled call; `cancel()` stops it if it has not run yet."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]):
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """A heap of Timers keyed on (monotonic due time, scheduling order); thread-safe."""

    def __init__(self, wakeup: Wakeup):
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = wakeup

    def add(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), fn)
        with self._lock:
            first = not self._heap or timer.when < self._heap[0][0]
            heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        if first:
            self._wakeup.wake()  # the loop may be sleeping past the new first deadline
        return timer

    def due(self, now: float) -> list[Timer]:
        out = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                timer = heapq.heappop(self._heap)[2]
                if not timer.cancelled:
                    out.append(timer)
        return out

    def next_delay(self, now: float) -> float | None:
        """Seconds until the first timer is due (None: no timer)."""
        with self._lock:
            while self._heap and self._heap[0][2].cancelled:
                heapq.heappop(self._heap)
            return None if not self._heap else max(0.0, self._heap[0][0] - now)

    def __len__(self) -> int:
        return len(self._heap)


def poll_ms(seconds: float) -> int:
    """Poll timeout in whole ms, rounded up so a timer is never polled for early (a
    truncated 0 ms timeout would spin until the timer is due)."""
    return max(0, math.ceil(seconds * 1000))


class RateLimit:
    """At most `per_s` log lines / error events a second; counts what it holds back.

    `allow()` returns (allowed, suppressed): when a new second starts, `suppressed` is how
    many were held back in the previous one, so the caller can say so once.
    """

    def __init__(self, per_s: int = 10):
        self.per_s, self.window, self.count = per_s, 0, 0
        self.suppressed = 0          # total held back
        self._held = 0               # held back in the current window

    def allow(self) -> tuple[bool, int]:
        now = int(time.monotonic())
        reported = 0
        if now != self.window:
            self.window, self.count, reported, self._held = now, 0, self._held, 0
        self.count += 1
        if self.count > self.per_s:
            self.suppressed += 1
            self._held += 1
            return False, reported
        return True, reported
