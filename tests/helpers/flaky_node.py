"""A node that loses messages on purpose, for the retry/dedupe tests (tests/test_bus_reqrep.py).

    nexrl-node tests/helpers/flaky_node.py:FlakyNode node.start=now flaky.drop_first_request=true

It serves `lease.ack` and counts how often its handler ran for each lease id; the reply's
`acked` is that count, so a client sees directly whether a retry ran the handler again.
Faults (each applies to the first attempt of every lease.ack request, by msg_id; other
requests such as node.status are served normally):

    drop_first_request   the first arrival never reaches dedupe or the handler (lost on the way in)
    drop_first_reply     the handler runs, its reply is cached but not sent (lost on the way out)
    delay_s              the handler defers and answers after delay_s (slower than the client)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from nexrl.bus import codec
from nexrl.node import DEFER, Node, Request, handles


@dataclass
class FlakyConfig:
    #: Ignore the first arrival of every request (by msg_id), before any processing.
    drop_first_request: bool = False
    #: Run the handler but do not send its first reply (it stays in the reply cache).
    drop_first_reply: bool = False
    #: Seconds the lease.ack handler holds its answer (0: answer at once).
    delay_s: float = 0.0


class FlakyNode(Node):
    role = "flaky"
    Config = FlakyConfig
    RUNTIME_OVERRIDES = ("_on_request_frames", "_route_reply")  # where the faults are injected

    def setup(self) -> None:
        self.runs: Counter[str] = Counter()
        self.seen_ids: set[str] = set()
        self.replied_ids: set[bytes] = set()
        self.dropped_requests = 0
        self.dropped_replies = 0

    def _on_request_frames(self, parts: list) -> None:
        if self.cfg.drop_first_request and len(parts) > 1:
            try:
                msg = codec.decode(parts[1:])
                msg_id = msg.msg_id if msg.type == "lease.ack" else None
            except codec.DecodeError:
                msg_id = None
            if msg_id is not None and msg_id not in self.seen_ids:
                self.seen_ids.add(msg_id)
                self.dropped_requests += 1
                return
        super()._on_request_frames(parts)

    def _route_reply(self, peer: bytes, frames: list) -> bool:
        if self.cfg.drop_first_reply:
            reply = codec.decode([bytes(f) for f in frames])
            key = (reply.reply_to or "").encode()
            if reply.type == "lease.ack.reply" and key not in self.replied_ids:
                self.replied_ids.add(key)
                self.dropped_replies += 1
                return True
        return super()._route_reply(peer, frames)

    @handles("lease.ack")
    def on_ack(self, req: Request) -> Any:
        """lease.ack{lease_ids} -> {acked: handler runs for lease_ids[0], unknown: []}."""
        lid = req.body["lease_ids"][0]
        self.runs[lid] += 1
        body = {"acked": self.runs[lid], "unknown": []}
        if self.cfg.delay_s > 0:
            self.call_later(self.cfg.delay_s, lambda: self.reply(req, body))
            return DEFER
        return body

    def stats_extra(self) -> dict[str, Any]:
        return {"runs": dict(getattr(self, "runs", {})),
                "dropped_requests": getattr(self, "dropped_requests", 0),
                "dropped_replies": getattr(self, "dropped_replies", 0)}


class TinyCacheNode(FlakyNode):
    """FlakyNode whose reply cache keeps only ~1 KB of replies (tests the byte bound)."""

    role = "tinycache"
    config_section = "flaky"
    REPLY_CACHE_BYTES = 1000
