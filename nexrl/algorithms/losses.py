"""The clipped policy-gradient loss, its aggregation modes, and the SFT loss.

Shapes: ``[B, T]`` = (sequences, response positions). ``logp`` is the differentiable
logprob of each sampled token under the current parameters; everything else (old / engine /
reference logprobs, advantages, masks) is a constant and is detached here, so a caller cannot
leak gradient into them by accident.

Gradient accumulation and data parallelism: every aggregation is ``numerator / denominator``
where the numerator is a sum over sequences. A micro-batch that is one slice of a larger
optimizer step must divide by the denominator of the WHOLE step, or short and long micro-batches
get the wrong weights. The trainer therefore sums :func:`aggregation_denominator` over its
micro-batches (and all-reduces it over ranks, then divides by the world size if gradients are
averaged), and passes the result as ``agg_denom``. Without ``agg_denom`` the micro-batch is
treated as the whole step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nexrl.algorithms.config import LOSS_AGG_MODES, AlgorithmConfig
from nexrl.algorithms.kl import kl_penalty
from nexrl.algorithms.ops import _as_weights, masked_max, masked_mean, token_logprobs


def _check_mode(mode: str, norm_len: Optional[int]) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"nexrl.algorithms.aggregate_loss: mode={mode!r}, expected one of {LOSS_AGG_MODES}")
    if mode == "seq-mean-token-sum-norm" and (norm_len is None or norm_len <= 0):
        raise ValueError(
            "nexrl.algorithms.aggregate_loss: mode 'seq-mean-token-sum-norm' needs norm_len > 0 "
            f"(config loss_agg_norm_len), got {norm_len!r}"
        )


def aggregation_denominator(mask: Tensor, mode: str) -> Tensor:
    """This micro-batch's share of the aggregation denominator (a 0-dim float32 tensor).

    token-mean: number of masked tokens. The seq-mean modes: number of sequences with at least
    one masked token (all-padding rows, e.g. from evening out data-parallel shards, do not
    count, so they cannot dilute the loss).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"nexrl.algorithms.aggregation_denominator: mode={mode!r}, expected one of {LOSS_AGG_MODES}"
        )
    w = mask.detach().float()
    if mode == "token-mean":
        return w.sum()
    return (w.sum(dim=-1) > 0).float().sum()


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    norm_len: Optional[int] = None,
    denom: Optional[float | Tensor] = None,
) -> Tensor:
    """Reduce per-token losses ``[B, T]`` to a scalar, per config ``loss_agg``.

    - token-mean:              sum_{i,t} m*l / sum_{i,t} m
    - seq-mean-token-mean:     (1/S) sum_i [ sum_t m*l / sum_t m ]
    - seq-mean-token-sum-norm: (1/S) sum_i [ sum_t m*l / norm_len ]
    with S the number of non-empty sequences. ``denom`` replaces the denominator (sum m, or S)
    for micro-batched steps; see the module docstring. An empty batch gives 0, never NaN.
    """
    _check_mode(mode, norm_len)
    w = _as_weights(mask, loss_mat)
    seq_sum = (loss_mat * w).sum(dim=-1)
    if mode == "token-mean":
        num = seq_sum.sum()
    elif mode == "seq-mean-token-mean":
        tok = w.sum(dim=-1)
        num = (seq_sum / torch.where(tok > 0, tok, torch.ones_like(tok))).sum()
    else:
        num = seq_sum.sum() / float(norm_len)
    den = aggregation_denominator(mask, mode) if denom is None else torch.as_tensor(denom)
    den = den.to(device=num.device, dtype=num.dtype)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _check_like(name: str, x: Optional[Tensor], logp: Tensor) -> None:
    if x is not None and x.shape != logp.shape:
        raise ValueError(
            f"nexrl.algorithms.policy_loss: {name} has shape {tuple(x.shape)}, expected {tuple(logp.shape)} like logp"
        )


def policy_loss(
    logp: Tensor,
    old_logp: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    *,
    engine_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    agg_denom: Optional[float | Tensor] = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss (+ KL, - entropy bonus), aggregated; and its metrics.

    Args:
        logp: [B, T] current logprobs of the sampled tokens (requires grad).
        old_logp: [B, T] logprobs of the same tokens under the parameters that the batch's
            first update started from (the PPO "old" policy, recomputed by the trainer). None
            means a single on-policy update: old = logp.detach(), so the ratio is 1 in value and
            only its gradient matters.
        advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
        mask: [B, T] 1 for response tokens that are trained on, 0 for prompt/padding.
        cfg: the algorithm knobs.
        engine_logp: [B, T] logprobs reported by the inference engine that sampled the tokens.
            Enables the mismatch metrics and, with cfg.tis_cap, the truncated IS weight.
        ref_logp: [B, T] reference-model logprobs; required when cfg.kl_in == "loss" and
            cfg.kl_coef > 0, otherwise only reported as "kl_mean".
        entropy: [B, T] per-token policy entropy (from :func:`entropy_from_logits`); required
            when cfg.entropy_coef != 0, otherwise only reported.
        agg_denom: denominator of the whole optimizer step for micro-batching (see module doc).

    Returns:
        (loss, metrics): a scalar to call ``backward()`` on, and plain floats for logging.
    """
    if logp.dim() != 2:
        raise ValueError(f"nexrl.algorithms.policy_loss: logp must be [B, T], got {tuple(logp.shape)}")
    old_logp = logp.detach() if old_logp is None else old_logp.detach()
    for name, x in (("old_logp", old_logp), ("mask", mask), ("engine_logp", engine_logp),
                    ("ref_logp", ref_logp), ("entropy", entropy)):
        _check_like(name, x, logp)
    if advantages.shape == logp.shape[:1]:
        adv = advantages.detach().unsqueeze(-1)
    elif advantages.shape == logp.shape:
        adv = advantages.detach()
    else:
        raise ValueError(
            f"nexrl.algorithms.policy_loss: advantages {tuple(advantages.shape)} must be [B] or [B, T] "
            f"for logp {tuple(logp.shape)}"
        )
    kl_in_loss = cfg.kl_in == "loss" and cfg.kl_coef > 0
    if kl_in_loss and ref_logp is None:
        raise ValueError(
            "nexrl.algorithms.policy_loss: kl_in='loss' with kl_coef > 0 needs ref_logp "
            "(reference-model logprobs); pass them or set kl_coef=0"
        )
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("nexrl.algorithms.policy_loss: entropy_coef != 0 needs the per-token entropy tensor")
    adv = adv.to(logp.dtype)

    # PPO ratio and the clipped surrogate.
    lrc = cfg.log_ratio_clamp
    ratio = torch.exp((logp - old_logp).clamp(-lrc, lrc))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if cfg.dual_clip_c is not None:
        pg_dual = torch.minimum(pg, -adv * cfg.dual_clip_c)
        pg = torch.where(adv < 0, pg_dual, pg)

    # Truncated importance sampling: the engine sampled from pi_engine, not pi_old.
    tis_w = None
    if engine_logp is not None and cfg.tis_cap is not None:
        raw_w = torch.exp((old_logp - engine_logp.detach()).clamp(-lrc, lrc))
        tis_w = raw_w.clamp(max=cfg.tis_cap)
        pg = pg * tis_w

    per_token = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp, log_ratio_clamp=lrc)
        if kl_in_loss:
            per_token = per_token + cfg.kl_coef * kl
    if entropy is not None and cfg.entropy_coef != 0:
        per_token = per_token - cfg.entropy_coef * entropy

    loss = aggregate_loss(per_token, mask, cfg.loss_agg, cfg.loss_agg_norm_len, agg_denom)

    with torch.no_grad():
        m = mask.detach().bool()
        a = adv.expand_as(logp)
        stats: dict[str, Tensor] = {
            "loss": loss.detach(),
            "pg_loss": aggregate_loss(pg.detach(), mask, cfg.loss_agg, cfg.loss_agg_norm_len, agg_denom),
            "num_tokens": m.float().sum(),
            "clip_frac": masked_mean((pg_clipped > pg_unclipped).float(), m),
            "clip_frac_low": masked_mean(((ratio < 1.0 - cfg.clip_low) & (a < 0)).float(), m),
            "clip_frac_high": masked_mean(((ratio > 1.0 + cfg.clip_high) & (a > 0)).float(), m),
            "ratio_mean": masked_mean(ratio.detach(), m),
            "ratio_max": masked_max(ratio, m),
        }
        if cfg.dual_clip_c is not None:
            pg_ppo = torch.maximum(pg_unclipped, pg_clipped)
            stats["dual_clip_frac"] = masked_mean(((a < 0) & (pg_ppo > -a * cfg.dual_clip_c)).float(), m)
        if kl is not None:
            stats["kl_mean"] = masked_mean(kl.detach(), m)
        if entropy is not None:
            stats["entropy_mean"] = masked_mean(entropy.detach(), m)
        if engine_logp is not None:
            diff = old_logp - engine_logp.detach()
            stats["logprob_mismatch"] = masked_mean(diff.abs(), m)
            stats["logprob_mismatch_max"] = masked_max(diff.abs(), m)
            # k3 estimate of KL(engine || trainer) with the engine's own samples.
            stats["logprob_mismatch_kl"] = masked_mean(torch.exp(diff.clamp(-lrc, lrc)) - diff - 1.0, m)
        if tis_w is not None:
            stats["tis_weight_mean"] = masked_mean(tis_w, m)
            stats["tis_clip_frac"] = masked_mean((raw_w > cfg.tis_cap).float(), m)
        names = list(stats)
        values = torch.stack([stats[k].float().reshape(()) for k in names]).tolist()  # one device sync
    return loss, dict(zip(names, values))


def sft_loss(
    logits_or_logp: Tensor,
    mask: Tensor,
    target_ids: Optional[Tensor] = None,
    *,
    denom: Optional[float | Tensor] = None,
) -> Tensor:
    """Cross-entropy averaged over masked tokens (the SFT trainer's loss).

    Pass either logits ``[B, T, V]`` with ``target_ids [B, T]`` (already shifted so position t
    predicts target t), or precomputed target logprobs ``[B, T]`` with ``target_ids=None``.
    ``denom`` replaces the masked-token count for micro-batched steps (see module doc).
    """
    if target_ids is not None:
        logp = token_logprobs(logits_or_logp, target_ids)
    else:
        logp = logits_or_logp
    if logp.shape != mask.shape:
        raise ValueError(
            f"nexrl.algorithms.sft_loss: logprobs {tuple(logp.shape)} and mask {tuple(mask.shape)} differ"
        )
    return aggregate_loss(-logp, mask, "token-mean", None, denom)
