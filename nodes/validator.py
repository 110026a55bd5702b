"""The validator node: collects validation trajectories and reports each pass's metrics.

    nexrl-node validator --config recipe.yaml node.start=now

The queue (everything on the loop thread):

    weight_sync --validation.begin{version, validation_id, num_samples}--> a pass opens;
                  its timeout_s clock starts
    rollout-i   --trajectory.put{mode validate}--> deduped by traj_id into its pass (a put
                  that arrives before its validation.begin is kept and counted then)
    the pass has num_samples trajectories --> aggregate, publish validation.done
                  {version, validation_id, num_samples, metrics}, log a line, append a line to
                  <run_dir>/validation.jsonl
    timeout_s passes first --> node.error{code: timeout} and validation.done with what came
                  in and metrics["complete"] = 0 (every validation.done carries "complete":
                  1 or 0), so whoever waits on it (weight_sync, tracker) is never stuck;
                  later trajectories of that pass are dropped

Nothing here bounds staleness: validation items bypass admission control in the dataloader.

Metrics (names as published): reward_mean, reward_std, accuracy, response_length_mean,
complete, and per data source "<source>/reward_mean", "<source>/accuracy". A trajectory is
correct if its metrics["correct"] is present and > 0, else if reward >= correct_threshold.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexrl.config import NodeConfig
from nexrl.node import HandlerError, Node, Request, handles


@dataclass
class ValidatorConfig:
    """The `validator` section of a recipe."""

    #: A sample counts as correct when its reward >= this (unless it reports metrics["correct"]).
    correct_threshold: float = 1.0
    #: Seconds from validation.begin until an incomplete pass is reported as it is.
    timeout_s: float = 600.0
    #: Trajectories held for passes whose validation.begin has not arrived yet (beyond it,
    #: such puts are refused with error{busy}).
    max_early: int = 100_000

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_early < 0:
            raise ValueError(f"validator.timeout_s must be > 0 and validator.max_early >= 0, got "
                             f"{self.timeout_s} and {self.max_early}")


@dataclass(slots=True)
class _Sample:
    reward: float
    correct: bool
    source: str
    length: int


@dataclass(eq=False)
class _Pass:
    validation_id: str
    version: int = -1                 # -1 until validation.begin arrives
    expected: int = -1
    started: float = 0.0
    samples: dict[str, _Sample] = field(default_factory=dict)   # traj_id -> sample


def aggregate(samples: list[_Sample]) -> dict[str, float]:
    """The pass's metrics (without `complete`)."""
    if not samples:
        return {}
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / len(rewards)
    out = dict(reward_mean=mean,
               reward_std=math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
               accuracy=sum(s.correct for s in samples) / len(samples),
               response_length_mean=sum(s.length for s in samples) / len(samples))
    by_source: dict[str, list[_Sample]] = defaultdict(list)
    for s in samples:
        by_source[s.source].append(s)
    for src, ss in sorted(by_source.items()):
        out[f"{src}/reward_mean"] = sum(s.reward for s in ss) / len(ss)
        out[f"{src}/accuracy"] = sum(s.correct for s in ss) / len(ss)
    return out


class Validator(Node):
    """Serves validation.begin and trajectory.put (mode validate); publishes validation.done."""

    role = "validator"
    Config = ValidatorConfig
    SERVE_WHEN_READY_ONLY = True   # handler state is built in setup()

    def __init__(self, node_cfg: NodeConfig, cfg: ValidatorConfig | None = None):
        super().__init__(node_cfg, cfg)
        self.passes: dict[str, _Pass] = {}
        self.finished: dict[str, tuple[int, int]] = {}   # validation_id -> (version, expected)
        self.counts = dict(accepted=0, duplicates=0, late=0, passes_done=0, passes_timed_out=0)

    def _sample(self, i: int, t: Any) -> tuple[str, str, _Sample]:
        """(validation_id, traj_id, sample) of trajectory i, or refuse the put."""
        def bad(why: str) -> HandlerError:
            return HandlerError("invalid_body", f"trajectory.put: trajectories[{i}] {why}")

        if not isinstance(t, dict):
            raise bad(f"is a {type(t).__name__}, not a map")
        for key in ("traj_id", "validation_id"):
            if not isinstance(t.get(key), str):
                raise bad(f"needs a string {key!r} (the validator takes mode 'validate' only)")
        reward = t.get("reward")
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise bad("needs a numeric 'reward'")
        metrics = t.get("metrics") or {}
        correct = (float(metrics["correct"]) > 0 if isinstance(metrics, dict) and "correct" in metrics
                   else reward >= self.cfg.correct_threshold)
        ids = t.get("response_ids")
        length = len(ids) if ids is not None else 0
        source = t.get("data_source") or "unknown"
        return t["validation_id"], t["traj_id"], _Sample(float(reward), bool(correct), str(source), length)

    @handles("validation.begin")
    def on_begin(self, req: Request) -> dict[str, Any]:
        """validation.begin{version, validation_id, num_samples} -> validation.begin.reply{}.

        Idempotent for the same pass. Failure: error{invalid_body} when the same
        validation_id comes again with another version or num_samples, or num_samples < 0.
        """
        vid, version, n = (str(req.body["validation_id"]), int(req.body["version"]),
                           int(req.body["num_samples"]))
        if n < 0:
            raise HandlerError("invalid_body", f"validation.begin: num_samples must be >= 0, got {n}")
        p = self.passes.get(vid)
        before = self.finished.get(vid) or (p and p.expected >= 0 and (p.version, p.expected))
        if before:
            if before != (version, n):
                raise HandlerError("invalid_body", f"validation.begin: pass {vid} was begun with "
                                                   f"version {before[0]}, {before[1]} samples")
            return {}
        p = self.passes.setdefault(vid, _Pass(vid))
        p.version, p.expected, p.started = version, n, time.monotonic()
        self.log.info("validation %s of version %d: expecting %d samples (%d already in)",
                      vid, version, n, len(p.samples))
        self.call_later(self.cfg.timeout_s, lambda: self._on_timeout(vid))
        self._maybe_done(p)
        return {}

    @handles("trajectory.put")
    def on_put(self, req: Request) -> dict[str, Any]:
        """trajectory.put{trajectories} -> trajectory.put.reply{accepted, duplicates}.

        Trajectories of a finished (or timed-out) pass are dropped (neither accepted nor
        duplicates). Failure: error{invalid_body} naming the bad trajectory (nothing stored);
        error{busy} when too many arrive before their validation.begin.
        """
        checked = [self._sample(i, t) for i, t in enumerate(req.body["trajectories"])]
        incoming = sum(1 for vid, _, _ in checked if self._is_early(vid))
        held = sum(len(p.samples) for p in self.passes.values() if p.expected < 0)
        if incoming and held + incoming > self.cfg.max_early:
            raise HandlerError("busy", f"{self.name}: {held} trajectories wait for their "
                                       f"validation.begin (max_early={self.cfg.max_early})")
        accepted = duplicates = 0
        touched: set[str] = set()
        for vid, tid, sample in checked:
            if vid in self.finished:
                self.counts["late"] += 1
                continue
            p = self.passes.setdefault(vid, _Pass(vid))
            if tid in p.samples:
                duplicates += 1
                continue
            p.samples[tid] = sample
            accepted += 1
            touched.add(vid)
        self.counts["accepted"] += accepted
        self.counts["duplicates"] += duplicates
        for vid in touched:
            self._maybe_done(self.passes[vid])
        return dict(accepted=accepted, duplicates=duplicates)

    def _is_early(self, vid: str) -> bool:
        p = self.passes.get(vid)
        return vid not in self.finished and (p is None or p.expected < 0)

    def _maybe_done(self, p: _Pass) -> None:
        if p.expected >= 0 and len(p.samples) >= p.expected:
            self._finish(p, complete=True)

    def _on_timeout(self, vid: str) -> None:
        p = self.passes.get(vid)
        if p is None or vid in self.finished:
            return
        msg = (f"validation {vid} of version {p.version}: only {len(p.samples)} of {p.expected} "
               f"samples within timeout_s={self.cfg.timeout_s:g}; reporting it incomplete")
        self.log.error("%s", msg)
        self.publish("node.error", dict(node=self.name, role=self.role, code="timeout", message=msg))
        self.counts["passes_timed_out"] += 1
        self._finish(p, complete=False)

    def _finish(self, p: _Pass, complete: bool) -> None:
        del self.passes[p.validation_id]
        self.finished[p.validation_id] = (p.version, p.expected)
        metrics = aggregate(list(p.samples.values()))
        metrics["complete"] = 1.0 if complete else 0.0
        body = dict(version=p.version, validation_id=p.validation_id,
                    num_samples=len(p.samples), metrics=metrics)
        self.publish("validation.done", body)
        self.counts["passes_done"] += 1
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.log.info("validation %s version %d: %d/%d samples in %.1fs: %s", p.validation_id,
                      p.version, len(p.samples), p.expected, time.monotonic() - p.started, shown)
        if self.node_cfg.run_dir:
            line = dict(time=time.time(), expected=p.expected, **body)
            path = Path(self.node_cfg.run_dir) / "validation.jsonl"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            except OSError as e:
                self.log.error("cannot append to %s: %s", path, e.strerror)

    def activity(self) -> dict[str, Any]:
        """In-flight work for the heartbeat (once nexrl.node has an activity hook)."""
        return dict(open_passes=len([p for p in self.passes.values() if p.expected >= 0]))

    def stats_extra(self) -> dict[str, Any]:
        return dict(self.counts, open_passes=len(self.passes))
