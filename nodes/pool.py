"""The pool node: groups training trajectories and hands complete groups to the trainer.

    nexrl-node pool --config recipe.yaml node.start=now

The queue (handlers on the loop thread; refunds and the end-of-data check on the worker):

    rollout-i --trajectory.put--> dedupe by traj_id; drop groups already released, filtered
                                  or consumed (late copies of re-issued leases)
                                  a NEW group beyond max_groups held: error{busy}, the
                                  rollout retries later (it has not acked its lease yet)
        group complete (group_size trajectories)
          |-- zero reward variance and filter_zero_variance: dropped, counted, and
          |     admission.refund{group_ids} to the dataloader (worker thread, retried), which
          |     then admits a replacement group
          `-> ready queue, in completion order
    trainer --batch.request{num_groups, wait_s}--> [waiting requests, FIFO]
          unblocked when num_groups groups are ready: the OLDEST ready groups go first (the
          order in which they completed), so a group waits at most as long as the trainer
          takes to consume the groups that completed before it; staleness itself is bounded
          upstream by the dataloader's admission control
          wait_s passes: num_groups=0 (the trainer asks again)
          the dataloader reports exhausted (asked every exhausted_poll_s while a request
          waits) and fewer than num_groups are ready: num_groups=0, exhausted=true (the
          remainder is dropped, like drop_last; logged)

Batch order is deterministic for a given set of groups: its groups are sorted by item id
(split, epoch, row index), each group's trajectories by sample_index. In sync mode admission
makes the set of groups of each step deterministic, so batches repeat exactly run to run.

Group size: a trajectory's `group_size` field if it has one (the task's n), else the config's
`group_size`. State (`state.get`, JSON-safe; arrays as {"__ndarray__": dtype, "shape", "data"}):
{"version": 1, "groups": [{group_id, group_size, complete, trajectories}], "counts": {...}}.
Resume (`resume_from`, the checkpoint's data_state.json) restores the groups held and drops any
later copy of a group that is held or listed in "consumed".
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nexrl.bus.reqrep import RemoteError, RequestTimeout
from nexrl.config import NodeConfig
from nexrl.node import DEFER, Deferred, HandlerError, Node, Request, handles
from nexrl.checkpoint import ResumeConfig, read_data_state, resolve_resume


@dataclass
class PoolConfig(ResumeConfig):
    """The `pool` section of a recipe."""

    #: Trajectories per group for trajectories without a `group_size` field (recipe:
    #: ${dataloader.n_samples}); 0 = every trajectory must carry group_size.
    group_size: int = 0
    #: Most groups held (complete + partial). A put that would open one more is refused with
    #: error{busy}. Keep it above batch_groups * (max_staleness + 2) + rollout concurrency.
    max_groups: int = 4096
    #: Drop groups whose rewards are all equal (they give zero advantage) and refund their
    #: admission slot to the dataloader (DAPO-style dynamic sampling). Groups of 1 are kept.
    filter_zero_variance: bool = False
    #: Seconds between "is the data exhausted?" questions to the dataloader while a batch
    #: request waits for groups.
    exhausted_poll_s: float = 1.0
    #: Seconds before a failed admission.refund is sent again.
    refund_retry_s: float = 2.0
    #: Seconds between `metrics{kind: pool}` events (only sent when something changed).
    metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.group_size < 0 or self.max_groups < 1:
            raise ValueError(f"pool.group_size must be >= 0 and pool.max_groups >= 1, got "
                             f"{self.group_size} and {self.max_groups}")
        for key in ("exhausted_poll_s", "refund_retry_s", "metrics_interval_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"pool.{key} must be > 0, got {getattr(self, key)}")


def to_jsonable(v: Any) -> Any:
    """A JSON-safe copy: numpy arrays become {"__ndarray__": dtype, "shape", "data"}."""
    if isinstance(v, np.ndarray):
        return {"__ndarray__": str(v.dtype), "shape": list(v.shape), "data": v.ravel().tolist()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray, memoryview)):
        raise TypeError("pool state: bytes values cannot be saved as JSON")
    return v


def from_jsonable(v: Any) -> Any:
    """Inverse of to_jsonable."""
    if isinstance(v, dict):
        if "__ndarray__" in v:
            return np.asarray(v["data"], dtype=v["__ndarray__"]).reshape(v["shape"])
        return {k: from_jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_jsonable(x) for x in v]
    return v


_ID = re.compile(r"^(\w+)/e?(\d+)/(\d+)$")


def item_key(item_id: str) -> tuple:
    """Sort key of an item id: ("train", epoch, row) numerically, else the plain string."""
    m = _ID.match(item_id)
    return (0, m.group(1), int(m.group(2)), int(m.group(3)), "") if m else (1, "", 0, 0, item_id)


@dataclass(eq=False)
class _Group:
    group_id: str
    size: int
    trajs: dict[str, dict] = field(default_factory=dict)   # traj_id -> trajectory


@dataclass(eq=False)
class _Waiter:
    req: Request
    num_groups: int
    done: bool = False


class Pool(Node):
    """Serves trajectory.put, batch.request and state.get."""

    role = "pool"
    Config = PoolConfig
    SERVE_WHEN_READY_ONLY = True   # handler state is built in setup()

    def __init__(self, node_cfg: NodeConfig, cfg: PoolConfig | None = None):
        super().__init__(node_cfg, cfg)
        self.groups: dict[str, _Group] = {}          # held, complete or partial
        self.ready: deque[str] = deque()             # complete group ids, completion order
        self.closed: set[str] = set()                # released, filtered or consumed groups
        self._waiting: list[_Waiter] = []
        self._refunds: list[str] = []
        self._lock = threading.Lock()                # guards _refunds (loop <-> worker)
        self._wake = threading.Event()
        self.data_exhausted = False
        self._restored = False
        self._no_dataloader_logged = False
        self.counts = dict(accepted=0, duplicates=0, late_duplicates=0, groups_completed=0,
                           groups_filtered=0, groups_released=0, batches=0, refused_busy=0,
                           refunds_sent=0)
        self._last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ setup and resume

    def setup(self) -> None:
        """Read and check the resume state (worker thread), then install it on the loop."""
        consumed: set[str] = set()
        groups: list[_Group] = []
        self.resumed_from = resolve_resume(self.cfg.resume_from, self.cfg.checkpoint_dir,
                                           self.node_cfg.run_dir)
        if self.resumed_from:
            data = read_data_state(self.resumed_from)
            consumed = {str(i) for i in data.get("consumed", [])}
            try:
                for g in (data.get("pool") or {}).get("groups", []):
                    group = _Group(str(g["group_id"]), int(g["group_size"]))
                    for t in from_jsonable(g["trajectories"]):
                        group.trajs[str(t["traj_id"])] = t
                    if group.group_id not in consumed:
                        groups.append(group)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"resume_from: {self.resumed_from}: malformed pool state "
                                 f"({type(e).__name__}: {e})") from e
        self.call_soon(lambda: self._install(groups, consumed))

    def _install(self, groups: list[_Group], consumed: set[str]) -> None:
        self.closed |= consumed
        for group in groups:
            self.groups[group.group_id] = group
            if len(group.trajs) >= group.size:
                self.ready.append(group.group_id)
        if self.resumed_from:
            self.log.info("resumed from %s: %d groups held (%d complete), %d consumed groups",
                          self.resumed_from, len(self.groups), len(self.ready), len(consumed))
        self._restored = True
        self._serve_waiting()
        self.call_later(self.cfg.metrics_interval_s, self._metrics_tick)

    def state_dict(self) -> dict[str, Any]:
        ready = set(self.ready)
        order = list(self.ready) + [g for g in self.groups if g not in ready]
        groups = [dict(group_id=gid, group_size=self.groups[gid].size,
                       complete=len(self.groups[gid].trajs) >= self.groups[gid].size,
                       trajectories=to_jsonable(list(self.groups[gid].trajs.values())))
                  for gid in order]
        return dict(version=1, groups=groups, counts=dict(self.counts))

    # ------------------------------------------------------------------ trajectories in

    def _check(self, i: int, t: Any, sizes: dict[str, int]) -> tuple[str, str, int]:
        """(traj_id, group_id, group_size) of trajectory i, or refuse the put. `sizes` holds
        the group sizes seen earlier in the same put."""
        def bad(why: str) -> HandlerError:
            return HandlerError("invalid_body", f"trajectory.put: trajectories[{i}] {why}")

        if not isinstance(t, dict):
            raise bad(f"is a {type(t).__name__}, not a map")
        for key in ("traj_id", "group_id"):
            if not isinstance(t.get(key), str):
                raise bad(f"needs a string {key!r}")
        if not isinstance(t.get("reward"), (int, float)) or isinstance(t.get("reward"), bool):
            raise bad("needs a numeric 'reward'")
        if t.get("mode", "train") != "train":
            raise bad(f"has mode {t.get('mode')!r}: the pool takes mode 'train' only "
                      f"(validation trajectories go to the validator)")
        size = t.get("group_size", self.cfg.group_size)
        if not isinstance(size, int) or size < 1:
            raise bad("needs a 'group_size' >= 1 (or set pool.group_size)")
        held = self.groups.get(t["group_id"])
        known = held.size if held is not None else sizes.setdefault(t["group_id"], size)
        if known != size:
            raise bad(f"says group {t['group_id']} has {size} samples, earlier ones said {known}")
        return t["traj_id"], t["group_id"], size

    @handles("trajectory.put")
    def on_put(self, req: Request) -> dict[str, Any]:
        """trajectory.put{trajectories} -> trajectory.put.reply{accepted, duplicates}.

        Failure: error{invalid_body} naming the bad trajectory (nothing is stored);
        error{busy} when the put would open a group beyond max_groups (retry later);
        error{not_ready} before the resume state is loaded.
        """
        if not self._restored:
            raise HandlerError("not_ready", f"{self.name}: still loading its resume state")
        trajs = req.body["trajectories"]
        sizes: dict[str, int] = {}
        checked = [self._check(i, t, sizes) for i, t in enumerate(trajs)]
        new = {gid for _, gid, _ in checked if gid not in self.groups and gid not in self.closed}
        if new and len(self.groups) + len(new) > self.cfg.max_groups:
            self.counts["refused_busy"] += 1
            raise HandlerError("busy", f"pool {self.name} holds {len(self.groups)} groups "
                                       f"(max_groups={self.cfg.max_groups}); retry later")
        accepted = duplicates = 0
        for t, (tid, gid, size) in zip(trajs, checked):
            if gid in self.closed:
                self.counts["late_duplicates"] += 1
                duplicates += 1
                continue
            g = self.groups.setdefault(gid, _Group(gid, size))
            if tid in g.trajs or len(g.trajs) >= g.size:
                duplicates += 1
                continue
            g.trajs[tid] = t
            accepted += 1
            if len(g.trajs) == g.size:
                self._complete(g)
        self.counts["accepted"] += accepted
        self.counts["duplicates"] += duplicates
        self._serve_waiting()
        return dict(accepted=accepted, duplicates=duplicates)

    def _complete(self, g: _Group) -> None:
        self.counts["groups_completed"] += 1
        rewards = [float(t["reward"]) for t in g.trajs.values()]
        if self.cfg.filter_zero_variance and g.size > 1 and max(rewards) == min(rewards):
            del self.groups[g.group_id]
            self.closed.add(g.group_id)
            self.counts["groups_filtered"] += 1
            self.log.info("group %s filtered: all %d rewards are %g; refunding its admission slot",
                          g.group_id, g.size, rewards[0])
            with self._lock:
                self._refunds.append(g.group_id)
            self._wake.set()
            return
        self.ready.append(g.group_id)

    # ------------------------------------------------------------------ batches out

    def _stats(self) -> dict[str, float]:
        partial = len(self.groups) - len(self.ready)
        return dict(groups_complete=float(len(self.ready)), groups_partial=float(partial),
                    groups_filtered=float(self.counts["groups_filtered"]),
                    trajectories_held=float(sum(len(g.trajs) for g in self.groups.values())))

    def _batch(self, n: int) -> dict[str, Any]:
        gids = sorted((self.ready.popleft() for _ in range(n)), key=item_key)
        trajs: list[dict] = []
        for gid in gids:
            g = self.groups.pop(gid)
            self.closed.add(gid)
            trajs += sorted(g.trajs.values(), key=lambda t: (t.get("sample_index", 0), t["traj_id"]))
        self.counts["groups_released"] += n
        self.counts["batches"] += 1
        return dict(trajectories=trajs, num_groups=n, stats=self._stats(),
                    exhausted=self.data_exhausted and not self.ready)

    def _empty(self) -> dict[str, Any]:
        return dict(trajectories=[], num_groups=0, stats=self._stats(), exhausted=self.data_exhausted)

    @handles("batch.request")
    def on_batch_request(self, req: Request) -> dict[str, Any] | Deferred:
        """batch.request{num_groups, wait_s?} -> batch.request.reply{trajectories, num_groups,
        exhausted, stats}.

        Answered when num_groups groups are ready (the oldest), else held up to wait_s (then
        num_groups=0), or at once with num_groups=0, exhausted=true once the data is exhausted.
        Failure: error{invalid_body} if num_groups is < 1 or > max_groups.
        """
        n, wait_s = int(req.body["num_groups"]), float(req.body.get("wait_s", 0.0))
        if not 1 <= n <= self.cfg.max_groups:
            raise HandlerError("invalid_body", f"batch.request: num_groups must be in 1.."
                                               f"{self.cfg.max_groups} (max_groups), got {n}")
        if not self._waiting and len(self.ready) >= n:
            return self._batch(n)
        if self.data_exhausted or wait_s <= 0 or self.stopping.is_set():
            return self._empty()
        w = _Waiter(req, n)
        self._waiting.append(w)
        self.call_later(wait_s, lambda: self._on_wait_timeout(w))
        self._wake.set()
        return DEFER

    def _serve_waiting(self) -> None:
        while self._waiting and len(self.ready) >= self._waiting[0].num_groups:
            w = self._waiting.pop(0)
            w.done = True
            self.reply(w.req, self._batch(w.num_groups))

    def _on_wait_timeout(self, w: _Waiter) -> None:
        if not w.done:
            w.done = True
            self._waiting.remove(w)
            self.reply(w.req, self._empty())

    def _on_data_exhausted(self) -> None:
        if self.data_exhausted:
            return
        self.data_exhausted = True
        self.log.info("the dataloader is exhausted; %d complete and %d partial groups left",
                      len(self.ready), len(self.groups) - len(self.ready))
        self._serve_waiting()
        for w in self._waiting:
            w.done = True
            self.reply(w.req, self._empty())
        self._waiting.clear()

    # ------------------------------------------------------------------ worker thread

    def main(self) -> None:
        """Send refunds and watch for the end of the data, without blocking the loop."""
        while not self.stopping.is_set():
            self._wake.wait(self.cfg.exhausted_poll_s)
            self._wake.clear()
            ok = self._send_refunds()
            if self._waiting and not self.data_exhausted:
                self._check_exhausted()
            if not ok:
                self.stopping.wait(self.cfg.refund_retry_s)

    def _dataloader(self):
        """The dataloader's client, or None (logged once) when the job has no dataloader."""
        try:
            return self.client("dataloader")
        except LookupError as e:
            if not self._no_dataloader_logged:
                self._no_dataloader_logged = True
                self.log.error("%s: refunds cannot be sent and the end of the data cannot be "
                               "detected", e)
            return None

    def _send_refunds(self) -> bool:
        with self._lock:
            gids = list(self._refunds)
        if not gids:
            return True
        dl = self._dataloader()
        try:
            if dl is None:
                raise LookupError("no dataloader peer")
            reply = dl.request("admission.refund", dict(group_ids=gids), timeout=5.0, retries=1)
        except (RequestTimeout, RemoteError, LookupError) as e:
            msg = f"admission.refund of {len(gids)} group(s) failed, retrying: {e}"
            self.log.error("%s", msg)
            self.publish("node.error", dict(node=self.name, role=self.role, code="refund_failed",
                                            message=msg, request_type="admission.refund"))
            return False
        with self._lock:
            del self._refunds[:len(gids)]
        refunded = int(reply.body["refunded"])
        self.call_soon(lambda: self.counts.__setitem__("refunds_sent",
                                                       self.counts["refunds_sent"] + refunded))
        return True

    def _check_exhausted(self) -> None:
        dl = self._dataloader()
        if dl is None:
            return
        try:
            state = dl.request("state.get", {}, timeout=5.0, retries=0).body["state"]
        except (RequestTimeout, RemoteError) as e:
            self.log.warning("cannot ask the dataloader whether the data is exhausted: %s", e)
            return
        if state.get("exhausted"):
            self.call_soon(self._on_data_exhausted)

    # ------------------------------------------------------------------ state and reporting

    @handles("state.get")
    def on_state_get(self, req: Request) -> dict[str, Any]:
        """state.get{} -> state.get.reply{state}: the groups held (JSON-safe, see module doc)."""
        return dict(state=self.state_dict())

    def _metrics_tick(self) -> None:
        values = {f"pool/{k}": float(v) for k, v in {**self.counts, **self._stats()}.items()}
        if values != self._last_metrics:
            self._last_metrics = values
            self.publish("metrics", dict(step=self.counts["batches"], kind="pool", values=values))
        if not self.stopping.is_set():
            self.call_later(self.cfg.metrics_interval_s, self._metrics_tick)

    def activity(self) -> dict[str, Any]:
        """In-flight work for the heartbeat (once nexrl.node has an activity hook)."""
        return dict(groups=len(self.groups), ready=len(self.ready), waiting=len(self._waiting))

    def stats_extra(self) -> dict[str, Any]:
        return dict(self.counts, **self._stats(), data_exhausted=self.data_exhausted)

    def on_drain(self) -> None:
        self._wake.set()
        for w in self._waiting:
            w.done = True
            self.reply(w.req, self._empty())
        self._waiting.clear()
