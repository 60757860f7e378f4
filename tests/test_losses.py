"""Tests of ngdiag.train.losses: the NormGuard penalty (paper eq. 7-8) and the velocity-local base losses.

Expected values are written out by hand (the arithmetic is in the comments), never recomputed with
the code under test. float64 throughout so that closed forms can be checked to 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.train.losses import (
    LossTerms,
    awm_log_prob,
    awm_loss,
    dpo_loss,
    flow_matching_loss,
    nft_loss,
    normguard_penalty,
    with_normguard,
)

D64 = torch.float64


def t64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=D64, requires_grad=grad)


# ----------------------------------------------------------------------------------------------
# NormGuard penalty
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1.0, -1.0, 0.5, 0.0])
def test_penalty_is_exactly_zero_with_zero_gradient_when_not_inflated(factor):
    # factor 1 and -1: ||v_theta|| == ||v_ref|| exactly (same squares); 0.5 and 0: below.
    v_ref = t64([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    v_theta = (factor * v_ref).detach().requires_grad_(True)
    p = normguard_penalty(v_theta, v_ref, lam=7.0)
    assert p.loss.item() == 0.0
    assert torch.equal(p.per_sample, torch.zeros(2, dtype=D64))
    p.loss.backward()
    assert torch.equal(v_theta.grad, torch.zeros_like(v_theta))
    assert p.active_fraction == 0.0
    assert p.mean_ratio == pytest.approx(abs(factor), abs=1e-15)


def test_penalty_gradient_matches_closed_form_when_active():
    gen = torch.Generator().manual_seed(0)
    b = 4
    v_ref = torch.randn(b, 3, 5, 5, generator=gen, dtype=D64)
    v_theta = (1.5 * v_ref + 0.1 * torch.randn(b, 3, 5, 5, generator=gen, dtype=D64)).requires_grad_(True)
    lam = 0.3
    p = normguard_penalty(v_theta, v_ref, lam)
    assert p.active_fraction == 1.0
    p.loss.backward()
    nr2 = (v_ref**2).sum(dim=(1, 2, 3)).reshape(b, 1, 1, 1)
    expected = 2.0 * lam * v_theta.detach() / nr2 / b
    assert torch.allclose(v_theta.grad, expected, rtol=0.0, atol=1e-12)


def test_penalty_gradient_is_per_sample_in_a_mixed_batch():
    v_ref = t64([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    v_theta = t64([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]], grad=True)  # active, below, equal
    p = normguard_penalty(v_theta, v_ref, lam=1.0)
    p.loss.backward()
    # sample 0: 2 * 1 * [2, 0] / 1 / 3 ; samples 1 and 2: exactly 0
    assert torch.allclose(v_theta.grad[0], t64([4.0 / 3.0, 0.0]), rtol=0, atol=1e-15)
    assert torch.equal(v_theta.grad[1:], torch.zeros(2, 2, dtype=D64))
    assert p.active_fraction == pytest.approx(1.0 / 3.0, abs=1e-15)


def test_penalty_matches_eq7_on_hand_computed_samples():
    # ||v_theta||^2 = 25, 1 ; ||v_ref||^2 = 16, 4 ; lam = 2
    # R_0 = 2 * (25 - 16) / 16 = 1.125 ; R_1 = 2 * max(0, (1 - 4) / 4) = 0 ; mean 0.5625
    # ratios 5/4 and 1/2, mean 0.875 ; active 1 of 2
    v_theta = t64([[3.0, 4.0], [1.0, 0.0]], grad=True)
    v_ref = t64([[0.0, 4.0], [0.0, 2.0]])
    p = normguard_penalty(v_theta, v_ref, lam=2.0)
    assert p.per_sample.tolist() == [1.125, 0.0]
    assert p.loss.item() == 0.5625
    assert p.active_fraction == 0.5
    assert p.mean_ratio == 0.875


def test_penalty_norm_is_over_all_non_batch_dims():
    # (B, C, H, W) and its token-packed (B, N, D) layout give the same penalty.
    gen = torch.Generator().manual_seed(1)
    v_ref = torch.randn(2, 4, 2, 2, generator=gen, dtype=D64)
    v_theta = 1.3 * v_ref
    a = normguard_penalty(v_theta, v_ref, 1.0)
    packed = lambda v: v.permute(0, 2, 3, 1).reshape(2, 4, 4)  # noqa: E731
    b = normguard_penalty(packed(v_theta), packed(v_ref), 1.0)
    # 1.3^2 - 1 = 0.69 for both samples
    assert torch.allclose(a.per_sample, t64([0.69, 0.69]), rtol=0, atol=1e-12)
    assert torch.allclose(a.per_sample, b.per_sample, rtol=0, atol=1e-12)


def test_penalty_v_ref_gets_no_gradient():
    v_ref = t64([[1.0, 1.0]], grad=True)
    v_theta = t64([[2.0, 2.0]], grad=True)
    p = normguard_penalty(v_theta, v_ref, 1.0)
    p.loss.backward()
    assert v_ref.grad is None
    assert v_theta.grad is not None


@pytest.mark.parametrize("lam", [-1e-6, -1.0, float("nan"), float("inf")])
def test_penalty_rejects_bad_lam(lam):
    v = t64([[1.0, 2.0]])
    with pytest.raises(ConfigError):
        normguard_penalty(v, v, lam)
    base = LossTerms(total=torch.zeros((), dtype=D64), terms={"loss": 0.0})
    with pytest.raises(ConfigError):
        with_normguard(base, v, v, lam)


def test_penalty_zero_reference_norm_is_a_numerical_error():
    v_theta = t64([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    v_ref = t64([[1.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]])
    with pytest.raises(NumericalError, match=r"\[1, 2\]"):
        normguard_penalty(v_theta, v_ref, 1.0)


def test_penalty_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError):
        normguard_penalty(t64([[1.0, 2.0]]), t64([[1.0, 2.0, 3.0]]), 1.0)


def test_penalty_half_precision_inputs_are_computed_in_float32():
    # same numbers as the eq. 7 test, exactly representable in bfloat16
    v_theta = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    v_ref = torch.tensor([[0.0, 4.0], [0.0, 2.0]], dtype=torch.bfloat16)
    p = normguard_penalty(v_theta, v_ref, lam=2.0)
    assert p.per_sample.dtype == torch.float32
    assert p.per_sample.tolist() == [1.125, 0.0]
    p.loss.backward()
    assert v_theta.grad.dtype == torch.bfloat16
    # 2 * 2 * [3, 4] / 16 / 2 = [.375, .5]
    assert v_theta.grad.float().tolist() == [[0.375, 0.5], [0.0, 0.0]]


def test_penalty_lam_zero_is_zero_but_keeps_diagnostics():
    p = normguard_penalty(t64([[2.0, 0.0]]), t64([[1.0, 0.0]]), 0.0)
    assert p.loss.item() == 0.0
    assert p.active_fraction == 1.0
    assert p.mean_ratio == 2.0


# ----------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------


def test_flow_matching_loss_by_hand():
    x0 = t64([[1.0, 2.0], [0.0, 1.0]])
    eps = t64([[0.0, 0.0], [1.0, 1.0]])
    v = t64([[0.0, 0.0], [1.0, 2.0]])
    # targets eps - x0: [-1, -2] and [1, 0]; errors (1 + 4)/2 = 2.5 and (0 + 4)/2 = 2
    assert flow_matching_loss(v, x0, eps).item() == 2.25
    # weights multiply and the sum is divided by B: (2 * 2.5 + 0.5 * 2) / 2 = 3
    assert flow_matching_loss(v, x0, eps, weight=t64([2.0, 0.5])).item() == 3.0
    with pytest.raises(ConfigError):
        flow_matching_loss(v, x0, eps, weight=t64([1.0]))


# ----------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------


def _nft_case():
    # Sample 0: t = 0.5, x_t = [1, 1], x0 = [0, 0], v_theta = [2, 2], v_old = [2, 0], A = 1
    #   v+ = .5[2,2] + .5[2,0] = [2, 1]; x0+ = [1,1] - .5[2,1] = [0, .5]; e+ = [0, .5]
    #   w+ = .25; L+ = mean([0, .25 / .25]) = .5
    #   v- = 1.5[2,0] - .5[2,2] = [2, -1]; x0- = [0, 1.5]; w- = .75; L- = mean([0, 2.25/.75]) = 1.5
    #   r = 1/2/2 + .5 = .75; P = (.75 * .5 + .25 * 1.5) / .5 = 1.5
    # Sample 1: t = .25, x_t = [1, 1], x0 = [1, -1], v_theta = [0, 4], v_old = [0, 0], A = -5 -> -2
    #   v+ = [0, 2]; x0+ = [1, .5]; e+ = [0, 1.5]; w+ = .75; L+ = 1.5
    #   v- = [0, -2]; x0- = [1, 1.5]; e- = [0, 2.5]; w- = 1.25; L- = 2.5
    #   r = 0; P = 2.5 / .5 = 5
    # policy_loss = mean(2 * [1.5, 5]) = 6.5; unweighted = 3.25
    # KL: v_ref = [1, 2] -> diff [1, 0] -> .5 ; v_ref = [0, 2] -> diff [0, 2] -> 2 ; kl_div = 1.25
    return dict(
        v_theta=t64([[2.0, 2.0], [0.0, 4.0]], grad=True),
        v_old=t64([[2.0, 0.0], [0.0, 0.0]], grad=True),
        x_t=t64([[1.0, 1.0], [1.0, 1.0]]),
        x0=t64([[0.0, 0.0], [1.0, -1.0]]),
        t=t64([0.5, 0.25]),
        advantage=t64([1.0, -5.0]),
        v_ref=t64([[1.0, 2.0], [0.0, 2.0]], grad=True),
    )


def test_nft_loss_by_hand():
    c = _nft_case()
    out = nft_loss(
        c["v_theta"], c["v_old"], c["x_t"], c["x0"], c["t"], c["advantage"],
        beta=0.5, adv_clip_max=2.0, kl_beta=0.1, v_ref=c["v_ref"],
    )
    assert out.terms["positive_loss"] == pytest.approx(1.0, abs=1e-12)  # mean(.5, 1.5)
    assert out.terms["negative_loss"] == pytest.approx(2.0, abs=1e-12)  # mean(1.5, 2.5)
    assert out.terms["r_mean"] == 0.375
    assert out.terms["unweighted_policy_loss"] == pytest.approx(3.25, abs=1e-12)
    assert out.terms["policy_loss"] == pytest.approx(6.5, abs=1e-12)
    assert out.terms["kl_div"] == 1.25
    assert out.terms["kl_loss"] == pytest.approx(0.125, abs=1e-15)
    assert out.total.item() == pytest.approx(6.625, abs=1e-12)
    assert out.terms["loss"] == pytest.approx(6.625, abs=1e-12)
    out.total.backward()
    # d/dv_theta, sample 0: (m/B) [r/beta * 2 e+/(w+ D) (-t beta) + (1-r)/beta * 2 e-/(w- D) (t beta)]
    #   = 1 * [1.5 * [0, -.5] + .5 * [0, .5]] = [0, -.5]; KL: .1 * 2 [1, 0] / (2 * 2) = [.05, 0]
    # sample 1: 1 * 2 * (2 [0, 2.5] / 2.5 * .125) = [0, .5]; KL: .1 * 2 [0, 2] / 4 = [0, .1]
    assert torch.allclose(c["v_theta"].grad, t64([[0.05, -0.5], [0.0, 0.6]]), rtol=0, atol=1e-12)
    assert c["v_old"].grad is None
    assert c["v_ref"].grad is None


def test_nft_loss_kl_is_logged_but_not_added_at_zero_coefficient():
    c = _nft_case()
    out = nft_loss(
        c["v_theta"], c["v_old"], c["x_t"], c["x0"], c["t"], c["advantage"],
        beta=0.5, adv_clip_max=2.0, v_ref=c["v_ref"],
    )
    assert out.total.item() == pytest.approx(6.5, abs=1e-12)
    assert out.terms["kl_div"] == 1.25 and out.terms["kl_loss"] == 0.0


def test_nft_loss_rejects_bad_arguments():
    c = _nft_case()
    args = (c["v_theta"], c["v_old"], c["x_t"], c["x0"], c["t"], c["advantage"])
    with pytest.raises(ConfigError):
        nft_loss(*args, beta=0.5, adv_clip_max=2.0, kl_beta=0.1)  # no v_ref
    with pytest.raises(ConfigError):
        nft_loss(*args, beta=0.0, adv_clip_max=2.0)
    with pytest.raises(ConfigError):
        nft_loss(*args, beta=0.5, adv_clip_max=0.0)
    with pytest.raises(ConfigError):
        nft_loss(*args[:5], t64([1.0, 2.0, 3.0]), beta=0.5, adv_clip_max=2.0)


# ----------------------------------------------------------------------------------------------
# AWM
# ----------------------------------------------------------------------------------------------


def test_awm_log_prob_weightings_by_hand():
    v = t64([[0.0, 1.0]])
    target = t64([[1.0, 1.0]])  # mse = 0.5
    t = 0.5
    assert awm_log_prob(v, target, t).item() == -0.5
    assert awm_log_prob(v, target, t, weighting="t").item() == -0.25
    assert awm_log_prob(v, target, t, weighting="t**2").item() == -0.125
    # a Python float t keeps float64 precision: -0.5 * 0.3 is exactly -0.15 in float64
    assert awm_log_prob(v, target, 0.3, weighting="t").item() == -0.15
    # -(sqrt(0.5 + 1e-10) - 1e-5) * 0.5
    assert awm_log_prob(v, target, t, weighting="huber").item() == pytest.approx(-0.35354839062862914, rel=1e-12)
    # -((0.5 + 1e-10)^.25 - (1e-10)^.25) * 0.5 / .25
    assert awm_log_prob(v, target, t, weighting="ghuber").item() == pytest.approx(-1.6754682752711818, rel=1e-12)
    with pytest.raises(ConfigError):
        awm_log_prob(v, target, t, weighting="t**3")


def test_awm_loss_by_hand():
    # target = eps - x0 = [1, 1] for both samples
    # sample 0: v_theta = [1, 1] (l = 0), v_old = [0, 1] (l = -.5): ratio e^.5 = 1.6487; A = 1
    #   unclipped -1.6487, clipped -1.2 -> max -1.2
    # sample 1: v_theta = [0, 1] (l = -.5), v_old = [1, 1] (l = 0): ratio e^-.5 = .6065; A = -2
    #   unclipped 1.2131, clipped 2 * .8 = 1.6 -> max 1.6
    # policy = mean(-1.2, 1.6) = .2
    # KL to v_ref = [[1,1],[1,1]]: per sample [0, .5] -> .25, * .1 = .025
    # KL to v_ema = 0: per sample [1, .5] -> .75, * .2 = .15 ; total .375
    x0 = t64([[0.0, 0.0], [0.0, 0.0]])
    eps = t64([[1.0, 1.0], [1.0, 1.0]])
    v_theta = t64([[1.0, 1.0], [0.0, 1.0]], grad=True)
    v_old = t64([[0.0, 1.0], [1.0, 1.0]], grad=True)
    v_ref = t64([[1.0, 1.0], [1.0, 1.0]], grad=True)
    v_ema = t64([[0.0, 0.0], [0.0, 0.0]], grad=True)
    out = awm_loss(
        v_theta, v_old, x0, eps, 0.5, t64([1.0, -2.0]),
        clip_range=0.2, kl_beta=0.1, v_ref=v_ref, ema_kl_beta=0.2, v_ema=v_ema,
    )
    assert out.terms["policy_loss"] == pytest.approx(0.2, abs=1e-12)
    assert out.terms["ratio_mean"] == pytest.approx((1.6487212707001282 + 0.6065306597126334) / 2, abs=1e-12)
    assert out.terms["clip_frac_high"] == 0.5 and out.terms["clip_frac_low"] == 0.5
    assert out.terms["kl_div"] == 0.25 and out.terms["kl_loss"] == pytest.approx(0.025, abs=1e-15)
    assert out.terms["ema_kl_div"] == 0.75 and out.terms["ema_kl_loss"] == pytest.approx(0.15, abs=1e-15)
    assert out.total.item() == pytest.approx(0.375, abs=1e-12)
    out.total.backward()
    # both policy terms are clipped, so only the KLs give gradient:
    # .1 * 2 (v - v_ref) / (2 * 2) + .2 * 2 (v - v_ema) / (2 * 2)
    expected = 0.05 * t64([[0.0, 0.0], [-1.0, 0.0]]) + 0.1 * t64([[1.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(v_theta.grad, expected, rtol=0, atol=1e-12)
    assert v_old.grad is None and v_ref.grad is None and v_ema.grad is None


def test_awm_gradient_inside_the_clip_range():
    # v_theta = [1.5, 1] (l = -.125), v_old = [0, 1] (l = -.5): ratio e^.375 inside [.5, 1.5], A = 1
    # loss = -ratio ; d/dv = -ratio * dl/dv = -e^.375 * (-2 [.5, 0] / 2) = [e^.375 / 2, 0]
    v_theta = t64([[1.5, 1.0]], grad=True)
    v_old, x0, eps = t64([[0.0, 1.0]]), t64([[0.0, 0.0]]), t64([[1.0, 1.0]])
    out = awm_loss(v_theta, v_old, x0, eps, 0.3, 1.0, clip_range=(-0.5, 0.5))
    assert out.total.item() == pytest.approx(-1.4549914146182013, abs=1e-12)
    out.total.backward()
    assert torch.allclose(v_theta.grad, t64([[0.7274957073091007, 0.0]]), rtol=0, atol=1e-12)


def test_awm_loss_rejects_bad_arguments():
    v = t64([[1.0, 1.0]])
    with pytest.raises(ConfigError):
        awm_loss(v, v, v, v, 0.5, 1.0, kl_beta=0.1)
    with pytest.raises(ConfigError):
        awm_loss(v, v, v, v, 0.5, 1.0, ema_kl_beta=0.1)
    with pytest.raises(ConfigError):
        awm_loss(v, v, v, v, 0.5, 1.0, clip_range=(0.1, 0.2))


# ----------------------------------------------------------------------------------------------
# Diffusion-DPO
# ----------------------------------------------------------------------------------------------


def _dpo_case():
    # pair 0: e_w = mean([0, 1]) = .5, e_ref_w = mean([1, 0]) = .5, e_l = .5, e_ref_l = 0
    #   z = -(4/2) * ((.5 - .5) - (.5 - 0)) = 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.31326168751822286
    # pair 1: e_w = 1, e_ref_w = 0, e_l = e_ref_l = 0 : z = -2 * 1 = -2 -> log(1 + e^2) = 2.1269280110429727
    return dict(
        v_w=t64([[1.0, 1.0], [1.0, 1.0]], grad=True),
        v_l=t64([[0.0, 0.0], [0.0, 0.0]], grad=True),
        v_ref_w=t64([[0.0, 0.0], [0.0, 0.0]], grad=True),
        v_ref_l=t64([[0.0, 1.0], [0.0, 0.0]], grad=True),
        target_w=t64([[1.0, 0.0], [0.0, 0.0]]),
        target_l=t64([[0.0, 1.0], [0.0, 0.0]]),
    )


def test_dpo_loss_by_hand():
    c = _dpo_case()
    out = dpo_loss(**c, beta=4.0)
    assert out.total.item() == pytest.approx((0.31326168751822286 + 2.1269280110429727) / 2, abs=1e-12)
    assert out.terms["theta_w_err"] == 0.75 and out.terms["theta_l_err"] == 0.25
    assert out.terms["ref_w_err"] == 0.25 and out.terms["ref_l_err"] == 0.0
    assert out.terms["implicit_accuracy"] == 0.5
    # rewards -2 * d: chosen [0, -2], rejected [-1, 0]
    assert out.terms["implicit_reward_chosen"] == -1.0
    assert out.terms["implicit_reward_rejected"] == -0.5
    out.total.backward()
    # pair 0: dL/dz = -sigmoid(-1), dz/de_w = -2, de_w/dv_w = 2 (v_w - target_w) / 2 = [0, 1]; / B = 2
    #   -> sigmoid(-1) [0, 1] ; pair 1: dL/dz = -sigmoid(2), de_w/dv_w = [1, 1] -> sigmoid(2) [1, 1]
    s1, s2 = 1.0 / (1.0 + math.exp(1.0)), 1.0 / (1.0 + math.exp(-2.0))
    assert torch.allclose(c["v_w"].grad, t64([[0.0, s1], [s2, s2]]), rtol=0, atol=1e-12)
    assert c["v_ref_w"].grad is None and c["v_ref_l"].grad is None


def test_dpo_loss_rejects_non_positive_beta():
    with pytest.raises(ConfigError):
        dpo_loss(**_dpo_case(), beta=0.0)


# ----------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------


def _bases():
    c = _nft_case()
    nft = nft_loss(
        c["v_theta"], c["v_old"], c["x_t"], c["x0"], c["t"], c["advantage"],
        beta=0.5, adv_clip_max=2.0, kl_beta=0.1, v_ref=c["v_ref"],
    )
    v = t64([[1.0, 3.0], [0.0, 1.0]], grad=True)
    awm = awm_loss(
        v, t64([[0.0, 1.0], [1.0, 1.0]]), t64([[0.0, 0.0]] * 2), t64([[1.0, 1.0]] * 2), 0.5, t64([1.0, -2.0])
    )
    d = _dpo_case()
    # non-zero reference velocities, as a trained reference has (a zero norm is a NumericalError)
    d["v_ref_w"] = t64([[1.0, 0.0], [0.5, 0.5]])
    d["v_ref_l"] = t64([[0.0, 1.0], [1.0, 0.0]])
    dpo = dpo_loss(**d, beta=4.0)
    fm = LossTerms(total=flow_matching_loss(v, t64([[1.0, 2.0]] * 2), t64([[0.0, 0.0]] * 2)), terms={})
    return [
        (nft, c["v_theta"], c["v_ref"]),
        (awm, v, t64([[1.0, 1.0], [1.0, 1.0]])),
        (dpo, (d["v_w"], d["v_l"]), (d["v_ref_w"], d["v_ref_l"])),
        (fm, v, t64([[1.0, 1.0], [1.0, 1.0]])),
    ]


def test_with_normguard_lam_zero_is_the_base_bit_for_bit():
    for base, v_theta, v_ref in _bases():
        out = with_normguard(base, v_theta, v_ref, 0.0)
        assert torch.equal(out.total, base.total)
        assert out.total is base.total
        assert out.terms["normguard"] == 0.0
        assert 0.0 <= out.terms["normguard_active_fraction"] <= 1.0


def test_with_normguard_adds_the_penalty():
    for base, v_theta, v_ref in _bases():
        out = with_normguard(base, v_theta, v_ref, 0.7)
        thetas = v_theta if isinstance(v_theta, tuple) else (v_theta,)
        refs = v_ref if isinstance(v_ref, tuple) else (v_ref,)
        pen = normguard_penalty(torch.cat(thetas), torch.cat(refs), 0.7)
        assert torch.equal(out.total, base.total + pen.loss)
        assert out.terms["normguard"] == pytest.approx(pen.loss.item(), abs=1e-15)
        assert out.terms["normguard_active_fraction"] == pen.active_fraction
        assert out.terms["normguard_mean_ratio"] == pytest.approx(pen.mean_ratio, abs=1e-15)
        for k, v in base.terms.items():
            if k != "loss":
                assert out.terms[k] == v


def test_with_normguard_hand_value_and_gradient():
    # base: a loss with zero gradient; penalty of v_theta = [3, 4] against v_ref = [0, 4], lam = 2:
    # R = 2 * 9 / 16 = 1.125 ; grad = 2 * 2 * [3, 4] / 16 = [.75, 1]
    v_theta = t64([[3.0, 4.0]], grad=True)
    base = LossTerms(total=(0.0 * v_theta).sum() + 1.0, terms={"loss": 1.0})
    out = with_normguard(base, v_theta, t64([[0.0, 4.0]], grad=True), 2.0)
    assert out.total.item() == 2.125 and out.terms["loss"] == 2.125
    out.total.backward()
    assert torch.allclose(v_theta.grad, t64([[0.75, 1.0]]), rtol=0, atol=1e-15)


def test_with_normguard_refuses_a_second_penalty_and_unpaired_inputs():
    base, v_theta, v_ref = _bases()[0]
    once = with_normguard(base, v_theta, v_ref, 0.1)
    with pytest.raises(ConfigError):
        with_normguard(once, v_theta, v_ref, 0.1)
    with pytest.raises(ConfigError):
        with_normguard(base, (v_theta, v_theta), (v_ref,), 0.1)
