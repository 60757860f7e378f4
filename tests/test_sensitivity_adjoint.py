"""Tests of the reward-adjoint norm-scaling sensitivity (paper eq. 4-5, CONVENTIONS).

Everything runs in float64 on small fields with known properties: the identity
``sum_k |dt_k| S_k = dR/d(eps)`` against finite differences, the discrete adjoint against
autograd through the whole sampler, conservation of ``a . v`` for autonomous fields, agreement of
the continuous adjoint with finite differences of the ODE flow, and its O(1/K) distance to the
discrete one.
"""

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from ngdiag.core.errors import ConfigError, NgdiagError, NumericalError
from ngdiag.core.sampling import sample
from ngdiag.sensitivity import SensitivityResult, norm_sensitivity

DIM = 8
BATCH = 4
F64 = torch.float64


class TinyField(nn.Module):
    """A random two-layer MLP velocity ``v(x, t)``; ``autonomous=True`` ignores ``t``."""

    def __init__(self, autonomous: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.autonomous = autonomous
        self.inp = nn.Linear(DIM + 1, 32)
        self.out = nn.Linear(32, DIM)
        self.double()

    def forward(self, x, t):
        t = torch.zeros_like(t) if self.autonomous else t
        return self.out(torch.tanh(self.inp(torch.cat([x, t[:, None]], dim=1))))


def reward(x):
    """A smooth per-sample reward with a non-trivial gradient."""
    return -0.5 * ((x - 0.3) ** 2).sum(dim=1) + torch.tanh(2.0 * x).sum(dim=1)


def shifted_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3-style shifted sigmas from 1 to 0."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def euler(velocity, x, times, scale: float = 1.0, keep=None):
    """Reference Euler sampler, written independently: x_{k+1} = x_k + (t_{k+1} - t_k) * scale * v."""
    for k in range(times.numel() - 1):
        x = x + (times[k + 1] - times[k]) * scale * velocity(x, times[k].expand(x.shape[0]))
        if keep is not None:
            keep.append(x)
    return x


def flow(velocity, x, times, scales):
    """The ODE flow from times[0] to times[-1], interval k's velocity scaled by scales[k] (dopri5, tight)."""
    with torch.no_grad():
        for k in range(times.numel() - 1):

            def field(t, y, s=scales[k]):
                return s * velocity(y, t.expand(y.shape[0]))

            x = odeint(field, x, times[k : k + 2], method="dopri5", rtol=1e-12, atol=1e-12)[-1]
    return x


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------
# The discrete adjoint
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [True, False])
def test_identity_equals_finite_difference_of_scaled_sampler(checkpoint):
    """sum_k |t_{k+1} - t_k| S_k = dR/d(eps) when every step's velocity is scaled by (1 + eps)."""
    field, x0, times = TinyField(), noise(), shifted_schedule(12)
    res = norm_sensitivity(field, x0, times, reward, checkpoint=checkpoint)
    eps = 1e-5
    with torch.no_grad():
        fd = (reward(euler(field, x0, times, 1 + eps)) - reward(euler(field, x0, times, 1 - eps))) / (2 * eps)
    assert res.directional_derivative.shape == (BATCH,)
    assert torch.allclose(res.directional_derivative, fd, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert torch.equal(res.reward, reward(euler(field, x0, times)))


@pytest.mark.parametrize("checkpoint", [True, False])
def test_discrete_adjoint_equals_autograd_through_sampler(checkpoint):
    """a_k = dR/dx_k from autograd of R(x_K) w.r.t. each stored x_k, and S_k = a_{k+1} . d_k."""
    field, times = TinyField(), shifted_schedule(10)
    x0 = noise().requires_grad_(True)
    states = [x0]
    total = reward(euler(field, x0, times, keep=states)).sum()
    ref_adjoint = [torch.autograd.grad(total, x, retain_graph=True)[0] for x in states]

    res = norm_sensitivity(field, noise(), times, reward, checkpoint=checkpoint, return_adjoint=True)
    assert res.S.shape == (10, BATCH) and res.S.dtype == F64
    assert res.adjoint.shape == (11, BATCH, DIM)
    for k in range(11):
        assert (res.adjoint[k] - ref_adjoint[k]).abs().max() <= 1e-10 * ref_adjoint[k].abs().max()
    for k in range(10):
        d_k = (states[k + 1] - states[k]).detach() / (times[k] - times[k + 1])
        assert torch.allclose(res.S[k], (ref_adjoint[k + 1] * d_k).sum(dim=1), rtol=1e-10, atol=1e-12)
    assert torch.allclose(res.x_final, states[-1].detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize(
    "state, computed", [(torch.float32, torch.float32), (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16)],
    ids=["float32", "float32-state-float64-velocity", "bfloat16"],
)
def test_forward_pass_is_the_sampler_bit_for_bit(checkpoint, state, computed):
    """The states the adjoint differentiates are ngdiag.core.sampling.sample's, to the last bit, also where the
    velocity's dtype differs from the state's (the sampler continues in the velocity's dtype, as diffusers'
    scheduler does) and in half precision (dt * v in the velocity's dtype, the state update in float32)."""
    field = TinyField().to(computed)

    def velocity(x, t):
        return field(x.to(computed), t.to(computed))

    x0, times = noise().to(state), shifted_schedule(6).float()
    expected = sample(velocity, x0, times).x_final
    res = norm_sensitivity(velocity, x0, times, lambda x: reward(x.double()), checkpoint=checkpoint)
    assert res.x_final.dtype == expected.dtype == computed
    assert torch.equal(res.x_final, expected)
    if state != torch.bfloat16:  # the two backward walks agree (in bfloat16 only the stepwise one accumulates in float32)
        other = norm_sensitivity(velocity, x0, times, lambda x: reward(x.double()), checkpoint=not checkpoint)
        assert torch.allclose(res.S, other.S, rtol=1e-5, atol=0)


def test_linear_field_on_uniform_grid_has_exactly_constant_discrete_S():
    """For v = A x and a uniform grid, a_{k+1} . d_k is exactly constant along each trajectory:
    a_{k+1} = (I + h A)^T a_{k+2} and x_{k+1} = (I + h A) x_k, and (I + h A) commutes with A.
    On a non-uniform grid the constants of neighbouring steps differ (h_k != h_{k+1})."""
    A = 0.6 * torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(3), dtype=F64)

    def linear(x, t):
        return x @ A.T

    uniform = norm_sensitivity(linear, noise(), torch.linspace(1, 0, 11, dtype=F64), reward)
    spread = (uniform.S - uniform.S[0]).abs().max() / uniform.S[0].abs().max()
    assert spread <= 1e-12
    shifted = norm_sensitivity(linear, noise(), shifted_schedule(10), reward)
    assert (shifted.S - shifted.S[0]).abs().max() / shifted.S[0].abs().max() > 1e-3


def test_autonomous_field_conserves_S_along_the_flow():
    """For an autonomous field the continuous a(t) . v(x(t)) is conserved:
    d/dt (a . v) = (da/dt) . v + a . J dx/dt = -(J^T a) . v + a . J v = 0. So the continuous S_k
    (interval averages of a . d) are equal at every step, up to the solver's tolerance. The discrete
    Euler S_k deviate from a constant by O(max |dt|): halving the steps halves the spread."""
    times = shifted_schedule(6)
    res = norm_sensitivity(TinyField(autonomous=True), noise(), times, reward, method="continuous",
                           solver="dopri5", rtol=1e-10, atol=1e-10)
    assert (res.S - res.S[0]).abs().max() <= 1e-7 * res.S[0].abs().max()

    # The same check fails for a time-dependent field (so it can fail).
    timed = norm_sensitivity(TinyField(), noise(), times, reward, method="continuous",
                             solver="dopri5", rtol=1e-10, atol=1e-10)
    assert (timed.S - timed.S[0]).abs().max() > 1e-2 * timed.S[0].abs().max()

    spreads = []
    for steps in (40, 80):
        d = norm_sensitivity(TinyField(autonomous=True), noise(), torch.linspace(1, 0, steps + 1, dtype=F64), reward)
        spreads.append(float((d.S.max(0).values - d.S.min(0).values).max() / d.S.abs().max()))
    assert spreads[0] < 1e-2
    assert 1.6 < spreads[0] / spreads[1] < 2.5


# ----------------------------------------------------------------------------------------------
# The continuous adjoint
# ----------------------------------------------------------------------------------------------


def test_continuous_matches_finite_differences_of_the_flow():
    """dR/ds_k = |dt_k| S_k^cont where interval k's velocity is scaled by s_k, and the global
    scaling gives the directional derivative."""
    field, x0, times = TinyField(), noise(), shifted_schedule(6)
    res = norm_sensitivity(field, x0, times, reward, method="continuous", solver="dopri5", rtol=1e-10, atol=1e-10)
    dt = times[:-1] - times[1:]
    eps = 1e-4
    for k in (0, 3, 5):
        up, down = torch.ones(6, dtype=F64), torch.ones(6, dtype=F64)
        up[k], down[k] = 1 + eps, 1 - eps
        fd = (reward(flow(field, x0, times, up)) - reward(flow(field, x0, times, down))) / (2 * eps)
        assert torch.allclose(dt[k] * res.S[k], fd, rtol=1e-6, atol=1e-9)
    fd = (reward(flow(field, x0, times, torch.full((6,), 1 + eps, dtype=F64)))
          - reward(flow(field, x0, times, torch.full((6,), 1 - eps, dtype=F64)))) / (2 * eps)
    assert torch.allclose(res.directional_derivative, fd, rtol=1e-6, atol=1e-9)
    assert torch.allclose(res.x_final, flow(field, x0, times, torch.ones(6, dtype=F64)), atol=1e-8)


def test_continuous_approaches_discrete_as_steps_grow():
    """Euler's S_k differs from the ODE's interval-averaged S_k by O(max |dt|) = O(1/K)."""
    field, x0 = TinyField(), noise()
    errors = {}
    for steps in (8, 16, 32):
        times = shifted_schedule(steps)
        discrete = norm_sensitivity(field, x0, times, reward)
        continuous = norm_sensitivity(field, x0, times, reward, method="continuous", solver="rk4",
                                      continuous_substeps=4)
        errors[steps] = rel(discrete.S, continuous.S)
    assert errors[8] < 0.1
    assert errors[16] < errors[8] / 1.6
    assert errors[32] < errors[8] / 2.5


def test_continuous_fixed_grid_agrees_with_adaptive():
    field, x0, times = TinyField(), noise(), shifted_schedule(5)
    rk4 = norm_sensitivity(field, x0, times, reward, method="continuous", solver="rk4", continuous_substeps=4)
    dopri = norm_sensitivity(field, x0, times, reward, method="continuous", solver="dopri5", rtol=1e-10, atol=1e-10)
    assert rel(rk4.S, dopri.S) < 1e-6
    assert rk4.method == "continuous"


# ----------------------------------------------------------------------------------------------
# Models with parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"checkpoint": False}, {"method": "continuous"}])
def test_module_parameters_accumulate_no_grad(kwargs):
    """Parameters that require grad (velocity and a reward head) get no .grad from the call."""
    field = TinyField()
    torch.manual_seed(5)
    head = nn.Linear(DIM, 1).double()

    def head_reward(x):
        return head(torch.tanh(x)).squeeze(1)

    res = norm_sensitivity(field, noise(), shifted_schedule(4), head_reward, **kwargs)
    assert torch.isfinite(res.S).all()
    for p in list(field.parameters()) + list(head.parameters()):
        assert p.requires_grad and p.grad is None


def test_runs_under_no_grad_and_with_float32():
    field = TinyField().float()
    with torch.no_grad():
        res = norm_sensitivity(field, noise().float(), shifted_schedule(6).float(), reward)
    assert res.x_final.dtype == torch.float32 and res.S.dtype == F64
    ref = norm_sensitivity(TinyField(), noise(), shifted_schedule(6), reward)
    assert rel(res.S, ref.S) < 1e-4


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"checkpoint": False}, {"method": "continuous"}])
@pytest.mark.parametrize(
    "bad_reward",
    [lambda x: torch.zeros(x.shape[0], dtype=x.dtype), lambda x: 0.0 * x.sum(dim=1)],
    ids=["detached", "zero-gradient"],
)
def test_reward_without_gradient_is_an_error(kwargs, bad_reward):
    with pytest.raises(NgdiagError, match="the reward does not depend on the image"):
        norm_sensitivity(TinyField(), noise(), shifted_schedule(4), bad_reward, **kwargs)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_infinite_velocity_names_the_step(checkpoint):
    times = shifted_schedule(6)
    field = TinyField()

    def blowing_up(x, t):
        v = field(x, t)
        return v * float("inf") if abs(float(t[0]) - float(times[3])) < 1e-12 else v

    with pytest.raises(NumericalError, match=r"velocity is not finite at step 3 "):
        norm_sensitivity(blowing_up, noise(), times, reward, checkpoint=checkpoint)


def test_infinite_velocity_names_the_step_continuous():
    times = shifted_schedule(6)
    field = TinyField()

    def blowing_up(x, t):
        v = field(x, t)
        return v * float("inf") if float(times[4]) < float(t[0]) < float(times[3]) else v

    with pytest.raises(NumericalError, match=r"velocity is not finite in step 3 "):
        norm_sensitivity(blowing_up, noise(), times, reward, method="continuous")


class _InfiniteSlope(torch.autograd.Function):
    """Zero in the forward pass, infinite slope in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("checkpoint", [True, False])
def test_infinite_adjoint_names_the_step(checkpoint):
    times = shifted_schedule(6)
    field = TinyField()

    def steep(x, t):
        v = field(x, t)
        return v + _InfiniteSlope.apply(x) if abs(float(t[0]) - float(times[2])) < 1e-12 else v

    with pytest.raises(NumericalError, match=r"adjoint is not finite at step 2 "):
        norm_sensitivity(steep, noise(), times, reward, checkpoint=checkpoint)


def test_velocity_without_gradient_is_an_error():
    field = TinyField()

    def frozen(x, t):
        with torch.no_grad():
            return field(x, t)

    with pytest.raises(NgdiagError, match="velocity carries no gradient at step 3"):
        norm_sensitivity(frozen, noise(), shifted_schedule(4), reward)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"times": torch.linspace(0, 1, 5, dtype=F64)}, "strictly decreasing"),
        ({"times": torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=F64)}, "strictly decreasing"),
        ({"times": torch.linspace(1, 0, 6, dtype=F64)[None]}, "1-D"),
        ({"times": torch.tensor([1.0], dtype=F64)}, "at least 2"),
        ({"times": torch.linspace(1000, 0, 5, dtype=F64)}, r"\[0, 1\]"),
        ({"times": torch.tensor([1.0, float("nan"), 0.0])}, "non-finite"),
        ({"x_init": torch.randn(DIM, dtype=F64)}, r"shape \(B, \.\.\.\)"),
        ({"reward": lambda x: reward(x)[:, None]}, r"shape \(4,\)"),
        ({"velocity": lambda x, t: x[:, :3]}, "velocity returned shape"),
        ({"method": "exact"}, "unknown sensitivity method"),
        ({"method": "continuous", "solver": "leapfrog"}, "unknown ODE solver"),
        ({"method": "continuous", "continuous_substeps": 0}, "continuous_substeps"),
    ],
)
def test_bad_configuration_is_a_config_error(change, message):
    args = {"velocity": TinyField(), "x_init": noise(), "times": shifted_schedule(5), "reward": reward}
    args.update(change)
    positional = [args.pop(name) for name in ("velocity", "x_init", "times", "reward")]
    with pytest.raises(ConfigError, match=message):
        norm_sensitivity(*positional, **args)


# ----------------------------------------------------------------------------------------------
# The result object
# ----------------------------------------------------------------------------------------------


def test_result_statistics_and_frames_agree_with_pandas():
    res = norm_sensitivity(TinyField(), noise(), shifted_schedule(5), reward)
    frame = res.to_frame()
    assert list(frame.columns) == ["step", "t", "t_next", "sample", "S"]
    assert len(frame) == 5 * BATCH
    row = frame[(frame.step == 2) & (frame["sample"] == 3)].iloc[0]
    assert row.S == float(res.S[2, 3]) and row.t == float(res.times[2]) and row.t_next == float(res.times[3])

    by_step = frame.groupby("step").S
    summary = res.summary_frame()
    assert list(summary.columns) == ["step", "t", "t_next", "mean", "mean_ci_low", "mean_ci_high", "std", "nsr", "stderr",
                                     "frac_positive"]
    assert torch.allclose(torch.tensor(summary["mean"].values), torch.tensor(by_step.mean().values))
    assert torch.allclose(torch.tensor(summary["std"].values), torch.tensor(by_step.std(ddof=1).values))
    assert torch.allclose(res.nsr, res.std / res.mean.abs())
    assert torch.allclose(res.stderr, res.std / BATCH**0.5)
    positive = by_step.apply(lambda s: (s > 0).mean())
    assert torch.allclose(torch.tensor(summary["frac_positive"].values), torch.tensor(positive.values))
    assert "steps=5" in repr(res)


def test_result_checks_shapes():
    with pytest.raises(ConfigError, match="times must have shape"):
        SensitivityResult(S=torch.zeros(3, 2, dtype=F64), times=torch.zeros(3, dtype=F64),
                          reward=torch.zeros(2, dtype=F64), x_final=torch.zeros(2, 1), method="discrete")
