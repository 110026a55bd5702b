"""A work server over nexrl.bus.lease.LeaseTable, for tests/test_bus_lease.py.

    nexrl-node tests/helpers/lease_node.py:LeaseNode node.start=now lease.items=6 lease.lease_timeout_s=0.8

    worker --lease.request{credits, wait_s}--> expired items first, then fresh ones; nothing
                                               to give: held until an expiry frees one (or
                                               wait_s passes: leases=[])
    worker --lease.ack{lease_ids}-----------> LeaseTable.settle: acked | late | unknown

It counts how many times each item was completed (`done`), which must end at exactly 1.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from nexrl.bus.lease import Lease, LeaseTable
from nexrl.node import DEFER, HandlerError, Node, Request, handles


@dataclass
class LeaseConfig:
    #: Number of work items: item-0 .. item-(items-1).
    items: int = 6
    #: Seconds a lease may stay unacknowledged before its item is leased again.
    lease_timeout_s: float = 0.8


class LeaseNode(Node):
    role = "leaser"
    config_section = "lease"
    Config = LeaseConfig
    SERVE_WHEN_READY_ONLY = True  # the table is built in setup()

    def setup(self) -> None:
        self.table = LeaseTable(self.cfg.lease_timeout_s)
        self.fresh = [f"item-{i}" for i in range(self.cfg.items)]
        self.done: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.waiting: list[tuple[Request, int]] = []
        self.expiry_timer: Any = None

    # -------------------------------------------------------------- leasing

    def _grant(self, worker: str, credits: int) -> list[Lease]:
        self.table.expire()
        out = []
        while len(out) < credits and (lease := self.table.grant_retry(worker)) is not None:
            out.append(lease)
        while len(out) < credits and self.fresh:
            item_id = self.fresh.pop(0)
            out.append(self.table.grant(item_id, {"id": item_id}, worker))
        if out:
            self._schedule_expiry()
        return out

    def _exhausted(self) -> bool:
        return not self.fresh and not self.table.outstanding and not self.table.retry

    def _body(self, leases: list[Lease]) -> dict[str, Any]:
        now = time.monotonic()
        return {"leases": [{"lease_id": x.lease_id, "deadline_s": max(0.0, x.deadline - now),
                            "item": {**x.item, "issues": x.issues}} for x in leases],
                "exhausted": self._exhausted()}

    def _schedule_expiry(self) -> None:
        nd = self.table.next_deadline()
        if nd is None:
            return
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
        self.expiry_timer = self.call_later(max(0.0, nd - time.monotonic()) + 0.01, self._on_expiry)

    def _on_expiry(self) -> None:
        self.expiry_timer = None
        gone = self.table.expire()
        if gone:
            self.log.info("expired: %s", [x.item_id for x in gone])
        while self.waiting and (self.table.retry or self.fresh):
            req, credits = self.waiting.pop(0)
            self.reply(req, self._body(self._grant(req.msg.sender, credits)))
        self._schedule_expiry()

    # -------------------------------------------------------------- handlers

    @handles("lease.request")
    def on_request(self, req: Request) -> Any:
        """lease.request{credits, wait_s?} -> {leases, exhausted}; held up to wait_s."""
        credits, wait_s = int(req.body["credits"]), float(req.body.get("wait_s", 0.0))
        if credits < 1:
            raise HandlerError("invalid_body", f"credits must be >= 1, got {credits}")
        leases = self._grant(req.msg.sender, credits)
        if leases or wait_s <= 0 or self._exhausted():
            return self._body(leases)
        entry = (req, credits)
        self.waiting.append(entry)
        self.call_later(wait_s, lambda: self._give_up(entry))
        return DEFER

    def _give_up(self, entry: tuple[Request, int]) -> None:
        if entry in self.waiting:
            self.waiting.remove(entry)
            self.reply(entry[0], self._body([]))

    @handles("lease.ack")
    def on_ack(self, req: Request) -> dict[str, Any]:
        """lease.ack{lease_ids} -> {acked, unknown}: exactly once per item (LeaseTable.settle)."""
        acked, unknown = 0, []
        for lid in req.body["lease_ids"]:
            lease = self.table.outstanding.get(lid)
            item_id = lease.item_id if lease else self.table.expired_ids.get(lid)
            outcome = self.table.settle(lid)
            self.outcomes[outcome] += 1
            if outcome == "unknown":
                unknown.append(lid)
            else:
                acked += 1
                self.done[item_id] += 1
        return {"acked": acked, "unknown": unknown}

    def stats_extra(self) -> dict[str, Any]:
        if not hasattr(self, "table"):
            return {}
        return {"done": dict(self.done), "outcomes": dict(self.outcomes),
                "reissued": self.table.reissued, "outstanding": len(self.table.outstanding),
                "retry": len(self.table.retry)}
