"""Request/reply over DEALER -> ROUTER with correlation ids, timeouts and retries.

    client (DEALER)                          server (ROUTER, in nexrl.node.Node)
    request(type, body) --[msg_id=m]-->      dedupe by (sender, m): first time -> handler
         waits <= timeout for reply_to=m     handler returns body, or DEFER and replies later
         no reply: resend the SAME m         a repeat of m gets the cached reply (or is ignored
         (retries times), then               while the first is still being handled)
         RequestTimeout naming the service
    <--[type=<request>.reply | error, reply_to=m]--

Replies to earlier attempts or other requests are discarded (counted). An `error` reply raises
`RemoteError` with the server's code and message. A `Client` is thread-safe (one request at a
time); `send`/`recv_reply` allow pipelining many requests on one socket (credit windows).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import zmq

from . import codec, schema
from .codec import Message
from .sockets import CurveConfig, make_socket, recv_frames, send_frames


class RequestTimeout(TimeoutError):
    """No reply in time (after retries); the text names the service, endpoint and request."""


class RemoteError(RuntimeError):
    """The server answered with an `error` reply."""

    def __init__(self, code: str, message: str, node: str, request_type: str | None):
        super().__init__(f"{node} refused {request_type}: [{code}] {message}")
        self.code, self.message, self.node, self.request_type = code, message, node, request_type


class Client:
    """A DEALER connected to one node's ROUTER (`endpoint`); `service` names it in errors."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, sender: str, service: str = "",
                 timeout: float = 10.0, retries: int = 2, hwm: int = 10_000,
                 linger_ms: int = 1_000, curve: CurveConfig | None = None,
                 max_bytes: int | None = None):
        self.endpoint, self.sender = endpoint, sender
        self.service = service or endpoint
        self.timeout, self.retries, self.max_bytes = timeout, retries, max_bytes
        self._sock = make_socket(ctx, zmq.DEALER, connect=endpoint, hwm=hwm,
                                 linger_ms=linger_ms, curve=curve)
        self._lock = threading.Lock()
        self._seq = 0
        self.discarded = 0  # replies that matched no outstanding request

    # -- pipelined primitives --------------------------------------------------------------

    def send(self, mtype: str, body: dict[str, Any], *, timeout: float | None = None,
             msg_id: str | None = None) -> tuple[str, list]:
        """Send one request without waiting for the reply; returns (msg_id, frames to resend)."""
        spec = schema.check_outgoing(mtype, body)
        if spec.kind != "request":
            raise schema.SchemaError("invalid_body", f"{mtype} is a {spec.kind}, not a request")
        self._seq += 1
        msg = codec.stamp(Message(mtype, body, msg_id=msg_id or ""), self.sender, self._seq)
        frames = codec.encode(msg)
        self._send_frames(frames, mtype, self.timeout if timeout is None else timeout)
        return msg.msg_id, frames

    def _send_frames(self, frames: list, mtype: str, timeout: float) -> None:
        if not self._sock.poll(int(timeout * 1000), zmq.POLLOUT):
            raise RequestTimeout(f"{self.sender}: cannot send {mtype} to {self.service} at "
                                 f"{self.endpoint}: no connection within {timeout:.1f}s "
                                 f"(is the node running?)")
        send_frames(self._sock, frames)

    def recv_reply(self, timeout: float) -> Message | None:
        """The next reply (any request), or None after `timeout` seconds."""
        if not self._sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return codec.decode(recv_frames(self._sock, 1), self.max_bytes)

    # -- one request, one reply ------------------------------------------------------------

    def request(self, mtype: str, body: dict[str, Any] | None = None, *,
                timeout: float | None = None, retries: int | None = None) -> Message:
        """Send `mtype` and wait for its reply; resend the same msg_id on timeout.

        Returns the reply message; raises RemoteError on an `error` reply and RequestTimeout
        when every attempt timed out (total wait ~ timeout * (retries + 1)).
        """
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        body = {} if body is None else body
        with self._lock:
            msg_id, frames = self.send(mtype, body, timeout=timeout)
            for attempt in range(retries + 1):
                if attempt:
                    self._send_frames(frames, mtype, timeout)
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    reply = self.recv_reply(left)
                    if reply is None:
                        break
                    if reply.reply_to != msg_id:
                        self.discarded += 1
                        continue
                    if reply.type == "error":
                        b = reply.body
                        raise RemoteError(str(b.get("code")), str(b.get("message")),
                                          str(b.get("node", reply.sender)), mtype)
                    schema.check_incoming(reply.type, reply.body)
                    return reply
            raise RequestTimeout(f"{self.sender}: no reply to {mtype} from {self.service} at "
                                 f"{self.endpoint} after {retries + 1} attempt(s) of {timeout:.1f}s")

    def close(self) -> None:
        self._sock.close()


class ReplyCache:
    """Server-side dedupe: remembers the last `size` requests by (sender, msg_id).

    A key maps to PENDING while its handler has not replied, then to the reply frames, which
    are re-sent if the same request arrives again (a client retry). Bounded: oldest first out.
    """

    PENDING = object()

    def __init__(self, size: int = 10_000):
        self.size = size
        self._d: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Any:
        return self._d.get(key)

    def put(self, key: tuple[str, str], value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)
