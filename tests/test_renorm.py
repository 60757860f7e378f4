"""Inference-time renormalization, paper eq. 2 and 3 (CONVENTIONS "Inference-time renormalization")."""

import pytest
import torch

from ngdiag.errors import ConfigError, NumericalError
from ngdiag.probes.metrics import velocity_norm
from ngdiag.probes.renorm import check_finite_norms, check_finite_tensor, cfg_renorm, rl_renorm


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("fn", [rl_renorm, cfg_renorm])
def test_renorm_sets_target_norm_and_keeps_direction(fn):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 16, 8, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0, 10.0, 1e-3]).view(-1, 1, 1, 1)
    target = torch.randn(5, 16, 8, 8, generator=g) * torch.tensor([1.0, 3.0, 0.1, 1.0, 1e3]).view(-1, 1, 1, 1)
    out = fn(v, target, step=2)
    assert out.shape == v.shape and out.dtype == v.dtype
    torch.testing.assert_close(velocity_norm(out), velocity_norm(target), rtol=1e-6, atol=0)
    torch.testing.assert_close(_cos(out, v), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)
    # The scale is positive: same direction, not the opposite one.
    assert ((out * v).reshape(5, -1).sum(1) > 0).all()
    # Idempotent, and the identity on a velocity that already has the target norm.
    torch.testing.assert_close(fn(out, target), out, rtol=1e-6, atol=1e-7)


def test_rl_renorm_hand_value_and_eq_3():
    out = rl_renorm(torch.tensor([[3.0, 4.0], [0.0, -2.0]]), torch.tensor([[0.0, 1.0], [6.0, 8.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, -10.0]]))
    g = torch.Generator().manual_seed(1)
    v_theta = torch.randn(3, 7, generator=g, dtype=torch.float64)
    v_ref = torch.randn(3, 7, generator=g, dtype=torch.float64)
    eq3 = v_theta * (v_ref.norm(dim=1) / v_theta.norm(dim=1))[:, None]
    torch.testing.assert_close(rl_renorm(v_theta, v_ref), eq3, rtol=1e-14, atol=0)


def test_cfg_renorm_eq_2_on_guided_velocity():
    g = torch.Generator().manual_seed(2)
    v_cond = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    v_uncond = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    v_cfg = v_uncond + 4.5 * (v_cond - v_uncond)
    eq2 = v_cfg * (velocity_norm(v_cond) / velocity_norm(v_cfg)).view(-1, 1, 1, 1)
    torch.testing.assert_close(cfg_renorm(v_cfg, v_cond), eq2, rtol=1e-14, atol=0)


def test_renorm_half_precision_keeps_dtype():
    v = torch.full((2, 1000), 300.0, dtype=torch.float16)  # norm overflows float16 if squared there
    target = torch.ones(2, 1000, dtype=torch.bfloat16)
    out = rl_renorm(v, target)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(velocity_norm(out), velocity_norm(target), rtol=1e-3, atol=0)


def test_renorm_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    v_theta = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v_ref = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rl_renorm(a, b), (v_theta, v_ref))


def test_zero_norm_raises_with_step_and_samples():
    v_theta = torch.ones(4, 3)
    v_theta[0] = 0.0
    v_theta[2] = 0.0
    msg = r"^v_theta has a zero or non-finite norm at step 3 for samples \[0, 2\]$"
    with pytest.raises(NumericalError, match=msg):
        rl_renorm(v_theta, torch.ones(4, 3), step=3)
    v_cond = torch.ones(4, 3)
    v_cond[3] = 0.0
    with pytest.raises(NumericalError, match=r"^v_cond has a zero or non-finite norm at step 0 for samples \[3\]$"):
        cfg_renorm(torch.ones(4, 3), v_cond, step=0)


def test_nan_and_inf_raise():
    v_ref = torch.ones(3, 2, 2)
    v_ref[1, 0, 1] = float("nan")
    with pytest.raises(NumericalError, match=r"^v_ref has a zero or non-finite norm at step 7 for samples \[1\]$"):
        rl_renorm(torch.ones(3, 2, 2), v_ref, step=7)
    v_cfg = torch.ones(3, 2)
    v_cfg[2, 1] = float("inf")
    with pytest.raises(NumericalError, match=r"^v_cfg has a zero or non-finite norm for samples \[2\]$"):
        cfg_renorm(v_cfg, torch.ones(3, 2))


def test_check_finite_norms_messages():
    check_finite_norms(torch.tensor([1.0, 2.0]), what="v_theta", step=1)  # passes silently
    with pytest.raises(NumericalError, match=r"^v_x has a zero or non-finite norm at step 4 for samples \[1, 2\]$"):
        check_finite_norms(torch.tensor([1.0, float("inf"), 0.0]), what="v_x", step=4)
    many = torch.zeros(25)
    many[0] = 1.0
    with pytest.raises(NumericalError, match=r"samples \[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\.\] \(24 in all\)$"):
        check_finite_norms(many, what="v_theta")


def test_check_finite_tensor_messages():
    v = torch.ones(4, 2, 3)
    check_finite_tensor(v, what="v_ref", step=0)  # passes silently
    v[1, 1, 2] = float("nan")
    v[3, 0, 0] = -float("inf")
    with pytest.raises(NumericalError, match=r"^v_ref has non-finite values at step 3 for samples \[1, 3\]$"):
        check_finite_tensor(v, what="v_ref", step=3)
    with pytest.raises(NumericalError, match=r"^v_ref has non-finite values for samples \[1, 3\]$"):
        check_finite_tensor(v, what="v_ref")


def test_shape_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="same shape"):
        rl_renorm(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ConfigError, match="same shape"):
        cfg_renorm(torch.ones(2, 3), torch.ones(3, 3))
