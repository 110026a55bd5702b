"""The node runtime: one process, one role, a clear lifecycle, and a loop that never dies
from a message.

    starting --setup()--> ready --job.state=running (or node.start=now)--> running --main()-->
        draining (main returned, SIGTERM/SIGINT, node.drain, job.state stopping) --> stopped
    (failed instead of stopped when setup/main raised, the drain timed out, or the bus failed)

Threads of a node:

    loop thread (the one calling run())      worker thread              heartbeat thread
    polls ROUTER + SUB + wake pipe           setup(), then waits for    publishes node.heartbeat
    decodes, checks, dedupes, dispatches     the start, then main()     every interval_s, so a
    handlers; sends replies; runs timers     (the role's own work)      busy loop still beats
    and call_soon() callbacks                                           (loop_lag_s tells)

Handlers run on the loop thread and should be quick; a handler that must wait (a long poll)
returns DEFER and answers later with `reply()` from any thread. A malformed message (random
bytes, wrong version, wrong field types, too large, unknown type) gets an `error` reply naming
what is wrong (events: nobody to answer), a `node.error` event and a log line (both
rate-limited), and is counted in `stats`; the loop goes on.

Heartbeats carry the role's `activity()` (in-flight work) and `loop_lag_s` (how long the
loop has been stuck in one callback). When the loop starts, the objects alive then are frozen
out of the garbage collector's sight and young collections are made rarer (`_tune_gc`):
that takes GC pauses off the message path's tail latency.

Stopping: the first SIGTERM/SIGINT drains (main() should watch `self.stopping`); a second
one exits at once. If main() has not returned `drain_timeout_s` after draining began, the
node exits 1 with state failed; `hard_exit` then tells the caller (nexrl-node) to end the
process with os._exit, because the stuck worker thread may still hold sockets.

A role subclasses Node, sets `role` and `Config` (its config dataclass), and marks handlers:

    class Pool(Node):
        role = "pool"
        Config = PoolConfig

        @handles("batch.request")
        def on_batch_request(self, req: Request) -> dict | Deferred: ...
"""

from __future__ import annotations

import dis
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import types
from typing import Any, Callable, ClassVar

import zmq

from .bus import codec, schema
from .bus.codec import Message
from .bus.dispatch import (BAD_INPUT_CODES, DEFER, Deferred, HandlerError, MessageHandling,
                           Request, _collect_handlers, handles)
from .bus.events import BusUnavailable, Publisher, Subscriber, handshake
from .bus.loop import CallQueue, RateLimit, Timer, Timers, Wakeup, poll_ms
from .bus.reqrep import Client, ReplyCache
from .bus.sockets import bound_endpoint, make_socket, stop_authenticators
from .config import NodeConfig

log = logging.getLogger("nexrl.node")


STATES = ("starting", "ready", "running", "draining", "stopped", "failed")
__all__ = ["BAD_INPUT_CODES", "DEFER", "Deferred", "HandlerError", "Node", "Request", "STATES",
           "handles"]


class Node(MessageHandling):
    """Base class of every NexRL node; see the module docstring."""

    role: ClassVar[str] = "node"
    Config: ClassVar[type | None] = None
    #: Event topics (prefixes) this node subscribes to, besides job.state.
    SUBSCRIBE: ClassVar[tuple[str, ...]] = ()
    #: True: the role's requests get `not_ready` (not cached: a retry may succeed) until
    #: setup() is done, and again once draining; ping / node.status / node.drain always work.
    #: Default False: handlers are called in any state and decide themselves.
    SERVE_WHEN_READY_ONLY: ClassVar[bool] = False
    #: Reply cache bounds (dedupe of retried requests): keys, and bytes of reply frames.
    REPLY_CACHE_SIZE: ClassVar[int] = 10_000
    REPLY_CACHE_BYTES: ClassVar[int] = 64 << 20
    #: Private names of the runtime this class replaces on purpose (fault injection in
    #: tests); any other method or `self._x` reusing one of the runtime's names is refused.
    RUNTIME_OVERRIDES: ClassVar[tuple[str, ...]] = ()
    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        taken = (_private_names(cls, defined_only=True) & _base_private_names()
                 - set(cls.RUNTIME_OVERRIDES))
        if taken:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} defines {', '.join(sorted(taken))}, "
                            f"which the Node base class uses itself: rename "
                            f"{'it' if len(taken) == 1 else 'them'} (e.g. without the underscore), "
                            f"or list a deliberate override in RUNTIME_OVERRIDES")
        cls._handlers = _collect_handlers(cls)

    def __init__(self, node_cfg: NodeConfig, cfg: Any = None):
        self.node_cfg, self.cfg = node_cfg, cfg
        self.name = node_cfg.name
        self.log = logging.getLogger(f"nexrl.{self.role}.{self.name}")
        self.state = "starting"
        self.started_at = time.time()
        self.stopping = threading.Event()      # set when the node should wind down
        self.job_running = threading.Event()   # set on job.state=running (or start=now)
        self.stats: dict[str, int] = dict(
            handled=0, errors=0, duplicates=0, reply_failures=0, replies_expired=0,
            malformed=0, malformed_requests=0, malformed_events=0,
            **{f"refused_{c}": 0 for c in BAD_INPUT_CODES})
        self.exit_code = 0
        self.hard_exit = False     # True: threads still hold sockets; end with os._exit
        self.endpoint = ""
        self._wakeup = Wakeup()
        self._call_q = CallQueue(self._wakeup)
        self._timer_q = Timers(self._wakeup)
        self._signals: list[int] = []
        self._busy_since: float | None = None
        self._deferred: dict[tuple[str, str], Request] = {}
        self._bound: dict[str, Callable[[Request], Any]] = {}   # handler attr -> bound method
        self._reply_cache = ReplyCache(self.REPLY_CACHE_SIZE, self.REPLY_CACHE_BYTES)
        self._err_limit = RateLimit()
        self._local = threading.local()
        self._clients: list[Client] = []   # every client of every thread, closed at shutdown
        self._clients_lock = threading.Lock()
        self._drain_reason = ""
        self._worker_thread: threading.Thread | None = None
        self._worker_done = threading.Event()
        self._setup_started = False
        self._drain_deadline: float | None = None
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._bus_pub: Publisher | None = None
        self._bus_sub: Subscriber | None = None
        self._router: zmq.Socket | None = None

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
        """Release resources after the loop ended (loop thread); only if setup() started."""

    def stats_extra(self) -> dict[str, Any]:
        """Role-specific counters for node.status."""
        return {}

    def activity(self) -> dict[str, Any]:
        """In-flight work for the heartbeat's `activity` (e.g. {inflight: 3, doing: "generate"}).
        Called on the heartbeat thread every interval: read, do not mutate; keep it cheap."""
        return {}

    # ------------------------------------------------------------------ facilities

    def publish(self, mtype: str, body: dict[str, Any], key: str | None = None) -> bool:
        """Publish an event (thread-safe, never blocks; False if dropped or not yet on the bus)."""
        pub = self._bus_pub
        return pub.publish(mtype, body, key) if pub is not None else False

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
            with self._clients_lock:
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
        """Run `fn` on the loop thread, after the calls queued before it (thread-safe)."""
        self._call_q.put(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` on the loop thread after `delay` seconds (thread-safe); timers with the
        same due time run in the order they were made. Returns a handle with cancel()."""
        return self._timer_q.add(delay, fn)

    def reply(self, req: Request, body: dict[str, Any], mtype: str | None = None) -> None:
        """Answer a deferred request (thread-safe). A second answer to one request is ignored."""
        self.call_soon(lambda: self._send_reply(req, body, mtype))

    def reply_error(self, req: Request, code: str, message: str) -> None:
        """Refuse a deferred request (thread-safe). Ignored if it was answered already."""
        self.call_soon(lambda: self._refuse_deferred(req, code, message))

    def request_stop(self, reason: str) -> None:
        """Begin draining (thread-safe, idempotent)."""
        self.call_soon(lambda: self._begin_drain(reason))

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run the node until it stops; returns the process exit code."""
        cfg, bus = self.node_cfg, self.node_cfg.bus
        self.ctx = zmq.Context()
        try:
            bus.curve.check()
            self._router = make_socket(self.ctx, zmq.ROUTER, bind=cfg.endpoint, hwm=bus.hwm,
                                       linger_ms=bus.linger_ms, curve=bus.curve)
            self.endpoint = bound_endpoint(self._router)
            self._bus_pub = Publisher(self.ctx, bus.events_pub, sender=self.name, hwm=bus.hwm,
                                      linger_ms=bus.linger_ms, curve=bus.curve)
            self._bus_sub = Subscriber(self.ctx, bus.events_sub, ("job.state", *self.SUBSCRIBE),
                                       curve=bus.curve, max_bytes=bus.max_message_bytes)
        except (zmq.ZMQError, OSError) as e:
            self.log.error("%s %s cannot start its sockets: %s", self.role, self.name, e)
            self.exit_code, self.state = 1, "failed"
            self._close_all()
            return self.exit_code
        old_handlers = self._install_signals()
        try:
            self.log.info("%s %s: waiting for the event proxy at %s", self.role, self.name,
                          bus.events_pub)
            handshake(self._bus_pub, self._bus_sub, bus.handshake_timeout_s)
            self.log.info("bus is live; serving requests at %s", self.endpoint)
            self._publish_lifecycle("starting", "")
            if cfg.start == "now":
                self.job_running.set()
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                               daemon=True)
            self._hb_thread.start()
            self._worker_thread = threading.Thread(target=self._worker_main, name="worker",
                                                   daemon=True)
            self._worker_thread.start()
            self._run_loop()
        except Exception as e:  # the bus itself failed (e.g. no proxy): report, exit non-zero
            self.log.error("%s: %s", self.name, e, exc_info=not isinstance(e, BusUnavailable))
            self.exit_code = 1
            self._drain_reason = self._drain_reason or str(e)
        finally:
            self._node_shutdown()
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
        return self.exit_code

    def _worker_main(self) -> None:
        try:
            self._setup_started = True
            self.setup()
            self.call_soon(lambda: self._set_state("ready"))
            started = time.monotonic()
            next_note = 10.0
            while not self.job_running.wait(0.25):
                if self.stopping.is_set():
                    return
                if time.monotonic() - started >= next_note:
                    self.log.info("waiting for job.state=running from the supervisor on %s "
                                  "(%.0fs); pass node.start=now to start without one",
                                  self.node_cfg.bus.events_sub, next_note)
                    next_note += 10.0
            if self.stopping.is_set():
                return
            self.call_soon(lambda: self._set_state("running"))
            self.main()
        except Exception as e:
            self.exit_code = 1
            self.log.error("%s failed: %s\n%s", self.name, e, traceback.format_exc())
            self._publish_error("fatal", f"{type(e).__name__}: {e}", fatal=True)
            reason = f"failed: {type(e).__name__}: {e}"
            self.call_soon(lambda: self._begin_drain(reason))
        finally:
            self._worker_done.set()
            self.call_soon(lambda: self._begin_drain("work finished"))

    def _begin_drain(self, reason: str) -> None:
        if self.state in ("draining", "stopped", "failed"):
            return
        self._drain_reason = reason
        self.stopping.set()
        self._drain_deadline = time.monotonic() + self.node_cfg.drain_timeout_s
        self._set_state("draining", reason)
        try:
            self.on_drain()
        except Exception as e:
            self.log.error("on_drain failed: %s\n%s", e, traceback.format_exc())

    def _set_state(self, state: str, reason: str = "") -> None:
        """Move forward only (a `ready` queued by the worker must not undo a `draining` that a
        signal caused meanwhile); stopped and failed are final."""
        previous = self.state
        if previous in ("stopped", "failed") or STATES.index(state) <= STATES.index(previous):
            return
        self.state = state
        self._publish_lifecycle(state, previous, reason)

    def _publish_lifecycle(self, state: str, previous: str, reason: str = "") -> None:
        """node.lifecycle for one state change (`previous` is "" for the first, starting)."""
        self.log.info("state %s -> %s%s", previous or "(new)", state, f" ({reason})" if reason else "")
        body = dict(role=self.role, name=self.name, state=state, previous=previous)
        if reason:
            body["reason"] = reason
        self.publish("node.lifecycle", body)

    def _install_signals(self) -> dict[int, Any]:
        """SIGTERM/SIGINT -> drain (second one: exit now). The handler only records the
        signal and wakes the loop: no lock is taken inside a signal handler."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, _frame: Any) -> None:
            self._signals.append(signum)
            self._wakeup.wake()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _on_signals(self) -> bool:
        """Handle received signals on the loop thread; True when the node must exit now."""
        while self._signals:
            name = signal.Signals(self._signals.pop(0)).name
            if self.stopping.is_set():
                self.log.error("second %s while draining: exiting now", name)
                self.exit_code = 1
                self._drain_reason = f"{name} while draining ({self._drain_reason})"
                return True
            self._begin_drain(name)
        return False

    def _node_shutdown(self) -> None:
        if self._setup_started:
            try:
                self.teardown()
            except Exception as e:
                self.log.error("teardown failed: %s\n%s", e, traceback.format_exc())
                self.exit_code = 1
        for key, req in list(self._deferred.items()):  # nobody will answer them now
            self._send_error(req.peer, req.msg.msg_id, "not_ready",
                             f"{self.name} stopped before answering ({self._drain_reason})",
                             req.msg.type, req.msg.sender, quiet=True)
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(5.0)
        final = "failed" if self.exit_code else "stopped"
        if self._bus_pub is not None:
            self._set_state(final, self._drain_reason)
            self._publish_heartbeat()  # a last one, so watchers see the final state at once
        self._close_all()

    def _close_all(self) -> None:
        """Close sockets; terminate the context only when no other live thread holds one."""
        for sock in (self._router, self._bus_sub):
            if sock is not None:
                sock.close()
        if self._bus_pub is not None:
            self._bus_pub.close()
        me = threading.current_thread()
        stray = 0
        with self._clients_lock:
            for c in self._clients:
                if c.owner is me or not c.owner.is_alive():
                    c.close()
                else:
                    stray += 1
        worker = self._worker_thread
        if stray or (worker is not None and worker.is_alive()):
            self.hard_exit = True
            self.log.warning("%s: the worker thread or %d client(s) of other threads are still "
                             "running; the process must exit without waiting for them",
                             self.name, stray)
            # Terminate the context on a thread we do not wait for beyond the linger time:
            # it flushes what our closed sockets still hold (the final lifecycle event), while
            # sockets of the stuck threads would block it forever.
            term = threading.Thread(target=self.ctx.term, name="ctx-term", daemon=True)
            term.start()
            term.join(self.node_cfg.bus.linger_ms / 1000)
        else:
            stop_authenticators(self.ctx)
            self.ctx.destroy(linger=self.node_cfg.bus.linger_ms)
            self._wakeup.close()  # (left open otherwise: a live thread may still wake it)

    # ------------------------------------------------------------------ heartbeats

    def _publish_heartbeat(self) -> None:
        busy = self._busy_since
        pub = self._bus_pub
        body = dict(
            role=self.role, name=self.name, host=socket.gethostname(), pid=os.getpid(),
            state=self.state, uptime_s=time.time() - self.started_at,
            interval_s=self.node_cfg.bus.heartbeat_interval_s,
            loop_lag_s=0.0 if busy is None else max(0.0, time.monotonic() - busy),
            endpoint=self.endpoint, dropped_events=pub.dropped if pub is not None else 0)
        try:
            activity = self.activity()
        except Exception as e:  # a role bug must not stop the heartbeats
            activity = {"error": f"activity() raised {type(e).__name__}: {e}"}
            allowed, _ = self._err_limit.allow()
            if allowed:
                self.log.error("activity() raised: %s", e)
        if isinstance(activity, dict):
            body["activity"] = activity
        try:
            self.publish("node.heartbeat", body)
        except (schema.SchemaError, codec.EncodeError) as e:  # e.g. activity() returned junk
            body.pop("activity", None)
            self.log.error("heartbeat activity cannot travel: %s", e)
            self.publish("node.heartbeat", body)

    def _heartbeat_loop(self) -> None:
        interval = self.node_cfg.bus.heartbeat_interval_s
        while not self._hb_stop.is_set():
            self._publish_heartbeat()
            self._hb_stop.wait(interval)

    # ------------------------------------------------------------------ the loop

    @staticmethod
    def _tune_gc() -> None:
        """Fewer, cheaper garbage collections on the message path: what is alive when the
        loop starts (modules, config, sockets) leaves the collector's sight (gc.freeze), and
        young collections run every 10,000 allocations instead of 700 (a message makes a
        few dozen objects). Measured on the 2-core VM: round-trip p90 94 -> 58 us."""
        gc.freeze()
        g0, g1, g2 = gc.get_threshold()
        gc.set_threshold(max(g0, 10_000), g1, g2)

    def _run_loop(self) -> None:
        router, sub = self._router, self._bus_sub
        assert router is not None and sub is not None
        wake_fd = self._wakeup.fd
        items = [(router, zmq.POLLIN), (sub.sock, zmq.POLLIN), (wake_fd, zmq.POLLIN)]
        self._tune_gc()
        while sub.pending:  # events that arrived during the handshake
            self._dispatch_event(*sub.pending.popleft())
        while True:
            if self.stopping.is_set():
                if self._worker_done.is_set():
                    return
                if time.monotonic() >= (self._drain_deadline or 0.0):
                    self.log.error("main() did not return within drain_timeout_s=%.1fs of "
                                   "draining; exiting", self.node_cfg.drain_timeout_s)
                    self.exit_code = 1
                    self._drain_reason = (f"drain timeout ({self.node_cfg.drain_timeout_s:g}s) "
                                          f"after {self._drain_reason or 'stop'}")
                    return
            ready = [what for what, _ in zmq.zmq_poll(items, self._poll_timeout())]
            if wake_fd in ready:
                self._wakeup.drain()
            if self._signals and self._on_signals():
                return
            if len(self._call_q):
                for fn in self._call_q.take():
                    self._run_guarded(fn, "callback")
            if len(self._timer_q):
                for timer in self._timer_q.due(time.monotonic()):
                    self._run_guarded(timer.fn, "timer")
            if router in ready:
                self._drain_socket(router, self._on_request_frames, hold_replies=True)
            if sub.sock in ready:
                self._drain_socket(sub.sock, self._on_event_frames)

    def _poll_timeout(self) -> int:
        if len(self._call_q) or self._signals:
            return 0
        if not len(self._timer_q) and self._drain_deadline is None:
            return 1000  # nothing scheduled: wake at least once a second
        now = time.monotonic()
        wait = 1.0
        nxt = self._timer_q.next_delay(now) if len(self._timer_q) else None
        if nxt is not None:
            wait = min(wait, nxt)
        if self._drain_deadline is not None and self.stopping.is_set():
            wait = min(wait, max(0.0, self._drain_deadline - now))
        return poll_ms(wait)

    def _run_guarded(self, fn: Callable[[], None], what: str) -> None:
        self._busy_since = time.monotonic()
        try:
            fn()
        except Exception as e:  # a role bug must not take the loop down
            self.stats["errors"] += 1
            self.log.error("%s raised: %s\n%s", what, e, traceback.format_exc())
            self._publish_error("handler_error", f"{what} raised {type(e).__name__}: {e}")
        finally:
            self._busy_since = None

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
        pub, sub = self._bus_pub, self._bus_sub
        stats.update(events_published=pub.published if pub else 0,
                     events_dropped=pub.dropped if pub else 0,
                     event_gaps=sub.gaps if sub else 0,
                     reply_cache_entries=len(self._reply_cache),
                     reply_cache_bytes=self._reply_cache.nbytes,
                     deferred=len(self._deferred),
                     # roles that do not need torch must not import it: visible here
                     torch_imported="torch" in sys.modules)
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


def _private_names(cls: type, defined_only: bool = False) -> set[str]:
    """Private names (`_x`, not `__x__`) of `cls` itself: its methods and class attributes, and
    the names its functions (nested ones too) use, or with defined_only the attributes they
    assign. Read from the compiled code (no source needed): ~0.1 ms for the names used, a few
    ms for the assignments of a large role class."""
    names = set(vars(cls))
    todo = []
    for v in vars(cls).values():
        v = getattr(v, "__func__", v)  # staticmethod / classmethod
        fns = (v.fget, v.fset, v.fdel) if isinstance(v, property) else (v,)
        todo += [f.__code__ for f in fns if hasattr(f, "__code__")]
    while todo:
        code = todo.pop()
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        if defined_only:
            names.update(i.argval for i in dis.get_instructions(code) if i.opname == "STORE_ATTR")
        else:
            names.update(code.co_names)
    return {x for x in names if isinstance(x, str) and x.startswith("_") and not x.startswith("__")}


_BASE_PRIVATE: set[str] = set()


def _base_private_names() -> set[str]:
    """What Node and MessageHandling use privately: a role that defines one of these names
    would silently replace a piece of the runtime (it happened: `_finish`, `_bound`)."""
    if not _BASE_PRIVATE:
        _BASE_PRIVATE.update(_private_names(Node) | _private_names(MessageHandling))
    return _BASE_PRIVATE
