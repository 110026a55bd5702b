"""Credit-based pull with leases: work is handed out, never pushed, and never lost.

    worker (DEALER)                        server (a LeaseTable inside e.g. the dataloader)
    lease.request{credits=k, wait_s} --->  expired leases are handed out again first, then new
                                           items from the source, up to k
                                           nothing to give: the request is held (deferred) up
                                           to wait_s; a new item or an expiry answers it
    <--- lease.request.reply{leases: [{lease_id, deadline_s, item}], exhausted}
    ... work ...
    lease.ack{lease_ids} ---------------->  the leases are done and forgotten; an ack for a
                                           lease that already expired (and went to another
                                           worker) is reported back as unknown

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


@dataclass
class Lease:
    lease_id: str
    item_id: str      # stable id of the work item (e.g. "epoch0/17"), survives re-issue
    item: Any
    worker: str
    deadline: float   # monotonic seconds
    issues: int = 1   # how many times this item has been leased


class LeaseTable:
    """Outstanding leases and the queue of expired items waiting to be leased again."""

    def __init__(self, lease_timeout_s: float):
        self.lease_timeout_s = lease_timeout_s
        self.outstanding: OrderedDict[str, Lease] = OrderedDict()
        self.retry: deque[tuple[str, Any, int]] = deque()   # (item_id, item, issues so far)
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self.reissued = 0

    def _lease(self, item_id: str, item: Any, worker: str, issues: int, now: float) -> Lease:
        lease = Lease(f"{self._prefix}-{next(self._ids)}", item_id, item, worker,
                      now + self.lease_timeout_s, issues)
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
        return self._lease(item_id, item, worker, 0 + 1, time.monotonic() if now is None else now)

    def ack(self, lease_id: str) -> Lease | None:
        """Mark a lease done; None if it is not outstanding (expired or acked before)."""
        return self.outstanding.pop(lease_id, None)

    def expire(self, now: float | None = None) -> list[Lease]:
        """Move leases past their deadline to the retry queue; returns them."""
        now = time.monotonic() if now is None else now
        gone = [lease for lease in self.outstanding.values() if lease.deadline <= now]
        for lease in gone:
            del self.outstanding[lease.lease_id]
            self.retry.append((lease.item_id, lease.item, lease.issues))
        return gone

    def next_deadline(self) -> float | None:
        return min((lease.deadline for lease in self.outstanding.values()), default=None)

    def state_dict(self) -> dict[str, Any]:
        """Everything not yet acked, as items to lease again after a restart."""
        pending = [(lease.item_id, lease.item, lease.issues) for lease in self.outstanding.values()]
        return {"pending": [list(p) for p in pending + list(self.retry)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outstanding.clear()
        self.retry = deque((str(i), item, int(n)) for i, item, n in state.get("pending", []))
