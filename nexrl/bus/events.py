"""Events over PUB/SUB through one XSUB/XPUB proxy.

    node PUB --connect--> [XSUB  EventProxy  XPUB] <--connect-- SUB node / tool
              frames: [topic, header, *buffers], topic = type or type + "/" + key

Events are advisory (heartbeats, lifecycle, errors, metrics, weights.ready/live): work that
must not be lost travels by request/reply instead. So a publisher never blocks: when its
queue is full the event is dropped and counted (`Publisher.dropped`), and because every event
carries a per-(sender, topic) sequence number, a subscriber sees the hole (`Subscriber.gaps`).

Slow joiners: a SUB only receives what is published after its subscription reached the
publisher. `handshake` closes that window: it publishes `bus.probe` on a topic only this
participant subscribed to and waits until a probe comes back through the proxy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any

import zmq

from . import codec, schema
from .codec import Message
from .sockets import CurveConfig, bound_endpoint, make_socket, recv_frames, send_frames

log = logging.getLogger(__name__)


class BusUnavailable(ConnectionError):
    """The event proxy did not answer the readiness handshake in time."""


def topic_of(mtype: str, key: str | None = None) -> bytes:
    return (mtype if key is None else f"{mtype}/{key}").encode()


class Publisher:
    """A PUB connected to the proxy frontend. Thread-safe; `publish` never blocks."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, sender: str, hwm: int = 10_000,
                 linger_ms: int = 1_000, curve: CurveConfig | None = None):
        self.sender, self.endpoint = sender, endpoint
        self._sock = make_socket(ctx, zmq.PUB, connect=endpoint, hwm=hwm, linger_ms=linger_ms,
                                 curve=curve)
        self._lock = threading.Lock()
        self._seq: dict[bytes, int] = defaultdict(int)
        self.published = 0
        self.dropped = 0

    def publish(self, mtype: str, body: dict[str, Any], key: str | None = None) -> bool:
        """Publish an event; False if it was dropped because the send queue is full."""
        spec = schema.check_outgoing(mtype, body)
        if spec.kind != "event":
            raise schema.SchemaError("invalid_body", f"{mtype} is a {spec.kind}, not an event")
        topic = topic_of(mtype, key)
        with self._lock:
            self._seq[topic] += 1
            frames = codec.encode(codec.stamp(Message(mtype, body), self.sender, self._seq[topic]))
            try:
                send_frames(self._sock, frames, zmq.NOBLOCK, prefix=[topic])
            except zmq.Again:
                self.dropped += 1
                return False
            self.published += 1
            return True

    def close(self) -> None:
        with self._lock:
            self._sock.close()


class Subscriber:
    """A SUB connected to the proxy backend, tracking per-(sender, topic) sequence gaps."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topics: tuple[str, ...] = ("",), *,
                 hwm: int = 100_000, linger_ms: int = 0, curve: CurveConfig | None = None,
                 max_bytes: int | None = None):
        self.endpoint, self.max_bytes = endpoint, max_bytes
        self.sock = make_socket(ctx, zmq.SUB, connect=endpoint, hwm=hwm, linger_ms=linger_ms,
                                curve=curve)
        for t in topics:
            self.subscribe(t)
        self._last: dict[tuple[str, bytes], int] = {}
        self.gaps = 0        # events known to be missing
        self.malformed = 0   # events that could not be decoded

    def subscribe(self, topic: str) -> None:
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())

    def unsubscribe(self, topic: str) -> None:
        self.sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    def recv(self, timeout: float | None = None) -> tuple[str, Message] | None:
        """Next (topic, event); None on timeout or for an undecodable event (counted)."""
        if timeout is not None and not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        parts = recv_frames(self.sock, 2)
        return self.decode(parts)

    def decode(self, parts: list) -> tuple[str, Message] | None:
        try:
            if len(parts) < 2:
                raise codec.DecodeError("event without a header frame")
            msg = codec.decode(parts[1:], self.max_bytes)
        except codec.DecodeError as e:
            self.malformed += 1
            log.warning("undecodable event on %s: %s", self.endpoint, e)
            return None
        topic = bytes(parts[0])
        key = (msg.sender, topic)
        last = self._last.get(key)
        if last is not None and msg.seq > last + 1:
            self.gaps += msg.seq - last - 1
        if last is None or msg.seq > last or msg.seq == 1:  # seq 1 again: the sender restarted
            self._last[key] = msg.seq
        return topic.decode(errors="replace"), msg

    def close(self) -> None:
        self.sock.close()


def handshake(pub: Publisher, sub: Subscriber, timeout: float) -> None:
    """Block until an event from `pub` comes back on `sub` through the proxy (or raise)."""
    nonce = os.urandom(6).hex()
    topic = f"bus.probe/{nonce}"
    sub.subscribe(topic)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            pub.publish("bus.probe", {"nonce": nonce}, key=nonce)
            end = min(deadline, time.monotonic() + 0.1)
            while (left := end - time.monotonic()) > 0:
                got = sub.recv(left)
                if got is not None and got[1].type == "bus.probe" and got[1].body.get("nonce") == nonce:
                    return
        raise BusUnavailable(f"{pub.sender}: no event proxy answered at {pub.endpoint} / "
                             f"{sub.endpoint} within {timeout:.1f}s (is the job's supervisor or "
                             f"`nexrl-bus proxy` running?)")
    finally:
        sub.unsubscribe(topic)


class EventProxy:
    """The XSUB/XPUB forwarder, on a thread of its own; `stop()` ends it cleanly."""

    def __init__(self, ctx: zmq.Context, frontend: str, backend: str, *, hwm: int = 100_000,
                 curve: CurveConfig | None = None):
        self._ctx = ctx
        self._xsub = make_socket(ctx, zmq.XSUB, bind=frontend, hwm=hwm, linger_ms=0, curve=curve)
        self._xpub = make_socket(ctx, zmq.XPUB, bind=backend, hwm=hwm, linger_ms=0, curve=curve)
        self.frontend, self.backend = bound_endpoint(self._xsub), bound_endpoint(self._xpub)
        self._ctl_addr = f"inproc://nexrl-proxy-{id(self)}"
        self._ctl = ctx.socket(zmq.PAIR)
        self._ctl.bind(self._ctl_addr)
        self._thread = threading.Thread(target=self._run, name="event-proxy", daemon=True)

    def start(self) -> "EventProxy":
        self._thread.start()
        return self

    def _run(self) -> None:
        ctl = self._ctx.socket(zmq.PAIR)
        ctl.connect(self._ctl_addr)
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, ctl)
        except zmq.ContextTerminated:
            pass
        finally:
            ctl.close(0)
            self._xsub.close(0)
            self._xpub.close(0)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._ctl.send(b"TERMINATE")
            self._thread.join(timeout)
        self._ctl.close(0)
