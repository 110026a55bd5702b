"""Liveness from heartbeats: who is alive, who went silent.

Every node publishes `node.heartbeat` every `interval_s`. A watcher (the supervisor, the
tracker, `nexrl-bus nodes`) feeds each heartbeat to `Liveness.beat`; a node that has missed
`liveness` intervals in a row is dead (the Paranoid Pirate rule of the ZeroMQ guide).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Peer:
    name: str
    info: dict[str, Any]
    last_seen: float                 # monotonic time of the last heartbeat
    interval_s: float
    beats: int = 0
    first_seen: float = field(default_factory=time.monotonic)

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_seen


class Liveness:
    """Track peers by name; `dead()` lists those silent for `liveness` heartbeat intervals."""

    def __init__(self, liveness: int = 3):
        self.liveness = liveness
        self.peers: dict[str, Peer] = {}

    def beat(self, name: str, info: dict[str, Any], now: float | None = None) -> Peer:
        now = time.monotonic() if now is None else now
        try:
            interval = float(info.get("interval_s") or 1.0)
        except (TypeError, ValueError):
            interval = 1.0
        interval = interval if interval > 0 else 1.0
        peer = self.peers.get(name)
        if peer is None:
            peer = self.peers[name] = Peer(name, info, now, interval, first_seen=now)
        peer.info, peer.last_seen, peer.interval_s = info, now, interval
        peer.beats += 1
        return peer

    def missed(self, name: str, now: float | None = None) -> int:
        """Whole heartbeat intervals since `name` last beat (0 while it beats on time); a
        node is dead once this reaches `liveness`. Unknown names count as `liveness`."""
        peer = self.peers.get(name)
        if peer is None:
            return self.liveness
        return int(peer.age(now) / peer.interval_s) if peer.interval_s > 0 else 0

    def is_alive(self, name: str, now: float | None = None) -> bool:
        peer = self.peers.get(name)
        return peer is not None and peer.age(now) < self.liveness * peer.interval_s

    def dead(self, now: float | None = None) -> list[Peer]:
        return [p for p in self.peers.values() if not self.is_alive(p.name, now)]

    def forget(self, name: str) -> None:
        self.peers.pop(name, None)
