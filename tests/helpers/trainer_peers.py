"""Real bus peers built for the trainer / weight_sync tests (they run as `nexrl-node` processes).

- `RecordingDataloader` (role dataloader): answers `validation.start` and `state.get` and
  records what it was asked (visible in node.status stats).
- `RecordingValidator` (role validator): answers `validation.begin` and records it.

    nexrl-node tests/helpers/trainer_peers.py:RecordingValidator node.start=now ...
"""

from __future__ import annotations

from typing import Any

from nexrl.node import Node, Request, handles


class RecordingDataloader(Node):
    role = "dataloader"

    def setup(self) -> None:
        self.validations: list[list[Any]] = []
        self.state_gets = 0

    @handles("validation.start")
    def on_validation(self, req: Request) -> dict[str, Any]:
        self.validations.append([req.body["version"], req.body["validation_id"]])
        return {"num_items": 2, "num_samples": 8}

    @handles("state.get")
    def on_state(self, req: Request) -> dict[str, Any]:
        self.state_gets += 1
        return {"state": {"epoch": 0, "cursor": self.state_gets}}

    def stats_extra(self) -> dict[str, Any]:
        return {"validations": list(getattr(self, "validations", [])),
                "state_gets": getattr(self, "state_gets", 0)}


class RecordingValidator(Node):
    role = "validator"

    def setup(self) -> None:
        self.begins: list[list[Any]] = []

    @handles("validation.begin")
    def on_begin(self, req: Request) -> dict[str, Any]:
        b = req.body
        self.begins.append([b["version"], b["validation_id"], b["num_samples"]])
        return {}

    def stats_extra(self) -> dict[str, Any]:
        return {"begins": list(getattr(self, "begins", []))}
