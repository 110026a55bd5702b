"""The dataloader node: leases prompts to rollout workers as groups, with admission control.

    nexrl-node dataloader --config recipe.yaml node.start=now

One training item is one prompt (a data row) to be sampled `n_samples` times: one group.
Item ids are stable across runs with the same data and seed: "train/e<epoch>/<row_index>"
(row_index = 0-based position among the non-blank rows of `train_files`, concatenated; bad
rows keep their position) and "val/<validation_id>/<row_index>" for validation.

The queue (everything below runs on the node's loop thread):

    rollout-i  --lease.request{credits, wait_s}-->  [waiting requests, FIFO]
                                                        | filled from, in this order:
      1. expired leases (LeaseTable.retry) .......... unblocked by a lease deadline passing
      2. validation items ........................... unblocked by validation.start
      3. training items, in the epoch's seeded order  unblocked by weights.live, admission.refund
           admitted only while  admitted // batch_groups <= live_version + max_staleness
           (admitted = training groups leased so far, net of refunds)   <-- staleness bound
      nothing leasable: the request waits up to wait_s, then gets leases=[]
      all epochs leased and acked, no validation pending: leases=[], exhausted=true
    rollout-i  --lease.ack{lease_ids}-->  done, never leased again. A lease not acked by its
      deadline (lease_timeout_s) goes back to the front of the queue; if its worker acks it
      late while it is still waiting there, it is taken back instead of re-issued.

Why the admission count is carried across resume instead of restarting at 0: after resuming
at trainer step S the live version is S, so counting from 0 would admit (S+1)*batch_groups
groups at once; carrying it keeps the k-th group in step slot k // batch_groups.

Resume (`resume_from`): the trainer's checkpoint holds `data_state.json` =
{"dataloader": <state.get reply>, "pool": {...}, "consumed": [item_id, ...]}. The epoch,
cursor and admission count are restored, the epoch order is recomputed from (seed, epoch),
leases that were outstanding at the snapshot are leased again first, and an item in
`consumed` is never leased again. Validation passes in flight at the snapshot are dropped.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nexrl.bus.codec import Message
from nexrl.bus.lease import Lease, LeaseTable
from nexrl.checkpoint import ResumeConfig, read_data_state, resolve_resume
from nexrl.config import NodeConfig
from nexrl.node import DEFER, Deferred, HandlerError, Node, Request, handles

_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class DataloaderConfig(ResumeConfig):
    """The `dataloader` section of a recipe."""

    #: Training data: .jsonl (one JSON object per line) or .parquet files, read in order.
    #: Relative paths are relative to the working directory.
    train_files: list[str] = field(default_factory=list)
    #: Validation data (same formats); leased on validation.start. Empty: no validation items.
    val_files: list[str] = field(default_factory=list)
    #: Row field holding the prompt: a non-empty string, or a chat list of {role, content}.
    prompt_key: str = "prompt"
    #: Row field naming the row's data source (per-source validation metrics); rows without
    #: it get the file's stem.
    data_source_key: str = "data_source"
    #: Samples per training prompt (the group size n of GRPO).
    n_samples: int = 4
    #: Samples per validation prompt.
    val_n_samples: int = 1
    #: Shuffle each epoch with a numpy Generator seeded from (seed, epoch); False: file order.
    shuffle: bool = True
    #: Shuffle seed; the same seed and data give the same order in every run.
    seed: int = 0
    #: Passes over the training data; 0 = unlimited.
    num_epochs: int = 1
    #: Seconds a leased item may stay unacknowledged before it is leased to another worker.
    lease_timeout_s: float = 600.0
    #: Groups per trainer step (the trainer's batch size in groups); sizes a step slot.
    batch_groups: int = 1
    #: Step slots a group may run ahead of the live weights (recipe: ${weight_sync.max_staleness}).
    max_staleness: int = 0
    #: False: lease training items without waiting for weights.live (standalone debugging).
    admission_control: bool = True
    #: Seconds between `metrics{kind: dataloader}` events (only sent when something changed).
    metrics_interval_s: float = 10.0
    #: Bad rows logged one by one per file; the rest are counted and summarised.
    max_logged_bad_rows: int = 20

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ValueError("dataloader.train_files: give at least one .jsonl or .parquet file")
        for key in ("train_files", "val_files"):
            for f in getattr(self, key):
                if not str(f).endswith(_SUFFIXES):
                    raise ValueError(f"dataloader.{key}: {f!r} is neither .jsonl nor .parquet")
        for key in ("n_samples", "val_n_samples", "batch_groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"dataloader.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_epochs < 0:
            raise ValueError(f"dataloader.num_epochs must be >= 0 (0 = unlimited), got {self.num_epochs}")
        if self.max_staleness < 0:
            raise ValueError(f"dataloader.max_staleness must be >= 0, got {self.max_staleness}")
        if self.lease_timeout_s <= 0 or self.metrics_interval_s <= 0:
            raise ValueError("dataloader.lease_timeout_s and metrics_interval_s must be > 0")


# ---------------------------------------------------------------------------- reading data

@dataclass(slots=True)
class Row:
    row: dict[str, Any]    # the whole data row, values plain (msgpack-safe)
    prompt: Any            # row[prompt_key], checked
    source: str            # data source name


def _plain(v: Any) -> Any:
    """A value msgpack can carry; others (timestamps, decimals) become strings."""
    if v is None or isinstance(v, (str, int, float, bool, bytes)):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def _check_prompt(row: Any, prompt_key: str) -> str | None:
    """Why `row` cannot be used, or None if it can."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    if prompt_key not in row:
        return f"has no {prompt_key!r} field (fields: {', '.join(sorted(map(str, row))) or 'none'})"
    p = row[prompt_key]
    if isinstance(p, str):
        return None if p.strip() else f"field {prompt_key!r} is an empty string"
    if isinstance(p, list) and p and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in p):
        return None
    return (f"field {prompt_key!r} must be a non-empty string or a list of {{role, content}} "
            f"messages, got {type(p).__name__}")


def _raw_rows(path: Path):
    """(line/row label, row or None, error or None) for every non-blank row of a file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only parquet users pay for the import

        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise ValueError(f"dataloader: cannot read parquet file {path}: {e}") from e
        for i, r in enumerate(rows):
            yield f"row {i}", r, None
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line), None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield f"line {lineno}", None, f"is not valid JSON ({e})"


def load_rows(paths: list[str], cfg: DataloaderConfig, report) -> list[Row | None]:
    """Rows of `paths` in order; a bad row becomes None (position kept) and is `report`ed."""
    out: list[Row | None] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"dataloader: data file {name} does not exist "
                                    f"(cwd {Path.cwd()})")
        for where, row, err in _raw_rows(path):
            err = err or _check_prompt(row, cfg.prompt_key)
            if err:
                report(path, where, err)
                out.append(None)
                continue
            row = _plain(row)
            src = row.get(cfg.data_source_key)
            out.append(Row(row, row[cfg.prompt_key], src if isinstance(src, str) and src else path.stem))
    return out


def check_dataloader_state(st: dict[str, Any], where: str) -> None:
    """Refuse (ValueError naming the key) a dataloader state this version cannot resume."""
    if not st:
        return
    for key, kind in (("epoch", int), ("cursor", int), ("admitted", int), ("pending", list)):
        if not isinstance(st.get(key), kind):
            raise ValueError(f"resume_from: {where}: dataloader.{key} must be a {kind.__name__}, "
                             f"got {st.get(key)!r}")


# ---------------------------------------------------------------------------- the node

@dataclass(eq=False)
class _Waiter:
    req: Request
    credits: int
    done: bool = False


class Dataloader(Node):
    """Serves lease.request / lease.ack / admission.refund / validation.start / state.get."""

    role = "dataloader"
    Config = DataloaderConfig
    SERVE_WHEN_READY_ONLY = True   # handler state is built in setup()
    SUBSCRIBE = ("weights.live",)

    def __init__(self, node_cfg: NodeConfig, cfg: DataloaderConfig | None = None):
        super().__init__(node_cfg, cfg)
        # Handlers may run before setup() has read the data: everything they touch exists now.
        self._loaded = False
        self.table = LeaseTable(cfg.lease_timeout_s if cfg else 600.0)
        self._waiting: list[_Waiter] = []
        self._expiry_at: float | None = None
        self.live_version = 0
        self.admitted = 0
        self.epoch = 0
        self.refunded: set[str] = set()
        self.counts = dict(leased=0, acked=0, late_acks=0, expired=0, refunded=0, bad_rows=0,
                           skipped_consumed=0)
        self._last_metrics: dict[str, float] = {}

    def setup(self) -> None:
        """Read the data files (worker thread), then install them on the loop thread."""
        cfg: DataloaderConfig = self.cfg
        bad_per_file: dict[Path, int] = {}

        def report(path: Path, where: str, why: str) -> None:
            self.counts["bad_rows"] += 1
            bad_per_file[path] = bad_per_file.get(path, 0) + 1
            if bad_per_file[path] <= cfg.max_logged_bad_rows:
                msg = f"{self.name}: skipped bad row in {path} {where}: {why}"
                self.log.warning("%s", msg)
                self.publish("node.error", dict(node=self.name, role=self.role, code="bad_row",
                                                message=msg))

        train = load_rows(cfg.train_files, cfg, report)
        val = load_rows(cfg.val_files, cfg, report)
        for path, n in bad_per_file.items():
            self.log.warning("%d bad row(s) skipped in %s", n, path)
        self.resumed_from = resolve_resume(cfg.resume_from, cfg.checkpoint_dir,
                                           self.node_cfg.run_dir)
        state = read_data_state(self.resumed_from) if self.resumed_from else None
        if state is not None:
            check_dataloader_state(state.get("dataloader") or {}, self.resumed_from)
        elif cfg.resume_from:
            self.log.info("resume_from=%s: no checkpoint yet; starting fresh", cfg.resume_from)
        self.call_soon(lambda: self._install(train, val, state))

    def _install(self, train: list[Row | None], val: list[Row | None],
                 state: dict[str, Any] | None) -> None:
        cfg: DataloaderConfig = self.cfg
        self.train, self.val = train, val
        self.valid = np.array([i for i, r in enumerate(train) if r is not None], dtype=np.int64)
        self.val_queue: deque[tuple[str, dict]] = deque()
        self.val_passes: dict[str, dict[str, int]] = {}
        self.pending_fresh: deque[str] = deque()
        self.consumed: set[str] = set()
        self.epoch, self.cursor = 0, 0
        self.train_done = len(self.valid) == 0
        if self.train_done:
            self.log.error("no usable training rows in %s: nothing to train on", cfg.train_files)
        if state is not None:
            self._restore(state)
        self.order = self._order(self.epoch)
        self._loaded = True
        self.log.info("loaded %d training rows (%d usable), %d validation rows; epoch %d, "
                      "%d items per epoch, n_samples=%d", len(train), len(self.valid), len(val),
                      self.epoch, len(self.valid), cfg.n_samples)
        self._serve_waiting()
        self.call_later(cfg.metrics_interval_s, self._metrics_tick)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.cfg.shuffle:
            return self.valid
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(self.valid)

    # ------------------------------------------------------------------ resume

    def _restore(self, data: dict[str, Any]) -> None:
        st = data.get("dataloader") or {}
        self.consumed = {str(i) for i in data.get("consumed", [])}
        if not st:
            self.log.warning("resume: no dataloader state in %s; starting at epoch 0 and "
                             "skipping %d consumed items", self.resumed_from, len(self.consumed))
            return
        if st.get("seed") != self.cfg.seed or st.get("num_rows") != len(self.train):
            self.log.warning("resume: the checkpoint had seed=%s and %s rows, now seed=%s and %d "
                             "rows: the epoch order will differ", st.get("seed"), st.get("num_rows"),
                             self.cfg.seed, len(self.train))
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])
        self.train_done = bool(st.get("train_done", False)) or len(self.valid) == 0
        self.admitted = int(st.get("admitted", 0))
        self.pending_fresh = deque(i for i in st.get("pending", []) if i not in self.consumed)
        self.log.info("resumed from %s: epoch %d, cursor %d, admitted %d, %d pending leases to "
                      "re-issue, %d consumed items", self.resumed_from, self.epoch, self.cursor,
                      self.admitted, len(self.pending_fresh), len(self.consumed))

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe resumable state; see the module docstring."""
        pending = [i for i, _, _ in self.table.state_dict()["pending"] if i.startswith("train/")]
        counted = sum(1 for i in pending if i not in self.refunded)
        return dict(version=1, seed=self.cfg.seed, num_rows=len(self.train), epoch=self.epoch,
                    cursor=self.cursor, train_done=self.train_done,
                    admitted=self.admitted - counted, pending=pending + list(self.pending_fresh),
                    exhausted=self._exhausted(), live_version=self.live_version,
                    counts=dict(self.counts))

    # ------------------------------------------------------------------ choosing items

    def _task(self, item_id: str, mode: str, r: Row, n: int, **extra: Any) -> dict[str, Any]:
        return dict(item_id=item_id, group_id=item_id, mode=mode, n=n, row=r.row,
                    prompt=r.prompt, data_source=r.source, **extra)

    def _train_item(self, item_id: str) -> dict[str, Any] | None:
        try:
            _, ep, pos = item_id.split("/")
            r = self.train[int(pos)]
        except (ValueError, IndexError):
            r = None
        if r is None or not ep.startswith("e"):
            self.log.error("pending item %s (from the resume state) names no usable row of the "
                           "training data; dropped", item_id)
            return None
        return self._task(item_id, "train", r, self.cfg.n_samples)

    def _peek_train(self) -> str | None:
        """The next training item id, not taken yet: skips consumed items and moves to the next
        epoch when one is fully leased. None (and train_done) when no training item is left."""
        while True:
            if self.pending_fresh:
                return self.pending_fresh[0]
            if self.train_done:
                return None
            if self.cursor >= len(self.order):
                if self.cfg.num_epochs and self.epoch + 1 >= self.cfg.num_epochs:
                    self.train_done = True
                    self.log.info("all %d epoch(s) leased", self.cfg.num_epochs)
                    return None
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order(self.epoch)
                self.log.info("epoch %d begins", self.epoch)
                continue
            item_id = f"train/e{self.epoch}/{int(self.order[self.cursor])}"
            if item_id not in self.consumed:
                return item_id
            self.cursor += 1
            self.counts["skipped_consumed"] += 1

    def _next_train(self) -> tuple[str, dict[str, Any]] | None:
        """Take the next training item: (item_id, task), or None when none is left."""
        while (item_id := self._peek_train()) is not None:
            if self.pending_fresh:
                self.pending_fresh.popleft()
            else:
                self.cursor += 1
            task = self._train_item(item_id)
            if task is not None:
                return item_id, task
        return None

    def _admit_ok(self) -> bool:
        cfg = self.cfg
        return (not cfg.admission_control or
                self.admitted // cfg.batch_groups <= self.live_version + cfg.max_staleness)

    def _grant(self, worker: str, credits: int) -> list[Lease]:
        now = time.monotonic()
        out: list[Lease] = []
        while len(out) < credits and (lease := self.table.grant_retry(worker, now)) is not None:
            out.append(lease)
        while len(out) < credits and self.val_queue:
            item_id, task = self.val_queue.popleft()
            out.append(self.table.grant(item_id, task, worker, now))
        while len(out) < credits and self._admit_ok():
            nxt = self._next_train()
            if nxt is None:
                break
            self.admitted += 1
            out.append(self.table.grant(nxt[0], nxt[1], worker, now))
        self.counts["leased"] += len(out)
        if out:
            self._schedule_expiry()
        return out

    def _exhausted(self) -> bool:
        return (self._loaded and not self.val_queue and not self.table.outstanding
                and not self.table.retry and self._peek_train() is None)

    # ------------------------------------------------------------------ waiting requests

    def _reply_body(self, leases: list[Lease]) -> dict[str, Any]:
        now = time.monotonic()
        return dict(leases=[dict(lease_id=x.lease_id, deadline_s=max(0.0, x.deadline - now),
                                 item=x.item) for x in leases],
                    exhausted=self._exhausted())

    def _answer(self, w: _Waiter, leases: list[Lease]) -> None:
        w.done = True
        self.reply(w.req, self._reply_body(leases))

    def _serve_waiting(self) -> None:
        """Hand what became leasable to the waiting requests, oldest first."""
        while self._waiting:
            w = self._waiting[0]
            leases = self._grant(w.req.msg.sender, w.credits) if self._loaded else []
            if not leases and not self._exhausted():
                return
            self._waiting.pop(0)
            self._answer(w, leases)

    def _on_wait_timeout(self, w: _Waiter) -> None:
        if not w.done:
            self._waiting.remove(w)
            self._answer(w, [])

    def _schedule_expiry(self) -> None:
        nd = self.table.next_deadline()
        if nd is None or (self._expiry_at is not None and self._expiry_at <= nd):
            return
        self._expiry_at = nd
        self.call_later(max(0.0, nd - time.monotonic()) + 0.005, self._on_expiry_timer)

    def _on_expiry_timer(self) -> None:
        self._expiry_at = None
        for lease in self.table.expire():
            self.counts["expired"] += 1
            self.log.warning("lease %s of %s (worker %s) expired after %.1fs unacknowledged; "
                             "leasing it again", lease.lease_id, lease.item_id, lease.worker,
                             self.cfg.lease_timeout_s)
        self._serve_waiting()
        self._schedule_expiry()

    # ------------------------------------------------------------------ handlers

    @handles("lease.request")
    def on_lease_request(self, req: Request) -> dict[str, Any] | Deferred:
        """lease.request{credits, wait_s?} -> lease.request.reply{leases, exhausted}.

        Each lease: {lease_id, deadline_s, item}; item = {item_id, group_id, mode, n, row,
        prompt, data_source, validation_id?, version?}. Answered at once when something is
        leasable or wait_s is 0, else held until something is (or wait_s passes: leases=[]).
        Failure: error{invalid_body} when credits < 1.
        """
        credits, wait_s = int(req.body["credits"]), float(req.body.get("wait_s", 0.0))
        if credits < 1:
            raise HandlerError("invalid_body", f"lease.request: credits must be >= 1, got {credits}")
        leases = self._grant(req.msg.sender, credits) if self._loaded and not self._waiting else []
        if leases or self._exhausted() or wait_s <= 0 or self.stopping.is_set():
            return self._reply_body(leases)
        w = _Waiter(req, credits)
        self._waiting.append(w)
        self.call_later(wait_s, lambda: self._on_wait_timeout(w))
        return DEFER

    @handles("lease.ack")
    def on_lease_ack(self, req: Request) -> dict[str, Any]:
        """lease.ack{lease_ids} -> lease.ack.reply{acked, unknown}.

        An id not outstanding is `unknown` (acked before, or expired and leased again), except
        an expired lease whose item still waits to be re-issued: that one is taken back.
        """
        acked, unknown = 0, []
        for lid in req.body["lease_ids"]:
            outcome = self.table.settle(lid)
            if outcome == "unknown":
                unknown.append(lid)
                continue
            acked += 1
            if outcome == "late":
                self.counts["late_acks"] += 1
        self.counts["acked"] += acked
        if self._exhausted():
            self._serve_waiting()
        return dict(acked=acked, unknown=unknown)

    @handles("admission.refund")
    def on_refund(self, req: Request) -> dict[str, Any]:
        """admission.refund{group_ids} -> admission.refund.reply{refunded}.

        Each training group not refunded before frees one admission slot (a replacement
        group may be leased). Validation or unknown ids are not counted.
        """
        refunded = 0
        for gid in req.body["group_ids"]:
            if gid.startswith("train/") and gid not in self.refunded:
                self.refunded.add(gid)
                refunded += 1
        self.admitted -= refunded
        self.counts["refunded"] += refunded
        if refunded:
            self._serve_waiting()
        return dict(refunded=refunded)

    @handles("validation.start")
    def on_validation_start(self, req: Request) -> dict[str, Any]:
        """validation.start{version, validation_id} -> validation.start.reply{num_items, num_samples}.

        Queues one item per usable validation row ("val/<validation_id>/<row_index>"), ahead
        of training items. Idempotent per validation_id. Failure: error{not_ready} before the
        data is loaded.
        """
        if not self._loaded:
            raise HandlerError("not_ready", f"{self.name}: data not loaded yet")
        vid, version = str(req.body["validation_id"]), int(req.body["version"])
        if vid in self.val_passes:
            return self.val_passes[vid]
        n = self.cfg.val_n_samples
        for pos, r in enumerate(self.val):
            if r is not None:
                item_id = f"val/{vid}/{pos}"
                self.val_queue.append((item_id, self._task(item_id, "validate", r, n,
                                                           validation_id=vid, version=version)))
        num_items = sum(r is not None for r in self.val)
        self.val_passes[vid] = dict(num_items=num_items, num_samples=num_items * n)
        self.log.info("validation %s of version %d: %d items queued", vid, version, num_items)
        self._serve_waiting()
        return self.val_passes[vid]

    @handles("state.get")
    def on_state_get(self, req: Request) -> dict[str, Any]:
        """state.get{} -> state.get.reply{state}: see state_dict(). Failure: error{not_ready}."""
        if not self._loaded:
            raise HandlerError("not_ready", f"{self.name}: data not loaded yet")
        return dict(state=self.state_dict())

    @handles("weights.live")
    def on_weights_live(self, msg: Message) -> None:
        """A newer live version opens admission for more step slots."""
        version = int(msg.body["version"])
        if version > self.live_version:
            self.live_version = version
            if self._loaded:
                self._serve_waiting()

    # ------------------------------------------------------------------ reporting

    def _metrics(self) -> dict[str, float]:
        values = {f"dataloader/{k}": float(v) for k, v in self.counts.items()}
        values.update({"dataloader/epoch": float(self.epoch),
                       "dataloader/admitted": float(self.admitted),
                       "dataloader/reissued": float(self.table.reissued),
                       "dataloader/outstanding": float(len(self.table.outstanding)),
                       "dataloader/waiting_requests": float(len(self._waiting))})
        return values

    def _metrics_tick(self) -> None:
        values = self._metrics()
        if values != self._last_metrics:
            self._last_metrics = values
            self.publish("metrics", dict(step=self.live_version, kind="dataloader", values=values))
        if not self.stopping.is_set():
            self.call_later(self.cfg.metrics_interval_s, self._metrics_tick)

    def activity(self) -> dict[str, Any]:
        """In-flight work for the heartbeat (once nexrl.node has an activity hook)."""
        return dict(inflight=len(self.table.outstanding), waiting=len(self._waiting),
                    epoch=self.epoch)

    def stats_extra(self) -> dict[str, Any]:
        return dict(self._metrics(), live_version=self.live_version, exhausted=self._exhausted())

    def on_drain(self) -> None:
        for w in self._waiting:
            self._answer(w, [])
        self._waiting.clear()
