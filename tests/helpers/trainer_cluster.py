"""Harness of the trainer / weight_sync tests: a real bus and real node processes.

- `Bus`: an event proxy (nexrl.bus.events.EventProxy) in the test process plus a recorder
  that keeps every event, so a test can wait for `weights.live{1}` with a timeout;
- `Cluster.spawn`: starts `python -m nexrl.cli.node ROLE ...` (the real `nexrl-node`
  entrypoint) with the bus addresses, its ROUTER endpoint and the peers it should know;
  logs go to files under the run dir; `close()` kills every process tree it started;
- `make_trajectories`: samples groups from a real engine over HTTP and turns the completions
  into `trajectory.put`-shaped dicts (token ids, engine logprobs, weight version, a reward);
  `put_trajectories` delivers them to a pool the way a rollout worker does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from helpers.procs import free_port, kill_tree
from nexrl.bus.codec import Message
from nexrl.bus.events import EventProxy, Subscriber
from nexrl.bus.reqrep import Client, RequestTimeout
from nexrl.engine_client import EngineClient


class Bus:
    """Event proxy + recorder of every event (thread), in the test process."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.proxy = EventProxy(self.ctx, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
        self.pub, self.sub = self.proxy.frontend, self.proxy.backend
        self.events: list[Message] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sub = Subscriber(self.ctx, self.sub, ("",))
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        while not self._stop.is_set():
            got = self._sub.recv(0.1)
            if got is not None and not got[0].startswith("bus.probe"):
                with self._cond:
                    self.events.append(got[1])
                    self._cond.notify_all()

    def of(self, mtype: str, **match: Any) -> list[Message]:
        with self._cond:
            return [m for m in self.events if m.type == mtype
                    and all(m.body.get(k) == v for k, v in match.items())]

    def wait(self, mtype: str, timeout: float = 30.0, since: int = 0,
             pred: Callable[[Message], bool] = lambda m: True, **match: Any) -> Message:
        """The first event of `mtype` (index >= since) whose body matches; AssertionError
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.events[since:]:
                    if m.type == mtype and pred(m) and all(m.body.get(k) == v
                                                           for k, v in match.items()):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {mtype} {match} event within {timeout}s")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def client(self, endpoint: str, timeout: float = 30.0) -> Client:
        return Client(self.ctx, endpoint, sender="test", timeout=timeout, retries=0, linger_ms=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()
        self.proxy.stop()
        self.ctx.destroy(linger=0)


@dataclass
class Peer:
    name: str
    role: str
    endpoint: str
    url: str = ""


class Cluster:
    """Spawns nodes as real processes on `bus`; kills them all on close()."""

    def __init__(self, bus: Bus, run_dir: Path):
        self.bus, self.run_dir = bus, run_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.peers: dict[str, Peer] = {}

    def add_peer(self, name: str, role: str, url: str = "") -> Peer:
        p = Peer(name, role, f"tcp://127.0.0.1:{free_port()}", url)
        self.peers[name] = p
        return p

    def spawn(self, role: str, name: str, overrides: list[str], peers: list[str] = (),
              run_dir: Path | None = None) -> subprocess.Popen:
        """Start node `name` (registered with add_peer) knowing `peers` (names)."""
        me = self.peers[name]
        args = [sys.executable, "-m", "nexrl.cli.node", role, f"node.name={name}",
                "node.start=now", f"node.endpoint={me.endpoint}",
                f"node.bus.events_pub={self.bus.pub}", f"node.bus.events_sub={self.bus.sub}",
                f"node.run_dir={run_dir or self.run_dir}", "node.drain_timeout_s=20"]
        if me.url:
            args.append(f"node.http_url={me.url}")
        for pn in peers:
            p = self.peers[pn]
            args += [f"node.peers.{pn}.role={p.role}", f"node.peers.{pn}.endpoint={p.endpoint}"]
            if p.url:
                args.append(f"node.peers.{pn}.url={p.url}")
        log = open(self.run_dir / f"{name}.log", "ab")
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.Popen(args + list(overrides), stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=str(Path(__file__).resolve().parents[2]))
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.run_dir / f"{name}.log").read_text(errors="replace")

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout}s; log:\n"
                                 f"{self.log(name)[-3000:]}") from None

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        kill_tree(proc, wait_s=10.0)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def start_engine(self, name: str, model_path: str, extra: list[str] = ()) -> str:
        """An inference node (embedded engine) on a fixed free port; returns its base URL."""
        url = f"http://127.0.0.1:{free_port()}"
        self.add_peer(name, "inference", url)
        self.spawn("inference", name, [f"inference.model_path={model_path}",
                                       "inference.num_threads=1", *extra])
        return url

    def wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        url = self.peers[name].url
        deadline = time.monotonic() + timeout
        with EngineClient(url, timeout=5) as c:
            while not c.health(timeout=2):
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"engine {name} not healthy; log:\n"
                                         f"{self.log(name)[-3000:]}")
                time.sleep(0.2)


def status(bus: Bus, endpoint: str) -> dict[str, Any]:
    """node.status of the node at `endpoint` (its stats, including stats_extra)."""
    c = bus.client(endpoint, timeout=10)
    try:
        return c.request("node.status", {}).body
    finally:
        c.close()


def reward_of(ids: list[int]) -> float:
    """A deterministic reward with spread inside a group: share of even token ids."""
    return sum(1 for t in ids if t % 2 == 0) / max(1, len(ids))


def make_trajectories(url: str, prompts: list[list[int]], n: int, max_tokens: int,
                      first_group: int = 0) -> list[dict[str, Any]]:
    """n samples per prompt from the engine at `url` (temperature 1), as `trajectory.put`
    trajectories (arrays with the schema's dtypes), one group per prompt."""
    out = []
    with EngineClient(url, timeout=60) as c:
        for gi, prompt in enumerate(prompts, first_group):
            r = c.complete(prompt, max_tokens=max_tokens, temperature=1.0, n=n, seed=gi)
            for k, ch in enumerate(r["choices"]):
                ids, lps = ch["token_ids"], ch["token_logprobs"]
                v = int(ch["weight_version"])
                out.append(dict(
                    traj_id=f"item-{gi}/{k}", item_id=f"item-{gi}", group_id=f"item-{gi}",
                    sample_index=k, mode="train", prompt_ids=np.asarray(prompt, np.int32),
                    response_ids=np.asarray(ids, np.int32),
                    response_mask=np.ones(len(ids), np.uint8),
                    response_logprobs=np.asarray(lps, np.float32), weight_version=v,
                    weight_version_max=v, reward=reward_of(ids), finish_reason="length",
                    data_source="test", metrics={}, timing={"generate_s": 0.01, "reward_s": 0.001},
                    worker="test"))
    return out


def wait_running(bus: Bus, endpoint: str, timeout: float = 60.0) -> None:
    """Ping the node at `endpoint` until it reports state running (setup done)."""
    deadline = time.monotonic() + timeout
    c = bus.client(endpoint, timeout=2)
    try:
        while True:
            try:
                if c.request("ping", {}).body["state"] == "running":
                    return
            except RequestTimeout:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"node at {endpoint} not running within {timeout}s")
            time.sleep(0.1)
    finally:
        c.close()


def put_trajectories(bus: Bus, endpoint: str, trajs: list[dict[str, Any]]) -> dict[str, Any]:
    """trajectory.put to the pool at `endpoint`, as a rollout worker does; returns the reply."""
    c = bus.client(endpoint, timeout=10)
    try:
        return c.request("trajectory.put", {"trajectories": trajs}).body
    finally:
        c.close()
