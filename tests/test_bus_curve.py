"""CURVE on: an unauthenticated peer is refused, an authenticated one gets through.

    python -m pytest tests/test_bus_curve.py -q

Keys from `nexrl-bus keys DIR`; the proxy (`nexrl-bus proxy --curve-keys DIR`) and the node
(`node.bus.curve.enabled=true node.bus.curve.keys_dir=DIR`) are CURVE servers; clients use
the job's client key pair, which is in DIR/authorized.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq
import zmq.auth

from helpers.procs import REPO, Proc, helper, node_args, proxy_args
from nexrl.bus.events import Publisher, Subscriber, handshake
from nexrl.bus.reqrep import Client, RequestTimeout
from nexrl.bus.sockets import CurveConfig

ECHO = helper("echo_node.py:EchoNode")


@pytest.fixture
def curve_job(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "nexrl.cli.bus", "keys", str(keys)], cwd=REPO, check=True,
                   capture_output=True, timeout=30)
    procs = []
    try:
        proxy = Proc(proxy_args("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "--curve-keys", str(keys)),
                     "curve-proxy")
        procs.append(proxy)
        m = proxy.wait_for(r"publishers connect to (\S+), subscribers to (\S+)", 30)
        pub, sub = m.group(1), m.group(2)
        node = Proc(node_args(ECHO, "secure", pub, sub, "node.bus.curve.enabled=true",
                              f"node.bus.curve.keys_dir={keys}"), "secure")
        procs.append(node)
        endpoint = node.wait_for(r"serving requests at (\S+)", 30).group(1)
        yield dict(keys=str(keys), pub=pub, sub=sub, endpoint=endpoint, tmp=tmp_path)
    finally:
        for p in procs:
            p.kill_tree()


def test_authenticated_client_gets_through_and_others_are_refused(curve_job, zmq_ctx) -> None:
    curve = CurveConfig(enabled=True, keys_dir=curve_job["keys"])
    good = Client(zmq_ctx, curve_job["endpoint"], sender="trusted", timeout=5.0, retries=0,
                  linger_ms=0, curve=curve)
    plain = Client(zmq_ctx, curve_job["endpoint"], sender="plain", timeout=1.0, retries=0,
                   linger_ms=0)
    # a client with a well-formed key pair that the job never authorized
    rogue_dir = curve_job["tmp"] / "rogue"
    rogue_dir.mkdir()
    zmq.auth.create_certificates(str(rogue_dir), "client")
    for name in ("server.key", "server.key_secret"):
        (rogue_dir / name).write_bytes((curve_job["tmp"] / "keys" / name).read_bytes())
    (rogue_dir / "authorized").mkdir()
    rogue = Client(zmq_ctx, curve_job["endpoint"], sender="rogue", timeout=1.0, retries=0,
                   linger_ms=0, curve=CurveConfig(enabled=True, keys_dir=str(rogue_dir)))
    try:
        reply = good.request("ping", {"payload": "authenticated"})
        assert reply.body["payload"] == "authenticated"
        for refused in (plain, rogue):
            with pytest.raises(RequestTimeout, match="no connection"):
                refused.request("ping", {"payload": "let me in"})
        assert good.request("node.status").body["stats"]["handled"] == 2  # nothing else got in
    finally:
        for c in (good, plain, rogue):
            c.close(0)


def test_events_need_curve_too(curve_job, zmq_ctx) -> None:
    curve = CurveConfig(enabled=True, keys_dir=curve_job["keys"])
    pub = Publisher(zmq_ctx, curve_job["pub"], sender="t", linger_ms=0, curve=curve)
    sub = Subscriber(zmq_ctx, curve_job["sub"], ("node.heartbeat",), curve=curve)
    plain_sub = Subscriber(zmq_ctx, curve_job["sub"], ("node.heartbeat",))
    try:
        handshake(pub, sub, 20.0)
        got = sub.recv(5.0)
        assert got is not None and got[1].body["name"] == "secure"
        assert plain_sub.recv(1.5) is None  # the proxy never let it in
    finally:
        pub.close(0)
        sub.close()
        plain_sub.close()
