"""Request/reply over real processes: timeouts, retries with the same msg_id, dedupe.

    python -m pytest tests/test_bus_reqrep.py -q

A FlakyNode (tests/helpers/flaky_node.py) loses the first attempt of every request in one
of three ways; in each case the client's retry (same msg_id) is answered and the handler ran
exactly once.
"""

from __future__ import annotations

import time

import pytest
import zmq

from helpers.procs import helper
from nexrl.bus import codec
from nexrl.bus.codec import Message
from nexrl.bus.reqrep import Client, RemoteError, RequestTimeout

FLAKY = helper("flaky_node.py:FlakyNode")


@pytest.mark.parametrize("fault", ["flaky.drop_first_request=true", "flaky.drop_first_reply=true",
                                   "flaky.delay_s=0.6"])
def test_retry_is_answered_and_the_handler_runs_once(spawn_node, fault: str) -> None:
    node = spawn_node(FLAKY, "flaky0", fault)
    client = node.client(timeout=0.3, retries=3)
    t = time.monotonic()
    reply = client.request("lease.ack", {"lease_ids": ["job-1"]})
    took = time.monotonic() - t
    assert reply.type == "lease.ack.reply"
    assert reply.body["acked"] == 1, "the handler ran again for a retried request"
    assert 0.3 <= took < 2.0, took  # at least one timeout, then the retry's answer
    stats = node.status()["stats"]
    assert stats["runs"] == {"job-1": 1}
    if "drop_first_request" in fault:  # the retry is the first arrival the node sees
        assert stats["dropped_requests"] == 1 and stats["duplicates"] == 0
        assert stats["handled"] == 2  # lease.ack + this node.status
    else:  # the retry is a duplicate: answered from the cache / ignored while pending
        assert stats["duplicates"] >= 1 and stats["handled"] == 2
    if "drop_first_reply" in fault:
        assert stats["dropped_replies"] == 1
    # a second, different request runs the handler for its own id, once
    assert client.request("lease.ack", {"lease_ids": ["job-2"]}).body["acked"] == 1
    assert node.status()["stats"]["runs"] == {"job-1": 1, "job-2": 1}


def test_a_repeated_msg_id_gets_the_cached_reply_byte_for_byte(spawn_node) -> None:
    node = spawn_node(FLAKY, "flaky1")
    client = node.client(timeout=5.0)
    msg_id = client.send("lease.ack", {"lease_ids": ["a"]})
    first = client.recv_reply(5.0)
    client.send("lease.ack", {"lease_ids": ["a"]}, msg_id=msg_id)
    second = client.recv_reply(5.0)
    assert first is not None and second is not None
    assert first.reply_to == second.reply_to == msg_id
    assert (first.msg_id, first.ts, first.body) == (second.msg_id, second.ts, second.body)
    assert node.status()["stats"]["runs"] == {"a": 1}


def test_timeout_names_the_service_and_takes_the_configured_time(zmq_ctx) -> None:
    from helpers.procs import free_ports

    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # nobody listens here
    client = Client(zmq_ctx, endpoint, sender="t", service="pool", timeout=0.2, retries=1,
                    linger_ms=0)
    try:
        t = time.monotonic()
        with pytest.raises(RequestTimeout, match="pool") as e:
            client.request("ping", {})
        assert time.monotonic() - t < 1.5
        assert endpoint in str(e.value)
    finally:
        client.close()


def test_error_reply_raises_remote_error_with_code(spawn_node, zmq_ctx) -> None:
    node = spawn_node(FLAKY, "flaky2")
    client = node.client()
    with pytest.raises(RemoteError) as e:
        client.request("lease.request", {"credits": 1})  # declared, but not served here
    assert e.value.code == "unknown_type" and e.value.node == "flaky2"
    # a body the schema refuses (the Client would not send it: craft the frames by hand)
    raw = zmq_ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(node.endpoint)
    try:
        msg = codec.stamp(Message("lease.ack", {"lease_ids": "not-a-list"}), "raw", 1)
        raw.send_multipart(codec.encode(msg))
        assert raw.poll(5000)
        err = codec.decode(raw.recv_multipart())
    finally:
        raw.close()
    assert (err.type, err.reply_to, err.body["code"]) == ("error", msg.msg_id, "invalid_body")
    assert "lease_ids" in err.body["message"] and err.body["request_type"] == "lease.ack"


def test_pipelined_requests_are_matched_by_reply_to(spawn_node) -> None:
    """A burst of requests: the node holds its replies and sends them in batches (see
    nexrl/bus/dispatch.py); every one arrives, once, in request order."""
    node = spawn_node(FLAKY, "flaky3")
    client = node.client()
    ids = {client.send("lease.ack", {"lease_ids": [f"x{i}"]}): f"x{i}" for i in range(200)}
    got = {}
    while len(got) < len(ids):
        reply = client.recv_reply(5.0)
        assert reply is not None
        assert reply.reply_to in ids and reply.reply_to not in got
        got[reply.reply_to] = reply.body["acked"]
    assert set(got.values()) == {1}
    assert list(got) == list(ids)


def test_a_retry_after_its_reply_left_the_cache_is_refused_not_rerun(spawn_node) -> None:
    """The reply cache is bounded in bytes: an old reply becomes a tombstone, and a late
    retry gets `timeout` instead of running the handler a second time."""
    node = spawn_node(helper("flaky_node.py:TinyCacheNode"), "tiny")
    client = node.client(timeout=5.0)
    msg_id = client.send("lease.ack", {"lease_ids": ["old"]})
    assert client.recv_reply(5.0).body["acked"] == 1
    for i in range(30):  # ~30 replies of ~100 B push the first one out of a 1,000 B cache
        client.request("lease.ack", {"lease_ids": [f"n{i}"]})
    client.send("lease.ack", {"lease_ids": ["old"]}, msg_id=msg_id)
    late = client.recv_reply(5.0)
    assert late.type == "error" and late.reply_to == msg_id and late.body["code"] == "timeout"
    assert "not run twice" in late.body["message"]
    stats = node.status()["stats"]
    assert stats["runs"]["old"] == 1 and stats["replies_expired"] == 1
    assert stats["reply_cache_bytes"] <= 1000
