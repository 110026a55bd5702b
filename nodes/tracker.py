"""The tracker: what the job is doing, step by step, and what to do when something breaks.

    trainer ----- metrics{kind: train} ------+
    rollout ----- metrics{kind: rollout} ----+
    weight_sync - metrics{kind: sync}, ------+--> Tracker --> console: one progress line a step
                  weights.live               |            --> <run_dir>/metrics.jsonl
    validator --- validation.done -----------+            --> <run_dir>/tensorboard/ (event files)
    trainer ----- checkpoint.saved ----------+            --> wandb (when configured)
    every node -- node.heartbeat (activity) -+            --> at the end: summary.json and
              -- node.error -----------------+                plots/reward.png
                                                          --> job.stop to the supervisor
                                                              (error_policy = stop)

Nothing waits on the tracker: it only subscribes, so a slow or absent tracker never slows
training (events are advisory; a missed one shows up as a sequence gap in node.status).

Activity: each node's heartbeat may carry `activity` ({inflight: n, ...}); the tracker keeps the
latest per node and calls the job quiescent when no node has work in flight (`quiescent()`).
Error policy: `stop` — the first fatal `node.error` (or any error whose code is in
`stop_on_codes`) makes the tracker ask the supervisor to stop the job (`job.stop`, failed);
`continue` — errors are only logged and counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from nexrl.bus.codec import Message
from nexrl.bus.reqrep import RemoteError, RequestTimeout
from nexrl.node import Node, handles

ERROR_POLICIES = ("stop", "continue")


@dataclass
class TrackerConfig:
    """The `tracker` section of a recipe."""

    #: "stop": a fatal node.error stops the job (job.stop to the supervisor); "continue": log only.
    error_policy: str = "stop"
    #: Error codes that also stop the job under error_policy=stop (besides fatal errors).
    stop_on_codes: list[str] = field(default_factory=list)
    #: Total trainer steps, for the progress line ("step 3/40"); 0 = unknown.
    total_steps: int = 0
    #: Print one progress line per trainer step.
    console: bool = True
    #: Write every metric to <run_dir>/metrics.jsonl.
    jsonl: bool = True
    #: Write TensorBoard event files under <run_dir>/tensorboard.
    tensorboard: bool = True
    #: wandb project; "" = off. Needs the wandb package and credentials.
    wandb_project: str = ""
    #: Draw <run_dir>/plots/reward.png at the end.
    plot: bool = True

    def __post_init__(self) -> None:
        if self.error_policy not in ERROR_POLICIES:
            raise ValueError(f"tracker.error_policy must be one of {ERROR_POLICIES}, "
                             f"not {self.error_policy!r}")


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


class Tracker(Node):
    role = "tracker"
    Config = TrackerConfig
    SUBSCRIBE = ("metrics", "validation.done", "weights.live", "node.error", "node.heartbeat",
                 "checkpoint.saved")

    def setup(self) -> None:
        cfg: TrackerConfig = self.cfg
        self.run_dir = self.node_cfg.run_dir or ""
        self.steps: dict[int, dict[str, float]] = defaultdict(dict)
        self.validation: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.node_activity: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.live_version = 0
        self.stop_requested = False
        self.started = time.time()
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            if cfg.jsonl:
                self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a", buffering=1)
            if cfg.tensorboard:  # tensorboard's own writer: tensorboardX would import torch
                from tensorboard.summary.writer.event_file_writer import EventFileWriter

                self._tb = EventFileWriter(os.path.join(self.run_dir, "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("tracker.wandb_project is set but the wandb package is not "
                                   "installed (pip install wandb)") from e
            self._wandb = wandb.init(project=cfg.wandb_project, dir=self.run_dir or None)

    # ------------------------------------------------------------------ event handlers

    def _record(self, step: int, kind: str, values: dict[str, float]) -> None:
        self.steps[step].update(values)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"time": time.time(), "step": step, "kind": kind,
                                          **values}) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                                 for k, v in values.items()])
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    @handles("metrics")
    def on_metrics(self, msg: Message) -> None:
        b = msg.body
        step, kind = int(b["step"]), str(b["kind"])
        values = {str(k): float(v) for k, v in b["values"].items()}
        self._record(step, kind, values)
        if kind == "train" and self.cfg.console:
            print(self.progress_line(step), flush=True)

    @handles("validation.done")
    def on_validation(self, msg: Message) -> None:
        b = msg.body
        version = int(b["version"])
        values = {f"val/{k}": float(v) for k, v in b["metrics"].items()}
        self.validation.append({"version": version, "validation_id": b["validation_id"],
                                "num_samples": int(b["num_samples"]), **values})
        self._record(version, "validate", values)
        if self.cfg.console:
            print(f"validation v{version}: reward {_fmt(values.get('val/reward_mean'))} "
                  f"accuracy {_fmt(values.get('val/accuracy'))} "
                  f"({b['num_samples']} samples)", flush=True)

    @handles("weights.live")
    def on_live(self, msg: Message) -> None:
        self.live_version = max(self.live_version, int(msg.body["version"]))

    @handles("checkpoint.saved")
    def on_checkpoint(self, msg: Message) -> None:
        self.checkpoints.append({"step": int(msg.body["step"]), "path": str(msg.body["path"])})

    @handles("node.heartbeat")
    def on_heartbeat(self, msg: Message) -> None:
        activity = msg.body.get("activity")
        if isinstance(activity, dict):
            self.node_activity[str(msg.body["name"])] = activity

    @handles("node.error")
    def on_error(self, msg: Message) -> None:
        b = msg.body
        self.errors.append({"time": msg.ts, **{k: b.get(k) for k in ("node", "code", "message")}})
        fatal = bool(b.get("fatal"))
        if (self.cfg.error_policy == "stop" and not self.stop_requested
                and (fatal or b.get("code") in self.cfg.stop_on_codes)):
            self.stop_requested = True
            reason = f"error policy 'stop': {b.get('node')} reported [{b.get('code')}] {b.get('message')}"
            self.log.error(reason)
            self.call_soon(lambda: self._ask_stop(reason))

    def _ask_stop(self, reason: str) -> None:
        import threading

        def ask() -> None:
            try:
                self.client("supervisor").request("job.stop", {"reason": reason, "failed": True})
            except (LookupError, RemoteError, RequestTimeout) as e:
                self.log.error("cannot ask the supervisor to stop the job: %s", e)

        threading.Thread(target=ask, name="job-stop", daemon=True).start()

    # ------------------------------------------------------------------ views

    def quiescent(self) -> bool:
        """True when no node reports work in flight."""
        return all(int(a.get("inflight", 0)) == 0 for a in self.node_activity.values())

    def progress_line(self, step: int) -> str:
        v = self.steps[step]
        total = f"/{self.cfg.total_steps}" if self.cfg.total_steps else ""
        last_val = self.validation[-1] if self.validation else None
        val = (f"val {_fmt(last_val.get('val/reward_mean'))} (v{last_val['version']})"
               if last_val else "val -")
        return (f"step {step}{total} | reward {_fmt(v.get('train/reward_mean'))}"
                f"±{_fmt(v.get('train/reward_std'), '.2f')} | {val} | "
                f"kl {_fmt(v.get('train/kl'), '.4f')} | clip {_fmt(v.get('train/clip_frac'), '.2f')} | "
                f"len {_fmt(v.get('train/response_len_mean'), '.1f')} | "
                f"gen {_fmt(v.get('timing/generate_s'), '.1f')}s wait {_fmt(v.get('timing/wait_s'), '.1f')}s "
                f"train {_fmt(v.get('timing/train_s'), '.1f')}s sync {_fmt(v.get('timing/weight_sync_s'), '.2f')}s | "
                f"{_fmt(v.get('throughput/tokens_per_s'), '.0f')} tok/s | "
                f"staleness {_fmt(v.get('train/staleness_max'), '.0f')}")

    def stats_extra(self) -> dict[str, Any]:
        return {"steps_seen": len(self.steps), "validations": len(self.validation),
                "errors_seen": len(self.errors), "quiescent": self.quiescent()}

    # ------------------------------------------------------------------ the end

    def summary(self) -> dict[str, Any]:
        train = sorted((s, v["train/reward_mean"]) for s, v in self.steps.items()
                       if "train/reward_mean" in v)
        val = [(r["version"], r.get("val/reward_mean")) for r in self.validation]
        return {
            "wall_s": time.time() - self.started,
            "steps": len(train),
            "train_reward_first": train[0][1] if train else None,
            "train_reward_last": train[-1][1] if train else None,
            "validation": [{"version": s, "reward_mean": r} for s, r in val],
            "checkpoints": self.checkpoints,
            "errors": len(self.errors),
        }

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = sorted((s, v["train/reward_mean"]) for s, v in self.steps.items()
                       if "train/reward_mean" in v)
        val = sorted((r["version"], r["val/reward_mean"]) for r in self.validation
                     if "val/reward_mean" in r)
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train reward (batch mean)", alpha=0.7)
        if val:
            ax.plot(*zip(*val), "o-", label="validation reward")
        ax.set_xlabel("step (weight version)")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def teardown(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if not self.run_dir:
            return
        summary = self.summary()
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        lines = [f"summary: {summary['steps']} steps in {summary['wall_s']:.0f}s; train reward "
                 f"{_fmt(summary['train_reward_first'])} -> {_fmt(summary['train_reward_last'])}"]
        if summary["validation"]:
            first, last = summary["validation"][0], summary["validation"][-1]
            lines.append(f"validation reward v{first['version']} {_fmt(first['reward_mean'])} -> "
                         f"v{last['version']} {_fmt(last['reward_mean'])}")
        if self.cfg.plot and (self.steps or self.validation):
            os.makedirs(os.path.join(self.run_dir, "plots"), exist_ok=True)
            plot = os.path.join(self.run_dir, "plots", "reward.png")
            self._plot(plot)
            lines.append(f"plot: {plot}")
        lines.append(f"curves: {os.path.join(self.run_dir, 'metrics.jsonl')} "
                     f"(TensorBoard: {os.path.join(self.run_dir, 'tensorboard')})")
        if self.checkpoints:
            lines.append(f"checkpoints: {os.path.dirname(self.checkpoints[-1]['path'])} "
                         f"(last: {self.checkpoints[-1]['path']})")
        for line in lines:
            print(line, flush=True)
