"""The message side of a node: receive, check, deduplicate, dispatch, answer, refuse.

Split out of nexrl/node.py (Node inherits `MessageHandling`) so each file reads start to
finish. What happens to one request, in order (the stages of proto/README.md section 6):

    recv [routing id, header, *buffers] -> codec.decode (too_large, malformed, bad_version)
      -> reply cache: a retry of a known (sender, msg_id)? re-send its reply; never run twice
      -> schema.check_incoming (unknown_type, invalid_body) -> a handler for this request?
      -> handler(req): a body -> reply now; DEFER -> Node.reply() later; HandlerError/raise
         -> `error` reply naming the cause
Every refusal for form is counted (`stats["malformed"]`, per code `refused_<code>`), logged
and published as `node.error` (both rate-limited); events get the same checks minus the reply.

Replies made while a burst of requests is drained are held and sent together: at the end of
the burst, every REPLY_BATCH replies, or before the next request once the oldest held reply
waited REPLY_HOLD_S. Each send that finds ZeroMQ's I/O thread asleep wakes it (a syscall and
a context switch); a batch wakes it once. Pipelined clients get ~10 % more throughput for it
(bench/bus.py). A lone request is answered at once (its burst is one message long); a
handler that takes long delays the replies held before it, one more reason for handlers
to be quick (long work answers later through DEFER).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from . import codec, schema
from .codec import Message
from .reqrep import ReplyCache
from .sockets import NOBLOCK, recv_frames, send_frames

POLLIN = int(zmq.POLLIN)
zmq_poll = zmq.zmq_poll
#: Requests every node answers in any state (see Node.SERVE_WHEN_READY_ONLY).
ALWAYS_SERVED = frozenset({"ping", "node.status", "node.drain"})
#: Replies held while draining a burst of requests: at most this many, this long (see above).
REPLY_BATCH = 16
REPLY_HOLD_S = 0.001
#: Codes of messages refused for their form (counted as malformed in `stats`).
BAD_INPUT_CODES = ("malformed", "bad_version", "too_large", "unknown_type", "invalid_body")


class Deferred:
    """Returned by a handler that will answer later with Node.reply()."""


DEFER = Deferred()


class HandlerError(Exception):
    """Raise in a handler to refuse a request with a specific wire error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Request:
    """A request being handled: the message and who to answer."""

    msg: Message
    peer: bytes              # ROUTER routing id of the requester
    reply_type: str

    @property
    def body(self) -> dict[str, Any]:
        return self.msg.body


def handles(mtype: str) -> Callable:
    """Mark a Node method as the handler of message type `mtype` (a request or an event)."""

    def mark(fn: Callable) -> Callable:
        fn._nexrl_handles = mtype
        return fn

    return mark


def _collect_handlers(cls: type) -> dict[str, str]:
    found: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        for attr, fn in vars(base).items():
            mtype = getattr(fn, "_nexrl_handles", None)
            if mtype:
                found[mtype] = attr
    return found


class MessageHandling:
    """Mixin for Node: everything between the sockets and the handlers (see module doc).

    Uses the Node's attributes: stats, log, name, role, node_cfg, _router, _bus_sub,
    _reply_cache, _deferred, _handlers, _bound, _err_limit, _busy_since, publish().
    """

    _held_replies: list[tuple[bytes, list]] | None = None  # during a drain (module docstring)
    _held_replies_since = 0.0

    def _drain_socket(self, sock: zmq.Socket, on_frames: Callable[[list], None],
                      hold_replies: bool = False) -> None:
        """Handle what `sock` holds (at most 1000 messages, then the other sockets and the
        timers get a turn). Poll said POLLIN. Whether more is waiting: after the first
        message a zero-timeout poll of this socket answers (~1 us), then non-blocking
        receives go on until one fails with EAGAIN (~3 us, pyzmq raises; once per burst).
        So a lone request pays the cheap check, a burst the failed receive once, instead of
        a check per message. hold_replies: the ROUTER's burst; its replies go out in
        batches (module docstring)."""
        if hold_replies:
            self._held_replies = []
        try:
            for i in range(1000):
                if i == 1 and not zmq_poll([(sock, POLLIN)], 0):
                    return
                try:
                    parts = recv_frames(sock, 2, NOBLOCK)  # routing id / topic + header
                except zmq.Again:
                    return
                now = self._busy_since = time.monotonic()
                if self._held_replies and now - self._held_replies_since > REPLY_HOLD_S:
                    self._send_held_replies()
                try:
                    on_frames(parts)
                except Exception as e:  # last resort: a node never dies from a message
                    self.stats["errors"] += 1
                    self.log.error("internal error on a received message: %s\n%s", e,
                                   traceback.format_exc())
                finally:
                    self._busy_since = None
        finally:
            if hold_replies:
                self._send_held_replies()
                self._held_replies = None

    def _send_held_replies(self) -> None:
        held, self._held_replies = self._held_replies, []
        for peer, frames in held:
            self._send_routed(peer, frames)

    def _refused(self, code: str, where: str) -> None:
        stats = self.stats
        stats["malformed"] += 1
        stats[where] += 1
        key = f"refused_{code}"
        stats[key] = stats.get(key, 0) + 1

    def _on_request_frames(self, parts: list) -> None:
        peer = parts[0]
        try:
            if len(parts) < 2:
                raise codec.DecodeError("request has no header frame")
            msg = codec.decode(parts[1:], self.node_cfg.bus.max_message_bytes)
        except codec.DecodeError as e:
            self._refused(e.code, "malformed_requests")
            self._send_error(peer, None, e.code, str(e), None, peer.hex())
            return
        key = (msg.sender, msg.msg_id)
        cached = self._reply_cache.get(key)
        if cached is not None:
            self._on_duplicate(peer, msg, cached)
            return
        try:
            spec = schema.check_incoming(msg.type, msg.body)
            attr = self._handlers.get(msg.type)
            if spec.kind != "request" or attr is None:
                what = f"a {spec.kind}, not a request" if spec.kind != "request" else "not handled here"
                raise schema.SchemaError("unknown_type", f"{msg.type} is {what} "
                                                         f"({self.role} {self.name})")
        except schema.SchemaError as e:
            self._refused(e.code, "malformed_requests")
            self._send_error(peer, msg.msg_id, e.code, str(e), msg.type, msg.sender)
            return
        if self.SERVE_WHEN_READY_ONLY and msg.type not in ALWAYS_SERVED and \
                self.state not in ("ready", "running"):
            self._send_error(peer, msg.msg_id, "not_ready",
                             f"{self.role} {self.name} is {self.state}; {msg.type} is served "
                             f"only when ready", msg.type, msg.sender, cache=False)
            return
        req = Request(msg, peer, spec.reply or f"{msg.type}.reply")
        self.stats["handled"] += 1
        handler = self._bound.get(attr)
        if handler is None:
            handler = self._bound[attr] = getattr(self, attr)
        try:
            result = handler(req)
        except HandlerError as e:
            self._send_error(peer, msg.msg_id, e.code, str(e), msg.type, msg.sender)
            return
        except Exception as e:
            self.log.error("handler of %s raised: %s\n%s", msg.type, e, traceback.format_exc())
            self._send_error(peer, msg.msg_id, "handler_error", f"{type(e).__name__}: {e}",
                             msg.type, msg.sender)
            return
        # No other message is handled while a handler runs (one loop thread), so the key
        # needs a PENDING mark only when the answer comes later.
        if result is DEFER:
            self._deferred[key] = req
            self._reply_cache.put(key, ReplyCache.PENDING)
        else:
            self._dispatch_finish(req, key, result or {}, None)

    def _on_duplicate(self, peer: bytes, msg: Message, cached: Any) -> None:
        """A retry of a request seen before: re-send its reply; never run the handler again."""
        self.stats["duplicates"] += 1
        if cached is ReplyCache.PENDING:
            return  # still being handled: its one reply will come
        if cached is ReplyCache.ANSWERED:
            self.stats["replies_expired"] += 1
            self._send_error(peer, msg.msg_id, "timeout",
                             f"{msg.type} {msg.msg_id} was answered before and its reply is no "
                             f"longer cached (the request is not run twice)", msg.type, msg.sender,
                             cache=False)
            return
        self._route_reply(peer, cached)

    def _on_event_frames(self, parts: list) -> None:
        sub = self._bus_sub
        got = sub.decode(parts)
        if got is None:
            self._refused(sub.last_code, "malformed_events")
            self._report_bad_event(sub.last_code, sub.last_error, None, None)
            return
        self._dispatch_event(*got)

    def _dispatch_event(self, topic: str, msg: Message) -> None:
        try:
            spec = schema.check_incoming(msg.type, msg.body)
            if spec.kind != "event":
                raise schema.SchemaError("unknown_type", f"{msg.type} is a {spec.kind}, not an event")
        except schema.SchemaError as e:
            self._refused(e.code, "malformed_events")
            self._report_bad_event(e.code, str(e), msg.sender, msg.type)
            return
        attr = self._handlers.get(msg.type)
        if attr is not None:
            self._run_guarded(lambda: getattr(self, attr)(msg), f"event handler of {msg.type}")

    def _report_bad_event(self, code: str, message: str, sender: str | None,
                          mtype: str | None) -> None:
        allowed, held = self._err_limit.allow()
        if held:
            self.log.warning("%d more refused messages were not logged", held)
        if allowed:
            self.log.warning("ignored an event from %s: [%s] %s", sender or "?", code, message)
            self._publish_error(code, f"event refused: {message}", peer=sender, request_type=mtype)

    def _route_reply(self, peer: bytes, frames: list) -> None:
        """Send a reply now, or hold it while a burst of requests is drained."""
        held = self._held_replies
        if held is None:
            self._send_routed(peer, frames)
            return
        if not held:
            self._held_replies_since = time.monotonic()
        held.append((peer, frames))
        if len(held) >= REPLY_BATCH:
            self._send_held_replies()

    def _send_routed(self, peer: bytes, frames: list) -> bool:
        try:
            send_frames(self._router, frames, NOBLOCK, prefix=[peer])
            return True
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or its queue is full (Again)
            self.stats["reply_failures"] += 1
            allowed, _ = self._err_limit.allow()
            if allowed:
                self.log.warning("cannot reply to peer %s: %s (the reply stays cached for a "
                                 "retry)", peer.hex(), e)
            return False

    def _send_reply(self, req: Request, body: dict[str, Any], mtype: str | None = None) -> None:
        """The answer to a deferred request (loop thread; Node.reply queues it here)."""
        key = (req.msg.sender, req.msg.msg_id)
        if key not in self._deferred:
            self.log.warning("a second reply to %s %s was ignored", req.msg.type, req.msg.msg_id)
            return
        self._dispatch_finish(req, key, body, mtype)

    def _dispatch_finish(self, req: Request, key: tuple[str, str], body: dict[str, Any],
                         mtype: str | None) -> None:
        """Encode, cache (for retries) and send the reply to `req`."""
        mtype = mtype or req.reply_type
        try:
            schema.check_outgoing(mtype, body)
            frames = codec.encode_fields(mtype, body, self.name, codec.new_msg_id(),
                                         req.msg.msg_id, 0, time.time())
        except (schema.SchemaError, codec.EncodeError) as e:  # a role bug: answer, then report
            self.log.error("reply to %s is invalid: %s", req.msg.type, e)
            self._send_error(req.peer, req.msg.msg_id, "handler_error",
                             f"the reply could not be sent: {e}", req.msg.type, req.msg.sender)
            return
        self._deferred.pop(key, None)
        self._reply_cache.put(key, frames)
        self._route_reply(req.peer, frames)

    def _refuse_deferred(self, req: Request, code: str, message: str) -> None:
        """An error answer to a deferred request (loop thread; Node.reply_error queues it)."""
        if (req.msg.sender, req.msg.msg_id) not in self._deferred:
            self.log.warning("a second answer to %s %s was ignored", req.msg.type, req.msg.msg_id)
            return
        self._send_error(req.peer, req.msg.msg_id, code, message, req.msg.type, req.msg.sender)

    def _send_error(self, peer: bytes, reply_to: str | None, code: str, message: str,
                    request_type: str | None, sender: str, *, cache: bool = True,
                    quiet: bool = False) -> None:
        self.stats["errors"] += 1
        body = dict(code=code, message=message, node=self.name, request_type=request_type)
        frames = codec.encode(Message("error", body, sender=self.name, msg_id=codec.new_msg_id(),
                                      reply_to=reply_to, ts=time.time()))
        if reply_to is not None:
            self._deferred.pop((sender, reply_to), None)
            if cache:
                self._reply_cache.put((sender, reply_to), frames)
        self._route_reply(peer, frames)
        allowed, held = self._err_limit.allow()
        if held:
            self.log.warning("%d more refused messages were not logged", held)
        if allowed and not quiet:
            self.log.warning("refused %s from %s: [%s] %s", request_type or "a message", sender,
                             code, message)
            self._publish_error(code, message, peer=sender, request_type=request_type)

    def _publish_error(self, code: str, message: str, **extra: Any) -> None:
        body = dict(node=self.name, role=self.role, code=code, message=message)
        body.update({k: v for k, v in extra.items() if v is not None or k == "request_type"})
        self.publish("node.error", body)
