"""The rollout worker: leases tasks, generates with the engines, rewards, delivers trajectories.

    nexrl-node rollout --config recipe.yaml --name rollout-0 node.start=now

One asyncio loop (on the node's worker thread) keeps up to `max_inflight_groups` groups in
flight; bus calls block, so they run on a small thread pool (each thread has its own bus
clients: `self.client()` is per thread):

    lease loop                                   one task per leased group
    ----------                                   --------------------------
    free = max_inflight_groups - in flight       workflow.run_group(task, ctx)
    lease.request{credits=free, wait_s} ------>    ctx.generate: engines (least loaded),
      (held by the dataloader up to wait_s           token ids in, token ids + logprobs +
       when it has nothing leasable: admission       weight version out (retries, backoff)
       control, end of data)                       ctx.evaluate: evaluator -> reward
    <- leases: start one task each                trajectory.put -> pool (train) / validator
    no free slot: wait for a task to finish      lease.ack  (only after the put was taken)

Failures (the node itself never dies from one; each is a rate-limited node.error):
- engines unreachable after retries (EngineUnavailable): the lease is NOT acknowledged, so
  the dataloader leases the item again after its deadline; new leases pause for a moment.
- the engine refuses the request (HTTP 4xx, e.g. prompt too long) or the workflow raises:
  the item is given up: a training group is refunded (`admission.refund`, so admission
  control does not wait for it forever), a validation group is delivered as n zero-reward
  trajectories (so the validation pass completes); then the lease is acknowledged.
  `max_consecutive_failures` such failures in a row stop the node (a broken workflow).
- the evaluator raises or times out: reward 0, metric evaluator_error = 1.
- trajectory.put refused as busy / not ready, or timed out: retried with backoff
  (`deliver_retries`), then the lease is left to expire. The receivers deduplicate by traj_id.
Metrics: `metrics{kind: "rollout"}` every `metrics_every_groups` groups or
`metrics_interval_s`, with step = the latest live weight version.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from nexrl.bus.codec import Message
from nexrl.bus.reqrep import RemoteError, RequestTimeout
from nexrl.node import Node, handles

DESTINATION = {"train": "pool", "validate": "validator"}


@dataclass
class RolloutConfig:
    """The `rollout` section of a recipe."""

    #: HF checkpoint directory whose tokenizer and chat template render the prompts.
    model_path: str = ""
    #: Tokenizer directory if not next to the weights ("" = model_path).
    tokenizer_path: str = ""
    #: Engine base URLs (http://host:port); [] = the urls of the job's peers of role inference.
    engine_urls: list[str] = field(default_factory=list)
    #: `model` field of requests; "" = the first id the engine lists at GET /v1/models.
    served_model_name: str = ""
    #: A built-in evaluator ("exact_match", "math") or "path/to/file.py:Class".
    evaluator: str = "exact_match"
    #: Keyword arguments of the evaluator's constructor.
    evaluator_args: dict[str, Any] = field(default_factory=dict)
    #: Seconds one evaluate() call may take before it counts as failed (reward 0).
    evaluator_timeout_s: float = 60.0
    #: Threads running plain (non-async) evaluate() calls.
    reward_threads: int = 2
    #: Custom workflow "path/to/file.py:Class" (a nexrl.rollout_workflow.RolloutWorkflow);
    #: "" = the single-turn default.
    rollout_class: str = ""
    #: Keyword arguments of the workflow's constructor.
    rollout_args: dict[str, Any] = field(default_factory=dict)
    #: System message put before chat prompts that have none ("" = none).
    system_prompt: str = ""
    #: Groups (leased tasks) this worker runs at once; its lease credits.
    max_inflight_groups: int = 8
    #: Seconds the dataloader may hold a lease.request when it has nothing to lease.
    lease_wait_s: float = 2.0
    #: Most tokens generated per model turn.
    max_tokens: int = 256
    #: Sampling temperature (1.0: the engine's logprobs are the plain model logprobs).
    temperature: float = 1.0
    #: Nucleus sampling mass (1.0 = off).
    top_p: float = 1.0
    #: Top-k sampling (0 = off).
    top_k: int = 0
    #: Stop strings (the stop token ids of the model end generation anyway).
    stop: list[str] = field(default_factory=list)
    #: Temperature for validation tasks (None = temperature).
    val_temperature: Optional[float] = None
    #: max_tokens for validation tasks (None = max_tokens).
    val_max_tokens: Optional[int] = None
    #: Also ask for standard OpenAI logprobs (engines without NexRL's token_logprobs field).
    standard_logprobs: bool = False
    #: Seconds one engine request may take (queueing included).
    request_timeout_s: float = 600.0
    #: Retries of a failed engine request (another engine when there is one), then give up.
    engine_retries: int = 4
    #: Retries of samples aborted by an engine (paused with mode=abort for a weight update).
    abort_retries: int = 50
    #: First retry delay, seconds; doubles per retry up to max_backoff_s (with jitter).
    retry_backoff_s: float = 0.5
    #: Longest retry delay, seconds.
    max_backoff_s: float = 8.0
    #: Seconds to wait at start for every engine to answer.
    engine_wait_s: float = 300.0
    #: Attempts to deliver a group's trajectories when the receiver is busy or silent.
    deliver_retries: int = 20
    #: Item failures in a row (engine 4xx, workflow errors) after which the node stops.
    max_consecutive_failures: int = 50
    #: Publish metrics after this many finished groups ...
    metrics_every_groups: int = 16
    #: ... or after this many seconds (whichever first; nothing is sent when idle).
    metrics_interval_s: float = 10.0
    #: Seconds in-flight groups may still finish when the node drains (then cancelled,
    #: their leases re-issued). Keep it below node.drain_timeout_s.
    drain_grace_s: float = 5.0
    #: Threads for blocking bus calls (lease, put, ack).
    bus_threads: int = 4

    def __post_init__(self) -> None:
        if not self.model_path and not self.tokenizer_path:
            raise ValueError("rollout.model_path is required (the tokenizer and chat template "
                             "come from it)")
        for name in ("max_inflight_groups", "max_tokens", "reward_threads", "bus_threads",
                     "metrics_every_groups", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("engine_retries", "abort_retries", "deliver_retries", "top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("evaluator_timeout_s", "request_timeout_s", "retry_backoff_s",
                     "max_backoff_s", "metrics_interval_s", "engine_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rollout.{name} must be > 0, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"rollout: temperature must be >= 0 and top_p in (0, 1], got "
                             f"{self.temperature} and {self.top_p}")
        if self.lease_wait_s < 0 or self.drain_grace_s < 0:
            raise ValueError("rollout.lease_wait_s and drain_grace_s must be >= 0")


class _Stats:
    """Counters between two metrics events."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.groups = self.trajectories = self.response_tokens = self.errors = 0
        self.evaluator_errors = 0
        self.generate_s = self.reward_s = self.reward_sum = 0.0


class Rollout(Node):
    role = "rollout"
    Config = RolloutConfig
    SUBSCRIBE = ("weights.live",)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        # The fast tokenizer class alone: AutoTokenizer would import torch (~1.3 s and memory
        # in every rollout process), which this node never needs.
        from transformers import PreTrainedTokenizerFast

        from nexrl.evaluators import load_evaluator
        from nexrl.plugins import load_object
        from nexrl.rollout_engines import SamplingConfig
        from nexrl.rollout_workflow import RolloutWorkflow, SingleTurnWorkflow

        cfg: RolloutConfig = self.cfg
        tok_path = cfg.tokenizer_path or cfg.model_path
        if not os.path.exists(os.path.join(tok_path, "tokenizer.json")):
            raise FileNotFoundError(f"rollout: no tokenizer.json in {tok_path} (a fast tokenizer "
                                    f"is required; set rollout.tokenizer_path)")
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_path)
        self.evaluator = load_evaluator(cfg.evaluator, cfg.evaluator_args)
        cls = load_object(cfg.rollout_class) if cfg.rollout_class else SingleTurnWorkflow
        if not (isinstance(cls, type) and issubclass(cls, RolloutWorkflow)):
            raise TypeError(f"rollout.rollout_class {cfg.rollout_class!r} is not a "
                            f"nexrl.rollout_workflow.RolloutWorkflow subclass")
        self.workflow = cls(**cfg.rollout_args)
        self.sampling = {
            "train": SamplingConfig(cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.top_k, list(cfg.stop)),
            "validate": SamplingConfig(
                cfg.max_tokens if cfg.val_max_tokens is None else cfg.val_max_tokens,
                cfg.temperature if cfg.val_temperature is None else cfg.val_temperature,
                cfg.top_p, cfg.top_k, list(cfg.stop))}
        self.engine_urls = list(cfg.engine_urls) or [
            self.node_cfg.peers[n].url for n in self.peers_of_role("inference")]
        if not self.engine_urls or not all(self.engine_urls):
            raise ValueError(f"rollout: no engine URLs (rollout.engine_urls is empty and the "
                             f"inference peers are {self.peers_of_role('inference')} with urls "
                             f"{self.engine_urls})")
        self.live_version = 0
        self.inflight: dict[str, asyncio.Task] = {}
        self.doing = "idle"
        self._window = _Stats()
        self.counts = dict(groups=0, trajectories=0, failed_items=0, unacked=0, errors=0)
        self._consecutive_failures = 0
        self._error_times: dict[str, list[float]] = {}
        self._cooldown_until = 0.0

    @handles("weights.live")
    def on_weights_live(self, msg: Message) -> None:
        self.live_version = max(self.live_version, int(msg.body["version"]))

    def activity(self) -> dict[str, Any]:
        """In-flight work for the heartbeat (once nexrl.node has an activity hook)."""
        return {"inflight": len(getattr(self, "inflight", {})), "doing": getattr(self, "doing", "setup")}

    def stats_extra(self) -> dict[str, Any]:
        engines = getattr(self, "engines", None)
        return dict(getattr(self, "counts", {}), inflight=len(getattr(self, "inflight", {})),
                    **{f"engine_{k}": v for k, v in (engines.counts if engines else {}).items()})

    def report(self, code: str, message: str, event: bool = True) -> None:
        """A node.error event (unless event=False: a log line only) and a warning, at most 5
        per code per 10 s (the rest are counted in node.status and the rollout metrics)."""
        self.counts["errors"] += 1
        self._window.errors += 1
        now = time.monotonic()
        times = [t for t in self._error_times.get(code, []) if now - t < 10.0]
        if len(times) >= 5:
            self._error_times[code] = times
            return
        self._error_times[code] = times + [now]
        self.log.warning("[%s] %s", code, message)
        if event:
            self.publish("node.error", dict(node=self.name, role=self.role, code=code,
                                            message=message))

    # ------------------------------------------------------------------ main loop
    def main(self) -> None:
        asyncio.run(self._amain())

    async def _amain(self) -> None:
        from nexrl.rollout_engines import EnginePool

        cfg: RolloutConfig = self.cfg
        self._bus_threads = ThreadPoolExecutor(cfg.bus_threads, thread_name_prefix="rollout-bus")
        self._reward_threads = ThreadPoolExecutor(cfg.reward_threads, thread_name_prefix="rollout-reward")
        self.engines = EnginePool(
            self.engine_urls, request_timeout_s=cfg.request_timeout_s, retries=cfg.engine_retries,
            abort_retries=cfg.abort_retries, retry_backoff_s=cfg.retry_backoff_s,
            max_backoff_s=cfg.max_backoff_s, model=cfg.served_model_name,
            standard_logprobs=cfg.standard_logprobs, on_retry=self._on_engine_retry)
        try:
            self.doing = "waiting for engines"
            silent = await self.engines.wait_ready(cfg.engine_wait_s)
            if silent:
                self.report("engine_unavailable", f"engines {silent} did not answer within "
                                                  f"{cfg.engine_wait_s:.0f}s; using the others")
            self.log.info("engines ready: %s (model %r)", self.engines.urls, self.engines.model)
            await self._lease_loop()
            await self._drain_groups()
        finally:
            self._publish_metrics(force=True)
            await self.engines.close()
            # Threads still blocked in a bus request (a silent receiver) are not waited for:
            # the node exits anyway and their leases expire and are re-issued.
            self._bus_threads.shutdown(wait=False, cancel_futures=True)
            self._reward_threads.shutdown(wait=False, cancel_futures=True)

    async def _in_bus_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._bus_threads, fn, *args)

    def _lease_request(self, credits: int) -> dict[str, Any]:
        wait = self.cfg.lease_wait_s
        timeout = wait + self.node_cfg.bus.request_timeout_s
        return self.client("dataloader").request(
            "lease.request", {"credits": credits, "wait_s": wait}, timeout=timeout).body

    async def _lease_loop(self) -> None:
        cfg: RolloutConfig = self.cfg
        while not self.stopping.is_set():
            self._publish_metrics()
            free = cfg.max_inflight_groups - len(self.inflight)
            if free <= 0 or time.monotonic() < self._cooldown_until:
                await self._wait_any(0.5)
                continue
            self.doing = "leasing" if not self.inflight else "generating"
            try:
                reply = await self._in_bus_thread(self._lease_request, free)
            except (RequestTimeout, RemoteError) as e:
                self.report("lease_failed", f"lease.request to the dataloader failed: {e}")
                await asyncio.sleep(1.0)
                continue
            for lease in reply["leases"]:
                task = asyncio.create_task(self._run_lease(lease))
                self.inflight[lease["lease_id"]] = task
                task.add_done_callback(lambda t, lid=lease["lease_id"]: self._task_done(lid, t))
            if not reply["leases"] and reply.get("exhausted"):
                # End of data: keep serving (a validation pass may still come) but poll gently.
                self.doing = "idle (data exhausted)" if not self.inflight else self.doing
                await self._wait_any(max(cfg.lease_wait_s, 1.0))
            self.doing = "generating" if self.inflight else "idle"

    def _task_done(self, lease_id: str, task: asyncio.Task) -> None:
        self.inflight.pop(lease_id, None)
        if not task.cancelled() and task.exception() is not None:  # a bug in this module
            e = task.exception()
            self.report("rollout_error", f"group of lease {lease_id} failed: "
                                         f"{type(e).__name__}: {e} (lease left to expire)")

    async def _wait_any(self, timeout: float) -> None:
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(timeout)

    async def _drain_groups(self) -> None:
        """Let in-flight groups finish for drain_grace_s, then cancel them (not acked: the
        dataloader re-issues them)."""
        if not self.inflight:
            return
        self.doing = "draining"
        self.log.info("draining: %d groups in flight (up to %.0fs)", len(self.inflight),
                      self.cfg.drain_grace_s)
        _, pending = await asyncio.wait(list(self.inflight.values()), timeout=self.cfg.drain_grace_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
            self.log.warning("cancelled %d unfinished groups; their leases will be re-issued",
                             len(pending))

    # ------------------------------------------------------------------ one group
    def _make_context(self, task: dict[str, Any]):
        from nexrl.rollout_workflow import RolloutContext

        loop = asyncio.get_running_loop()
        return RolloutContext(
            task, tokenizer=self.tokenizer, engines=self.engines,
            sampling=self.sampling.get(task.get("mode"), self.sampling["train"]),
            evaluator=self.evaluator, evaluator_timeout_s=self.cfg.evaluator_timeout_s,
            system_prompt=self.cfg.system_prompt,
            run_blocking=lambda fn, *a: loop.run_in_executor(self._reward_threads, fn, *a),
            on_error=self.report)

    async def _run_lease(self, lease: dict[str, Any]) -> None:
        from nexrl.rollout_engines import EngineRequestError, EngineUnavailable
        from nexrl.rollout_workflow import to_wire

        lease_id, task = lease["lease_id"], lease["item"]
        gid = task.get("group_id", "?")
        t0 = time.monotonic()
        ctx = self._make_context(task)
        try:
            trajs = await self.workflow.run_group(task, ctx)
            wire = to_wire(task, trajs, self.name)
        except asyncio.CancelledError:
            raise
        except EngineUnavailable as e:
            self.counts["unacked"] += 1
            self._cooldown_until = time.monotonic() + self.cfg.retry_backoff_s * 4
            self.report("engine_unavailable", f"group {gid}: {e}; lease {lease_id} left to expire "
                                              f"(the dataloader re-issues it)")
            return
        except EngineRequestError as e:
            await self._give_up(lease_id, task, f"the engine refused it: {e}")
            return
        except Exception as e:  # noqa: BLE001 -- a workflow bug must not kill the worker
            await self._give_up(lease_id, task, f"the workflow raised {type(e).__name__}: {e}")
            return
        self._consecutive_failures = 0
        if await self._deliver(task, wire) and await self._ack(lease_id):
            self._count_group(wire, ctx, time.monotonic() - t0)

    async def _give_up(self, lease_id: str, task: dict[str, Any], why: str) -> None:
        """A permanent item failure: refund (train) or zero-reward trajectories (validate)."""
        from nexrl.rollout_workflow import failed_wire

        gid = task.get("group_id", "?")
        self.counts["failed_items"] += 1
        self._consecutive_failures += 1
        self.report("item_failed", f"group {gid} given up: {why}")
        if self._consecutive_failures >= self.cfg.max_consecutive_failures:
            self.report("too_many_failures", f"{self._consecutive_failures} items failed in a row; "
                                             f"stopping (last: {why})")
            self.request_stop(f"{self._consecutive_failures} item failures in a row")
            return
        try:
            if task.get("mode") == "validate":
                wire = failed_wire(task, self.live_version, self.name)
                if not await self._deliver(task, wire):
                    return
            else:
                await self._in_bus_thread(lambda: self.client("dataloader").request(
                    "admission.refund", {"group_ids": [gid]}))
        except (RequestTimeout, RemoteError) as e:
            self.report("refund_failed", f"group {gid}: {e}")
            return
        await self._ack(lease_id)

    async def _deliver(self, task: dict[str, Any], wire: list[dict[str, Any]]) -> bool:
        dest = DESTINATION.get(task.get("mode"), "pool")
        for attempt in range(self.cfg.deliver_retries + 1):
            try:
                await self._in_bus_thread(lambda: self.client(dest).request(
                    "trajectory.put", {"trajectories": wire}))
                return True
            except RemoteError as e:
                if e.code not in ("busy", "not_ready"):
                    self.report("deliver_refused", f"{dest} refused group {task['group_id']}: {e}; "
                                                   f"lease left to expire")
                    return False
                why = str(e)
            except RequestTimeout as e:
                why = str(e)
            if self.stopping.is_set():
                return False
            await asyncio.sleep(min(self.cfg.max_backoff_s, self.cfg.retry_backoff_s * 2 ** attempt)
                                * (0.5 + random.random() / 2))
        self.report("deliver_failed", f"group {task['group_id']} not delivered to {dest} after "
                                      f"{self.cfg.deliver_retries + 1} attempts: {why}")
        return False

    async def _ack(self, lease_id: str) -> bool:
        try:
            reply = await self._in_bus_thread(lambda: self.client("dataloader").request(
                "lease.ack", {"lease_ids": [lease_id]}))
        except (RequestTimeout, RemoteError) as e:
            self.report("ack_failed", f"lease.ack of {lease_id} failed: {e} (the item may be "
                                      f"re-generated; receivers drop the duplicates)")
            return False
        if reply.body.get("unknown"):
            self.log.info("lease %s had expired before its ack (re-issued; duplicates are dropped)",
                          lease_id)
        return True

    # ------------------------------------------------------------------ metrics
    def _on_engine_retry(self, code: str, message: str) -> None:
        self.report(code, message, event=False)  # a retry is not yet a failure

    def _count_group(self, wire: list[dict[str, Any]], ctx, wall_s: float) -> None:
        s = self._window
        s.groups += 1
        s.trajectories += len(wire)
        s.response_tokens += sum(int(t["response_mask"].sum()) for t in wire)
        s.reward_sum += sum(t["reward"] for t in wire)
        s.generate_s += max((t["timing"].get("generate_s", 0.0) for t in wire), default=0.0)
        s.reward_s += ctx.reward_s
        s.evaluator_errors += ctx.evaluator_errors
        self.counts["groups"] += 1
        self.counts["trajectories"] += len(wire)
        self._publish_metrics()

    def _publish_metrics(self, force: bool = False) -> None:
        s, cfg = self._window, self.cfg
        elapsed = time.monotonic() - s.since
        if not s.groups and not s.errors:
            if elapsed > cfg.metrics_interval_s:
                s.reset()
            return
        if not force and s.groups < cfg.metrics_every_groups and elapsed < cfg.metrics_interval_s:
            return
        g, n = max(s.groups, 1), max(s.trajectories, 1)
        values = {"rollout/groups": float(s.groups), "rollout/trajectories": float(s.trajectories),
                  "rollout/generate_s": s.generate_s / g, "rollout/reward_s": s.reward_s / g,
                  "rollout/tokens_per_s": s.response_tokens / max(elapsed, 1e-9),
                  "rollout/reward_mean": s.reward_sum / n,
                  "rollout/response_len_mean": s.response_tokens / n,
                  "rollout/errors": float(s.errors), "rollout/evaluator_errors": float(s.evaluator_errors),
                  "rollout/inflight_groups": float(len(self.inflight))}
        self.publish("metrics", dict(step=self.live_version, kind="rollout", values=values))
        s.reset()
