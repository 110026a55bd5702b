"""Shared fixtures (opt-in, none autouse): a ZMQ context, an event proxy process, and a
factory of node processes that are always killed (whole process tree, psutil), even when
the test fails; plus `bus`, the data-node tests' harness (helpers.data_procs.DataBus).

    def test_x(bus_proxy, spawn_node):
        node = spawn_node(helper("echo_node.py:EchoNode"), "echo0")   # waits until serving
        reply = node.client().request("ping", {})

Run the bus tests: python -m pytest tests/test_bus_*.py -q

    def test_y(bus):                              # dataloader / pool / validator / tracker
        dl = bus.start("dataloader", {...})       # `nexrl-node dataloader`, waits until running

A test module may define its own `bus` fixture (test_proto.py, and test_rollout.py with module
scope); pytest then uses the module's one there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest
import zmq

from helpers.data_procs import DataBus
from helpers.procs import Proc, node_args, proxy_args


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


@pytest.fixture
def bus(tmp_path) -> Iterator[DataBus]:
    """An event proxy and the data nodes of one test (helpers.data_procs.DataBus); every
    process it started is killed at teardown, whatever happens."""
    b = DataBus(tmp_path)
    try:
        yield b
    finally:
        b.close()
