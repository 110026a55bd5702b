"""Credit-based leases over real processes: expiry, re-issue, deferral, exactly-once acks.

    python -m pytest tests/test_bus_lease.py -q

A LeaseNode (tests/helpers/lease_node.py) serves 6 items from a LeaseTable with 0.8 s
leases; two workers (DEALER clients of the test) take, lose, re-take and acknowledge them.
Plus unit checks of LeaseTable itself (no sockets).
"""

from __future__ import annotations

import time

from helpers.procs import helper
from nexrl.bus.lease import LeaseTable

LEASER = helper("lease_node.py:LeaseNode")
TIMEOUT = 0.8


def items(reply) -> dict[str, tuple[str, int]]:
    """item id -> (lease id, issues) of a lease.request reply."""
    return {x["item"]["id"]: (x["lease_id"], x["item"]["issues"]) for x in reply.body["leases"]}


def test_leases_expire_are_reissued_and_each_item_is_done_exactly_once(spawn_node) -> None:
    node = spawn_node(LEASER, "leaser", "lease.items=6", f"lease.lease_timeout_s={TIMEOUT}")
    a, b = node.client(timeout=5), node.client(timeout=5)

    got_a = items(a.request("lease.request", {"credits": 4}))
    assert set(got_a) == {"item-0", "item-1", "item-2", "item-3"}
    assert all(issues == 1 for _, issues in got_a.values())
    assert a.request("lease.ack", {"lease_ids": [got_a["item-0"][0]]}).body == {"acked": 1, "unknown": []}
    twice = a.request("lease.ack", {"lease_ids": [got_a["item-0"][0]]}).body  # acked twice
    assert twice == {"acked": 0, "unknown": [got_a["item-0"][0]]}

    # worker a goes silent. b takes what is fresh, then waits: an expiry answers the wait.
    time.sleep(TIMEOUT / 2)  # (so b's own leases expire well after a's)
    got_b = items(b.request("lease.request", {"credits": 10}))
    assert set(got_b) == {"item-4", "item-5"}
    t = time.monotonic()
    held = b.request("lease.request", {"credits": 10, "wait_s": 5.0})
    waited = time.monotonic() - t
    reissued = items(held)
    assert set(reissued) == {"item-1", "item-2", "item-3"} and held.body["exhausted"] is False
    assert all(issues == 2 for _, issues in reissued.values())
    assert 0.1 < waited < 3.0, waited  # held until a's leases expired, not until wait_s

    # a wakes up and acks item-1: it went to b already -> unknown (b's lease owns it)
    late = a.request("lease.ack", {"lease_ids": [got_a["item-1"][0]]}).body
    assert late == {"acked": 0, "unknown": [got_a["item-1"][0]]}

    # b finishes everything but item-3, whose lease it lets expire...
    done = [reissued["item-1"][0], reissued["item-2"][0], got_b["item-4"][0], got_b["item-5"][0]]
    assert b.request("lease.ack", {"lease_ids": done}).body == {"acked": 4, "unknown": []}
    deadline = time.monotonic() + 5
    while node.status()["stats"]["retry"] != 1:  # item-3 waits to be leased again
        assert time.monotonic() < deadline, node.status()["stats"]
        time.sleep(0.1)
    # ...then acks it late: nobody else has it yet, so the work is taken back, once
    assert b.request("lease.ack", {"lease_ids": [reissued["item-3"][0]]}).body == \
        {"acked": 1, "unknown": []}

    end = b.request("lease.request", {"credits": 10, "wait_s": 0.5})
    assert end.body == {"leases": [], "exhausted": True}
    stats = node.status()["stats"]
    assert stats["done"] == {f"item-{i}": 1 for i in range(6)}, stats
    assert stats["outcomes"] == {"acked": 5, "late": 1, "unknown": 2}
    assert stats["reissued"] == 3 and stats["outstanding"] == 0 and stats["retry"] == 0


def test_a_wait_with_nothing_to_give_is_answered_empty_after_wait_s(spawn_node) -> None:
    node = spawn_node(LEASER, "leaser2", "lease.items=1", "lease.lease_timeout_s=30")
    c = node.client(timeout=5)
    assert len(c.request("lease.request", {"credits": 1}).body["leases"]) == 1
    t = time.monotonic()
    reply = c.request("lease.request", {"credits": 1, "wait_s": 0.4})
    assert reply.body == {"leases": [], "exhausted": False}
    assert 0.35 < time.monotonic() - t < 3.0


def test_lease_table_orders_expiry_and_survives_a_restart() -> None:
    table = LeaseTable(10.0)
    leases = [table.grant(f"i{k}", k, "w", now=100.0 + k) for k in range(5)]
    assert table.next_deadline() == 110.0
    assert [x.item_id for x in table.expire(now=112.0)] == ["i0", "i1", "i2"]
    assert table.settle(leases[0].lease_id) == "late"          # waiting for re-issue: taken back
    again = table.grant_retry("w2", now=113.0)
    assert again is not None and again.item_id == "i1" and again.issues == 2
    assert table.settle(leases[1].lease_id) == "unknown"       # re-issued: the new lease owns it
    assert table.settle(again.lease_id) == "acked"
    assert table.settle(again.lease_id) == "unknown"           # never twice
    state = table.state_dict()
    fresh = LeaseTable(10.0)
    fresh.load_state_dict(state)
    assert sorted(i for i, _, _ in fresh.retry) == ["i2", "i3", "i4"] and not fresh.outstanding
    # grants out of time order still expire correctly
    odd = LeaseTable(1.0)
    late = odd.grant("a", 0, "w", now=50.0)
    early = odd.grant("b", 0, "w", now=10.0)
    assert odd.next_deadline() == 11.0
    assert [x.item_id for x in odd.expire(now=20.0)] == ["b"]
    assert late.lease_id in odd.outstanding and early.lease_id not in odd.outstanding
