"""The trainer node: pulls batches, updates the policy, pushes weights, checkpoints.

    nexrl-node trainer --config recipe.yaml node.start=now trainer.model_path=/models/tiny

One step (who waits for what)::

    trainer                          pool            weight_sync              engines
    batch.request{G, wait_s} ──────▶ held until G complete groups (or wait_s: empty, ask again)
    ◀──── trajectories ──────────── (timing/wait_s = time blocked here)
    GRPO update (nexrl.train_steps)                                            (serve rollouts
    version v = step + 1                                                        of older slots)
    weights.ready{v} ────────────────────────────────▶ pause / drain ───────▶ paused
    ◀──── {engines, paused} ─────────────────────────
    WeightSender.push (bucketed gloo/NCCL broadcast) ─────────────────────────▶ apply, version v
    weights.pushed{v, ok} ───────────────────────────▶ check /get_weight_version, resume
    ◀──── {live} ────────────────────────────────────  publishes weights.live{v}
    metrics{step: v, kind: train}; every save_every steps: state.get (dataloader, then pool),
    checkpoint step_<v>, checkpoint.saved

trainer.type "sft" runs the same loop with batches from trainer.sft.data_file instead of the
pool (nexrl.sft_data says why) and metrics train/loss, grad_norm, lr, response_len_*, timing/*.

Staleness is bounded upstream (the dataloader's admission control against weights.live); the
trainer only measures it: staleness = (version trained from) - trajectory.weight_version.
The job ends when `total_steps` steps are done, or the pool answers exhausted with nothing
left: the trainer saves a final checkpoint and returns (exit 0); it is the node that
completes the job.

Device and precision: on CPU the model trains in float32. On CUDA the parameters (and AdamW's
state) stay float32 and forwards run under bf16 autocast (`autocast`): bf16 parameters would
drop most updates at RL learning rates (~1e-6 relative steps are below bf16's 8-bit mantissa).
Weights are cast to `push_dtype` (bf16 on CUDA: what the engines serve) while being pushed.

Resume (`resume: auto` or a checkpoint path): model, tokenizer, optimizer, scheduler, RNG,
step and consumed item_ids come from the checkpoint (nexrl.checkpoint); the version is the
step, and the resumed weights are pushed to the engines (weights.ready/pushed, version = step)
BEFORE the first batch.request. (Engines restarted with the job serve version 0 until then;
the dataloader carries its admission count across resume, so it leases no training group
until weights.live reaches the resumed version.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nexrl.algorithms.config import AlgorithmConfig
from nexrl.node import Node
from nexrl.sft_data import SFTConfig

PUSH_DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTOCAST_DTYPES = ("bfloat16", "float16", "none")
#: Metric names published every GRPO step (RL_DESIGN.md), checked by the tests.
REQUIRED_METRICS = (
    "train/reward_mean", "train/reward_std", "train/adv_mean", "train/adv_std",
    "train/adv_abs_max", "train/response_len_mean", "train/response_len_max", "train/clip_frac",
    "train/kl", "train/entropy", "train/grad_norm", "train/lr", "train/logprob_mismatch",
    "train/staleness_max", "train/staleness_mean", "timing/generate_s", "timing/reward_s",
    "timing/wait_s", "timing/train_s", "timing/weight_sync_s", "timing/step_s",
    "throughput/tokens_per_s")


@dataclass
class OptimConfig:
    """The `trainer.optim` block: AdamW and its learning-rate schedule."""

    #: Peak learning rate.
    lr: float = 1e-6
    #: AdamW weight decay (not applied to biases and norm weights).
    weight_decay: float = 0.0
    #: AdamW betas.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    #: AdamW epsilon.
    eps: float = 1e-8
    #: Max global gradient L2 norm; <= 0 disables clipping (the norm is still reported).
    grad_clip: float = 1.0
    #: "constant", "cosine" or "linear" (decay to min_lr_ratio * lr at total_steps).
    lr_schedule: str = "constant"
    #: Steps of linear warmup from lr / warmup_steps to lr.
    warmup_steps: int = 0
    #: Final lr as a fraction of lr for the cosine and linear schedules.
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        from nexrl.trainer_utils import LR_SCHEDULES

        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"trainer.optim.lr_schedule {self.lr_schedule!r} is not one of "
                             f"{LR_SCHEDULES}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("trainer.optim: lr and eps must be > 0, weight_decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"trainer.optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("trainer.optim: warmup_steps >= 0 and min_lr_ratio in [0, 1]")


@dataclass
class TrainerConfig:
    """The `trainer` section of a recipe."""

    #: Update rule, a key of nexrl.train_steps.TRAINER_TYPES: "grpo" (batches from the pool)
    #: or "sft" (batches from trainer.sft.data_file).
    type: str = "grpo"
    #: Local HF checkpoint directory of the initial policy (also the reference model).
    model_path: str = ""
    #: Tokenizer directory if not next to the weights ("" = model_path).
    tokenizer_path: str = ""
    #: "cpu" or "cuda" / "cuda:<i>".
    device: str = "cpu"
    #: CUDA only: dtype of forwards under autocast ("none": full float32).
    autocast: str = "bfloat16"
    #: dtype of pushed weights: "auto" = bfloat16 on CUDA, the parameters' dtype on CPU.
    push_dtype: str = "auto"
    #: Seed of python/numpy/torch RNGs at start (and of the SFT data order).
    seed: int = 0
    #: torch intra-op threads (0 = torch's default).
    num_threads: int = 0
    #: Trainer steps of the run (the weight version reached at the end).
    total_steps: int = 1
    #: Groups per batch (batch.request num_groups); the dataloader's batch_groups must match.
    batch_groups: int = 1
    #: Seconds the pool may hold one batch.request before answering empty (then asked again).
    batch_wait_s: float = 5.0
    #: Sequences per forward/backward (gradient accumulation over micro-batches).
    micro_batch_size: int = 8
    #: Passes over each batch (> 1: PPO-style reuse with recomputed old logprobs).
    ppo_epochs: int = 1
    #: Optimizer updates per pass (the batch is split into this many mini-batches).
    mini_batches: int = 1
    #: The rollout's sampling temperature: logprobs are of softmax(logits / temperature).
    temperature: float = 1.0
    #: The GRPO-family knobs (nexrl.algorithms.AlgorithmConfig).
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    #: Optimizer and lr schedule.
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: SFT data (type "sft" only).
    sft: SFTConfig = field(default_factory=SFTConfig)
    #: Checkpoint root ("" = <node.run_dir>/checkpoints).
    checkpoint_dir: str = ""
    #: Save every k steps (0 = only at the end).
    save_every: int = 0
    #: Keep the newest k checkpoints (0 = all).
    keep_checkpoints: int = 0
    #: "" (start fresh), "auto" (newest complete checkpoint, if any) or a checkpoint path.
    resume: str = ""
    #: Push weights to the engines after every step (false: standalone trainer, no engines).
    push_weights: bool = True
    #: Engine base URLs ([] = the urls of the job's peers of role "inference").
    engine_urls: list[str] = field(default_factory=list)
    #: Seconds to wait at start for every engine's /health.
    engine_wait_s: float = 300.0
    #: Address the engines use to reach this trainer's TCPStore (rank 0 of the weight group).
    master_address: str = "127.0.0.1"
    #: Its port (0 = pick a free one).
    master_port: int = 0
    #: Largest flat bucket of one broadcast, bytes.
    bucket_bytes: int = 256 << 20
    #: "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl". NCCL refuses two ranks on one
    #: GPU ("Duplicate GPU detected"): a trainer that shares its GPU with an engine needs gloo.
    sync_backend: str = "auto"
    #: Two buckets in flight (embedded engines only; false for sglang).
    pipelined: bool = True
    #: Weight-group ranks of each engine, in engine order (an sglang engine with --tp-size k
    #: has k); [] = one rank each (the embedded engine).
    engine_tp: list[int] = field(default_factory=list)
    #: Deadline of each collective / engine reply during a push, seconds.
    transfer_timeout_s: float = 120.0
    #: Seconds to wait for weight_sync's replies to weights.ready / weights.pushed.
    sync_timeout_s: float = 600.0
    #: Extra attempts when a sync does not go live (reconnect, push again); then fail.
    sync_retries: int = 1

    def __post_init__(self) -> None:
        from nexrl.train_steps import TRAINER_TYPES

        if self.type not in TRAINER_TYPES:
            raise ValueError(f"trainer.type {self.type!r} is not one of {sorted(TRAINER_TYPES)}")
        if not self.model_path:
            raise ValueError("trainer.model_path is required (a local HF checkpoint directory)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"trainer.device {self.device!r} is not cpu or cuda[:i]")
        if self.push_dtype not in PUSH_DTYPES or self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"trainer.push_dtype must be one of {PUSH_DTYPES} and "
                             f"trainer.autocast one of {AUTOCAST_DTYPES}")
        if self.sync_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"trainer.sync_backend {self.sync_backend!r}: auto, gloo or nccl")
        for name in ("total_steps", "batch_groups", "micro_batch_size", "ppo_epochs",
                     "mini_batches", "bucket_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0 or self.keep_checkpoints < 0 or self.sync_retries < 0:
            raise ValueError("trainer.save_every, keep_checkpoints and sync_retries must be >= 0")
        if self.temperature <= 0 or self.batch_wait_s < 0:
            raise ValueError("trainer.temperature must be > 0 and batch_wait_s >= 0")
        if self.type == "sft" and not self.sft.data_file:
            raise ValueError("trainer.type sft needs trainer.sft.data_file (JSONL of prompt/"
                             "response rows; see nexrl.sft_data)")


class Trainer(Node):
    role = "trainer"
    Config = TrainerConfig

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from nexrl.trainer_runtime import TrainerRuntime

        self.t = TrainerRuntime(self)  # model, optimizer, update rule, resume, engines

    def stats_extra(self) -> dict[str, Any]:
        t = getattr(self, "t", None)
        return {"step": t.step if t else 0}

    # ------------------------------------------------------------------ the loop
    def main(self) -> None:
        cfg, t = self.cfg, self.t
        if t.sender is not None:
            if not t.connect_engines(self):
                return
            if t.step > 0:  # resumed weights go live before any batch is asked for
                self.log.info("pushing the resumed weights (version %d) before training", t.step)
                t.sync(self, t.step)
        last_saved = t.step if t.resumed_from else -1
        finished = True
        while t.step < cfg.total_steps:
            if self.stopping.is_set():
                finished = False
                break
            t0 = time.monotonic()
            got = t.next_batch(self)
            if got is None:
                finished = not self.stopping.is_set()
                if finished:
                    self.log.info("the pool is exhausted after %d steps; finishing", t.step)
                break
            batch, wait_s = got
            t1 = time.monotonic()
            values = t.train_step(batch)
            t2 = time.monotonic()
            t.step += 1
            sync_s = t.sync(self, t.step) if t.sender is not None else 0.0
            values.update(t.batch_metrics(batch, t.step - 1))
            step_s = time.monotonic() - t0
            values.update({"timing/wait_s": wait_s, "timing/train_s": t2 - t1,
                           "timing/weight_sync_s": sync_s, "timing/step_s": step_s,
                           "throughput/tokens_per_s": t.batch_tokens(batch) / max(step_s, 1e-9)})
            values = {k: float(v) for k, v in values.items()}
            self.publish("metrics", {"step": t.step, "kind": "train", "values": values})
            self.log.info(t.log_line(t.step, cfg.total_steps, values))
            if cfg.save_every and t.step % cfg.save_every == 0:
                self._save_checkpoint()
                last_saved = t.step
        if finished and t.step != last_saved and t.ckpt_root:
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        path = self.t.save(self)
        if path:
            self.publish("checkpoint.saved", {"step": self.t.step, "path": path})

    def teardown(self) -> None:
        t = getattr(self, "t", None)
        if t is not None and t.sender is not None:
            t.sender.close()
