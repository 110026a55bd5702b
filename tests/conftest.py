"""Shared fixtures (opt-in, none autouse): a ZMQ context, an event proxy process, and a
factory of node processes that are always killed (whole process tree, psutil), even when
the test fails.

    def test_x(bus_proxy, spawn_node):
        node = spawn_node(helper("echo_node.py:EchoNode"), "echo0")   # waits until serving
        reply = node.client().request("ping", {})

Run the bus tests: python -m pytest tests/test_bus_*.py -q
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest
import zmq

from helpers.procs import Proc, node_args, proxy_args


def free_ports(n: int) -> list[int]:
    """n TCP ports free right now on 127.0.0.1 (prefer binding port 0 where possible)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@dataclass
class ProxyProc:
    proc: Proc
    pub: str    # publishers connect here (XSUB)
    sub: str    # subscribers connect here (XPUB)


@pytest.fixture
def bus_proxy() -> Iterator[ProxyProc]:
    """`nexrl-bus proxy` on ports the OS picks; its addresses come from its first line."""
    proc = Proc(proxy_args(), "proxy")
    try:
        m = proc.wait_for(r"event proxy: publishers connect to (\S+), subscribers to (\S+)", 30)
        yield ProxyProc(proc, m.group(1), m.group(2))
    finally:
        proc.kill_tree()


@dataclass
class NodeProc:
    proc: Proc
    name: str
    endpoint: str
    ctx: zmq.Context
    clients: list = field(default_factory=list)

    def client(self, timeout: float = 10.0, retries: int = 0, **kw: Any) -> Any:
        from nexrl.bus.reqrep import Client

        c = Client(self.ctx, self.endpoint, sender=f"pytest-{len(self.clients)}", service=self.name,
                   timeout=timeout, retries=retries, linger_ms=0, **kw)
        self.clients.append(c)
        return c

    def status(self) -> dict[str, Any]:
        return self.client(timeout=10.0).request("node.status").body


@pytest.fixture
def spawn_node(bus_proxy: ProxyProc, zmq_ctx: zmq.Context) -> Iterator[Callable[..., NodeProc]]:
    """Factory: spawn_node(ref, name, *overrides, until="running") -> NodeProc (killed at
    teardown, whatever happens)."""
    nodes: list[NodeProc] = []
    procs: list[Proc] = []

    def spawn(ref: str, name: str, *overrides: str, until: str = "running",
              env: dict[str, str] | None = None) -> NodeProc:
        """until: "running" (setup done, main started), "live" (serving requests, setup may
        still run) or "" (do not wait)."""
        proc = Proc(node_args(ref, name, bus_proxy.pub, bus_proxy.sub, *overrides), name, env)
        procs.append(proc)
        endpoint = ""
        if until:
            endpoint = proc.wait_for(r"bus is live; serving requests at (\S+)", 60).group(1)
        if until == "running":
            proc.wait_for(r"state \S+ -> running", 60)
        node = NodeProc(proc, name, endpoint, zmq_ctx)
        nodes.append(node)
        return node

    try:
        yield spawn
    finally:
        for node in nodes:
            for c in node.clients:
                c.close(0)
        for proc in procs:
            proc.kill_tree()
