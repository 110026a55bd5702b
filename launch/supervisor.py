"""The supervisor: start the plan's nodes, wait until all are ready, watch them, stop in order.

    launch:    event proxy up -> handshake -> spawn every node (placement order; external nodes:
               print the nexrl-node command) -> job.state=starting every second
    ready:     every node reported ready (lifecycle/heartbeat, a 200 from its URL, or just its
               process for `ready: process`) -> job.state=running (nodes start their work)
               a node not ready within its ready_timeout_s fails the launch (name + log tail)
    supervise: process exit (watchdog status) | heartbeats silent for `liveness` intervals
               -> exit 0: the node is done | otherwise: restart per policy (backoff doubling)
               or stop the job with the node's name, the cause and the tail of its log
    complete:  all `completes_job` nodes exited 0 (or, with none marked, every spawned node)
    shutdown:  (completion, failure, Ctrl-C/SIGTERM, launcher error) for each node in reverse
               start order: node.drain -> wait drain_timeout_s -> SIGTERM -> wait
               term_timeout_s -> SIGKILL of its whole tree; then job.state=stopping/done,
               proxy down. A second Ctrl-C skips the waits.
    requests:  the supervisor's ROUTER (nexrl.launch.control) takes job.stop from any node (the
               tracker's error policy) -> shutdown as above, exit 1 if it says failed

Why `job.state=stopping` is published only after the ordered drain: `nexrl.node.Node` drains
at once on job.state=stopping, so publishing it first would drain every node together and
lose the order (consumers before producers). During the ordered drain the periodic job.state
pauses; afterwards `stopping` and `done` reach nodes the launcher does not know (started by
hand without a placement entry).

Exit codes: 0 job complete (or job.stop with failed=false), 1 a node failed past its policy,
job.stop with failed=true, or the launcher failed; 130/143 stopped by SIGINT/SIGTERM. `<run_dir>/state.json` always holds the current view
(job state, per-node phase, pids, restarts), rewritten atomically on change.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
import traceback
from typing import Any

import zmq

from nexrl.bus.events import EventProxy, Publisher, Subscriber, handshake
from nexrl.bus.liveness import Liveness
from nexrl.bus.reqrep import Client, RequestTimeout
from nexrl.config import BusConfig, merge, to_object

from .control import ControlSocket
from .logs import Console, NodeLog, format_progress
from .noderun import LIVE, NodeRun, join_command, spawn_spec, watch_http, write_json
from .placement import bus_settings
from .remote import kill_tree, set_subreaper
from .resolve import Plan
from .spawn import signal_name, spawn


class Supervisor:
    """Runs one job from its plan; `run()` returns the launcher's exit code."""

    def __init__(self, plan: Plan, console: Console, remote_files: dict[str, str]):
        self.plan, self.console, self.remote_files = plan, console, remote_files
        p = plan.placement
        self.job = p.job
        self.bus: BusConfig = to_object(merge(BusConfig, bus_settings(p), {
            "events_pub": plan.events_pub, "events_sub": plan.events_sub}))
        console.width = max([6, *(len(i.name) for i in plan.instances)])
        logs = os.path.join(plan.run_dir, "logs")
        self.runs = [NodeRun(i, NodeLog(console, i.name, os.path.join(logs, f"{i.name}.log"), k))
                     for k, i in enumerate(plan.instances)]
        self.by_name = {r.name: r for r in self.runs}
        self.liveness = Liveness(self.bus.liveness)
        self.job_state = "starting"
        self.stop_reason, self.exit_code = "", 0
        self.shutting_down, self.hurry = False, False
        self.pids: list[int] = []         # every local process ever spawned
        self._signal: int | None = None
        self._stop_http = threading.Event()
        self._dirty = True
        self._next_publish = 0.0
        self._progress_at, self._last_progress = 0.0, None
        self.ctx: zmq.Context | None = None
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ top level

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        set_subreaper()  # orphans of a node whose watchdog died come back to us (final sweep)
        try:
            self._start_bus()
            for r in self.runs:
                if r.external:
                    r.phase, r.since = "starting", time.monotonic()
                    r.deadline = r.since + r.inst.ready_timeout_s
                    self.console.say(f"external node {r.name}: start it with\n"
                                     f"    {join_command(self.plan, r.inst)}")
                else:
                    self._start(r)
            while not self.stop_reason:
                self._tick()
        except Exception as e:  # a launcher bug or a bus failure: stop everything, say why
            self.console.say(traceback.format_exc().rstrip())
            self._stop(f"launcher error: {type(e).__name__}: {e}", 1)
        finally:
            self._shutdown()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only flags here: printing from a handler could deadlock on the console lock.
        if self._signal is not None or self.shutting_down:
            self.hurry = True
        self._signal = signum

    def _check_signal(self) -> None:
        if self._signal is not None and not self.stop_reason:
            name = signal.Signals(self._signal).name
            self._stop(f"interrupted by {name}", 130 if self._signal == signal.SIGINT else 143)

    def _start_bus(self) -> None:
        self.ctx = zmq.Context()
        curve = self.bus.curve
        self.proxy = EventProxy(self.ctx, self.plan.events_pub, self.plan.events_sub,
                                curve=curve).start()
        self.control = ControlSocket(self.ctx, self.plan.supervisor, self._on_job_stop,
                                     lambda: "stopping" if self.stop_reason else self.job_state,
                                     curve=curve)
        self.pub = Publisher(self.ctx, self.plan.events_pub, sender="supervisor",
                             hwm=self.bus.hwm, linger_ms=0, curve=curve)
        topics = ["node.heartbeat", "node.lifecycle", "node.error"]
        if not any(p["role"] == "tracker" for p in self.plan.directory.values()):
            topics.append("metrics")  # no tracker to print progress: the launcher does
        self.sub = Subscriber(self.ctx, self.plan.events_sub, tuple(topics), curve=curve)
        handshake(self.pub, self.sub, self.bus.handshake_timeout_s)
        self.console.say(f"event proxy up: publish to {self.plan.events_pub}, subscribe at "
                         f"{self.plan.events_sub}")
        self._publish_state()

    # ------------------------------------------------------------------ the loop

    def _tick(self, timeout: float = 0.2) -> None:
        self._pump(timeout)
        self._check_signal()
        now = time.monotonic()
        for r in self.runs:
            if not self.stop_reason:
                self._check(r, now)
        if not self.stop_reason:
            if self.job_state == "starting" and all(r.phase in ("up", "done") for r in self.runs):
                self.job_state = "running"
                self.console.say(f"all {len(self.runs)} nodes ready after {now - self.t0:.1f}s; "
                                 f"job running")
                self._publish_state()
            self._check_complete()
        if now >= self._next_publish and not self.shutting_down:
            self._publish_state()
        if self._dirty:
            self._write_state()

    def _pump(self, timeout: float) -> None:
        """Wait up to `timeout` s for bus events and handle all that are queued (process exits
        are checked by the caller every tick, i.e. within ~0.2 s)."""
        poller = zmq.Poller()
        poller.register(self.sub.sock, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        ready = dict(poller.poll(int(timeout * 1000)))
        if self.control.sock in ready:
            self.control.handle_ready()
            for err in self.control.errors:
                self.console.say(f"supervisor socket: {err}")
            self.control.errors.clear()
        if self.sub.sock not in ready:
            return
        for _ in range(10_000):
            got = self.sub.recv(0)
            if got is None:
                return
            self._on_event(got[1].type, got[1].body)

    def _on_event(self, mtype: str, body: dict[str, Any]) -> None:
        if mtype == "metrics":
            self._on_metrics(body)
            return
        r = self.by_name.get(str(body.get("name") or body.get("node") or ""))
        if r is None:
            return  # a node or tool the placement does not know
        state = body.get("state", "")
        if mtype == "node.heartbeat":
            if r.phase not in LIVE or state in ("stopped", "failed"):
                return  # the last words of a process that has already ended
            self.liveness.beat(r.name, body)
            if r.node_pid != body.get("pid"):
                r.node_pid, self._dirty = body.get("pid"), True
            r.node_state = state
            if state in ("ready", "running"):
                self._mark_up(r)
        elif mtype == "node.lifecycle":
            if r.phase not in LIVE:
                return
            r.node_state, self._dirty = state, True
            if state in ("ready", "running"):
                self._mark_up(r)
            elif state == "failed" and body.get("reason"):
                r.reported = r.reported or str(body["reason"])
            if r.external and state in ("stopped", "failed"):
                self.liveness.forget(r.name)
                if state == "stopped":
                    self._set_phase(r, "done")
                    self.console.say(f"external node {r.name} finished")
                else:
                    self._external_lost(r, f"failed ({r.reported})" if r.reported else "failed")
        elif mtype == "node.error" and body.get("fatal"):
            r.reported = str(body.get("message", ""))

    def _on_job_stop(self, sender: str, reason: str, failed: bool) -> None:
        """job.stop from a node (e.g. the tracker's error policy): stop in order."""
        self._stop(f"{sender} asked to stop the job: {reason}", 1 if failed else 0,
                   self.by_name.get(sender) if failed else None)

    def _on_metrics(self, body: dict[str, Any]) -> None:
        """Train metrics as one progress line, at most every 2 s (only when the job has no
        tracker: the tracker prints a richer line of its own)."""
        line = format_progress(body)
        now = time.monotonic()
        if line and line != self._last_progress and now - self._progress_at >= 2.0:
            self._progress_at, self._last_progress = now, line
            self.console.say(line)

    def _check(self, r: NodeRun, now: float) -> None:
        if r.phase == "backoff" and now >= r.deadline:
            self._start(r)
            return
        if r.phase not in LIVE:
            return
        if r.proc is not None:
            rc = r.proc.poll()
            if rc is not None:
                self._exited(r, rc)
                return
        if r.phase == "starting":
            if r.inst.ready == "process" or (r.http_ok is not None and r.http_ok.is_set()):
                self._mark_up(r)
            elif now > r.deadline:
                self._not_ready(r)
                return
        if r.name in self.liveness.peers and not self.liveness.is_alive(r.name, now):
            peer = self.liveness.peers[r.name]
            self.liveness.forget(r.name)
            cause = (f"went silent: no heartbeat for {peer.age(now):.1f}s (liveness "
                     f"{self.liveness.liveness} x {peer.interval_s:g}s)")
            if r.external:
                self._external_lost(r, cause)
            elif r.proc is not None:
                r.killed_for = cause
                self.console.say(f"node {r.name} {cause}; killing its process tree")
                r.proc.kill(grace_s=1.0)

    def _set_phase(self, r: NodeRun, phase: str) -> None:
        r.phase, r.since, self._dirty = phase, time.monotonic(), True

    def _mark_up(self, r: NodeRun) -> None:
        if r.phase != "starting":
            return
        self.console.say(f"node {r.name} ready ({time.monotonic() - r.since:.1f}s)")
        self._set_phase(r, "up")
        if self.job_state == "running" and not self.shutting_down:
            self._publish_state()  # a restarted node starts work without waiting a second

    def _start(self, r: NodeRun) -> None:
        inst, now = r.inst, time.monotonic()
        spec = spawn_spec(self.plan, inst, self.remote_files)
        policy = inst.entry.restart
        what = f"start #{r.starts + 1}"
        if r.restarts:
            what += f" (restart {r.restarts} of {policy.max_restarts})"
        r.log.mark(f"{what} on {inst.host.name}: {shlex.join(inst.argv)}")
        r.node_pid, r.node_state, r.killed_for, r.reported = None, "", "", ""
        try:
            r.proc = spawn(spec)
        except OSError as e:
            self._set_phase(r, "starting")
            self._failed(r, f"could not be started: {e}")
            return
        r.log.attach(r.proc.stdout)
        self.pids.append(r.proc.pid)
        r.starts += 1
        self._set_phase(r, "starting")
        r.deadline = now + inst.ready_timeout_s
        if inst.ready.startswith(("http://", "https://")):
            r.http_ok = watch_http(inst.ready, self._stop_http)

    # ------------------------------------------------------------------ failures

    def _exited(self, r: NodeRun, rc: int) -> None:
        assert r.proc is not None
        r.proc.kill(grace_s=1.0)   # reaps it; anything it left behind goes too
        r.log.flush(1.0)
        self.liveness.forget(r.name)
        r.exit_code, self._dirty = rc, True
        if rc == 0 and not r.killed_for:
            self._set_phase(r, "done")
            self.console.say(f"node {r.name} finished (exit 0)")
        else:
            cause = r.killed_for or signal_name(rc) + (f" ({r.reported})" if r.reported else "")
            self._failed(r, cause)

    def _failed(self, r: NodeRun, cause: str) -> None:
        policy = r.inst.entry.restart
        if policy.policy == "on-failure" and r.restarts < policy.max_restarts and not self.stop_reason:
            delay = min(policy.backoff_s * 2 ** r.restarts, policy.backoff_max_s)
            r.restarts += 1
            self._set_phase(r, "backoff")
            r.deadline = time.monotonic() + delay
            self.console.say(f"node {r.name} {cause}; restarting in {delay:.1f}s "
                             f"(restart {r.restarts} of {policy.max_restarts})")
            return
        self._set_phase(r, "failed")
        why = ("restart policy: never" if policy.policy == "never"
               else f"no restarts left: {policy.max_restarts} used")
        self._stop(f"node {r.name} {cause} ({why})", 1, r)

    def _not_ready(self, r: NodeRun) -> None:
        t = r.inst.ready_timeout_s
        if r.external:
            self._set_phase(r, "failed")
            self._stop(f"external node {r.name} did not join within {t:.0f}s; start it with: "
                       f"{join_command(self.plan, r.inst)}", 1)
            return
        seen = f"last state: {r.node_state}" if r.node_state else "no heartbeat seen"
        cause = f"did not become ready within {t:g}s ({seen})"
        if self.job_state == "starting":  # the launch fails; no restart hides a broken start
            assert r.proc is not None
            r.proc.kill(grace_s=1.0)
            r.log.flush(1.0)
            self._set_phase(r, "failed")
            self._stop(f"node {r.name} {cause}", 1, r)
        elif r.proc is not None:
            r.killed_for = cause
            r.proc.kill(grace_s=1.0)

    def _external_lost(self, r: NodeRun, cause: str) -> None:
        r.deadline = time.monotonic() + r.inst.ready_timeout_s
        self._set_phase(r, "starting")
        self.console.say(f"external node {r.name} {cause}; waiting {r.inst.ready_timeout_s:.0f}s "
                         f"for it to rejoin:\n    {join_command(self.plan, r.inst)}")

    def _stop(self, reason: str, code: int, r: NodeRun | None = None) -> None:
        if self.stop_reason:
            return
        self.stop_reason, self.exit_code, self._dirty = reason, code, True
        self.console.say(f"stopping the job: {reason}")
        if r is not None:
            tail = r.log.tail(20)
            self.console.say(f"last lines of {r.log.path}:\n" +
                             "\n".join("    " + ln for ln in (tail or "(empty)").splitlines()))

    def _check_complete(self) -> None:
        if self.job_state != "running":
            return
        marked = [r for r in self.runs if r.inst.entry.completes_job]
        if marked and all(r.phase == "done" for r in marked):
            self._stop(f"job complete ({', '.join(r.name for r in marked)} finished)", 0)
        elif not marked and all(r.phase == "done" for r in self.runs):
            self._stop("job complete (every node finished)", 0)

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        self.shutting_down = True
        self._stop_http.set()
        reason = self.stop_reason or "launcher exiting"
        try:
            for r in reversed(self.runs):
                self._stop_run(r, reason)
            if self.ctx is not None and hasattr(self, "sub"):
                for state in ("stopping", "done"):
                    self.job_state = state
                    self._publish_state(reason)
                    self._pump(0.1)
        finally:
            for r in self.runs:  # whatever happened above, nothing stays behind
                if r.proc is not None:
                    r.proc.kill(grace_s=1.0)
                    if r.phase in LIVE:
                        self._set_phase(r, "stopped")
                r.log.close()
            kill_tree(os.getpid(), include_root=False)  # orphans re-parented to us, if any
            if self.ctx is not None:
                for name in ("pub", "sub", "control"):
                    if hasattr(self, name):
                        getattr(self, name).close()
                if hasattr(self, "proxy"):
                    self.proxy.stop()
                self.ctx.destroy(linger=0)
            self._write_state()
            verdict = "complete" if self.exit_code == 0 else f"stopped (exit code {self.exit_code})"
            self.console.say(f"job {verdict}: {reason}")

    def _wait_exit(self, r: NodeRun, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.hurry and time.monotonic() < deadline:
            if r.proc is not None and r.proc.poll() is not None:
                return True
            if r.proc is None and not self.liveness.is_alive(r.name):
                return True
            if self.ctx is not None and hasattr(self, "sub"):
                self._pump(0.1)
            else:
                time.sleep(0.1)
            self._check_signal()
        return r.proc is not None and r.proc.poll() is not None

    def _drain(self, r: NodeRun, reason: str) -> Client | None:
        """Send node.drain without waiting for the reply: the node's exit is the answer we
        wait for (a reply sent just before the node closes its socket can be lost with the
        connection; see ZMQ_IMMEDIATE in nexrl/bus/sockets.py)."""
        if self.ctx is None or self.hurry:
            return None
        client = Client(self.ctx, r.inst.endpoint, sender="supervisor", service=r.name, timeout=1.0,
                        retries=0, linger_ms=0)
        try:
            client.send("node.drain", {"reason": reason})
            return client
        except RequestTimeout as e:
            self.console.say(f"node {r.name}: cannot send node.drain ({e})")
            client.close()
            return None

    def _drained(self, r: NodeRun, reason: str) -> bool:
        """node.drain, then wait for the node to go; False if it is still there."""
        client = self._drain(r, reason)
        if client is None:
            return False
        try:
            if self._wait_exit(r, self.job.drain_timeout_s):
                return True
            acked = client.recv_reply(0) is not None
            self.console.say(f"node {r.name} did not exit within {self.job.drain_timeout_s:g}s of "
                             f"node.drain ({'acknowledged' if acked else 'no reply'})")
            return False
        finally:
            client.close()

    def _stop_run(self, r: NodeRun, reason: str) -> None:
        if r.proc is None or r.proc.poll() is not None:
            if r.external and r.phase in LIVE and self.liveness.is_alive(r.name):
                if not self._drained(r, reason):
                    self.console.say(f"external node {r.name} is still running; stop it by hand")
            return
        if r.on_bus and r.phase in LIVE and self._drained(r, reason):
            return
        r.proc.terminate()
        if self._wait_exit(r, self.job.term_timeout_s):
            return
        self.console.say(f"node {r.name} still running {self.job.term_timeout_s:g}s after "
                         f"SIGTERM; SIGKILL of its process tree")
        r.proc.kill(grace_s=1.0)

    # ------------------------------------------------------------------ job.state, state.json

    def _publish_state(self, reason: str = "") -> None:
        body: dict[str, Any] = {"state": self.job_state, "run_dir": self.plan.run_dir}
        if reason:
            body["reason"] = reason
        self.pub.publish("job.state", body)
        self._next_publish = time.monotonic() + 1.0

    def _write_state(self) -> None:
        self._dirty = False
        write_json(os.path.join(self.plan.run_dir, "state.json"), dict(
            job=self.job_state if not self.stop_reason or self.shutting_down else "stopping",
            reason=self.stop_reason, exit_code=self.exit_code if self.stop_reason else None,
            launcher_pid=os.getpid(), events_pub=self.plan.events_pub,
            events_sub=self.plan.events_sub, pids=self.pids,
            nodes={r.name: r.as_dict() for r in self.runs}))
