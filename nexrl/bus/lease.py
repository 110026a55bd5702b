"""Credit-based pull with leases: work is handed out, never pushed, and never lost.

    worker (DEALER)                        server (a LeaseTable inside e.g. the dataloader)
    lease.request{credits=k, wait_s} --->  expired leases are handed out again first, then new
                                           items from the source, up to k
                                           nothing to give: the request is held (deferred) up
                                           to wait_s; a new item or an expiry answers it
    <--- lease.request.reply{leases: [{lease_id, deadline_s, item}], exhausted}
    ... work ...
    lease.ack{lease_ids} ---------------->  settle(): the item is done, exactly once
    <--- lease.ack.reply{acked, unknown}

Exactly-once acks (`settle`): an item counts as done the first time any of its leases is
acknowledged, never twice.

    ack of an outstanding lease ............................ "acked"
    ack of an expired lease whose item waits for re-issue .. "late": taken back, not re-issued
    ack of an expired lease whose item was re-issued ....... "unknown" (the new lease owns it)
    ack of a lease acked before, or never issued ........... "unknown"

Backpressure falls out of the credits: a worker asks only for what it can run, so nothing
queues up in a slow worker, and a dead worker's leases come back after `lease_timeout_s`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

#: Expired lease ids remembered for late acks (oldest forgotten first).
EXPIRED_MAX = 100_000


@dataclass
class Lease:
    lease_id: str
    item_id: str      # stable id of the work item (e.g. "epoch0/17"), survives re-issue
    item: Any
    worker: str
    deadline: float   # monotonic seconds
    issues: int = 1   # how many times this item has been leased


class LeaseTable:
    """Outstanding leases and the queue of expired items waiting to be leased again.

    `outstanding` is kept in grant order; when every grant uses a non-decreasing `now` (the
    normal case: time.monotonic()), that is deadline order too, and `expire` and
    `next_deadline` only look at the front. Out-of-order grants fall back to a full scan.
    """

    def __init__(self, lease_timeout_s: float):
        self.lease_timeout_s = lease_timeout_s
        self.outstanding: OrderedDict[str, Lease] = OrderedDict()
        self.retry: deque[tuple[str, Any, int]] = deque()   # (item_id, item, issues so far)
        self.expired_ids: OrderedDict[str, str] = OrderedDict()  # expired lease_id -> item_id
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self._last_deadline = float("-inf")
        self._ordered = True
        self.reissued = 0
        self.late_acks = 0

    def _lease(self, item_id: str, item: Any, worker: str, issues: int, now: float) -> Lease:
        lease = Lease(f"{self._prefix}-{next(self._ids)}", item_id, item, worker,
                      now + self.lease_timeout_s, issues)
        if lease.deadline < self._last_deadline:
            self._ordered = False
        self._last_deadline = max(self._last_deadline, lease.deadline)
        self.outstanding[lease.lease_id] = lease
        return lease

    def grant_retry(self, worker: str, now: float | None = None) -> Lease | None:
        """Lease an expired item again, if any is waiting."""
        if not self.retry:
            return None
        item_id, item, issues = self.retry.popleft()
        self.reissued += 1
        return self._lease(item_id, item, worker, issues + 1, time.monotonic() if now is None else now)

    def grant(self, item_id: str, item: Any, worker: str, now: float | None = None) -> Lease:
        """Lease a fresh item."""
        return self._lease(item_id, item, worker, 1, time.monotonic() if now is None else now)

    def ack(self, lease_id: str) -> Lease | None:
        """Mark a lease done; None if it is not outstanding (expired or acked before)."""
        return self.outstanding.pop(lease_id, None)

    def settle(self, lease_id: str) -> str:
        """Acknowledge with exactly-once semantics (module docstring): "acked", "late" or
        "unknown"."""
        if self.outstanding.pop(lease_id, None) is not None:
            return "acked"
        item_id = self.expired_ids.pop(lease_id, None)
        if item_id is not None:
            for entry in self.retry:
                if entry[0] == item_id:
                    self.retry.remove(entry)
                    self.late_acks += 1
                    return "late"
        return "unknown"

    def expire(self, now: float | None = None) -> list[Lease]:
        """Move leases past their deadline to the retry queue; returns them."""
        now = time.monotonic() if now is None else now
        if self._ordered:
            gone = []
            for lease in self.outstanding.values():
                if lease.deadline > now:
                    break
                gone.append(lease)
        else:
            gone = [lease for lease in self.outstanding.values() if lease.deadline <= now]
        for lease in gone:
            del self.outstanding[lease.lease_id]
            self.retry.append((lease.item_id, lease.item, lease.issues))
            self.expired_ids[lease.lease_id] = lease.item_id
            if len(self.expired_ids) > EXPIRED_MAX:
                self.expired_ids.popitem(last=False)
        if not self.outstanding:
            self._ordered, self._last_deadline = True, float("-inf")
        return gone

    def next_deadline(self) -> float | None:
        if not self.outstanding:
            return None
        if self._ordered:
            return next(iter(self.outstanding.values())).deadline
        return min(lease.deadline for lease in self.outstanding.values())

    def state_dict(self) -> dict[str, Any]:
        """Everything not yet acked, as items to lease again after a restart."""
        pending = [(lease.item_id, lease.item, lease.issues) for lease in self.outstanding.values()]
        return {"pending": [list(p) for p in pending + list(self.retry)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outstanding.clear()
        self.expired_ids.clear()
        self._ordered, self._last_deadline = True, float("-inf")
        self.retry = deque((str(i), item, int(n)) for i, item, n in state.get("pending", []))
