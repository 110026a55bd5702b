"""A test-only trajectory receiver for the rollout tests: a real bus node that takes
trajectory.put like the validator (or the pool) and appends every trajectory, as JSON, to
`out_path`, so a test can inspect exactly what a rollout worker delivered.

    nexrl-node tests/helpers/rollout_collector.py:Collector --config c.yaml node.start=now ...

`refuse_first` > 0 answers the first puts with error{busy} (the receiver-full case a rollout
must retry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from nexrl.node import HandlerError, Node, Request, handles


@dataclass
class CollectorConfig:
    #: JSON-lines file receiving every trajectory (arrays as {"dtype", "data"}).
    out_path: str = ""
    #: Puts refused with error{busy} before the first one is taken.
    refuse_first: int = 0


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"dtype": str(v.dtype), "data": v.tolist()}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class Collector(Node):
    role = "validator"
    Config = CollectorConfig

    def setup(self) -> None:
        self.seen: set[str] = set()
        self.refused = 0

    @handles("trajectory.put")
    def on_put(self, req: Request) -> dict[str, Any]:
        if self.refused < self.cfg.refuse_first:
            self.refused += 1
            raise HandlerError("busy", f"collector: refusing put {self.refused} (test)")
        accepted = duplicates = 0
        with open(self.cfg.out_path, "a") as f:
            for t in req.body["trajectories"]:
                if t["traj_id"] in self.seen:
                    duplicates += 1
                    continue
                self.seen.add(t["traj_id"])
                accepted += 1
                f.write(json.dumps(_plain(t)) + "\n")
        return {"accepted": accepted, "duplicates": duplicates}

    def stats_extra(self) -> dict[str, Any]:
        return {"collected": len(getattr(self, "seen", ())), "refused": getattr(self, "refused", 0)}
