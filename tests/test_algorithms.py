"""Unit tests of nexrl.algorithms against hand-computed numbers.

Run: python -m pytest tests/test_algorithms.py -q      (a few seconds, CPU only)

Expected values are worked out by hand in the comments next to them; the tests never
re-derive them with the code under test.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nexrl.algorithms import (
    AlgorithmConfig,
    AlgorithmConfigError,
    aggregate_loss,
    aggregation_denominator,
    entropy_from_logits,
    group_advantages,
    group_stats,
    kl_penalty,
    kl_reward_shaping,
    masked_mean,
    masked_sum,
    policy_loss,
    sft_loss,
    token_logprobs,
)

LN = math.log


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


def leaf(x):
    return t(x).requires_grad_(True)


# ----------------------------------------------------------------------------- config


def test_config_defaults_follow_verl_trl():
    cfg = AlgorithmConfig()
    assert (cfg.advantage, cfg.adv_eps, cfg.std_unbiased) == ("grpo", 1e-6, True)
    assert (cfg.clip_low, cfg.clip_high, cfg.dual_clip_c) == (0.2, 0.2, None)
    assert (cfg.loss_agg, cfg.kl_coef, cfg.kl_estimator, cfg.kl_in) == ("token-mean", 0.0, "k3", "loss")
    assert (cfg.kl_clamp, cfg.log_ratio_clamp, cfg.tis_cap, cfg.entropy_coef) == (10.0, 20.0, None, 0.0)
    assert not cfg.uses_reference


@pytest.mark.parametrize(
    "field,value",
    [
        ("advantage", "ppo"),
        ("adv_eps", -1.0),
        ("std_unbiased", "yes"),
        ("clip_low", 1.0),
        ("clip_high", -0.1),
        ("dual_clip_c", 1.0),
        ("loss_agg", "sum"),
        ("loss_agg_norm_len", 0),
        ("kl_coef", -0.1),
        ("kl_estimator", "k4"),
        ("kl_in", "both"),
        ("kl_clamp", 0.0),
        ("log_ratio_clamp", float("inf")),
        ("tis_cap", 0.0),
        ("entropy_coef", float("nan")),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(AlgorithmConfigError, match=f"AlgorithmConfig.{field}="):
        AlgorithmConfig(**{field: value})


def test_config_sum_norm_needs_a_constant_length_and_unknown_keys_fail():
    with pytest.raises(AlgorithmConfigError, match="loss_agg_norm_len"):
        AlgorithmConfig(loss_agg="seq-mean-token-sum-norm")
    AlgorithmConfig(loss_agg="seq-mean-token-sum-norm", loss_agg_norm_len=512)
    with pytest.raises(AlgorithmConfigError, match="clip_hgh"):
        AlgorithmConfig.from_dict({"clip_hgh": 0.3})
    assert AlgorithmConfig.from_dict({"clip_high": 0.28, "kl_coef": 0.001}).clip_high == 0.28


def test_config_import_does_not_import_torch():
    code = "import sys, nexrl.algorithms as a; a.AlgorithmConfig(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- advantages


def test_grpo_unbiased_std_with_eps():
    # rewards 1,2,3: mean 2, unbiased var (1+0+1)/2 = 1, std 1 -> A = (-1, 0, 1) / (1 + 1e-6)
    adv = group_advantages(t([1.0, 2.0, 3.0]), ["g"] * 3, mode="grpo", eps=1e-6, unbiased=True)
    assert adv.tolist() == pytest.approx([-1 / 1.000001, 0.0, 1 / 1.000001], abs=1e-12)


def test_grpo_biased_std():
    # rewards 1,2,3: population var 2/3, std 0.8164965809; A = +-1/0.8164965809 = +-1.2247448714
    adv = group_advantages(t([1.0, 2.0, 3.0]), [7, 7, 7], mode="grpo", eps=0.0, unbiased=False)
    assert adv.tolist() == pytest.approx([-1.2247448714, 0.0, 1.2247448714], abs=1e-9)


def test_grpo_eps_enters_denominator():
    # rewards 0,1: mean 0.5, unbiased var 0.5, std 0.7071067812; eps 0.1 -> 0.5/0.8071067812 = 0.6194967
    adv = group_advantages(t([0.0, 1.0]), ["a", "a"], eps=0.1)
    assert adv.tolist() == pytest.approx([-0.6194967, 0.6194967], abs=1e-6)


def test_drgrpo_no_std_division_and_interleaved_groups():
    # group a = (0, 0, 4): mean 4/3 -> (-4/3, -4/3, 8/3); group b = (1, 3): mean 2 -> (-1, 1)
    rewards = t([0.0, 1.0, 0.0, 3.0, 4.0])
    adv = group_advantages(rewards, ["a", "b", "a", "b", "a"], mode="drgrpo")
    assert adv.tolist() == pytest.approx([-4 / 3, -1.0, -4 / 3, 1.0, 8 / 3], abs=1e-12)


@pytest.mark.parametrize("mode", ["grpo", "drgrpo"])
def test_group_of_one_and_constant_group_get_exact_zero(mode):
    # group x has one sample; group y is constant 0.1 (its float mean is not exactly 0.1)
    rewards = torch.tensor([5.0, 0.1, 0.1, 0.1, 1.0, 0.0])
    ids = torch.tensor([9, 1, 1, 1, 2, 2])
    adv = group_advantages(rewards, ids, mode=mode, eps=0.0)
    assert adv.dtype == torch.float32
    assert adv[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(adv).all()
    # group z = (1, 0): grpo -> +-0.5/0.7071067812 = +-0.7071067812; drgrpo -> +-0.5
    expect = 0.7071067812 if mode == "grpo" else 0.5
    assert adv[4:].tolist() == pytest.approx([expect, -expect], abs=1e-6)


def test_group_stats_summary_and_errors():
    s = group_stats(t([1.0, 1.0, 0.0, 2.0, 3.0]), ["p", "p", "q", "q", "r"])
    assert s.keys == ["p", "q", "r"] and s.count.tolist() == [2, 2, 1]
    # q = (0, 2): mean 1, unbiased std sqrt(2) = 1.414213562
    assert s.mean.tolist() == pytest.approx([1.0, 1.0, 3.0]) and s.std.tolist() == pytest.approx([0, 1.414213562, 0])
    summary = s.summary()
    assert summary["frac_groups_constant"] == pytest.approx(2 / 3)
    assert summary["frac_groups_singleton"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 group ids for 3 rewards"):
        group_stats(t([1.0, 2.0, 3.0]), ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        group_stats(t([1.0, float("nan")]), ["a", "a"])


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_at_known_points():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # d = logp - ref = (0.5, -1.0)
    assert kl_penalty(logp, ref, "k1", None).tolist() == pytest.approx([0.5, -1.0])
    # k2 = d^2 / 2 = (0.125, 0.5)
    assert kl_penalty(logp, ref, "k2", None).tolist() == pytest.approx([0.125, 0.5])
    # k3 = e^{-d} + d - 1: e^{-0.5} - 0.5 = 0.1065306597; e^{1} - 2 = 0.7182818285
    assert kl_penalty(logp, ref, "k3", None).tolist() == pytest.approx([0.1065306597, 0.7182818285], abs=1e-9)


def test_kl_clamps():
    # d = -30: clamped to -20 first, k3 = e^20 - 21 ~ 4.85e8, then clamped to 10
    assert kl_penalty(t([-40.0]), t([-10.0]), "k3", 10.0).tolist() == [10.0]
    assert kl_penalty(t([-40.0]), t([-10.0]), "k3", None).item() == pytest.approx(math.exp(20) - 21)
    assert kl_penalty(t([0.0, 0.0]), t([-1.0, 1.0]), "k1", 0.3).tolist() == pytest.approx([0.3, -0.3])


def test_kl_reward_shaping_subtracts_summed_kl():
    # seq0 d = (0.5, 0.25, [pad 9]) -> k1 sum 0.75; seq1 d = (-0.5, [pad], [pad]) -> -0.5
    ref = t([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logp = ref + t([[0.5, 0.25, 9.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # r - 0.1 * kl: 1 - 0.075 = 0.925; 0 + 0.05 = 0.05
    shaped = kl_reward_shaping(t([1.0, 0.0]), logp, ref, mask, 0.1, "k1")
    assert shaped.tolist() == pytest.approx([0.925, 0.05])


# ----------------------------------------------------------------------------- policy loss


def _ones(b, t_):
    return torch.ones(b, t_)


def test_ratio_clipping_asymmetric_clip_higher():
    cfg = AlgorithmConfig(clip_low=0.2, clip_high=0.28)
    old = t([[-1.0], [-1.0], [-1.0], [-1.0]])
    # ratios 1.5, 0.5, 0.5, 1.5 with A = +1, +1, -1, -1
    logp = leaf((old + t([[LN(1.5)], [LN(0.5)], [LN(0.5)], [LN(1.5)]])).tolist())
    adv = t([1.0, 1.0, -1.0, -1.0])
    loss, m = policy_loss(logp, old, adv, _ones(4, 1), cfg)
    # tok0: max(-1.5, -1.28) = -1.28 (clipped high)   tok1: max(-0.5, -0.8) = -0.5
    # tok2: max(0.5, 0.8) = 0.8 (clipped low)          tok3: max(1.5, 1.28) = 1.5
    # token-mean: (-1.28 - 0.5 + 0.8 + 1.5) / 4 = 0.13
    assert loss.item() == pytest.approx(0.13)
    assert m["clip_frac"] == 0.5 and m["clip_frac_high"] == 0.25 and m["clip_frac_low"] == 0.25
    # ratio mean (1.5+0.5+0.5+1.5)/4 = 1, max 1.5
    assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_max"] == pytest.approx(1.5)
    loss.backward()
    # d(-A*ratio)/dlogp = -A*ratio on unclipped tokens, / 4 tokens: tok1 -0.5/4, tok3 1.5/4
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.125, 0.0, 0.375])


def test_clip_higher_lets_ratio_125_through_but_symmetric_does_not():
    old = t([[0.0]])
    logp = t([[LN(1.25)]])
    sym, m_sym = policy_loss(logp, old, t([1.0]), _ones(1, 1), AlgorithmConfig())
    hi, m_hi = policy_loss(logp, old, t([1.0]), _ones(1, 1), AlgorithmConfig(clip_high=0.28))
    # symmetric: max(-1.25, -1.2) = -1.2 clipped; clip-higher 0.28: -1.25 unclipped
    assert sym.item() == pytest.approx(-1.2) and m_sym["clip_frac"] == 1.0
    assert hi.item() == pytest.approx(-1.25) and m_hi["clip_frac"] == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    cfg = AlgorithmConfig(dual_clip_c=3.0)
    old = t([[0.0], [0.0], [0.0]])
    logp = leaf([[LN(5.0)], [LN(2.0)], [LN(5.0)]])
    adv = t([-1.0, -1.0, 1.0])
    loss, m = policy_loss(logp, old, adv, _ones(3, 1), cfg)
    # tok0 A=-1 r=5: ppo max(5, 1.2) = 5 -> dual min(5, 3) = 3 (no gradient)
    # tok1 A=-1 r=2: max(2, 1.2) = 2 < 3 -> 2 (gradient -A*r = 2)
    # tok2 A=+1 r=5: max(-5, -1.2) = -1.2 (dual only for A<0; clipped, no gradient)
    # token-mean: (3 + 2 - 1.2) / 3 = 1.2666667
    assert loss.item() == pytest.approx(3.8 / 3)
    assert m["dual_clip_frac"] == pytest.approx(1 / 3) and m["clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 2 / 3, 0.0])


# Ragged batch used by the aggregation tests: three sequences of 4, 2 and 1 tokens plus an
# all-padding row; padding positions hold 100 so any leak through the mask is visible.
RAGGED_LOSS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0], [7.0, 100.0, 100.0, 100.0], [100.0] * 4]
RAGGED_MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
# token-mean: (1+2+3+4+5+6+7) / 7 = 28/7 = 4
# seq-mean-token-mean: (10/4 + 11/2 + 7/1) / 3 = (2.5 + 5.5 + 7) / 3 = 5   (empty row not counted)
# seq-mean-token-sum-norm, L=8: (10/8 + 11/8 + 7/8) / 3 = 3.5 / 3 = 1.1666667
RAGGED_EXPECTED = {"token-mean": 4.0, "seq-mean-token-mean": 5.0, "seq-mean-token-sum-norm": 3.5 / 3}


@pytest.mark.parametrize("mode", list(RAGGED_EXPECTED))
def test_aggregate_loss_on_ragged_mask(mode):
    mask = torch.tensor(RAGGED_MASK, dtype=torch.bool)
    got = aggregate_loss(t(RAGGED_LOSS), mask, mode, norm_len=8)
    assert got.item() == pytest.approx(RAGGED_EXPECTED[mode])
    # the same number through policy_loss: ratio 1 and per-token A = -loss gives loss = -A*1
    cfg = AlgorithmConfig(loss_agg=mode, loss_agg_norm_len=8)
    logp = t([[-1.0] * 4] * 4)
    pl, _ = policy_loss(logp, logp, -t(RAGGED_LOSS), mask.float(), cfg)
    assert pl.item() == pytest.approx(RAGGED_EXPECTED[mode])


@pytest.mark.parametrize("mode", list(RAGGED_EXPECTED))
def test_micro_batches_with_step_denominator_sum_to_the_full_loss(mode):
    loss, mask = t(RAGGED_LOSS), torch.tensor(RAGGED_MASK)
    parts = [(loss[:1], mask[:1]), (loss[1:], mask[1:])]
    # step denominators: token-mean 4 + 3 = 7 tokens; seq modes 1 + 2 = 3 non-empty sequences
    denom = sum(aggregation_denominator(mk, mode) for _, mk in parts)
    assert denom.item() == (7.0 if mode == "token-mean" else 3.0)
    total = sum(aggregate_loss(ls, mk, mode, 8, denom) for ls, mk in parts)
    assert total.item() == pytest.approx(RAGGED_EXPECTED[mode])


def test_empty_mask_gives_zero_loss_and_finite_grad():
    logp = leaf([[-1.0, -2.0]])
    loss, m = policy_loss(logp, logp.detach() - 0.3, t([1.0]), torch.zeros(1, 2), AlgorithmConfig())
    loss.backward()
    assert loss.item() == 0.0 and m["num_tokens"] == 0.0 and m["ratio_max"] == 0.0
    assert torch.isfinite(logp.grad).all()


def test_truncated_importance_sampling_cap():
    cfg = AlgorithmConfig(tis_cap=2.0)
    old = t([[-1.0, -1.0]])
    engine = old - t([[LN(3.0), LN(0.5)]])  # old - engine = (ln 3, ln 0.5): raw weights 3, 0.5
    logp = leaf(old.tolist())  # ratio 1
    loss, m = policy_loss(logp, old, t([1.0]), _ones(1, 2), cfg, engine_logp=engine)
    # weights min(3, 2) = 2 and 0.5; per-token -A*ratio*w = -2, -0.5; mean = -1.25
    assert loss.item() == pytest.approx(-1.25)
    assert m["tis_weight_mean"] == pytest.approx(1.25) and m["tis_clip_frac"] == 0.5
    # mismatch |ln 3| = 1.0986123, |ln 0.5| = 0.6931472: mean 0.8958797, max 1.0986123
    assert m["logprob_mismatch"] == pytest.approx(0.8958797) and m["logprob_mismatch_max"] == pytest.approx(1.0986123)
    # k3 of the gap e^x - x - 1: 3 - 2.0986123 = 0.9013877; 0.5 - 0.3068528 = 0.1931472 -> 0.5472674
    assert m["logprob_mismatch_kl"] == pytest.approx(0.5472674)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0, -0.25])  # -A*w*ratio / 2
    # without tis_cap the weight is not applied, but the mismatch is still measured
    loss2, m2 = policy_loss(old.clone(), old, t([1.0]), _ones(1, 2), AlgorithmConfig(), engine_logp=engine)
    assert loss2.item() == pytest.approx(-1.0) and "tis_weight_mean" not in m2
    assert m2["logprob_mismatch"] == pytest.approx(0.8958797)


@pytest.mark.parametrize(
    "estimator,expected_loss,expected_grad",
    [
        # d = (0.5, 1.0); k1 = d: 0.1 * (0.5 + 1) / 2 = 0.075; dk1/dlogp = 1 -> 0.1 / 2 = 0.05
        ("k1", 0.075, [0.05, 0.05]),
        # k3 = e^{-d} + d - 1 = 0.1065306597, 0.3678794412 -> 0.1 * 0.4744101009 / 2 = 0.0237205050
        # dk3/dlogp = 1 - e^{-d} = 0.3934693403, 0.6321205588 -> x 0.1 / 2
        ("k3", 0.0237205050, [0.0196734670, 0.0316060279]),
    ],
)
def test_kl_in_loss(estimator, expected_loss, expected_grad):
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator=estimator)
    logp = leaf([[-1.0, -1.0]])
    ref = t([[-1.5, -2.0]])
    loss, m = policy_loss(logp, logp.detach(), t([0.0]), _ones(1, 2), cfg, ref_logp=ref)  # A=0: KL only
    assert loss.item() == pytest.approx(expected_loss)
    assert m["kl_mean"] == pytest.approx(expected_loss / 0.1)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx(expected_grad)


def test_kl_in_reward_adds_nothing_to_loss_and_missing_ref_fails():
    logp = t([[-1.0, -1.0]])
    ref = t([[-1.5, -2.0]])
    loss, m = policy_loss(logp, logp, t([0.0]), _ones(1, 2), AlgorithmConfig(kl_coef=0.1, kl_in="reward"), ref_logp=ref)
    assert loss.item() == 0.0 and m["kl_mean"] > 0
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, logp, t([0.0]), _ones(1, 2), AlgorithmConfig(kl_coef=0.1))


def test_entropy_bonus():
    cfg = AlgorithmConfig(entropy_coef=0.01)
    logp = t([[-1.0, -1.0, -1.0]])
    ent = leaf([[2.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    # A=0: loss = -0.01 * mean(2, 4) = -0.03; d/d entropy = -0.01/2 on masked tokens
    loss, m = policy_loss(logp, logp, t([0.0]), mask, cfg, entropy=ent)
    assert loss.item() == pytest.approx(-0.03) and m["entropy_mean"] == pytest.approx(3.0)
    loss.backward()
    assert ent.grad.flatten().tolist() == pytest.approx([-0.005, -0.005, 0.0])
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, t([0.0]), mask, cfg)


def test_gradient_flows_only_through_logp():
    cfg = AlgorithmConfig(kl_coef=0.1, tis_cap=2.0, dual_clip_c=3.0)
    logp = leaf([[-1.0, -2.0], [-0.5, -0.7]])
    old, engine, ref, adv = (leaf(x) for x in ([[-1.1, -1.9], [-0.4, -0.9]], [[-1.2, -1.8], [-0.5, -1.0]],
                                                [[-1.3, -2.1], [-0.6, -0.6]], [1.0, -1.0]))
    loss, _ = policy_loss(logp, old, adv, _ones(2, 2), cfg, engine_logp=engine, ref_logp=ref)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and engine.grad is None and ref.grad is None and adv.grad is None


@pytest.mark.parametrize("mode", list(RAGGED_EXPECTED))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_policy_gradient_is_minus_advantage_times_grad_logp(mode, seed):
    """Property: at logp == old_logp with no KL, d loss / d logp_it = -A_i * m_it / (agg weight)."""
    g = torch.Generator().manual_seed(seed)
    b, tt, norm_len = 5, 6, 10
    lengths = torch.randint(1, tt + 1, (b,), generator=g)
    mask = (torch.arange(tt)[None, :] < lengths[:, None]).double()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    logp = (-torch.rand(b, tt, generator=g, dtype=torch.float64)).requires_grad_(True)
    cfg = AlgorithmConfig(loss_agg=mode, loss_agg_norm_len=norm_len, clip_low=0.1, clip_high=0.1)
    loss, m = policy_loss(logp, None, adv, mask, cfg)
    loss.backward()
    if mode == "token-mean":
        scale = torch.full((b, 1), 1.0 / mask.sum().item(), dtype=torch.float64)
    elif mode == "seq-mean-token-mean":
        scale = 1.0 / (lengths[:, None].double() * b)
    else:
        scale = torch.full((b, 1), 1.0 / (norm_len * b), dtype=torch.float64)
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask * scale)
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == 1.0


def test_shape_errors_name_the_argument():
    logp = t([[-1.0, -1.0]])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, t([1.0, 2.0, 3.0]), _ones(1, 2), AlgorithmConfig())
    with pytest.raises(ValueError, match="engine_logp"):
        policy_loss(logp, logp, t([1.0]), _ones(1, 2), AlgorithmConfig(), engine_logp=t([[1.0]]))


# ----------------------------------------------------------------------------- utilities and SFT


def test_masked_reductions():
    x = t([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_sum(x, mask).item() == 7.0  # 1 + 2 + 4
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(x, mask, dim=-1).tolist() == [1.5, 4.0]
    xe = leaf([[1.0, 2.0]])
    out = masked_mean(xe, torch.zeros(1, 2))
    out.backward()
    assert out.item() == 0.0 and xe.grad.tolist() == [[0.0, 0.0]]


def test_token_logprobs_matches_log_softmax_with_chunks_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    got = token_logprobs(logits, ids, temperature=0.7, chunk_rows=3)
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref)
    (gg,) = torch.autograd.grad(got.sum(), logits)
    (gr,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(gg, gr)
    # bf16 logits: computed in float32, so equal to the float32 answer on the rounded logits
    lb = logits.detach().bfloat16()
    torch.testing.assert_close(
        token_logprobs(lb, ids), torch.log_softmax(lb.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    )


def test_entropy_from_logits_known_values_and_stability():
    # uniform over 4 -> ln 4 = 1.3862944; one-hot-ish with huge gaps -> 0 (not NaN)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, -1000.0, -float("inf")]], requires_grad=True)
    ent = entropy_from_logits(logits, chunk_rows=1)
    assert ent[0].item() == pytest.approx(1.3862944) and ent[1].item() == pytest.approx(0.0, abs=1e-6)
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # p = (0.5, 0.25, 0.25) from logits ln(2), 0, 0: H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 = 1.0397208
    ent2 = entropy_from_logits(torch.tensor([LN(2.0), 0.0, 0.0]))
    assert ent2.item() == pytest.approx(1.0397208)


def test_sft_loss_equals_cross_entropy_on_masked_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]])
    ours = sft_loss(logits, mask, targets)
    ignored = targets.masked_fill(mask == 0, -100)
    theirs = F.cross_entropy(logits.reshape(-1, 7), ignored.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, theirs)
    (g1,) = torch.autograd.grad(ours, logits)
    (g2,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g1, g2)
    # logprob form: -mean(-1, -3) = 2
    assert sft_loss(t([[-1.0, -3.0, -50.0]]), torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)
