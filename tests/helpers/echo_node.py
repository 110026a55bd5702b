"""A small node for bus tests: echoes, counts, defers, and streams events.

    nexrl-node tests/helpers/echo_node.py:EchoNode node.start=now node.bus.events_pub=... ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nexrl.node import DEFER, Node, Request, handles


@dataclass
class EchoConfig:
    #: Seconds a lease.request with no work is held before an empty reply (tests deferral).
    hold_s: float = 0.2


class EchoNode(Node):
    role = "echo"
    Config = EchoConfig

    def setup(self) -> None:
        self.received = 0

    @handles("lease.request")
    def on_lease(self, req: Request) -> Any:
        """Answers after hold_s with `credits` numbered items (exercises DEFER + reply)."""
        self.received += 1
        credits = int(req.body["credits"])
        items = [{"lease_id": f"l{self.received}-{i}", "deadline_s": 1.5, "item": i}
                 for i in range(credits)]
        self.call_later(self.cfg.hold_s, lambda: self.reply(req, {"leases": items}))
        return DEFER

    @handles("lease.ack")
    def on_ack(self, req: Request) -> dict:
        self.received += 1
        return {"acked": len(req.body["lease_ids"]), "unknown": []}

    def stats_extra(self) -> dict:
        return {"received": getattr(self, "received", 0)}
