"""Request/reply over DEALER -> ROUTER with correlation ids, timeouts and retries.

    client (DEALER)                          server (ROUTER, in nexrl.node.Node)
    request(type, body) --[msg_id=m]-->      dedupe by (sender, m): first time -> handler
         waits <= timeout for reply_to=m     handler returns body, or DEFER and replies later
         no reply: resend the SAME m         a repeat of m gets the cached reply (or is ignored
         (retries times), then               while the first is still being handled)
         RequestTimeout naming the service
    <--[type=<request>.reply | error, reply_to=m]--

Replies to earlier attempts or other requests are discarded (counted). An `error` reply raises
`RemoteError` with the server's code and message. A `Client` is thread-safe for `request`
(one request at a time); `send`/`recv_reply` pipeline many requests on one socket (credit
windows) and belong to one thread.

Waiting uses the socket's own RCVTIMEO instead of a zmq.Poller per call: on the hot path a
reply costs one blocking recv (the GIL is released while waiting), nothing else.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import zmq

from . import codec, schema
from .codec import Message
from .sockets import NOBLOCK, CurveConfig, make_socket, recv_frames, send_frames


class RequestTimeout(TimeoutError):
    """No reply in time (after retries); the text names the service, endpoint and request."""


class RemoteError(RuntimeError):
    """The server answered with an `error` reply."""

    def __init__(self, code: str, message: str, node: str, request_type: str | None):
        super().__init__(f"{node} refused {request_type}: [{code}] {message}")
        self.code, self.message, self.node, self.request_type = code, message, node, request_type


class Client:
    """A DEALER connected to one node's ROUTER (`endpoint`); `service` names it in errors.

    timeout: seconds each attempt waits for its reply; retries: resends of the same msg_id
    after a timeout; max_bytes: largest reply accepted (None: no limit).
    """

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
        self._rcvtimeo = -2          # the RCVTIMEO now set on the socket (ms); -2: unknown
        self.discarded = 0           # replies that matched no outstanding request
        self.owner = threading.current_thread()   # the thread that made it (see Node._shutdown)
        self.oob_threshold = codec.OOB_THRESHOLD

    # -- pipelined primitives --------------------------------------------------------------

    def send(self, mtype: str, body: dict[str, Any], *, timeout: float | None = None,
             msg_id: str | None = None) -> str:
        """Send one request without waiting for the reply; returns its msg_id (pass it
        back as `msg_id` to send a retry: the same request, deduplicated by the server).

        Raises SchemaError (nothing sent) for an undeclared type/field, RequestTimeout when
        the message cannot be queued within `timeout` (no connection, or the queue is full).
        """
        spec = schema.check_outgoing(mtype, body)
        if spec.kind != "request":
            raise schema.SchemaError("invalid_body", f"{mtype} is a {spec.kind}, not a request")
        self._seq += 1
        msg_id = msg_id or codec.new_msg_id()
        frames = codec.encode_fields(mtype, body, self.sender, msg_id, None, self._seq,
                                     time.time(), self.oob_threshold, transient=True)
        timeout = self.timeout if timeout is None else timeout
        try:
            send_frames(self._sock, frames, NOBLOCK, copy_header=True)
            return msg_id
        except zmq.Again:
            pass
        # Not connected yet (IMMEDIATE) or the queue is full: wait for room, bounded.
        if not self._sock.poll(max(0, int(timeout * 1000)), zmq.POLLOUT):
            raise RequestTimeout(f"{self.sender}: cannot send {mtype} to {self.service} at "
                                 f"{self.endpoint}: no connection (or a full queue) within "
                                 f"{timeout:.1f}s (is the node running?)")
        send_frames(self._sock, frames, copy_header=True)
        return msg_id

    def recv_reply(self, timeout: float) -> Message | None:
        """The next reply (any request), or None after `timeout` seconds.

        Raises codec.DecodeError (naming the service) for a reply that is not a valid message.
        """
        ms = max(0, int(timeout * 1000 + 0.999))
        if ms != self._rcvtimeo:
            self._sock.rcvtimeo = ms
            self._rcvtimeo = ms
        try:
            frames = recv_frames(self._sock, 1)
        except zmq.Again:
            return None
        try:
            return codec.decode(frames, self.max_bytes)
        except codec.DecodeError as e:
            raise codec.DecodeError(f"{self.sender}: bad reply from {self.service} at "
                                    f"{self.endpoint}: {e}", e.code) from e

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
            msg_id = self.send(mtype, body, timeout=timeout)
            for attempt in range(retries + 1):
                if attempt:  # the same msg_id: the server runs the request at most once
                    self.send(mtype, body, timeout=timeout, msg_id=msg_id)
                deadline = time.monotonic() + timeout
                left = timeout  # the first wait: the whole timeout (RCVTIMEO stays as it was)
                while left > 0:
                    reply = self.recv_reply(left)
                    left = deadline - time.monotonic()
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

    def close(self, linger_ms: int | None = None) -> None:
        self._sock.close(linger_ms)

    @property
    def closed(self) -> bool:
        return self._sock.closed


def frames_nbytes(frames: list) -> int:
    """Bytes held by a message's frames (header bytes + out-of-band buffers)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


class ReplyCache:
    """Server-side dedupe: remembers the last `size` requests by (sender, msg_id).

    A key maps to PENDING while its handler has not replied, then to the reply frames, which
    are re-sent byte for byte if the same request arrives again (a client retry). Memory is
    bounded twice: at most `size` keys (oldest forgotten first) and at most `max_bytes` of
    reply frames (oldest replies first); a reply pushed out by the byte bound leaves an
    ANSWERED tombstone, so a late retry is refused (error code `timeout`) instead of running
    the handler a second time. A reply larger than `max_bytes` is never kept.
    """

    PENDING = object()
    ANSWERED = object()

    def __init__(self, size: int = 10_000, max_bytes: int = 64 << 20):
        self.size, self.max_bytes = size, max_bytes
        # In first-arrival order (OrderedDict: popping the oldest is O(1); a plain dict's
        # next(iter()) slows down as deleted slots pile up at its front).
        self._d: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._sized: OrderedDict[tuple[str, str], int] = OrderedDict()  # keys with frames -> bytes
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: tuple[str, str]) -> Any:
        return self._d.get(key)

    def put(self, key: tuple[str, str], value: Any) -> None:
        sized = self._sized
        if sized:
            old = sized.pop(key, None)
            if old is not None:
                self.nbytes -= old
        if value is not self.PENDING and value is not self.ANSWERED:
            n = len(value[0]) if len(value) == 1 else frames_nbytes(value)
            if n > self.max_bytes:
                value = self.ANSWERED
            else:
                sized[key] = n
                self.nbytes += n
                if self.nbytes > self.max_bytes:
                    self._shed_bytes()
        d = self._d
        d[key] = value
        if len(d) > self.size:
            self._shed_keys()

    def _shed_bytes(self) -> None:
        """Turn the oldest replies into tombstones until the frames fit in max_bytes."""
        sized, d = self._sized, self._d
        while self.nbytes > self.max_bytes:
            k, n = sized.popitem(last=False)
            self.nbytes -= n
            d[k] = self.ANSWERED

    def _shed_keys(self) -> None:
        """Forget the oldest keys until at most `size` remain."""
        d, sized = self._d, self._sized
        while len(d) > self.size:
            k, _ = d.popitem(last=False)
            n = sized.pop(k, None)
            if n is not None:
                self.nbytes -= n
