"""The one config block of the RL math: :class:`AlgorithmConfig`.

This module imports nothing heavy (no torch), so a trainer entrypoint can build and validate the
algorithm config -- and report a bad knob -- in milliseconds, before it loads torch or a model.

Validation happens in ``__post_init__``; every error names the field, the value it got and what
is allowed. :meth:`AlgorithmConfig.from_dict` additionally rejects unknown keys, because a typo
such as ``clip_hgh`` must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

ADVANTAGE_MODES = ("grpo", "drgrpo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")


class AlgorithmConfigError(ValueError):
    """A field of :class:`AlgorithmConfig` has a value outside its allowed range."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise AlgorithmConfigError(f"AlgorithmConfig.{field}={value!r} is invalid: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class AlgorithmConfig:
    """Knobs of the GRPO-family objective (see the ``nexrl.algorithms`` docstring for the math).

    Defaults follow verl and TRL where they agree (clip 0.2, token-mean aggregation, k3 KL
    in the loss, no KL and no entropy bonus by default); where they differ the choice is noted.
    """

    advantage: str = "grpo"
    """How rewards become advantages within a group. "grpo": (r - mean) / (std + adv_eps).
    "drgrpo": r - mean (Dr. GRPO drops the std division, which up-weights low-variance groups
    otherwise; pair it with loss_agg="seq-mean-token-sum-norm")."""

    adv_eps: float = 1e-6
    """Added to the group std before dividing (dimensionless; verl uses 1e-6, TRL 1e-4).
    Only used by advantage="grpo"."""

    std_unbiased: bool = True
    """Group std with Bessel's correction (divide by n-1), as torch.std, verl and TRL do.
    False divides by n (the population std)."""

    clip_low: float = 0.2
    """Lower PPO clip: the ratio is clipped at 1 - clip_low. Must be in [0, 1)."""

    clip_high: float = 0.2
    """Upper PPO clip: the ratio is clipped at 1 + clip_high. A value above clip_low is DAPO's
    "clip-higher" (e.g. 0.28), which lets rare tokens with positive advantage grow faster."""

    dual_clip_c: Optional[float] = None
    """Dual-clip bound for tokens with negative advantage: their loss is capped at -A * c, so a
    huge ratio on a bad token cannot produce an unbounded loss. None disables; must be > 1
    (3.0 is the usual value)."""

    loss_agg: str = "token-mean"
    """How per-token losses become one scalar. "token-mean": sum over all tokens / number of
    tokens (DAPO; TRL "dapo"/"bnpo", verl default). "seq-mean-token-mean": mean over sequences
    of each sequence's token mean (original GRPO). "seq-mean-token-sum-norm": each sequence's
    token sum / loss_agg_norm_len, then mean over sequences (Dr. GRPO)."""

    loss_agg_norm_len: Optional[int] = None
    """The constant divisor (tokens) of "seq-mean-token-sum-norm": normally the max response
    length of the run. Required by that mode, ignored by the others. It must stay constant over
    training, which is why it is not taken from the (varying) padded width of a batch."""

    kl_coef: float = 0.0
    """Weight of the KL(policy || reference) penalty (verl's kl_loss_coef, TRL's beta).
    0 disables it and no reference model is needed; ~0.001 is typical. Must be >= 0."""

    kl_estimator: str = "k3"
    """Per-token KL estimator (Schulman's naming): "k1" = logp - ref_logp (unbiased, can be
    negative), "k2" = 0.5 * (logp - ref_logp)^2, "k3" = exp(ref - logp) - (ref - logp) - 1
    (unbiased, always >= 0, low variance; verl "low_var_kl", TRL's estimator)."""

    kl_in: str = "loss"
    """Where the KL penalty goes. "loss": kl_coef * kl is added to every token's loss (TRL,
    verl use_kl_loss). "reward": kl_coef * (summed KL of the sequence) is subtracted from the
    reward before advantages are computed (classic RLHF, verl use_kl_in_reward)."""

    kl_clamp: Optional[float] = 10.0
    """Per-token KL values are clamped to [-kl_clamp, kl_clamp] so one token that the
    reference finds absurd cannot dominate the loss (verl clamps k3 at 10). None disables."""

    log_ratio_clamp: float = 20.0
    """Log-ratios (logp - old_logp, ref - logp, old - engine) are clamped to +-log_ratio_clamp
    before exp(), so exp() never overflows (e^20 ~ 4.9e8). Must be > 0."""

    tis_cap: Optional[float] = None
    """Truncated importance sampling against the inference engine: each token's policy-gradient
    loss is multiplied by min(exp(old_logp - engine_logp), tis_cap), which corrects for the
    engine sampling from a slightly different distribution than the trainer computes. None
    disables; 2.0 is typical. Must be > 0."""

    entropy_coef: float = 0.0
    """Entropy bonus weight: entropy_coef * entropy is subtracted from each token's loss, so a
    positive value rewards keeping the policy spread out. 0 disables (verl and TRL default)."""

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_MODES:
            _fail("advantage", self.advantage, f"expected one of {ADVANTAGE_MODES}")
        if not _is_number(self.adv_eps) or self.adv_eps < 0:
            _fail("adv_eps", self.adv_eps, "expected a finite number >= 0")
        if not isinstance(self.std_unbiased, bool):
            _fail("std_unbiased", self.std_unbiased, "expected true or false")
        if not _is_number(self.clip_low) or not 0 <= self.clip_low < 1:
            _fail("clip_low", self.clip_low, "expected a number in [0, 1) (ratio floor is 1 - clip_low)")
        if not _is_number(self.clip_high) or self.clip_high < 0:
            _fail("clip_high", self.clip_high, "expected a finite number >= 0")
        if self.dual_clip_c is not None and (not _is_number(self.dual_clip_c) or self.dual_clip_c <= 1):
            _fail("dual_clip_c", self.dual_clip_c, "expected null (disabled) or a number > 1, e.g. 3.0")
        if self.loss_agg not in LOSS_AGG_MODES:
            _fail("loss_agg", self.loss_agg, f"expected one of {LOSS_AGG_MODES}")
        if self.loss_agg_norm_len is not None and (
            not isinstance(self.loss_agg_norm_len, int)
            or isinstance(self.loss_agg_norm_len, bool)
            or self.loss_agg_norm_len <= 0
        ):
            _fail("loss_agg_norm_len", self.loss_agg_norm_len, "expected null or a positive integer (tokens)")
        if self.loss_agg == "seq-mean-token-sum-norm" and self.loss_agg_norm_len is None:
            _fail(
                "loss_agg_norm_len",
                None,
                'loss_agg="seq-mean-token-sum-norm" needs a constant divisor: set it to the max response length',
            )
        if not _is_number(self.kl_coef) or self.kl_coef < 0:
            _fail("kl_coef", self.kl_coef, "expected a finite number >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            _fail("kl_estimator", self.kl_estimator, f"expected one of {KL_ESTIMATORS}")
        if self.kl_in not in KL_PLACEMENTS:
            _fail("kl_in", self.kl_in, f"expected one of {KL_PLACEMENTS}")
        if self.kl_clamp is not None and (not _is_number(self.kl_clamp) or self.kl_clamp <= 0):
            _fail("kl_clamp", self.kl_clamp, "expected null (no clamp) or a number > 0")
        if not _is_number(self.log_ratio_clamp) or self.log_ratio_clamp <= 0:
            _fail("log_ratio_clamp", self.log_ratio_clamp, "expected a finite number > 0")
        if self.tis_cap is not None and (not _is_number(self.tis_cap) or self.tis_cap <= 0):
            _fail("tis_cap", self.tis_cap, "expected null (disabled) or a number > 0, e.g. 2.0")
        if not _is_number(self.entropy_coef):
            _fail("entropy_coef", self.entropy_coef, "expected a finite number")

    @property
    def uses_reference(self) -> bool:
        """True when a reference model's logprobs are needed (any KL penalty is active)."""
        return self.kl_coef > 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AlgorithmConfig":
        """Build from a plain mapping (e.g. a resolved omegaconf node), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AlgorithmConfigError(
                f"AlgorithmConfig: unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**dict(values))
