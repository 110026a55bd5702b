"""What one trainer step does with a batch: the GRPO family and SFT, behind one registry.

``TRAINER_TYPES`` maps the recipe's ``trainer.type`` to an update class; each is built from
a :class:`StepContext` (model, optimizer, knobs) and exposes ``step(batch) -> metrics``:

- ``"grpo"`` (:class:`GRPOUpdate`): a batch of complete groups of trajectories from the pool.
      1. old logprobs: recomputed on the trainer (one no-grad forward per micro-batch) only
         when the batch is used for more than one optimizer update (ppo_epochs > 1 or
         mini_batches > 1) or when the KL goes into the reward; a single on-policy update
         uses logp.detach() (ratio 1 in value; see nexrl.algorithms.policy_loss);
      2. reference logprobs (no grad) when algorithm.kl_coef > 0;
      3. kl_in="reward": rewards -= kl_coef * summed KL (kl_reward_shaping), then group
         advantages (group_advantages over the batch's group_ids);
      4. for each epoch, for each mini-batch: zero grads, forward/backward every micro-batch
         with the loss divided by the WHOLE mini-batch's aggregation denominator (summed
         aggregation_denominator of its micro-batches), so the accumulated gradient equals
         the full-batch loss's; clip; optimizer step;
      5. one lr-scheduler step per trainer step.
- ``"sft"`` (:class:`SFTUpdate`): cross-entropy on the response tokens of prompt/response
  samples (from the SFT data file, see nexrl.sft_data), token-mean over the whole batch with
  the same micro-batch accumulation.

One trainer step may hold ppo_epochs x mini_batches optimizer updates; the weight version
counts trainer steps (what the engines and the staleness window see), not optimizer updates.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from nexrl.algorithms.config import AlgorithmConfig
from nexrl.trainer_utils import (Sample, chunks, clip_and_norm, pack, pad_rows, response_logits,
                                 sample_from_trajectory, sequence_logprobs, split_even)

#: Metrics of policy_loss that are token means: combined across micro-batches weighted by
#: their token counts. *_max are combined with max; loss terms are summed (each micro-batch's
#: loss is already divided by the whole mini-batch's denominator).
_SUMMED = ("loss", "pg_loss", "num_tokens")


@dataclass
class StepContext:
    """Everything an update needs; built once by the trainer node (or a test)."""

    model: Any
    optimizer: Any
    scheduler: Any
    pad_id: int
    device: Any = "cpu"
    micro_batch_size: int = 8        # sequences per forward/backward
    grad_clip: float = 1.0           # max global grad norm; <= 0 disables clipping
    temperature: float = 1.0         # the rollout's sampling temperature (logprob scale)
    algorithm: AlgorithmConfig | None = None
    ref_model: Any = None            # frozen reference, when algorithm.kl_coef > 0
    ppo_epochs: int = 1              # passes over the batch per trainer step
    mini_batches: int = 1            # optimizer updates per pass
    autocast: Callable[[], Any] = nullcontext  # context factory around forwards (bf16 on GPU)


def combine(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Merge per-micro-batch policy_loss metrics into one dict (see _SUMMED)."""
    out: dict[str, float] = {}
    tokens = sum(p.get("num_tokens", 0.0) for p in parts)
    for key in {k for p in parts for k in p}:
        vals = [(p[key], p.get("num_tokens", 0.0)) for p in parts if key in p]
        if key in _SUMMED:
            out[key] = sum(v for v, _ in vals)
        elif key.endswith("_max"):
            out[key] = max(v for v, _ in vals)
        else:
            out[key] = sum(v * w for v, w in vals) / tokens if tokens > 0 else 0.0
    return out


def policy_backward(ctx: StepContext, samples: Sequence[Sample], advantages: Any,
                    old_lp: Sequence[Any] | None = None,
                    ref_lp: Sequence[Any] | None = None) -> dict[str, float]:
    """Accumulate the gradient of the policy loss of `samples` (one optimizer update) over
    micro-batches; does not zero or step. Returns the combined policy_loss metrics."""
    import torch

    from nexrl.algorithms import (aggregation_denominator, entropy_from_logits, policy_loss,
                                  token_logprobs)

    cfg = ctx.algorithm
    idx = list(range(len(samples)))
    micro = list(chunks(idx, ctx.micro_batch_size))
    packs = [pack([samples[i] for i in m], ctx.pad_id, ctx.device) for m in micro]
    denom = sum(float(aggregation_denominator(p.mask, cfg.loss_agg)) for p in packs)
    parts = []
    for m, p in zip(micro, packs, strict=True):
        logits = response_logits(ctx.model, p, ctx.autocast)
        logp = token_logprobs(logits, p.response_ids, temperature=ctx.temperature)
        if cfg.entropy_coef != 0:
            ent = entropy_from_logits(logits, temperature=ctx.temperature)
        else:
            with torch.no_grad():
                ent = entropy_from_logits(logits.detach(), temperature=ctx.temperature)
        old = None if old_lp is None else pad_rows([old_lp[i] for i in m], p.width)
        ref = None if ref_lp is None else pad_rows([ref_lp[i] for i in m], p.width)
        adv = advantages[m].to(logp.device, torch.float32)
        loss, metrics = policy_loss(logp, old, adv, p.mask, cfg, engine_logp=p.engine_logp,
                                    ref_logp=ref, entropy=ent, agg_denom=denom)
        loss.backward()
        parts.append(metrics)
    return combine(parts)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std of a non-empty list (for logging)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


class GRPOUpdate:
    """The GRPO family (see the module docstring); batch = trajectories of complete groups."""

    def __init__(self, ctx: StepContext):
        if ctx.algorithm is None:
            raise ValueError("trainer: the grpo update needs an AlgorithmConfig")
        self.ctx = ctx

    @staticmethod
    def needs_reference(cfg: AlgorithmConfig) -> bool:
        return cfg.uses_reference

    def step(self, trajectories: Sequence[dict[str, Any]]) -> dict[str, float]:
        """One trainer step on a batch; returns train/* metrics (names of RL_DESIGN.md)."""
        import torch

        from nexrl.algorithms import group_advantages, kl_reward_shaping

        ctx, cfg = self.ctx, self.ctx.algorithm
        samples = [sample_from_trajectory(t) for t in trajectories]
        rewards = torch.tensor([float(t["reward"]) for t in trajectories], dtype=torch.float64)
        group_ids = [str(t["group_id"]) for t in trajectories]
        lp_kw = dict(pad_id=ctx.pad_id, device=ctx.device, micro_batch_size=ctx.micro_batch_size,
                     temperature=ctx.temperature, autocast=ctx.autocast)
        multi = ctx.ppo_epochs > 1 or ctx.mini_batches > 1
        kl_reward = cfg.kl_in == "reward" and cfg.kl_coef > 0
        old_lp = sequence_logprobs(ctx.model, samples, **lp_kw) if multi or kl_reward else None
        ref_lp = None
        if ctx.ref_model is not None:
            ref_lp = sequence_logprobs(ctx.ref_model, samples, **lp_kw)
        shaped = rewards
        if kl_reward:  # per-sequence arithmetic: on the CPU, where the rewards are
            width = max(1, max(len(s.response_ids) for s in samples))
            mask = pad_rows([torch.tensor(s.response_mask) for s in samples], width)
            old_cpu = pad_rows([x.cpu() for x in old_lp], width)
            ref_cpu = pad_rows([x.cpu() for x in ref_lp], width)
            shaped = kl_reward_shaping(rewards, old_cpu, ref_cpu, mask, cfg.kl_coef,
                                       cfg.kl_estimator, clamp=cfg.kl_clamp,
                                       log_ratio_clamp=cfg.log_ratio_clamp)
        adv = group_advantages(shaped, group_ids, mode=cfg.advantage, eps=cfg.adv_eps,
                               unbiased=cfg.std_unbiased).float()
        order = list(range(len(samples)))
        first: dict[str, float] = {}
        grad_norms: list[float] = []
        ctx.model.train()
        for epoch in range(ctx.ppo_epochs):
            for mini in split_even(order, ctx.mini_batches):
                ctx.optimizer.zero_grad(set_to_none=True)
                m = policy_backward(ctx, [samples[i] for i in mini], adv[mini],
                                    None if old_lp is None else [old_lp[i] for i in mini],
                                    None if ref_lp is None else [ref_lp[i] for i in mini])
                grad_norms.append(optimizer_step(ctx))
                if epoch == 0:
                    first = combine([first, m]) if first else m
        lr = ctx.optimizer.param_groups[0]["lr"]
        ctx.scheduler.step()
        r = [float(x) for x in rewards]
        a = [float(x) for x in adv]
        lens = [len(s.response_ids) for s in samples]
        r_mean, r_std = _mean_std(r)
        a_mean, a_std = _mean_std(a)
        return {
            "train/reward_mean": r_mean, "train/reward_std": r_std,
            "train/adv_mean": a_mean, "train/adv_std": a_std,
            "train/adv_abs_max": max(abs(x) for x in a),
            "train/response_len_mean": sum(lens) / len(lens),
            "train/response_len_max": float(max(lens)),
            "train/clip_frac": first.get("clip_frac", 0.0),
            "train/kl": first.get("kl_mean", 0.0),
            "train/entropy": first.get("entropy_mean", 0.0),
            "train/grad_norm": sum(grad_norms) / len(grad_norms),  # mean over the updates
            "train/lr": float(lr),
            "train/logprob_mismatch": first.get("logprob_mismatch", 0.0),
            # extras (not in the required list, useful when debugging a run)
            "train/loss": first.get("loss", 0.0),
            "train/pg_loss": first.get("pg_loss", 0.0),
            "train/num_tokens": first.get("num_tokens", 0.0),
            "train/logprob_mismatch_max": first.get("logprob_mismatch_max", 0.0),
        }


def optimizer_step(ctx: StepContext) -> float:
    """Clip, then step unless the gradient is not finite (then the update is skipped and the
    gradient dropped: one bad batch must not poison the weights). Returns the grad norm."""
    norm = clip_and_norm(ctx.model, ctx.grad_clip)
    if math.isfinite(norm):
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return norm


class SFTUpdate:
    """Cross-entropy on response tokens (token-mean over the batch); batch = Samples."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    @staticmethod
    def needs_reference(cfg: AlgorithmConfig) -> bool:
        return False

    def loss_backward(self, samples: Sequence[Sample]) -> tuple[float, float]:
        """Accumulate the batch's CE gradient over micro-batches; returns (loss, tokens)."""
        from nexrl.algorithms import aggregation_denominator, sft_loss, token_logprobs

        ctx = self.ctx
        packs = [pack(c, ctx.pad_id, ctx.device)
                 for c in chunks(list(samples), ctx.micro_batch_size)]
        denom = sum(float(aggregation_denominator(p.mask, "token-mean")) for p in packs)
        total = 0.0
        for p in packs:
            logits = response_logits(ctx.model, p, ctx.autocast)
            loss = sft_loss(token_logprobs(logits, p.response_ids), p.mask, denom=denom)
            loss.backward()
            total += float(loss.detach())
        return total, denom

    def step(self, samples: Sequence[Sample]) -> dict[str, float]:
        ctx = self.ctx
        ctx.model.train()
        ctx.optimizer.zero_grad(set_to_none=True)
        loss, tokens = self.loss_backward(samples)
        norm = optimizer_step(ctx)
        lr = ctx.optimizer.param_groups[0]["lr"]
        ctx.scheduler.step()
        lens = [len(s.response_ids) for s in samples]
        return {"train/loss": loss, "train/grad_norm": norm, "train/lr": float(lr),
                "train/num_tokens": tokens, "train/response_len_mean": sum(lens) / len(lens),
                "train/response_len_max": float(max(lens))}


#: trainer.type -> update class (an explicit registry; add a custom one here).
TRAINER_TYPES: dict[str, type] = {"grpo": GRPOUpdate, "sft": SFTUpdate}
