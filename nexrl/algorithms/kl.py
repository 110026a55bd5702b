"""Per-token KL estimators and KL-in-reward shaping.

With samples drawn from the policy pi and a reference pi_ref, let ``d = logp - ref_logp`` at
each sampled token (the log of pi / pi_ref). Three Monte-Carlo estimators of KL(pi || pi_ref)
(Schulman, "Approximating KL Divergence", 2020):

- k1 = d                              unbiased, high variance, negative on some tokens;
- k2 = d^2 / 2                        biased, low variance, >= 0; its gradient is the
                                      gradient of the true KL to first order;
- k3 = exp(-d) - (-d) - 1             unbiased, low variance, >= 0 (verl "low_var_kl").

Numerics: ``d`` is clamped to +-log_ratio_clamp before exp() (k3 would overflow for tokens the
reference finds impossible), and the resulting per-token value is clamped to +-clamp so a few
such tokens cannot swamp the loss. Clamping stops the gradient on the clamped tokens, which is
the intended effect.

Where the KL is used (config ``kl_in``):

- "loss": :func:`nexrl.algorithms.policy_loss` adds ``kl_coef * kl_penalty(logp, ref)`` to
  every token's loss, with ``logp`` the differentiable current logprobs;
- "reward": the trainer calls :func:`kl_reward_shaping` once per batch, BEFORE
  :func:`nexrl.algorithms.group_advantages`, with the logprobs of the policy that generated the
  batch (the trainer's old_logp, or the engine's logprobs if it does not recompute them), all
  without gradient. The shaped reward ``r - kl_coef * sum_t kl_t`` then flows through the
  group normalisation like any other reward, and ``policy_loss`` adds no KL term.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nexrl.algorithms.ops import masked_sum

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: str = "k3",
    clamp: Optional[float] = 10.0,
    *,
    log_ratio_clamp: float = 20.0,
) -> Tensor:
    """Per-token KL estimate of KL(policy || reference); same shape as ``logp``.

    ``ref_logp`` is treated as a constant (detached); gradients flow through ``logp`` only.
    Config knobs: ``kl_estimator`` -> estimator, ``kl_clamp`` -> clamp,
    ``log_ratio_clamp`` -> log_ratio_clamp.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"nexrl.algorithms.kl_penalty: estimator={estimator!r}, expected one of {KL_ESTIMATORS}")
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"nexrl.algorithms.kl_penalty: logp {tuple(logp.shape)} vs ref_logp {tuple(ref_logp.shape)}"
        )
    d = (logp - ref_logp.detach()).clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d.square()
    else:
        kl = torch.exp(-d) + d - 1.0
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def sequence_kl(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    estimator: str = "k1",
    clamp: Optional[float] = 10.0,
    *,
    log_ratio_clamp: float = 20.0,
) -> Tensor:
    """Summed per-token KL of each sequence over its mask: ``[B, T] -> [B]``."""
    return masked_sum(
        kl_penalty(logp, ref_logp, estimator, clamp, log_ratio_clamp=log_ratio_clamp), mask, dim=-1
    )


@torch.no_grad()
def kl_reward_shaping(
    rewards: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    coef: float,
    estimator: str = "k1",
    *,
    clamp: Optional[float] = 10.0,
    log_ratio_clamp: float = 20.0,
) -> Tensor:
    """Rewards minus ``coef`` times each sequence's summed KL: ``[B] -> [B]`` (no gradient).

    For ``kl_in="reward"``: call on the batch's per-sequence rewards before computing group
    advantages (see the module docstring for which logprobs to pass). k1 is the classic choice
    here (its sum over a sequence is the sequence's log-likelihood ratio).
    """
    if rewards.dim() != 1 or rewards.shape[0] != logp.shape[0]:
        raise ValueError(
            f"nexrl.algorithms.kl_reward_shaping: rewards {tuple(rewards.shape)} must be [B] "
            f"matching logp {tuple(logp.shape)}"
        )
    if coef < 0:
        raise ValueError(f"nexrl.algorithms.kl_reward_shaping: coef must be >= 0, got {coef}")
    seq_kl = sequence_kl(logp.detach(), ref_logp, mask, estimator, clamp, log_ratio_clamp=log_ratio_clamp)
    return (rewards.double() - coef * seq_kl.double()).to(
        rewards.dtype if rewards.is_floating_point() else torch.float32
    )
