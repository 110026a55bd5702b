"""Events over PUB/SUB through one XSUB/XPUB proxy.

    node PUB --connect--> [XSUB  EventProxy  XPUB] <--connect-- SUB node / tool
              frames: [topic, header, *buffers], topic = type or type + "/" + key

Events are advisory (heartbeats, lifecycle, errors, metrics, weights.ready/live): work that
must not be lost travels by request/reply instead. So a publisher never blocks: when its
queue to the proxy is full the event is dropped and counted (`Publisher.dropped`; the PUB
runs with XPUB_NODROP so libzmq reports the full queue instead of dropping silently). The
proxy drops for a subscriber that reads too slowly rather than stall everyone; because every
event carries a per-(sender, topic) sequence number, the subscriber sees the hole
(`Subscriber.gaps`) wherever the loss happened.

Slow joiners: a SUB only receives what is published after its subscription reached the
publisher. `handshake` closes that window: it publishes `bus.probe` on a topic only this
participant subscribed to and waits until a probe comes back through the proxy. Events of
other topics that arrive meanwhile are kept (`Subscriber.pending`) and handed out first by
`Subscriber.recv`, so the handshake itself loses nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import zmq

from . import codec, schema
from .codec import Message
from .sockets import NOBLOCK, CurveConfig, bound_endpoint, make_socket, recv_frames, send_frames

log = logging.getLogger(__name__)

#: Events kept while a handshake runs (beyond this the oldest are dropped and counted).
PENDING_MAX = 10_000
#: (sender, topic) streams whose last seq a Subscriber remembers (oldest forgotten first).
STREAMS_MAX = 100_000


class BusUnavailable(ConnectionError):
    """The event proxy did not answer the readiness handshake in time."""


def topic_of(mtype: str, key: str | None = None) -> bytes:
    return (mtype if key is None else f"{mtype}/{key}").encode()


class Publisher:
    """A PUB connected to the proxy frontend. Thread-safe; `publish` never blocks.

    HWM `hwm` events; a full queue drops the event (counted in `dropped`); linger `linger_ms`.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, *, sender: str, hwm: int = 10_000,
                 linger_ms: int = 1_000, curve: CurveConfig | None = None):
        self.sender, self.endpoint = sender, endpoint
        self._sock = make_socket(ctx, zmq.PUB, connect=endpoint, hwm=hwm, linger_ms=linger_ms,
                                 curve=curve)
        self._lock = threading.Lock()
        self._seq: dict[bytes, int] = {}
        self.published = 0
        self.dropped = 0

    def publish(self, mtype: str, body: dict[str, Any], key: str | None = None) -> bool:
        """Publish an event; False if it was dropped because the send queue is full.

        Raises SchemaError (nothing sent) for an undeclared type or field.
        """
        spec = schema.check_outgoing(mtype, body)
        if spec.kind != "event":
            raise schema.SchemaError("invalid_body", f"{mtype} is a {spec.kind}, not an event")
        topic = topic_of(mtype, key)
        with self._lock:
            seq = self._seq.get(topic, 0) + 1
            self._seq[topic] = seq
            frames = codec.encode_fields(mtype, body, self.sender, codec.new_msg_id(), None, seq,
                                         time.time(), transient=True)
            try:
                send_frames(self._sock, frames, NOBLOCK, prefix=[topic], copy_header=True)
            except zmq.Again:
                self.dropped += 1
                return False
            self.published += 1
            return True

    def close(self, linger_ms: int | None = None) -> None:
        with self._lock:
            self._sock.close(linger_ms)


class Subscriber:
    """A SUB connected to the proxy backend, tracking per-(sender, topic) sequence gaps.

    RCVHWM `hwm` events (the proxy drops beyond it; `gaps` counts what went missing); linger 0.
    Counters: `gaps` (events known to be missing), `malformed` (events refused: undecodable,
    or a topic that does not match the header's type), `restarts` (a sender's seq went back).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, topics: tuple[str, ...] = ("",), *,
                 hwm: int = 100_000, linger_ms: int = 0, curve: CurveConfig | None = None,
                 max_bytes: int | None = None):
        self.endpoint, self.max_bytes = endpoint, max_bytes
        self.sock = make_socket(ctx, zmq.SUB, connect=endpoint, hwm=hwm, linger_ms=linger_ms,
                                curve=curve)
        for t in topics:
            self.subscribe(t)
        self._last: dict[tuple[str, bytes], int] = {}
        self._rcvtimeo = -2
        self.pending: deque[tuple[str, Message]] = deque()
        self.gaps = 0
        self.malformed = 0
        self.restarts = 0
        self.pending_dropped = 0
        self.last_error = ""          # why the last malformed event was refused
        self.last_code = "malformed"  # and its wire error code

    def subscribe(self, topic: str) -> None:
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())

    def unsubscribe(self, topic: str) -> None:
        self.sock.setsockopt(zmq.UNSUBSCRIBE, topic.encode())

    def recv(self, timeout: float | None = None) -> tuple[str, Message] | None:
        """Next (topic, event), or None when none arrived within `timeout` seconds (None:
        wait forever). Malformed events are counted and skipped, never returned."""
        if self.pending:
            return self.pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                ms = -1
            else:
                ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            if ms != self._rcvtimeo:
                self.sock.rcvtimeo = ms
                self._rcvtimeo = ms
            try:
                parts = recv_frames(self.sock, 2)
            except zmq.Again:
                return None
            got = self.decode(parts)
            if got is not None:
                return got

    def decode(self, parts: list) -> tuple[str, Message] | None:
        """(topic, event) from received parts; None (counted in `malformed`, reason in
        `last_error`) for an event that is not a valid message. Updates the gap counters."""
        try:
            if len(parts) < 2:
                raise codec.DecodeError("event without a header frame (only a topic)")
            msg = codec.decode(parts[1:], self.max_bytes)
            topic = bytes(parts[0])
            mtype = msg.type.encode()
            if topic != mtype and not (topic.startswith(mtype) and topic[len(mtype):len(mtype) + 1] == b"/"):
                raise codec.DecodeError(f"topic {topic[:80]!r} does not match the event type "
                                        f"{msg.type!r} (topic = type or type/key)")
        except codec.DecodeError as e:
            self.malformed += 1
            self.last_error, self.last_code = str(e), e.code
            log.debug("undecodable event on %s: %s", self.endpoint, e)
            return None
        key = (msg.sender, topic)
        last = self._last.get(key)
        seq = msg.seq
        if last is None:
            if len(self._last) >= STREAMS_MAX:
                del self._last[next(iter(self._last))]
        elif seq > last + 1:
            self.gaps += seq - last - 1
        elif seq <= last:
            self.restarts += 1  # the sender restarted (seq starts again at 1)
        self._last[key] = seq
        return topic.decode(errors="replace"), msg

    def keep(self, got: tuple[str, Message]) -> None:
        """Keep an event for a later `recv` (used while a handshake consumes the stream)."""
        if len(self.pending) >= PENDING_MAX:
            self.pending.popleft()
            self.pending_dropped += 1
        self.pending.append(got)

    def close(self) -> None:
        self.sock.close()


def handshake(pub: Publisher, sub: Subscriber, timeout: float) -> None:
    """Block until an event from `pub` comes back on `sub` through the proxy (or raise
    BusUnavailable). Other events received meanwhile stay in `sub.pending`."""
    nonce = os.urandom(6).hex()
    topic = f"bus.probe/{nonce}"
    sub.subscribe(topic)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            pub.publish("bus.probe", {"nonce": nonce}, key=nonce)
            end = min(deadline, time.monotonic() + 0.1)
            while (left := end - time.monotonic()) > 0:
                got = _recv_socket(sub, left)
                if got is None:
                    break
                if got[1].type == "bus.probe" and got[1].body.get("nonce") == nonce:
                    return
                sub.keep(got)
        raise BusUnavailable(f"{pub.sender}: no event proxy answered at {pub.endpoint} / "
                             f"{sub.endpoint} within {timeout:.1f}s (is the job's supervisor or "
                             f"`nexrl-bus proxy` running?)")
    finally:
        sub.unsubscribe(topic)


def _recv_socket(sub: Subscriber, timeout: float) -> tuple[str, Message] | None:
    """Like Subscriber.recv, but straight from the socket (never from `pending`)."""
    kept, sub.pending = sub.pending, deque()
    try:
        return sub.recv(timeout)
    finally:
        kept.extend(sub.pending)
        sub.pending = kept


class EventProxy:
    """The XSUB/XPUB forwarder, on a thread of its own; `stop()` ends it cleanly.

    HWM `hwm` per side; the XPUB drops for a subscriber whose queue is full (never blocks
    the bus); linger 0 (events are advisory).
    """

    def __init__(self, ctx: zmq.Context, frontend: str, backend: str, *, hwm: int = 100_000,
                 curve: CurveConfig | None = None):
        self._ctx = ctx
        self._xsub = make_socket(ctx, zmq.XSUB, bind=frontend, hwm=hwm, linger_ms=0, curve=curve)
        try:
            self._xpub = make_socket(ctx, zmq.XPUB, bind=backend, hwm=hwm, linger_ms=0, curve=curve)
        except zmq.ZMQError:
            self._xsub.close(0)
            raise
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
        """End the proxy thread and close its sockets (also when it never started)."""
        if self._thread.is_alive():
            self._ctl.send(b"TERMINATE")
            self._thread.join(timeout)
        elif self._thread.ident is None:
            self._xsub.close(0)
            self._xpub.close(0)
        self._ctl.close(0)
