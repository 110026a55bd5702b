"""The Node lifecycle with real processes and signals.

    python -m pytest tests/test_bus_node.py -q

States in order and each exactly once; SIGTERM / SIGINT / node.drain drain and exit 0; a
second signal exits at once; a main() that ignores the drain is cut off at drain_timeout_s
(exit 1, state failed) even though its thread never returns; a crash exits 1 with a fatal
node.error; no proxy / a taken port exits 1 with a message saying so; clients made on the
worker thread shut down cleanly; deferred requests are answered (not_ready) on the way out;
heartbeats go on while a handler blocks the loop, and say so (loop_lag_s).
"""

from __future__ import annotations

import signal
import time

import pytest
import zmq

from helpers.procs import Proc, free_ports, helper, node_args
from helpers.tap import EventTap
from nexrl.bus.reqrep import RemoteError

LIFE = helper("life_node.py:LifeNode")
ECHO = helper("echo_node.py:EchoNode")


@pytest.fixture
def tap(bus_proxy, zmq_ctx):
    t = EventTap(zmq_ctx, bus_proxy.pub, bus_proxy.sub, ("node.lifecycle", "node.error"))
    yield t
    t.close()


def states(tap: EventTap, name: str) -> list[tuple[str, str]]:
    return [(m.body["previous"], m.body["state"]) for m in tap.seen
            if m.type == "node.lifecycle" and m.body["name"] == name]


def final_state(name: str) -> "callable":
    return lambda m: (m.type == "node.lifecycle" and m.body["name"] == name
                      and m.body["state"] in ("stopped", "failed"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_states_in_order_exactly_once_and_signal_drains(spawn_node, tap, sig) -> None:
    node = spawn_node(LIFE, "life0")
    tap.until(lambda m: m.type == "node.lifecycle" and m.body["state"] == "running", 10)
    node.proc.signal(sig)
    assert node.proc.wait(10) == 0, node.proc.output()
    tap.until(final_state("life0"), 5)
    assert states(tap, "life0") == [("", "starting"), ("starting", "ready"), ("ready", "running"),
                                    ("running", "draining"), ("draining", "stopped")]
    assert signal.Signals(sig).name in tap.seen[-1].body.get("reason", "")


def test_node_drain_request_ends_the_node(spawn_node, tap) -> None:
    node = spawn_node(LIFE, "life1")
    reply = node.client().request("node.drain", {"reason": "test says so"})
    assert reply.body["state"] == "draining"
    assert node.proc.wait(10) == 0, node.proc.output()
    tap.until(final_state("life1"), 5)
    assert tap.seen[-1].body["state"] == "stopped" and tap.seen[-1].body["reason"] == "test says so"


def test_stuck_main_is_cut_off_at_the_drain_timeout(spawn_node, tap) -> None:
    node = spawn_node(LIFE, "life2", "life.stuck=true", "node.drain_timeout_s=0.5")
    t = time.monotonic()
    node.proc.signal(signal.SIGTERM)
    assert node.proc.wait(10) == 1
    assert time.monotonic() - t < 5.0
    tap.until(final_state("life2"), 5)
    last = tap.seen[-1].body
    assert last["state"] == "failed" and "drain timeout" in last["reason"]
    assert "did not return within drain_timeout_s" in node.proc.output()


def test_second_signal_exits_at_once(spawn_node, tap) -> None:
    node = spawn_node(LIFE, "life3", "life.stuck=true", "node.drain_timeout_s=60")
    tap.until(lambda m: m.type == "node.lifecycle" and m.body["state"] == "running", 10)
    node.proc.signal(signal.SIGTERM)
    tap.until(lambda m: m.type == "node.lifecycle" and m.body["state"] == "draining", 5)
    t = time.monotonic()
    node.proc.signal(signal.SIGINT)
    assert node.proc.wait(10) == 1
    assert time.monotonic() - t < 5.0
    assert "second SIGINT while draining" in node.proc.output()


def test_crash_in_main_exits_1_with_a_fatal_error_event(spawn_node, tap) -> None:
    node = spawn_node(LIFE, "life4", "life.crash=true")
    assert node.proc.wait(10) == 1
    tap.until(final_state("life4"), 5)
    fatal = [m.body for m in tap.seen if m.type == "node.error" and m.body.get("fatal")]
    assert fatal and "crashing as configured" in fatal[0]["message"] and fatal[0]["node"] == "life4"
    assert tap.seen[-1].body["state"] == "failed"


def test_no_event_proxy_exits_1_and_says_so() -> None:
    pub, sub = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    proc = Proc(node_args(LIFE, "life5", pub, sub, "node.bus.handshake_timeout_s=0.5"), "life5")
    try:
        assert proc.wait(20) == 1
        assert "no event proxy answered" in proc.output()
    finally:
        proc.kill_tree()


def test_taken_port_exits_1_and_names_the_address(bus_proxy, zmq_ctx) -> None:
    taken = zmq_ctx.socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    proc = Proc(node_args(LIFE, "life6", bus_proxy.pub, bus_proxy.sub,
                          f"node.endpoint=tcp://127.0.0.1:{port}"), "life6")
    try:
        assert proc.wait(20) == 1
        assert f"cannot bind tcp://127.0.0.1:{port}" in proc.output()
    finally:
        proc.kill_tree()
        taken.close(0)


def test_clients_made_on_the_worker_thread_shut_down_cleanly(spawn_node, tap) -> None:
    echo = spawn_node(ECHO, "echo0")
    node = spawn_node(LIFE, "life7", "life.peer=echo", "node.peers.echo0.role=echo",
                      f"node.peers.echo0.endpoint={echo.endpoint}")
    deadline = time.monotonic() + 10
    while node.status()["stats"]["pings"] < 20:
        assert time.monotonic() < deadline, "the worker's client never got answers"
        time.sleep(0.05)
    node.proc.signal(signal.SIGTERM)
    assert node.proc.wait(10) == 0, node.proc.output()
    out = node.proc.output()
    assert "Traceback" not in out and "still running" not in out, out


def test_deferred_requests_are_answered_when_the_node_stops(spawn_node) -> None:
    node = spawn_node(LIFE, "life8")
    waiting = node.client(timeout=10)
    msg_id = waiting.send("lease.request", {"credits": 1})
    deadline = time.monotonic() + 10
    while node.status()["stats"]["deferred"] != 1:  # (two connections: no order between them)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    node.client().request("node.drain", {})
    reply = waiting.recv_reply(10)
    assert reply is not None and reply.type == "error" and reply.reply_to == msg_id
    assert reply.body["code"] == "not_ready" and "stopped before answering" in reply.body["message"]
    assert node.proc.wait(10) == 0


def test_heartbeats_go_on_while_a_handler_blocks_the_loop(spawn_node, bus_proxy, zmq_ctx) -> None:
    node = spawn_node(LIFE, "life9", "life.block_s=1.5")
    beats = EventTap(zmq_ctx, bus_proxy.pub, bus_proxy.sub, ("node.heartbeat",))
    try:
        client = node.client(timeout=10)
        client.send("lease.ack", {"lease_ids": []})
        got = beats.until(lambda m: m.body["name"] == "life9" and m.body["loop_lag_s"] > 0.5, 5)
        assert got[-1].body["state"] == "running"
        assert client.recv_reply(5) is not None
    finally:
        beats.close()


def test_unhandled_request_type_is_refused_but_the_node_goes_on(spawn_node) -> None:
    node = spawn_node(ECHO, "echo1")
    client = node.client()
    with pytest.raises(RemoteError) as e:
        client.request("batch.request", {"num_groups": 1})
    assert e.value.code == "unknown_type" and "not handled here" in e.value.message
    assert client.request("ping", {"payload": [1, 2]}).body["payload"] == [1, 2]


def test_serve_when_ready_only_refuses_role_requests_during_setup(spawn_node) -> None:
    node = spawn_node(helper("life_node.py:StrictLifeNode"), "strict", "life.setup_s=2",
                      until="live")
    client = node.client()
    with pytest.raises(RemoteError) as e:
        client.request("lease.ack", {"lease_ids": []})
    assert e.value.code == "not_ready" and "starting" in e.value.message
    assert client.request("ping", {}).body["state"] == "starting"  # built-ins always answer
    node.proc.wait_for(r"state \S+ -> running", 10)
    assert client.request("lease.ack", {"lease_ids": []}).body == {"acked": 0, "unknown": []}
