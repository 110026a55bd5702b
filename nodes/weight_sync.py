"""The weight_sync node: makes a new weight version live on every engine, and says so.

    nexrl-node weight_sync --config recipe.yaml weight_sync.mode=batch-async \
        weight_sync.max_staleness=1

One sync (trainer T, weight_sync W, engines E)::

    T                                  W                                      E (each)
    weights.ready{v} ───────────────▶  pause per pause_mode ───────────────▶ /pause_generation
                                       (drain: wait until nothing runs,        (or drained)
                                        then pause in place)
    ◀── {engines, paused} ───────────
    broadcast v (nexrl.weight_transfer) ─────────────────────────────────────▶ staged, applied
    weights.pushed{v, ok} ──────────▶  /get_weight_version == "v" on each? ─▶
                                       yes: /continue_generation, publish weights.live{v}
                                            (+ metrics{kind: sync}; validation every k)
                                       no / ok=false: /continue_generation (engines keep
                                            their previous weights), node.error, live=false
    ◀── {live} ──────────────────────
                                       every republish_s: weights.live{current} again

Where staleness is bounded: NOT here. The dataloader leases the k-th training group (step
slot floor(k / batch_groups)) only while slot <= live_version + max_staleness, with
live_version taken from these weights.live events. This node decides what happens to
requests IN FLIGHT during an update (pause_mode), which is what makes the modes differ:

    mode         max_staleness  pause_mode (default first)      in-flight requests
    sync         0              drain, abort, retract,          admission leaves none for
                                in_place, none                  training; drain lets
                                                                validation requests finish
    batch-async  >= 1           drain, abort                    finish on the old weights
                                                                (drain) or end with
                                                                finish_reason "abort" and are
                                                                redone by the rollout: a
                                                                trajectory never spans versions
    fully-async  >= 1           retract, in_place, none         continue on the new weights: a
                                                                trajectory may span versions
                                                                (weight_version = the oldest)

sglang's /pause_generation modes as NexRL uses them: "abort" ends every running and
queued request (partial output, finish_reason abort); "retract" holds them and drops their
KV cache, so after the update they are re-prefilled and continue with exact new-version
logprobs; "in_place" holds them with their KV (sglang keeps the stale KV; the embedded engine
re-prefills on apply anyway). "drain" is NexRL's: poll the engine (GET /get_server_info
`running`, NexRL's embedded engine reports it) until no request is running, pause in_place,
check again (a request that slipped in between means resume and wait again). It terminates
because admission control stops new leases while live_version cannot advance; after
drain_timeout_s it falls back to "retract" and publishes a node.error (drain_timeout).
"none" lets the engine apply weights between two decode steps while serving.

Failures never leave engines paused: a failed push, a version mismatch, or a trainer that
never reports the push (push_timeout_s) all end with /continue_generation on every engine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from nexrl.bus.codec import Message
from nexrl.bus.reqrep import RemoteError, RequestTimeout
from nexrl.engine_client import EngineClient, EngineError
from nexrl.node import DEFER, Deferred, Node, Request, handles

MODES = ("sync", "batch-async", "fully-async")
ALLOWED_PAUSE = {"sync": ("drain", "abort", "retract", "in_place", "none"),
                 "batch-async": ("drain", "abort"),
                 "fully-async": ("retract", "in_place", "none")}


@dataclass
class WeightSyncConfig:
    """The `weight_sync` section of a recipe."""

    #: "sync", "batch-async" or "fully-async" (see the module docstring).
    mode: str = "sync"
    #: Versions a training rollout may lag the live version (the dataloader reads it as
    #: ${weight_sync.max_staleness}); 0 for sync, >= 1 for the async modes.
    max_staleness: int = 0
    #: What happens to in-flight requests during an update: "auto" (the mode's default: sync
    #: and batch-async "drain", fully-async "retract") or one the mode allows (table above).
    pause_mode: str = "auto"
    #: Validate every k-th live version (0 = never).
    validate_every: int = 0
    #: Validate version 0 once at start (when the engines serve version 0).
    validate_before_train: bool = False
    #: Engine base URLs ([] = the urls of the job's peers of role "inference").
    engine_urls: list[str] = field(default_factory=list)
    #: Timeout of each engine admin HTTP call, seconds.
    engine_timeout_s: float = 30.0
    #: Seconds to wait at start for every engine's /health.
    engine_wait_s: float = 300.0
    #: Longest a drain waits for running requests before falling back to "retract".
    drain_timeout_s: float = 300.0
    #: Seconds between two looks at an engine's running count while draining.
    drain_poll_s: float = 0.05
    #: Seconds after the weights.ready reply within which weights.pushed must come; then
    #: the engines are resumed on their current weights (node.error weights_push_timeout).
    push_timeout_s: float = 900.0
    #: Seconds between two re-publications of weights.live.
    republish_s: float = 2.0
    #: Timeout of validation.start / validation.begin requests, seconds.
    validation_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"weight_sync.mode {self.mode!r} is not one of {MODES}")
        if self.mode == "sync" and self.max_staleness != 0:
            raise ValueError(f"weight_sync.max_staleness must be 0 in mode sync (no rollout of "
                             f"batch t+1 before weights t are live), got {self.max_staleness}; "
                             f"use mode batch-async or fully-async for staleness >= 1")
        if self.mode != "sync" and self.max_staleness < 1:
            raise ValueError(f"weight_sync.max_staleness must be >= 1 in mode {self.mode} "
                             f"(0 is mode sync), got {self.max_staleness}")
        if self.pause_mode != "auto" and self.pause_mode not in ALLOWED_PAUSE[self.mode]:
            raise ValueError(f"weight_sync.pause_mode {self.pause_mode!r} is not allowed in mode "
                             f"{self.mode}; allowed: auto, {', '.join(ALLOWED_PAUSE[self.mode])}")
        if self.validate_every < 0:
            raise ValueError(f"weight_sync.validate_every must be >= 0, got {self.validate_every}")
        for name in ("engine_timeout_s", "drain_timeout_s", "drain_poll_s", "push_timeout_s",
                     "republish_s", "validation_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"weight_sync.{name} must be > 0")

    @property
    def resolved_pause_mode(self) -> str:
        return ALLOWED_PAUSE[self.mode][0] if self.pause_mode == "auto" else self.pause_mode


@dataclass
class _OpenSync:
    """A sync between weights.ready and weights.pushed."""

    version: int
    t_ready: float
    pause_s: float
    paused: bool


class WeightSync(Node):
    role = "weight_sync"
    Config = WeightSyncConfig
    SERVE_WHEN_READY_ONLY = True   # handler state is built in setup()
    SUBSCRIBE = ("validation.done",)

    def setup(self) -> None:
        cfg: WeightSyncConfig = self.cfg
        self.urls = list(cfg.engine_urls) or self._ws_peer_urls()
        self.engines = [EngineClient(u, timeout=cfg.engine_timeout_s) for u in self.urls]
        self.pause_mode = cfg.resolved_pause_mode
        if cfg.validate_every or cfg.validate_before_train:
            missing = [r for r in ("dataloader", "validator") if not self.peers_of_role(r)]
            if missing:
                raise ValueError(f"weight_sync: validation is on (validate_every="
                                 f"{cfg.validate_every}, validate_before_train="
                                 f"{cfg.validate_before_train}) but the job has no {missing}")
        self.live_version: int | None = None
        self.last_sync_s = 0.0
        self.counts = dict(syncs=0, failures=0, drain_fallbacks=0, validations=0)
        self._ws_open: _OpenSync | None = None
        self._ws_work = ThreadPoolExecutor(1, thread_name_prefix="weight-sync")  # one sync at a time
        self._ws_fan = ThreadPoolExecutor(max(2, len(self.engines)), thread_name_prefix="engine-call")
        self.log.info("mode %s, max_staleness %d, pause_mode %s, engines %s", cfg.mode,
                      cfg.max_staleness, self.pause_mode, self.urls)

    def _ws_peer_urls(self) -> list[str]:
        names = self.peers_of_role("inference")
        if not names:
            raise ValueError("weight_sync: no inference engines: no peer of role 'inference' in "
                             "the job's directory and weight_sync.engine_urls is empty")
        missing = [n for n in names if not self.node_cfg.peers[n].url]
        if missing:
            raise ValueError(f"weight_sync: engines {missing} have no url in the job's directory")
        return [self.node_cfg.peers[n].url for n in names]

    # ------------------------------------------------------------------ start
    def main(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.engine_wait_s
        for c in self.engines:
            while not c.health(timeout=5.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"weight_sync: engine {c.base_url} not healthy within "
                                       f"{cfg.engine_wait_s:.0f}s")
                if self.stopping.wait(0.5):
                    return
        versions, errors = self._ws_fan_out(lambda c: c.get_weight_version())
        if errors:
            raise RuntimeError(f"weight_sync: cannot read the engines' weight versions: {errors}")
        distinct = {str(v) for v in versions.values()}
        if len(distinct) == 1 and distinct.pop().isdigit():
            self.live_version = int(next(iter(versions.values())))
            self.log.info("engines serve version %d at start", self.live_version)
        else:
            self._ws_error("weight_version_mismatch", f"engines disagree at start: {versions}; "
                        "no version is live until the first sync")
        self.call_soon(self._ws_republish)
        if cfg.validate_before_train and self.live_version == 0:
            self._ws_work.submit(self._ws_job, lambda: self._ws_validate(0))
        self.stopping.wait()

    def teardown(self) -> None:
        for pool in ("_ws_work", "_ws_fan"):
            if hasattr(self, pool):
                getattr(self, pool).shutdown(wait=False, cancel_futures=True)
        for c in getattr(self, "engines", []):
            c.close()

    def stats_extra(self) -> dict[str, Any]:
        return {"live_version": -1 if getattr(self, "live_version", None) is None
                else self.live_version, **getattr(self, "counts", {})}

    # ------------------------------------------------------------------ handlers
    @handles("weights.ready")
    def on_ready(self, req: Request) -> Deferred:
        """weights.ready{version, step} -> weights.ready.reply{engines, paused} once the
        engines are paused as pause_mode says; error reply (handler_error) if they cannot be."""
        self._ws_work.submit(self._ws_job, lambda: self._ws_prepare(req), req)
        return DEFER

    @handles("weights.pushed")
    def on_pushed(self, req: Request) -> Deferred:
        """weights.pushed{version, ok, seconds, bytes, error?} -> weights.pushed.reply{live}:
        live when every engine reports the version; engines are resumed either way."""
        self._ws_work.submit(self._ws_job, lambda: self._ws_finish(req), req)
        return DEFER

    @handles("validation.done")
    def on_validation_done(self, msg: Message) -> None:
        b = msg.body
        self.log.info("validation %s of version %s done: %d samples", b["validation_id"],
                      b["version"], b["num_samples"])

    # ------------------------------------------------------------------ sync steps (worker)
    def _ws_prepare(self, req: Request) -> None:
        version = int(req.body["version"])
        if self._ws_open is not None:
            self.log.warning("weights.ready{%d} while version %d was never reported pushed; "
                             "resuming the engines first", version, self._ws_open.version)
            self._ws_resume_all()
            self._ws_open = None
        t0 = time.monotonic()
        paused = self.pause_mode != "none"
        if paused:
            _, errors = self._ws_fan_out(self._ws_pause)
            if errors:
                self._ws_resume_all()
                raise RuntimeError(f"cannot pause the engines for version {version}: {errors}")
        self._ws_open = _OpenSync(version, t0, time.monotonic() - t0, paused)
        self.reply(req, {"engines": self.urls, "paused": paused})
        opened = self._ws_open
        self.call_later(self.cfg.push_timeout_s,
                        lambda: self._ws_work.submit(self._ws_job, lambda: self._ws_watchdog(opened)))

    def _ws_finish(self, req: Request) -> None:
        b = req.body
        version, ok = int(b["version"]), bool(b["ok"])
        op, self._ws_open = self._ws_open, None
        if op is not None and op.version != version:
            self.log.warning("weights.pushed{%d} but the open sync is for version %d",
                             version, op.version)
        t0 = time.monotonic()
        bad: dict[str, Any] = {}
        if ok:
            got, errors = self._ws_fan_out(lambda c: c.get_weight_version())
            bad = {u: v for u, v in got.items() if str(v) != str(version)}
            bad.update(errors)
        verify_s = time.monotonic() - t0
        if self.pause_mode != "none":
            self._ws_resume_all()
        if ok and not bad:
            self.live_version = version
            self.last_sync_s = time.monotonic() - (op.t_ready if op else t0)
            self.counts["syncs"] += 1
            self.publish("weights.live", {"version": version, "sync_s": self.last_sync_s,
                                          "engines": self.urls})
            push_s = float(b["seconds"])
            self.publish("metrics", {"step": version, "kind": "sync", "values": {
                "sync/sync_s": self.last_sync_s, "sync/pause_s": op.pause_s if op else 0.0,
                "sync/push_s": push_s, "sync/verify_s": verify_s,
                "sync/bytes": float(b["bytes"]), "sync/version": float(version),
                "sync/push_gb_per_s": float(b["bytes"]) / push_s / 1e9 if push_s > 0 else 0.0}})
            self.reply(req, {"live": True})
            self.log.info("version %d live on %d engine(s) in %.3fs", version, len(self.urls),
                          self.last_sync_s)
            if self.cfg.validate_every and version % self.cfg.validate_every == 0:
                self._ws_validate(version)
            return
        self.counts["failures"] += 1
        why = (f"the trainer reported the push failed: {b.get('error', 'no cause given')}"
               if not ok else f"engines report other versions: {bad}")
        self._ws_error("weight_sync_failed", f"version {version} is not live: {why}; engines "
                    f"resumed on their previous weights (live version stays "
                    f"{self.live_version})")
        self.reply(req, {"live": False})

    def _ws_watchdog(self, opened: _OpenSync) -> None:
        if self._ws_open is not opened:
            return
        self._ws_open = None
        self._ws_resume_all()
        self._ws_error("weights_push_timeout", f"no weights.pushed for version {opened.version} "
                    f"within {self.cfg.push_timeout_s:.0f}s of weights.ready; engines resumed")

    # ------------------------------------------------------------------ engines
    def _ws_pause(self, c: EngineClient) -> None:
        if self.pause_mode != "drain":
            c.pause(self.pause_mode)
            return
        cfg = self.cfg
        deadline = time.monotonic() + cfg.drain_timeout_s
        while time.monotonic() < deadline:
            if _running(c) == 0:
                c.pause("in_place")
                if _running(c) == 0:
                    return
                c.resume()  # a request started between the two looks: let it finish
            time.sleep(cfg.drain_poll_s)  # the engine API has no idle notification
        c.pause("retract")
        self.counts["drain_fallbacks"] += 1
        self._ws_error("drain_timeout", f"engine {c.base_url} still had running requests after "
                    f"{cfg.drain_timeout_s:.0f}s; paused with retract (they continue on the new "
                    f"weights and will span two versions)")

    def _ws_resume_all(self) -> None:
        _, errors = self._ws_fan_out(lambda c: c.resume())
        if errors:
            self._ws_error("engine_resume_failed", f"cannot resume engines: {errors}")

    def _ws_fan_out(self, fn: Callable[[EngineClient], Any]) -> tuple[dict, dict]:
        """fn on every engine concurrently: (url -> result, url -> error text)."""
        futs = {c.base_url: self._ws_fan.submit(fn, c) for c in self.engines}
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for url, f in futs.items():
            try:
                results[url] = f.result()
            except (EngineError, ValueError) as e:
                errors[url] = str(e)
        return results, errors

    # ------------------------------------------------------------------ validation
    def _ws_validate(self, version: int) -> None:
        """validation.start to the dataloader, then validation.begin to the validator."""
        vid, t = f"v{version}", self.cfg.validation_timeout_s
        try:
            r = self.client("dataloader").request(
                "validation.start", {"version": version, "validation_id": vid}, timeout=t).body
            self.client("validator").request(
                "validation.begin", {"version": version, "validation_id": vid,
                                     "num_samples": int(r["num_samples"])}, timeout=t)
        except (RemoteError, RequestTimeout) as e:
            self._ws_error("validation_start_failed", f"validation {vid}: {e}")
            return
        self.counts["validations"] += 1
        self.log.info("validation %s started: %d items, %d samples", vid, r["num_items"],
                      r["num_samples"])

    # ------------------------------------------------------------------ plumbing
    def _ws_republish(self) -> None:
        """Loop-thread timer: weights.live{current} every republish_s (for late subscribers)."""
        if self.stopping.is_set():
            return
        if self.live_version is not None:
            self.publish("weights.live", {"version": self.live_version,
                                          "sync_s": self.last_sync_s, "engines": self.urls})
        self.call_later(self.cfg.republish_s, self._ws_republish)

    def _ws_job(self, fn: Callable[[], None], req: Request | None = None) -> None:
        """Run a worker job; an exception answers the request with an error and is published
        (node.error), so no failure is lost inside the executor."""
        try:
            fn()
        except Exception as e:  # a worker-pool job: report it, or it would vanish in a Future
            msg = f"{type(e).__name__}: {e}"
            if req is not None:
                self.reply_error(req, "handler_error", msg)
            self._ws_error("weight_sync_failed", msg)

    def _ws_error(self, code: str, message: str) -> None:
        self.log.error("%s: %s", code, message)
        self.publish("node.error", {"node": self.name, "role": self.role, "code": code,
                                    "message": message})


def _running(c: EngineClient) -> int:
    """Requests being decoded now, from GET /get_server_info (NexRL's embedded engine)."""
    info = c.get_server_info()
    if not isinstance(info, dict) or "running" not in info:
        raise EngineError(c.base_url, "/get_server_info",
                          "no 'running' count: pause_mode drain needs NexRL's embedded engine; "
                          "use pause_mode retract (or abort) with sglang")
    return int(info["running"])
