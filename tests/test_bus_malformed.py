"""A node under a storm of malformed frames: it answers each with the right error, counts
each, keeps answering the well-formed requests interleaved with them, and never dies.

    python -m pytest tests/test_bus_malformed.py -q

10,000 malformed requests into the node's ROUTER (random bytes, truncated msgpack, wrong
version, wrong envelope types, non-map headers, bin keys, unknown types, non-requests,
invalid bodies, bad ext payloads, unknown ext codes, bad frame indexes, empty frames,
oversized) with a ping after every 10th, and 2,000 malformed events published into the
proxy on a topic the node subscribes to. Kinds: tests/helpers/malformed.py.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import zmq

from helpers import malformed
from helpers.procs import helper
from nexrl.bus import codec
from nexrl.bus.codec import Message

ECHO = helper("echo_node.py:EchoNode")
MAX_BYTES = 65536
N_REQUESTS = 10_000
N_EVENTS = 2_000
WINDOW = 256


def test_malformed_requests_and_events_never_hurt_the_node(spawn_node, bus_proxy, zmq_ctx) -> None:
    node = spawn_node(ECHO, "victim", f"node.bus.max_message_bytes={MAX_BYTES}")
    rng = random.Random(20261122)
    bad = list(malformed.requests(rng, N_REQUESTS, MAX_BYTES))
    want_codes = Counter(code for _, code, _ in bad)
    by_id = {msg_id: code for _, code, msg_id in bad if msg_id is not None}
    n_anonymous = sum(1 for _, _, msg_id in bad if msg_id is None)

    dealer = zmq_ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.sndhwm = dealer.rcvhwm = 100_000
    dealer.connect(node.endpoint)
    pings: dict[str, int] = {}
    got_codes: Counter[str] = Counter()
    anonymous = 0
    pong = 0
    outstanding = 0

    def take(timeout_ms: int) -> None:
        nonlocal outstanding, anonymous, pong
        assert dealer.poll(timeout_ms), (f"no reply within {timeout_ms} ms; "
                                         f"{outstanding} outstanding\n{node.proc.output()[-3000:]}")
        reply = codec.decode(dealer.recv_multipart())
        outstanding -= 1
        if reply.type == "ping.reply":
            assert pings.pop(reply.reply_to) == reply.body["payload"]
            pong += 1
            return
        assert reply.type == "error", reply
        code = reply.body["code"]
        got_codes[code] += 1
        assert reply.body["node"] == "victim" and reply.body["message"]
        if reply.reply_to is None:
            anonymous += 1
        else:
            assert by_id.pop(reply.reply_to) == code, (reply.body, reply.reply_to)

    t0 = time.monotonic()
    for i, (frames, _, _) in enumerate(bad):
        dealer.send_multipart(frames)
        outstanding += 1
        if i % 10 == 0:
            msg = codec.stamp(Message("ping", {"payload": i}), "fuzzer", i + 1)
            pings[msg.msg_id] = i
            dealer.send_multipart(codec.encode(msg))
            outstanding += 1
        while outstanding > WINDOW:
            take(10_000)
    while outstanding:
        take(10_000)
    took = time.monotonic() - t0

    assert pong == N_REQUESTS // 10 and not pings       # every well-formed request answered
    assert got_codes == want_codes, (got_codes, want_codes)
    assert not by_id and anonymous == n_anonymous
    assert took < 60, took

    # the SUB side: malformed events into the proxy, on a topic the node subscribes to
    events = list(malformed.events(rng, N_EVENTS))
    want_events = Counter(code for _, code in events)
    pub = zmq_ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.sndhwm = 100_000
    pub.connect(bus_proxy.pub)
    watch = zmq_ctx.socket(zmq.SUB)
    watch.linger = 0
    watch.connect(bus_proxy.sub)
    watch.subscribe(b"job.state/harmless-probe")
    probe = codec.encode(codec.stamp(Message("job.state", {"state": "starting"}), "fuzzer", 1))
    deadline = time.monotonic() + 20
    while not watch.poll(100):  # our PUB is connected and knows the subscriptions now
        assert time.monotonic() < deadline, "the raw publisher never got through the proxy"
        pub.send_multipart([b"job.state/harmless-probe", *probe])
    for frames, _ in events:
        pub.send_multipart(frames)
    status = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = node.status()["stats"]
        if status["malformed_events"] >= N_EVENTS:
            break
        time.sleep(0.1)
    assert status is not None
    assert status["malformed_events"] == N_EVENTS, status
    assert status["malformed_requests"] == N_REQUESTS
    assert status["malformed"] == N_REQUESTS + N_EVENTS
    for code in malformed_codes(want_codes, want_events):
        assert status[f"refused_{code}"] == want_codes[code] + want_events[code], (code, status)
    assert status["handled"] >= N_REQUESTS // 10
    # still alive and well
    assert node.client().request("ping", {"payload": "still here"}).body["payload"] == "still here"
    assert node.proc.p.poll() is None
    pub.close()
    watch.close()
    dealer.close()


def malformed_codes(*counters: Counter) -> set[str]:
    return {code for c in counters for code in c}
