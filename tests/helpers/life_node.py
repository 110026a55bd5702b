"""A node whose lifecycle misbehaves on request, for tests/test_bus_node.py.

    nexrl-node tests/helpers/life_node.py:LifeNode node.start=now life.stuck=true ...

    stuck          main() ignores `stopping` (sleeps for an hour): drain timeout path
    crash          main() raises after crash_after_s
    peer           main() pings this peer (a role or node name) in a loop with self.client(),
                   i.e. a client created on the worker thread, until told to stop
    block_s        lease.ack blocks the loop thread this long (heartbeats must go on)
    setup_s        setup() takes this long
    lease.request  is deferred and never answered (answered `not_ready` at shutdown)

StrictLifeNode is the same with SERVE_WHEN_READY_ONLY (role requests refused until ready).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nexrl.node import DEFER, Node, Request, handles


@dataclass
class LifeConfig:
    #: main() ignores self.stopping and sleeps for an hour.
    stuck: bool = False
    #: main() raises RuntimeError after crash_after_s seconds.
    crash: bool = False
    #: Seconds before the crash.
    crash_after_s: float = 0.2
    #: Peer (role or name) that main() pings in a loop from the worker thread; "" = none.
    peer: str = ""
    #: Seconds lease.ack blocks the loop thread.
    block_s: float = 0.0
    #: Seconds setup() takes (a model load).
    setup_s: float = 0.0


class LifeNode(Node):
    role = "life"
    Config = LifeConfig

    def setup(self) -> None:
        self.pings = 0
        time.sleep(self.cfg.setup_s)

    def main(self) -> None:
        if self.cfg.stuck:
            time.sleep(3600)
        if self.cfg.crash:
            time.sleep(self.cfg.crash_after_s)
            raise RuntimeError("life: crashing as configured")
        if self.cfg.peer:
            client = self.client(self.cfg.peer)
            while not self.stopping.is_set():
                client.request("ping", {"payload": self.pings})
                self.pings += 1
                self.stopping.wait(0.01)
            return
        self.stopping.wait()

    @handles("lease.request")
    def on_lease(self, req: Request) -> Any:
        """Held forever: the node answers it (not_ready) only when it stops."""
        return DEFER

    @handles("lease.ack")
    def on_ack(self, req: Request) -> dict:
        """Blocks the loop thread for block_s (a badly behaved handler)."""
        time.sleep(self.cfg.block_s)
        return {"acked": 0, "unknown": []}

    def stats_extra(self) -> dict:
        return {"pings": getattr(self, "pings", 0)}


class StrictLifeNode(LifeNode):
    role = "strictlife"
    config_section = "life"
    SERVE_WHEN_READY_ONLY = True
