"""`nexrl-bus` against real processes: nodes, echo (decoded, gaps reported), call, keys.

    python -m pytest tests/test_bus_cli.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import zmq

from helpers.procs import REPO, helper
from nexrl.bus import codec
from nexrl.bus.codec import Message

ECHO = helper("echo_node.py:EchoNode")


def bus_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexrl.cli.bus", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_nodes_lists_live_nodes_with_role_name_host_pid_state_and_age(spawn_node, bus_proxy) -> None:
    a = spawn_node(ECHO, "echo-a")
    b = spawn_node(ECHO, "echo-b")
    r = bus_cli("nodes", "--pub", bus_proxy.pub, "--sub", bus_proxy.sub, "--wait", "1.5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["ROLE", "NAME", "HOST", "PID", "STATE", "HEARTBEAT", "ENDPOINT"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    for node in (a, b):
        role, name, host, pid, state, age, ago, endpoint = rows[node.name]
        assert (role, state, endpoint, ago) == ("echo", "running", node.endpoint, "ago")
        assert int(pid) == node.proc.pid and host == os.uname().nodename
        assert age.endswith("s") and float(age[:-1]) < 1.0  # heartbeats every 0.2 s


def test_nodes_says_when_nobody_is_there(bus_proxy) -> None:
    r = bus_cli("nodes", "--pub", bus_proxy.pub, "--sub", bus_proxy.sub, "--wait", "0.5")
    assert r.returncode == 1 and "no heartbeats" in r.stderr


def test_echo_prints_live_events_decoded_and_reports_gaps(spawn_node, bus_proxy, zmq_ctx) -> None:
    spawn_node(ECHO, "echo-c")
    echo = subprocess.Popen([sys.executable, "-m", "nexrl.cli.bus", "echo", "--pub", bus_proxy.pub,
                             "--sub", bus_proxy.sub, "--duration", "4", "node.heartbeat", "metrics"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # a publisher of our own whose seq numbers skip 3 events (4 and 5 never sent... and 7)
        pub = zmq_ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.connect(bus_proxy.pub)
        time.sleep(1.5)  # echo's subscription reaches this PUB (echo itself does no handshake)
        for seq in (1, 2, 3, 6, 8):
            msg = codec.stamp(Message("metrics", {"step": seq, "kind": "train",
                                                   "values": {"loss": 0.5}}), "gappy", seq)
            pub.send_multipart([b"metrics", *codec.encode(msg)])
        out, err = echo.communicate(timeout=15)
        pub.close()
    finally:
        echo.kill()
    assert echo.returncode == 0, err
    beats = [line for line in out.splitlines() if "node.heartbeat" in line and "echo-c" in line]
    assert beats, out
    m = re.match(r"\d\d:\d\d:\d\d\.\d{3} echo-c\s+node\.heartbeat\s+#(\d+) (\{.*\})$", beats[0])
    assert m, beats[0]
    body = json.loads(m.group(2))
    assert body["name"] == "echo-c" and body["state"] == "running" and body["role"] == "echo"
    metrics = [line for line in out.splitlines() if "gappy" in line]
    assert len(metrics) == 5 and '"loss": 0.5' in metrics[0]
    assert "3 event(s) missed" in err, err


def test_call_sends_one_request_and_prints_the_reply(spawn_node) -> None:
    node = spawn_node(ECHO, "echo-d")
    r = bus_cli("call", node.endpoint, "ping", 'payload={"a": [1, 2]}')
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply == {"type": "ping.reply", "sender": "echo-d",
                     "body": {"state": "running", "payload": {"a": [1, 2]}}}
    r = bus_cli("call", node.endpoint, "lease.ack", "lease_ids=5")
    assert r.returncode == 1 and "must be list[str]" in r.stderr


def test_keys_writes_a_usable_key_folder(tmp_path) -> None:
    r = bus_cli("keys", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (tmp_path / "k").iterdir()}
    assert {"server.key", "server.key_secret", "client.key", "client.key_secret", "authorized"} <= names
    assert (tmp_path / "k" / "authorized" / "client.key").exists()
