"""In-process checks of the bus pieces (real sockets over inproc://, no child processes).

    python -m pytest tests/test_bus_units.py -q

Reply cache bounds, loop timers/calls ordering, rate limit, liveness counters, publisher
drop counting (XPUB_NODROP), subscriber gap / restart / topic checks, the handshake keeping
the events it read, the schema checks on the hot path, and roles refused for reusing a
private name of the Node base class.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from nexrl.bus import codec, schema
from nexrl.bus.codec import Message
from nexrl.bus.events import EventProxy, Publisher, Subscriber, handshake
from nexrl.bus.liveness import Liveness
from nexrl.bus.loop import CallQueue, RateLimit, Timers, Wakeup, poll_ms
from nexrl.bus.reqrep import ReplyCache
from nexrl.plugins import load_object


def frames(n: int) -> list:
    return [b"h" * n]


def test_reply_cache_is_bounded_in_keys_and_bytes() -> None:
    cache = ReplyCache(size=5, max_bytes=300)
    for i in range(3):
        cache.put(("s", f"m{i}"), frames(100))
    assert cache.nbytes == 300 and all(cache.get(("s", f"m{i}"))[0] for i in range(3))
    cache.put(("s", "m3"), frames(100))  # over the byte bound: the oldest reply -> tombstone
    assert cache.get(("s", "m0")) is ReplyCache.ANSWERED and cache.nbytes == 300
    cache.put(("s", "big"), frames(1000))  # larger than the whole budget: never kept
    assert cache.get(("s", "big")) is ReplyCache.ANSWERED and cache.nbytes == 300
    cache.put(("s", "p"), ReplyCache.PENDING)
    assert len(cache) == 5 and cache.get(("s", "m0")) is None  # the oldest key forgotten
    cache.put(("s", "p"), frames(50))  # PENDING -> reply keeps its place and counts bytes
    assert cache.get(("s", "p")) == frames(50)
    assert cache.nbytes <= 300 and len(cache) == 5
    total = sum(len(v[0]) for k, v in cache._d.items() if isinstance(v, list))
    assert total == cache.nbytes


def test_timers_run_in_due_order_then_scheduling_order_and_can_be_cancelled() -> None:
    wake = Wakeup()
    try:
        timers = Timers(wake)
        ran: list[str] = []
        timers.add(0.05, lambda: ran.append("late"))
        for name in ("a", "b", "c"):
            timers.add(0.0, lambda n=name: ran.append(n))
        cancelled = timers.add(0.0, lambda: ran.append("cancelled"))
        cancelled.cancel()
        for t in timers.due(time.monotonic()):
            t.fn()
        assert ran == ["a", "b", "c"]
        assert 0 < timers.next_delay(time.monotonic()) <= 0.05
        time.sleep(0.06)
        for t in timers.due(time.monotonic()):
            t.fn()
        assert ran == ["a", "b", "c", "late"] and timers.next_delay(time.monotonic()) is None
        assert poll_ms(0.0004) == 1 and poll_ms(0) == 0  # rounded up: no busy spin
    finally:
        wake.close()


def test_call_queue_keeps_fifo_across_threads_and_wakes_the_loop() -> None:
    wake = Wakeup()
    try:
        q = CallQueue(wake)
        poller = zmq.Poller()
        poller.register(wake.fd, zmq.POLLIN)
        assert not poller.poll(0)
        threads = [threading.Thread(target=lambda k=k: [q.put(lambda k=k, i=i: (k, i))
                                                         for i in range(200)]) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert poller.poll(1000)
        got = [fn() for fn in q.take()]
        assert len(got) == 800
        for k in range(4):
            assert [i for kk, i in got if kk == k] == list(range(200))  # per-thread order kept
        wake.drain()
        assert not poller.poll(0)
    finally:
        wake.close()


def test_rate_limit_reports_what_it_held_back() -> None:
    rl = RateLimit(per_s=3)
    results = [rl.allow() for _ in range(10)]
    assert [a for a, _ in results] == [True] * 3 + [False] * 7
    assert rl.suppressed == 7
    rl.window -= 1  # a new second
    assert rl.allow() == (True, 7)


def test_liveness_counts_missed_heartbeats() -> None:
    live = Liveness(liveness=3)
    live.beat("a", {"interval_s": 0.5}, now=10.0)
    live.beat("b", {"interval_s": "junk"}, now=10.0)  # bad interval: default 1 s, no crash
    assert live.missed("a", now=10.4) == 0 and live.is_alive("a", now=10.4)
    assert live.missed("a", now=11.1) == 2 and live.is_alive("a", now=11.1)
    assert live.missed("a", now=11.6) == 3 and not live.is_alive("a", now=11.6)
    assert [p.name for p in live.dead(now=11.6)] == ["a"]
    assert live.missed("nobody") == 3


@pytest.fixture
def proxy(zmq_ctx):
    p = EventProxy(zmq_ctx, "inproc://front", "inproc://back").start()
    yield p
    p.stop()


def test_publisher_counts_drops_when_its_queue_is_full(zmq_ctx) -> None:
    xsub = zmq_ctx.socket(zmq.XSUB)  # a subscriber that stops reading
    xsub.rcvhwm = 5
    xsub.bind("inproc://slow")
    pub = Publisher(zmq_ctx, "inproc://slow", sender="p", hwm=5, linger_ms=0)
    try:
        xsub.send(b"\x01")  # subscribe to everything
        body = {"step": 1, "kind": "t", "values": {"x": 1.0}}
        deadline = time.monotonic() + 5
        while not xsub.poll(10):  # until the subscription reached the PUB
            assert time.monotonic() < deadline
            pub.publish("metrics", body)
        before = pub.published + pub.dropped
        results = [pub.publish("metrics", body) for _ in range(100)]
        assert results.count(False) == pub.dropped > 0  # counted where they were dropped
        assert pub.published + pub.dropped == before + 100
    finally:
        pub.close(0)
        xsub.close(0)


def test_subscriber_detects_gaps_restarts_and_bad_topics(zmq_ctx) -> None:
    sub = Subscriber(zmq_ctx, "inproc://nowhere", ("",))
    try:
        def ev(seq: int, topic: bytes = b"metrics", mtype: str = "metrics", sender: str = "a"):
            msg = codec.stamp(Message(mtype, {"step": 0, "kind": "k", "values": {}}), sender, seq)
            return [topic, *codec.encode(msg)]

        for seq in (1, 2, 5, 6):
            assert sub.decode(ev(seq)) is not None
        assert sub.gaps == 2
        assert sub.decode(ev(1)) is not None and sub.restarts == 1  # the sender restarted
        assert sub.decode(ev(2)) is not None and sub.gaps == 2
        assert sub.decode(ev(9, sender="b")) is not None and sub.gaps == 2  # joined late: no gap
        assert sub.decode(ev(1, topic=b"metrics/k")) is not None  # a keyed topic is its own stream
        assert sub.decode(ev(3, topic=b"job.state")) is None  # topic does not match the type
        assert sub.decode([b"metrics"]) is None
        assert sub.decode([b"metrics", b"\x93\x01"]) is None
        assert sub.malformed == 3 and sub.last_code == "malformed"
    finally:
        sub.close()


def test_handshake_keeps_the_events_it_read(zmq_ctx, proxy) -> None:
    other = Publisher(zmq_ctx, proxy.frontend, sender="other", linger_ms=0)
    me_pub = Publisher(zmq_ctx, proxy.frontend, sender="me", linger_ms=0)
    me_sub = Subscriber(zmq_ctx, proxy.backend, ("metrics",))
    watcher = Subscriber(zmq_ctx, proxy.backend, ("metrics",))
    try:
        handshake(other, watcher, 5.0)
        stop = threading.Event()

        def chatter() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                other.publish("metrics", {"step": i, "kind": "k", "values": {}})
                time.sleep(0.002)

        t = threading.Thread(target=chatter)
        t.start()
        try:
            handshake(me_pub, me_sub, 5.0)
        finally:
            stop.set()
            t.join()
        kept = len(me_sub.pending)
        got = []
        while (x := me_sub.recv(0.3)) is not None:
            got.append(x[1].body["step"])
        assert got and kept <= len(got)
        assert got == list(range(got[0], got[0] + len(got)))  # in order, no hole
        assert me_sub.gaps == 0
    finally:
        for s in (other, me_pub):
            s.close(0)
        me_sub.close()
        watcher.close()


def test_schema_checks_refuse_with_codes_and_accept_unknown_fields_incoming() -> None:
    with pytest.raises(schema.SchemaError) as e:
        schema.check_outgoing("ping", {"payload": 1, "extra": 2})
    assert e.value.code == "invalid_body" and "not declared" in str(e.value)
    with pytest.raises(schema.SchemaError) as e:
        schema.check_outgoing("no.such", {})
    assert e.value.code == "unknown_type"
    assert schema.check_incoming("ping", {"payload": 1, "from_the_future": True}).kind == "request"
    with pytest.raises(schema.SchemaError, match="must be list"):
        schema.check_incoming("lease.ack", {"lease_ids": "x"})
    with pytest.raises(schema.SchemaError, match="must not be nil"):
        schema.check_incoming("lease.request", {"credits": None})


def test_a_role_that_reuses_a_private_name_of_the_node_base_is_refused(tmp_path) -> None:
    """A role class that defines a method or `self._x` the Node runtime uses itself would
    silently replace part of the runtime; it is refused when the class is made, by name."""
    bad = tmp_path / "bad_role.py"
    bad.write_text("from nexrl.node import Node\n\n\n"
                   "class Bad(Node):\n"
                   "    role = 'bad'\n\n"
                   "    def setup(self):\n"
                   "        self._bound = {}\n"
                   "        self._mine = 1\n")
    with pytest.raises(TypeError, match=r"Bad defines _bound, which the Node base class uses"):
        load_object(f"{bad}:Bad")
    good = tmp_path / "good_role.py"
    good.write_text(bad.read_text().replace("self._bound = {}", "self.bound = {}"))
    assert load_object(f"{good}:Bad").role == "bad"
