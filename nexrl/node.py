"""The node runtime: one process, one role, a clear lifecycle, and a loop that never dies
from a message.

    starting --setup()--> ready --job.state=running (or node.start=now)--> running --main()-->
        draining (main returned, SIGTERM/SIGINT, node.drain) --> stopped    (or failed)

Threads of a node:

    loop thread (the one calling run())      worker thread              heartbeat thread
    polls ROUTER + SUB + wake pipe           setup(), then waits for    publishes node.heartbeat
    decodes, checks, dedupes, dispatches     the start, then main()     every interval_s
    handlers; sends replies; runs timers     (the role's own work)
    and call_soon() callbacks

Handlers run on the loop thread and should be quick; a handler that must wait (a long poll)
returns DEFER and answers later with `reply()` from any thread. A malformed message (random
bytes, wrong version, wrong field types, too large, unknown type) gets an `error` reply naming
what is wrong, an error event and a log line (rate-limited), and the loop goes on.

A role subclasses Node, sets `role` and `Config` (its config dataclass), and marks handlers:

    class Pool(Node):
        role = "pool"
        Config = PoolConfig

        @handles("batch.request")
        def on_batch_request(self, req: Request) -> dict | Deferred: ...
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import zmq

from .bus import codec, schema
from .bus.codec import Message
from .bus.events import Publisher, Subscriber, handshake
from .bus.reqrep import Client, ReplyCache
from .bus.sockets import bound_endpoint, make_socket, recv_frames, send_frames, stop_authenticators
from .config import NodeConfig

log = logging.getLogger("nexrl.node")

STATES = ("starting", "ready", "running", "draining", "stopped", "failed")


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


class _RateLimit:
    """At most `per_s` log lines / error events a second; counts the rest."""

    def __init__(self, per_s: int = 10):
        self.per_s, self.window, self.count, self.suppressed = per_s, 0, 0, 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self.window:
            self.window, self.count = now, 0
        self.count += 1
        if self.count > self.per_s:
            self.suppressed += 1
            return False
        return True


class Node:
    """Base class of every NexRL node; see the module docstring."""

    role: ClassVar[str] = "node"
    Config: ClassVar[type | None] = None
    #: Event topics (prefixes) this node subscribes to, besides job.state.
    SUBSCRIBE: ClassVar[tuple[str, ...]] = ()
    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._handlers = _collect_handlers(cls)

    def __init__(self, node_cfg: NodeConfig, cfg: Any = None):
        self.node_cfg, self.cfg = node_cfg, cfg
        self.name = node_cfg.name
        self.log = logging.getLogger(f"nexrl.{self.role}.{self.name}")
        self.state = "starting"
        self.started_at = time.time()
        self.stopping = threading.Event()      # set when the node should wind down
        self.job_running = threading.Event()   # set on job.state=running (or start=now)
        self.stats: dict[str, int] = dict(handled=0, errors=0, malformed=0, duplicates=0,
                                          unknown_type=0, reply_failures=0)
        self.exit_code = 0
        self.endpoint = ""
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._busy_since: float | None = None
        self._pending: dict[tuple[str, str], Request] = {}
        self._cache = ReplyCache()
        self._err_limit = _RateLimit()
        self._local = threading.local()
        self._clients: list[Client] = []   # every client of every thread, closed at shutdown
        self._stop_reason = ""
        self._worker: threading.Thread | None = None
        self._worker_done = threading.Event()
        self._drain_deadline: float | None = None

    # ------------------------------------------------------------------ hooks for roles

    def setup(self) -> None:
        """Build what the role needs (models, data) before it reports ready. Worker thread."""

    def main(self) -> None:
        """The role's work, on the worker thread, once the job runs. Returning ends the node
        (it drains and exits 0). Long loops must watch `self.stopping`. Default: serve until
        told to stop."""
        self.stopping.wait()

    def on_drain(self) -> None:
        """Called on the loop thread when the node starts draining: stop taking new work."""

    def teardown(self) -> None:
        """Release resources after the loop ended (loop thread)."""

    def stats_extra(self) -> dict[str, Any]:
        """Role-specific counters for node.status."""
        return {}

    # ------------------------------------------------------------------ facilities

    def publish(self, mtype: str, body: dict[str, Any], key: str | None = None) -> bool:
        """Publish an event (thread-safe, never blocks; False if dropped)."""
        return self._pub.publish(mtype, body, key)

    def client(self, peer: str) -> Client:
        """A request client for peer `peer` (a node name, or a role with exactly one node),
        one per calling thread so threads never wait on each other's requests."""
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if peer not in clients:
            name, endpoint = self.resolve_peer(peer)
            bus = self.node_cfg.bus
            clients[peer] = Client(self.ctx, endpoint, sender=self.name, service=name,
                                   timeout=bus.request_timeout_s, retries=bus.request_retries,
                                   hwm=bus.hwm, linger_ms=0, curve=bus.curve,
                                   max_bytes=bus.max_message_bytes)
            with self._calls_lock:
                self._clients.append(clients[peer])
        return clients[peer]

    def resolve_peer(self, peer: str) -> tuple[str, str]:
        """(name, endpoint) of a peer given by name or by role (must then be unique)."""
        peers = self.node_cfg.peers
        if peer in peers:
            return peer, peers[peer].endpoint
        same_role = [n for n, p in peers.items() if p.role == peer]
        if len(same_role) == 1:
            return same_role[0], peers[same_role[0]].endpoint
        known = ", ".join(f"{n} ({p.role})" for n, p in peers.items()) or "none"
        raise LookupError(f"{self.name}: no unique peer {peer!r} in the job's directory "
                          f"(known: {known}); is it in the placement?")

    def peers_of_role(self, role: str) -> list[str]:
        return sorted(n for n, p in self.node_cfg.peers.items() if p.role == role)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread (thread-safe)."""
        with self._calls_lock:
            self._calls.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is already awake

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread after `delay` seconds (thread-safe)."""
        when = time.monotonic() + delay
        self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._timer_seq), fn)))

    def reply(self, req: Request, body: dict[str, Any], mtype: str | None = None) -> None:
        """Answer a deferred request (thread-safe)."""
        self.call_soon(lambda: self._send_reply(req, body, mtype))

    def reply_error(self, req: Request, code: str, message: str) -> None:
        """Refuse a deferred request (thread-safe)."""
        self.call_soon(lambda: self._send_error(req.peer, req.msg.msg_id, code, message,
                                                req.msg.type, req.msg.sender))

    def request_stop(self, reason: str) -> None:
        """Begin draining (thread-safe, idempotent)."""
        self.call_soon(lambda: self._begin_drain(reason))

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run the node until it stops; returns the process exit code."""
        cfg, bus = self.node_cfg, self.node_cfg.bus
        self.ctx = zmq.Context()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._router = make_socket(self.ctx, zmq.ROUTER, bind=cfg.endpoint, hwm=bus.hwm,
                                   linger_ms=bus.linger_ms, curve=bus.curve)
        self.endpoint = bound_endpoint(self._router)
        self._pub = Publisher(self.ctx, bus.events_pub, sender=self.name, hwm=bus.hwm,
                              linger_ms=bus.linger_ms, curve=bus.curve)
        self._sub = Subscriber(self.ctx, bus.events_sub, ("job.state", *self.SUBSCRIBE),
                               curve=bus.curve, max_bytes=bus.max_message_bytes)
        self._install_signals()
        try:
            self.log.info("%s %s: waiting for the event proxy at %s", self.role, self.name,
                          bus.events_pub)
            handshake(self._pub, self._sub, bus.handshake_timeout_s)
            self.log.info("bus is live; serving requests at %s", self.endpoint)
            self._set_state("starting")
            if cfg.start == "now":
                self.job_running.set()
            self._hb_stop = threading.Event()
            self._hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._hb.start()
            self._worker = threading.Thread(target=self._worker_main, name="worker", daemon=True)
            self._worker.start()
            self._loop()
        except Exception as e:  # the bus itself failed: report and exit non-zero
            self.log.error("%s: %s", self.name, e)
            self.exit_code = 1
            self._stop_reason = self._stop_reason or str(e)
        finally:
            self._shutdown()
        return self.exit_code

    def _worker_main(self) -> None:
        try:
            self.setup()
            self.call_soon(lambda: self._set_state("ready"))
            waited = 0.0
            while not self.job_running.wait(1.0):
                if self.stopping.is_set():
                    return
                waited += 1.0
                if waited % 10 == 0:
                    self.log.info("waiting for job.state=running from the supervisor on %s "
                                  "(%.0fs); pass node.start=now to start without one",
                                  self.node_cfg.bus.events_sub, waited)
            if self.stopping.is_set():
                return
            self.call_soon(lambda: self._set_state("running"))
            self.main()
        except Exception as e:
            self.exit_code = 1
            self.log.error("%s failed: %s\n%s", self.name, e, traceback.format_exc())
            self._publish_error("fatal", f"{type(e).__name__}: {e}", fatal=True)
            self.call_soon(lambda: self._begin_drain(f"failed: {type(e).__name__}: {e}"))
        finally:
            self._worker_done.set()
            self.call_soon(lambda: self._begin_drain("work finished"))

    def _begin_drain(self, reason: str) -> None:
        if self.state in ("draining", "stopped", "failed"):
            return
        self._stop_reason = reason
        self.stopping.set()
        self._drain_deadline = time.monotonic() + self.node_cfg.drain_timeout_s
        self._set_state("draining", reason)
        try:
            self.on_drain()
        except Exception as e:
            self.log.error("on_drain failed: %s", e)

    def _set_state(self, state: str, reason: str = "") -> None:
        previous, self.state = self.state, state
        if previous != state or state == "starting":
            self.log.info("state %s -> %s%s", previous, state, f" ({reason})" if reason else "")
            body = dict(role=self.role, name=self.name, state=state, previous=previous)
            if reason:
                body["reason"] = reason
            self._pub.publish("node.lifecycle", body)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            with self._calls_lock:
                self._calls.append(lambda: self._begin_drain(name))
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _shutdown(self) -> None:
        try:
            self.teardown()
        except Exception as e:
            self.log.error("teardown failed: %s", e)
            self.exit_code = 1
        final = "failed" if self.exit_code else "stopped"
        if hasattr(self, "_hb_stop"):
            self._hb_stop.set()
        try:
            self._set_state(final, self._stop_reason)
            self._heartbeat()  # a last one, so watchers see the final state at once
        except zmq.ZMQError:
            pass
        for sock in (self._router, self._sub):
            sock.close()
        self._pub.close()
        with self._calls_lock:
            for c in self._clients:
                c.close()
        stop_authenticators()
        self.ctx.destroy(linger=self.node_cfg.bus.linger_ms)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat(self) -> None:
        busy = self._busy_since
        self._pub.publish("node.heartbeat", dict(
            role=self.role, name=self.name, host=socket.gethostname(), pid=os.getpid(),
            state=self.state, uptime_s=time.time() - self.started_at,
            interval_s=self.node_cfg.bus.heartbeat_interval_s,
            loop_lag_s=0.0 if busy is None else time.monotonic() - busy,
            endpoint=self.endpoint, dropped_events=self._pub.dropped))

    def _heartbeat_loop(self) -> None:
        interval = self.node_cfg.bus.heartbeat_interval_s
        while not self._hb_stop.is_set():
            self._heartbeat()
            self._hb_stop.wait(interval)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._sub.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            if self.stopping.is_set() and (self._worker_done.is_set() or
                                           time.monotonic() > (self._drain_deadline or 0)):
                if not self._worker_done.is_set():
                    self.log.error("main() did not return within drain_timeout_s=%.0fs; exiting",
                                   self.node_cfg.drain_timeout_s)
                    self.exit_code = 1
                return
            timeout = 1000 if not self._timers else max(0, int((self._timers[0][0] - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout))
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            self._run_calls()
            self._run_timers()
            if self._router in events:
                self._drain_socket(self._router, self._on_request_frames)
            if self._sub.sock in events:
                self._drain_socket(self._sub.sock, self._on_event_frames)

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            self._guarded(fn, "callback")

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            self._guarded(fn, "timer")

    def _guarded(self, fn: Callable[[], None], what: str) -> None:
        self._busy_since = time.monotonic()
        try:
            fn()
        except Exception as e:  # a role bug must not take the loop down
            self.stats["errors"] += 1
            self.log.error("%s raised: %s\n%s", what, e, traceback.format_exc())
            self._publish_error("handler_error", f"{what} raised {type(e).__name__}: {e}")
        finally:
            self._busy_since = None

    def _drain_socket(self, sock: zmq.Socket, on_frames: Callable[[list], None]) -> None:
        n_head = 2  # routing id + header (ROUTER) / topic + header (SUB)
        for _ in range(1000):  # then let the other sockets have a turn
            try:
                parts = recv_frames(sock, n_head, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._busy_since = time.monotonic()
            try:
                on_frames(parts)
            except Exception as e:  # last resort: a node never dies from a message
                self.stats["errors"] += 1
                self.log.error("internal error on a received message: %s\n%s", e,
                               traceback.format_exc())
            finally:
                self._busy_since = None

    def _on_request_frames(self, parts: list) -> None:
        peer = parts[0]
        try:
            if len(parts) < 2:
                raise codec.DecodeError("request has no header frame")
            msg = codec.decode(parts[1:], self.node_cfg.bus.max_message_bytes)
        except codec.DecodeError as e:
            self.stats["malformed"] += 1
            self._send_error(peer, None, e.code, str(e), None, peer.hex())
            return
        key = (msg.sender, msg.msg_id)
        cached = self._cache.get(key)
        if cached is not None:
            self.stats["duplicates"] += 1
            if cached is not ReplyCache.PENDING:
                self._send(peer, cached)
            return
        try:
            spec = schema.check_incoming(msg.type, msg.body)
            attr = self._handlers.get(msg.type)
            if spec.kind != "request" or attr is None:
                self.stats["unknown_type"] += 1
                what = f"a {spec.kind}, not a request" if spec.kind != "request" else "not handled here"
                raise schema.SchemaError("unknown_type", f"{msg.type} is {what} "
                                                         f"({self.role} {self.name})")
        except schema.SchemaError as e:
            self._send_error(peer, msg.msg_id, e.code, str(e), msg.type, msg.sender)
            return
        req = Request(msg, peer, spec.reply or f"{msg.type}.reply")
        self._cache.put(key, ReplyCache.PENDING)
        self.stats["handled"] += 1
        try:
            result = getattr(self, attr)(req)
        except HandlerError as e:
            self._send_error(peer, msg.msg_id, e.code, str(e), msg.type, msg.sender)
            return
        except Exception as e:
            self.log.error("handler of %s raised: %s\n%s", msg.type, e, traceback.format_exc())
            self._send_error(peer, msg.msg_id, "handler_error", f"{type(e).__name__}: {e}",
                             msg.type, msg.sender)
            return
        if result is not DEFER:
            self._send_reply(req, result or {})

    def _on_event_frames(self, parts: list) -> None:
        got = self._sub.decode(parts)
        if got is None:
            self.stats["malformed"] += 1
            return
        _, msg = got
        try:
            spec = schema.check_incoming(msg.type, msg.body)
        except schema.SchemaError as e:
            self.stats["malformed"] += 1
            if self._err_limit.allow():
                self.log.warning("ignored event from %s: %s", msg.sender, e)
            return
        attr = self._handlers.get(msg.type)
        if attr is not None and spec.kind == "event":
            self._guarded(lambda: getattr(self, attr)(msg), f"event handler of {msg.type}")

    def _send(self, peer: bytes, frames: list) -> bool:
        try:
            send_frames(self._router, frames, zmq.NOBLOCK, prefix=[peer])
            return True
        except (zmq.Again, zmq.ZMQError) as e:  # peer gone (ROUTER_MANDATORY) or queue full
            self.stats["reply_failures"] += 1
            if self._err_limit.allow():
                self.log.warning("cannot reply to peer %s: %s", peer.hex(), e)
            return False

    def _send_reply(self, req: Request, body: dict[str, Any], mtype: str | None = None) -> None:
        mtype = mtype or req.reply_type
        schema.check_outgoing(mtype, body)
        msg = Message(mtype, body, sender=self.name, msg_id=codec.new_msg_id(),
                      reply_to=req.msg.msg_id, seq=0, ts=time.time())
        frames = codec.encode(msg)
        self._cache.put((req.msg.sender, req.msg.msg_id), frames)
        self._send(req.peer, frames)

    def _send_error(self, peer: bytes, reply_to: str | None, code: str, message: str,
                    request_type: str | None, sender: str) -> None:
        self.stats["errors"] += 1
        body = dict(code=code, message=message, node=self.name, request_type=request_type)
        frames = codec.encode(Message("error", body, sender=self.name, msg_id=codec.new_msg_id(),
                                      reply_to=reply_to, ts=time.time()))
        if reply_to is not None:
            self._cache.put((sender, reply_to), frames)
        self._send(peer, frames)
        if self._err_limit.allow():
            self.log.warning("refused %s from %s: [%s] %s", request_type or "a message", sender,
                             code, message)
            self._publish_error(code, message, peer=sender, request_type=request_type)

    def _publish_error(self, code: str, message: str, **extra: Any) -> None:
        body = dict(node=self.name, role=self.role, code=code, message=message)
        body.update({k: v for k, v in extra.items() if v is not None or k == "request_type"})
        self._pub.publish("node.error", body)

    # ------------------------------------------------------------------ built-in handlers

    @handles("ping")
    def on_ping(self, req: Request) -> dict[str, Any]:
        """ping{payload?} -> ping.reply{payload?, state}."""
        out: dict[str, Any] = {"state": self.state}
        if "payload" in req.body:
            out["payload"] = req.body["payload"]
        return out

    @handles("node.status")
    def on_status(self, req: Request) -> dict[str, Any]:
        """node.status{} -> node.status.reply{role, name, host, pid, state, uptime_s, stats}."""
        stats: dict[str, Any] = dict(self.stats)
        stats.update(events_published=self._pub.published, events_dropped=self._pub.dropped,
                     event_gaps=self._sub.gaps)
        stats.update(self.stats_extra())
        return dict(role=self.role, name=self.name, host=socket.gethostname(), pid=os.getpid(),
                    state=self.state, uptime_s=time.time() - self.started_at, stats=stats)

    @handles("node.drain")
    def on_drain_request(self, req: Request) -> dict[str, Any]:
        """node.drain{reason?} -> node.drain.reply{state}; the node exits once drained."""
        self._begin_drain(req.body.get("reason") or f"node.drain from {req.msg.sender}")
        return {"state": self.state}

    @handles("job.state")
    def on_job_state(self, msg: Message) -> None:
        if msg.body.get("state") == "running":
            self.job_running.set()
        elif msg.body.get("state") in ("stopping", "done") and not self.stopping.is_set():
            self._begin_drain(f"job {msg.body.get('state')}: {msg.body.get('reason', '')}".strip(": "))


Node._handlers = _collect_handlers(Node)
