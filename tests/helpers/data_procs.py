"""Real processes for the data-node tests: an event proxy plus `nexrl-node` processes.

    bus = DataBus(tmp_path)                      # starts `nexrl-bus proxy` on free ports
    dl = bus.start("dataloader", {...})          # `nexrl-node dataloader`, waits until running
    reply = dl.client.request("lease.request", {"credits": 2})
    bus.close()                                  # kills every process it started (always)

Nodes bind port 0; their endpoints are learned from their heartbeats, so tests running in
parallel never fight over ports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import zmq

from helpers.procs import kill_tree
from nexrl.bus.events import Publisher, Subscriber, handshake
from nexrl.bus.reqrep import Client

ROLE_CLASSES = {"dataloader": "nexrl.nodes.dataloader:Dataloader",
                "pool": "nexrl.nodes.pool:Pool",
                "validator": "nexrl.nodes.validator:Validator"}


def role_ref(role: str) -> str:
    """The role's short name once it is registered in nexrl.nodes.ROLES, else module:Class."""
    from nexrl.nodes import ROLES

    return role if role in ROLES else ROLE_CLASSES[role]


@dataclass
class NodeProc:
    name: str
    proc: subprocess.Popen
    log_path: Path
    endpoint: str
    client: Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        return self.client.request("node.status", {}, timeout=5.0).body["stats"]

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved on the way out."""
        self.proc.kill()
        self.proc.wait(timeout=10)


class DataBus:
    """An event proxy and the nodes of one test; close() always cleans up."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[NodeProc] = []
        self._closers: list[Any] = []
        try:
            self.proxy = subprocess.Popen(
                [sys.executable, "-m", "nexrl.cli.bus", "proxy", "--pub", "tcp://127.0.0.1:0",
                 "--sub", "tcp://127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
            self.procs.append(self.proxy)
            line = self.proxy.stdout.readline()
            m = re.search(r"connect to (\S+), subscribers to (\S+)", line)
            if not m:
                raise RuntimeError(f"event proxy did not start: {line!r}")
            self.pub_ep, self.sub_ep = m.group(1), m.group(2)
            self.pub = Publisher(self.ctx, self.pub_ep, sender="test-driver", linger_ms=0)
            self._closers.append(self.pub)
            self.heartbeats = self.subscriber(("node.heartbeat",))
        except BaseException:
            self.close()
            raise

    def subscriber(self, topics: tuple[str, ...]) -> Subscriber:
        """A live subscriber (handshake done, so nothing published after this is missed)."""
        sub = Subscriber(self.ctx, self.sub_ep, topics)
        self._closers.append(sub)
        handshake(self.pub, sub, 10.0)
        return sub

    def client(self, endpoint: str, timeout: float = 10.0) -> Client:
        c = Client(self.ctx, endpoint, sender=f"test-{os.getpid()}-{len(self._closers)}",
                   timeout=timeout, retries=0, linger_ms=0)
        self._closers.append(c)
        return c

    def start(self, role: str, cfg: dict[str, Any], name: str | None = None,
              peers: dict[str, NodeProc] | None = None, node: dict[str, Any] | None = None,
              wait_s: float = 30.0) -> NodeProc:
        """Run `nexrl-node ROLE` with `cfg` as the recipe's ROLE section; wait until running."""
        name = name or role
        recipe = self.tmp / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({role: cfg}))
        overrides = ["node.start=now", "node.endpoint=tcp://127.0.0.1:0",
                     f"node.bus.events_pub={self.pub_ep}", f"node.bus.events_sub={self.sub_ep}",
                     "node.bus.heartbeat_interval_s=0.2", "node.drain_timeout_s=5"]
        for k, v in (node or {}).items():
            overrides.append(f"node.{k}={v}")
        for pname, p in (peers or {}).items():
            role_of = pname.split("-")[0]
            overrides += [f"node.peers.{pname}.role={role_of}", f"node.peers.{pname}.endpoint={p.endpoint}"]
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "nexrl.cli.node", role_ref(role),
                                     "--name", name, "--config", str(recipe), *overrides],
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        endpoint = self._wait_running(name, proc, log_path, wait_s)
        np_ = NodeProc(name, proc, log_path, endpoint, self.client(endpoint))
        self.nodes.append(np_)
        return np_

    def _wait_running(self, name: str, proc: subprocess.Popen, log_path: Path, wait_s: float) -> str:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()}")
            got = self.heartbeats.recv(0.2)
            if got is not None:
                body = got[1].body
                if body["name"] == name and body["pid"] == proc.pid and body["state"] == "running":
                    return body["endpoint"]
        raise TimeoutError(f"{name} not running within {wait_s}s:\n{log_path.read_text()}")

    def close(self) -> None:
        for c in self._closers:
            c.close()
        for p in reversed(self.procs):
            kill_tree(p, grace_s=3.0, wait_s=3.0)  # SIGTERM first: nodes drain
        if getattr(self, "proxy", None) is not None and self.proxy.stdout:
            self.proxy.stdout.close()
        self.ctx.destroy(0)


def wait_for(sub: Subscriber, mtype: str, timeout: float, match=lambda body: True):
    """The next event of type `mtype` whose body matches, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = sub.recv(left)
        if got is not None and got[1].type == mtype and match(got[1].body):
            return got[1]
    return None


def trajectory(group_id: str, sample_index: int, reward: float, *, mode: str = "train",
               data_source: str = "test", response_len: int = 3, **extra: Any) -> dict[str, Any]:
    """A trajectory map with every field trajectory.put documents (as a rollout sends it)."""
    import numpy as np

    t = dict(traj_id=f"{group_id}/{sample_index}", item_id=group_id, group_id=group_id,
             sample_index=sample_index, mode=mode,
             prompt_ids=np.arange(5, dtype=np.int32),
             response_ids=np.arange(100, 100 + response_len, dtype=np.int32),
             response_mask=np.ones(response_len, dtype=np.uint8),
             response_logprobs=np.full(response_len, -0.5, dtype=np.float32),
             weight_version=0, weight_version_max=0, reward=float(reward), finish_reason="stop",
             data_source=data_source, metrics={}, timing={"generate_s": 0.01, "reward_s": 0.001},
             worker="test-rollout")
    t.update(extra)
    return t
