"""The trainer node's working parts (torch side): built in Trainer.setup(), driven by
Trainer.main() (see nodes/trainer.py for the step diagram).

Kept apart from the node module so that `nexrl.nodes.trainer` imports (and validates its
config) without torch, and so each piece stays small enough to read: building the model and
optimizer (and resuming), pulling a batch, the weight-sync handshake, metrics, checkpoints.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from nexrl import checkpoint as ckpt
from nexrl.bus.reqrep import RemoteError, RequestTimeout


class TrainerRuntime:
    """Model, optimizer, update rule, weight sender and counters of one trainer node."""

    def __init__(self, node: Any):
        self.cfg, self.log = node.cfg, node.log
        self.engine_urls = self._check_engines(node)  # fail fast, before importing torch
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nexrl.sft_data import SFTStream, load_sft_samples
        from nexrl.train_steps import TRAINER_TYPES, StepContext
        from nexrl.trainer_utils import autocast_for, build_optimizer

        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        run_dir = node.node_cfg.run_dir
        self.ckpt_root = cfg.checkpoint_dir or (
            os.path.join(run_dir, "checkpoints") if run_dir else "")
        if cfg.save_every and not self.ckpt_root:
            raise ValueError("trainer: save_every > 0 needs node.run_dir or trainer.checkpoint_dir")
        self.resumed_from = self._resume_path()
        src = self.resumed_from or cfg.model_path
        self.log.info("loading the policy from %s on %s", src, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.resumed_from or cfg.tokenizer_path or cfg.model_path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        update_cls = TRAINER_TYPES[cfg.type]
        ref = None
        if update_cls.needs_reference(cfg.algorithm):  # only when kl_coef > 0
            self.log.info("loading the frozen reference model from %s", cfg.model_path)
            ref = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=torch.float32)
            ref = ref.to(self.device).eval().requires_grad_(False)
        o = cfg.optim
        self.optimizer, self.scheduler = build_optimizer(
            self.model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
            schedule=o.lr_schedule, warmup_steps=o.warmup_steps, total_steps=cfg.total_steps,
            min_lr_ratio=o.min_lr_ratio)
        self.ctx = StepContext(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            pad_id=self.pad_id, device=self.device, micro_batch_size=cfg.micro_batch_size,
            grad_clip=o.grad_clip, temperature=cfg.temperature, algorithm=cfg.algorithm,
            ref_model=ref, ppo_epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches,
            autocast=autocast_for(self.device, cfg.autocast))
        self.update = update_cls(self.ctx)
        self.stream = None
        if cfg.type == "sft":
            samples = load_sft_samples(cfg.sft.data_file, self.tokenizer, cfg.sft)
            self.stream = SFTStream(samples, cfg.sft.batch_size, cfg.sft.shuffle, cfg.seed)
            self.log.info("SFT data: %d rows from %s", len(samples), cfg.sft.data_file)
        self.step = 0
        self.consumed: set[str] = set()
        if self.resumed_from:
            self._restore(self.resumed_from)
        self.sender = self._make_sender() if cfg.push_weights else None

    # ------------------------------------------------------------------ resume
    def _resume_path(self) -> str:
        r = self.cfg.resume
        if not r:
            return ""
        if r == "auto":
            if not self.ckpt_root:
                raise ValueError("trainer: resume=auto needs node.run_dir or "
                                 "trainer.checkpoint_dir")
            path = ckpt.latest_checkpoint(self.ckpt_root)
            if path is None:
                self.log.info("resume=auto: no checkpoint under %s; starting fresh", self.ckpt_root)
                return ""
            return path
        ckpt.read_trainer_state(r)  # raises CheckpointError naming the path if incomplete
        return r

    def _restore(self, path: str) -> None:
        state = ckpt.read_trainer_state(path)
        ckpt.load_optimizer(path, self.optimizer, self.scheduler)
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.consumed = set(state.get("consumed", []))
        if self.stream is not None and "sft" in state.get("extra", {}):
            self.stream.restore(state["extra"]["sft"])
        self.log.info("resumed from %s: step %d, %d items consumed", path, self.step,
                      len(self.consumed))

    # ------------------------------------------------------------------ engines
    def _engine_urls(self, node: Any) -> list[str]:
        if self.cfg.engine_urls:
            return list(self.cfg.engine_urls)
        names = node.peers_of_role("inference")
        missing = [n for n in names if not node.node_cfg.peers[n].url]
        if missing:
            raise ValueError(f"trainer: engines {missing} have no url in the job's directory "
                             f"(node.peers.<name>.url)")
        return [node.node_cfg.peers[n].url for n in names]

    def _check_engines(self, node: Any) -> list[str]:
        """The engines to push to; raises a clear error when pushing is on and there are none
        (or no weight_sync node to coordinate with)."""
        cfg = self.cfg
        urls = self._engine_urls(node)
        if not cfg.push_weights:
            self.log.info("push_weights is false: standalone trainer, engines (%s) will not "
                          "receive weights", ", ".join(urls) or "none")
            return urls
        if not urls:
            known = ", ".join(f"{n} ({p.role})" for n, p in node.node_cfg.peers.items()) or "none"
            raise ValueError("trainer: push_weights is true but there is no inference engine: no "
                             f"peer of role 'inference' in the job (peers: {known}) and "
                             "trainer.engine_urls is empty; set trainer.push_weights=false to "
                             "train without engines")
        if not node.peers_of_role("weight_sync"):
            raise ValueError("trainer: push_weights is true but the job has no weight_sync node "
                             "(it pauses the engines and announces weights.live)")
        return urls

    def _make_sender(self) -> Any:
        from nexrl.weight_transfer import SenderConfig, WeightSender

        cfg = self.cfg
        backend = cfg.sync_backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        return WeightSender(SenderConfig(
            engine_urls=self.engine_urls, master_address=cfg.master_address,
            master_port=cfg.master_port, backend=backend, bucket_bytes=cfg.bucket_bytes,
            timeout_s=cfg.transfer_timeout_s, pipelined=cfg.pipelined,
            engine_tp=list(cfg.engine_tp) or None))

    def connect_engines(self, node: Any) -> bool:
        """Wait for every engine's /health (bounded), then join the weight group; False if
        the node was told to stop meanwhile."""
        from nexrl.engine_client import EngineClient

        deadline = time.monotonic() + self.cfg.engine_wait_s
        for url in self.engine_urls:
            with EngineClient(url, timeout=5.0) as c:
                while not c.health(timeout=5.0):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"trainer: engine {url} not healthy within "
                                           f"{self.cfg.engine_wait_s:.0f}s")
                    if node.stopping.wait(0.5):
                        return False
        self.sender.connect()
        return True

    def _named_params(self):
        import torch

        want = self.cfg.push_dtype
        if want == "auto":
            dt = torch.bfloat16 if self.device.type == "cuda" else None
        else:
            dt = getattr(torch, want)
        for name, p in self.model.named_parameters():
            t = p.detach()
            yield name, (t if dt is None or t.dtype == dt else t.to(dt))

    def sync(self, node: Any, version: int) -> float:
        """weights.ready -> push -> weights.pushed until live; seconds taken. Raises after
        sync_retries failed attempts (the trainer cannot go on with engines behind)."""
        cfg, t0 = self.cfg, time.monotonic()
        ws = node.client("weight_sync")
        last = ""
        for attempt in range(cfg.sync_retries + 1):
            if attempt:
                self.log.warning("sync of version %d failed (attempt %d/%d): %s", version,
                                 attempt, cfg.sync_retries + 1, last)
            try:
                ready = ws.request("weights.ready", {"version": version, "step": version},
                                   timeout=cfg.sync_timeout_s, retries=0).body
            except RemoteError as e:  # weight_sync could not pause the engines
                last = str(e)
                continue
            if set(ready["engines"]) != set(self.engine_urls):
                self.log.warning("weight_sync prepared engines %s but this trainer pushes to %s",
                                 ready["engines"], self.engine_urls)
            body: dict[str, Any] = {"version": version, "ok": True, "seconds": 0.0, "bytes": 0}
            try:
                if self.sender.group is None:
                    self.sender.connect()
                stats = self.sender.push(self._named_params(), str(version))
                body.update(seconds=stats.seconds, bytes=stats.nbytes)
            except (RuntimeError, OSError) as e:  # WeightSyncError, EngineError, torch errors
                body.update(ok=False, error=f"{type(e).__name__}: {e}")
                last = body["error"]
            live = ws.request("weights.pushed", body, timeout=cfg.sync_timeout_s,
                              retries=0).body["live"]
            if live:
                return time.monotonic() - t0
            last = last or "weight_sync found engines that did not reach the version"
        raise RuntimeError(f"trainer: weights version {version} did not go live after "
                           f"{cfg.sync_retries + 1} attempt(s): {last}")

    # ------------------------------------------------------------------ batches
    def next_batch(self, node: Any) -> tuple[list[Any], float] | None:
        """The next batch (trajectories, or SFT samples) and the seconds waited for it;
        None when the pool is exhausted or the node is stopping."""
        if self.stream is not None:
            samples, _ = self.stream.next_batch()
            return samples, 0.0
        cfg, t0 = self.cfg, time.monotonic()
        pool = node.client("pool")
        timeout = cfg.batch_wait_s + node.node_cfg.bus.request_timeout_s
        while not node.stopping.is_set():
            try:
                body = pool.request("batch.request", {"num_groups": cfg.batch_groups,
                                                      "wait_s": cfg.batch_wait_s},
                                    timeout=timeout).body
            except RequestTimeout as e:  # a busy or restarting pool: ask again
                self.log.warning("%s; asking again", e)
                continue
            trajs = [t for t in body["trajectories"] if t.get("item_id") not in self.consumed]
            if len(trajs) < len(body["trajectories"]):
                self.log.warning("dropped %d trajectories of items already trained on",
                                 len(body["trajectories"]) - len(trajs))
            if trajs:
                return trajs, time.monotonic() - t0
            if body["exhausted"]:
                return None
        return None

    def train_step(self, batch: list[Any]) -> dict[str, float]:
        values = self.update.step(batch)
        if self.stream is None:
            self.consumed.update(str(t["item_id"]) for t in batch)
        return values

    def batch_metrics(self, batch: list[Any], trained_from: int) -> dict[str, float]:
        """Staleness and rollout timing of a GRPO batch (nothing for SFT samples)."""
        if self.stream is not None:
            return {}
        stale = [trained_from - int(t.get("weight_version", trained_from)) for t in batch]
        timing = [t.get("timing") or {} for t in batch]
        n = len(batch)
        return {"train/staleness_max": float(max(stale)),
                "train/staleness_mean": sum(stale) / n,
                "timing/generate_s": sum(float(x.get("generate_s", 0.0)) for x in timing) / n,
                "timing/reward_s": sum(float(x.get("reward_s", 0.0)) for x in timing) / n}

    def batch_tokens(self, batch: list[Any]) -> int:
        """Prompt + response tokens of the batch (throughput/tokens_per_s = this / step_s)."""
        if self.stream is not None:
            return sum(s.num_tokens for s in batch)
        return sum(len(t["prompt_ids"]) + len(t["response_ids"]) for t in batch)

    @staticmethod
    def log_line(step: int, total: int, v: dict[str, float]) -> str:
        """One line per step for the node's log."""
        parts = [f"{k.split('/')[-1]}={v[k]:.4g}" for k in (
            "train/reward_mean", "train/loss", "train/kl", "train/entropy", "train/grad_norm",
            "train/lr", "train/logprob_mismatch", "train/staleness_max", "timing/wait_s",
            "timing/train_s", "timing/weight_sync_s", "throughput/tokens_per_s") if k in v]
        return f"step {step}/{total}: " + " ".join(parts)

    # ------------------------------------------------------------------ checkpoints
    def _data_state(self, node: Any) -> dict[str, Any]:
        """state.get replies of the dataloader, then the pool (None for a role not in the job)."""
        out: dict[str, Any] = {}
        for role in ("dataloader", "pool"):
            if self.stream is not None or not node.peers_of_role(role):
                out[role] = None
                continue
            out[role] = node.client(role).request("state.get", {}).body["state"]
        out["consumed"] = sorted(self.consumed)
        return out

    def save(self, node: Any) -> str:
        """Write checkpoint step_<step>; on failure publish node.error and go on (the
        previous checkpoint stays the resume point). Returns the path or ""."""
        t0 = time.monotonic()
        try:
            data = self._data_state(node)
            state = {"step": self.step, "version": self.step, "rng": ckpt.rng_state(),
                     "consumed": sorted(self.consumed),
                     "extra": {"sft": self.stream.state()} if self.stream is not None else {}}
            path = ckpt.save_checkpoint(
                self.ckpt_root, self.step, model=self.model, tokenizer=self.tokenizer,
                optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state,
                data_state=data, keep=self.cfg.keep_checkpoints)
        except (ckpt.CheckpointError, RemoteError, RequestTimeout, OSError) as e:
            self.log.error("checkpoint of step %d failed: %s", self.step, e)
            node.publish("node.error", {"node": node.name, "role": node.role,
                                        "code": "checkpoint_failed",
                                        "message": f"step {self.step}: {e}"})
            return ""
        self.log.info("saved checkpoint %s in %.2fs", path, time.monotonic() - t0)
        return path
