"""Listen to the event bus from a test: a Subscriber made ready by the real handshake.

    tap = EventTap(ctx, proxy.pub, proxy.sub, ("node.lifecycle",))   # returns once live
    msgs = tap.until(lambda m: m.body["state"] == "stopped", timeout=10)
"""

from __future__ import annotations

import time
from typing import Callable

import zmq

from nexrl.bus.codec import Message
from nexrl.bus.events import Publisher, Subscriber, handshake


class EventTap:
    """Everything published on `topics` after construction (the handshake closes the
    slow-joiner window), kept in `seen`."""

    def __init__(self, ctx: zmq.Context, pub: str, sub: str, topics: tuple[str, ...]):
        self.pub = Publisher(ctx, pub, sender="pytest-tap", linger_ms=0)
        self.sub = Subscriber(ctx, sub, topics)
        handshake(self.pub, self.sub, 20.0)
        self.seen: list[Message] = []

    def until(self, pred: Callable[[Message], bool], timeout: float) -> list[Message]:
        """Receive until an event satisfies `pred`; returns everything seen so far."""
        deadline = time.monotonic() + timeout
        for m in self.seen:
            if pred(m):
                return list(self.seen)
        while (left := deadline - time.monotonic()) > 0:
            got = self.sub.recv(left)
            if got is None:
                break
            self.seen.append(got[1])
            if pred(got[1]):
                return list(self.seen)
        raise AssertionError(f"no matching event within {timeout}s; seen: "
                             f"{[(m.type, m.sender, m.body) for m in self.seen][-20:]}")

    def close(self) -> None:
        self.pub.close(0)
        self.sub.close()
