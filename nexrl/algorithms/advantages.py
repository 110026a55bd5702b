"""Group-relative advantages (GRPO and Dr. GRPO).

GRPO has no value model: a prompt is sampled ``n`` times (one *group*), and each completion's
advantage is its reward relative to its siblings. Two edge cases matter in practice and are
pinned down here rather than left to float luck:

- a group of one has no siblings to compare with: its advantage is 0 (it contributes no
  policy gradient, only KL/entropy terms);
- a group whose rewards are all equal (all right or all wrong) carries no signal: its
  advantages are exactly 0, never NaN (0 / 0 when adv_eps = 0) and never the tiny values
  that float rounding in the mean would otherwise leave behind.

Statistics are accumulated in float64 so that groups of very different sizes, or rewards of
very different magnitudes, do not lose precision; results come back in the rewards' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence, Union

import torch
from torch import Tensor

GroupIds = Union[Sequence[Hashable], Tensor]


@dataclass
class GroupStats:
    """Per-group reward statistics for one batch (G groups, N samples).

    The ``*_per_sample`` views are what advantage computations broadcast against; ``keys``
    lets a caller map group g back to its id (e.g. to log which prompts were uninformative).
    """

    keys: list
    """Group id of each group, in order of first appearance in the batch; length G."""
    index: Tensor
    """[N] long: which group (0..G-1) each sample belongs to."""
    count: Tensor
    """[G] long: samples per group."""
    mean: Tensor
    """[G] float64: mean reward per group."""
    std: Tensor
    """[G] float64: reward std per group (unbiased or not, as requested); 0 for groups of one."""
    constant: Tensor
    """[G] bool: every reward in the group is identical (includes groups of one)."""

    @property
    def num_groups(self) -> int:
        return len(self.keys)

    def summary(self) -> dict[str, float]:
        """Scalar metrics for the tracker: how much signal the batch carries."""
        g = max(self.num_groups, 1)
        return {
            "num_groups": float(self.num_groups),
            "group_size_mean": float(self.count.double().mean()) if self.num_groups else 0.0,
            "group_reward_std_mean": float(self.std.mean()) if self.num_groups else 0.0,
            "frac_groups_constant": float(self.constant.sum()) / g,
            "frac_groups_singleton": float((self.count == 1).sum()) / g,
        }


def _group_index(group_ids: GroupIds, n: int, device: torch.device) -> tuple[list, Tensor]:
    """Dense group index in order of first appearance, plus the group keys."""
    if isinstance(group_ids, Tensor):
        if group_ids.dim() != 1 or group_ids.shape[0] != n:
            raise ValueError(
                f"nexrl.algorithms.group_stats: group_ids tensor must be [N={n}], got {tuple(group_ids.shape)}"
            )
        ids = group_ids.tolist()
    else:
        ids = list(group_ids)
        if len(ids) != n:
            raise ValueError(f"nexrl.algorithms.group_stats: {len(ids)} group ids for {n} rewards")
    slot: dict = {}
    index = []
    for gid in ids:
        try:
            index.append(slot.setdefault(gid, len(slot)))
        except TypeError as exc:  # unhashable id (e.g. a list)
            raise TypeError(f"nexrl.algorithms.group_stats: group id {gid!r} is not hashable") from exc
    return list(slot), torch.tensor(index, dtype=torch.long, device=device)


def group_stats(rewards: Tensor, group_ids: GroupIds, *, unbiased: bool = True) -> GroupStats:
    """Per-group mean, std, size and constancy of ``rewards`` ([N]) grouped by ``group_ids``.

    ``group_ids`` may be any hashables (strings, ints, tuples) or a 1-D tensor; samples of a
    group need not be contiguous.
    """
    if rewards.dim() != 1:
        raise ValueError(f"nexrl.algorithms.group_stats: rewards must be [N], got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"nexrl.algorithms.group_stats: non-finite reward(s) at positions {bad}")
    n = rewards.shape[0]
    keys, index = _group_index(group_ids, n, rewards.device)
    g = len(keys)
    r = rewards.detach().double()
    count = torch.zeros(g, dtype=torch.long, device=r.device).scatter_add_(0, index, torch.ones_like(index))
    total = torch.zeros(g, dtype=torch.float64, device=r.device).scatter_add_(0, index, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(g, dtype=torch.float64, device=r.device).scatter_add_(0, index, (r - mean[index]) ** 2)
    dof = (count - 1) if unbiased else count
    std = torch.where(dof > 0, sq / dof.clamp(min=1), torch.zeros_like(sq)).sqrt()
    rmax = torch.full((g,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce_(
        0, index, r, reduce="amax"
    )
    rmin = torch.full((g,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce_(
        0, index, r, reduce="amin"
    )
    return GroupStats(keys=keys, index=index, count=count, mean=mean, std=std, constant=rmax == rmin)


def group_advantages(
    rewards: Tensor,
    group_ids: GroupIds,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
    unbiased: bool = True,
) -> Tensor:
    """One advantage per sample from its group's rewards.

    - ``mode="grpo"``: ``A_i = (r_i - mean_g) / (std_g + eps)``.
    - ``mode="drgrpo"``: ``A_i = r_i - mean_g`` (no std division; Dr. GRPO).

    Groups of one and groups with identical rewards get exactly 0. Returns ``[N]`` in the
    rewards' dtype, detached (advantages are constants for the loss).
    Config knobs: ``advantage`` -> mode, ``adv_eps`` -> eps, ``std_unbiased`` -> unbiased.
    """
    if mode not in ("grpo", "drgrpo"):
        raise ValueError(f"nexrl.algorithms.group_advantages: mode={mode!r}, expected 'grpo' or 'drgrpo'")
    if eps < 0:
        raise ValueError(f"nexrl.algorithms.group_advantages: eps must be >= 0, got {eps}")
    stats = group_stats(rewards, group_ids, unbiased=unbiased)
    r = rewards.detach().double()
    centred = r - stats.mean[stats.index]
    if mode == "grpo":
        adv = centred / (stats.std[stats.index] + eps)
    else:
        adv = centred
    adv = torch.where(stats.constant[stats.index], torch.zeros_like(adv), adv)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.to(out_dtype)
