"""Reward-adjoint norm-scaling sensitivity (paper eq. 4-5; CONVENTIONS "Norm-scaling sensitivity").

A flow-matching sampler integrates ``dx/dt = v(x, t)`` from ``t_0 = 1`` (noise) down to
``t_K = 0`` (data) with Euler steps ``x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)``. For a reward
``R(x_K)`` on the final sample:

- adjoint ``a_k = dR/dx_k``, exact through the discrete sampler:
  ``a_K = grad R(x_K)`` and ``a_k = a_{k+1} + (t_{k+1} - t_k) (dv/dx)(x_k, t_k)^T a_{k+1}``;
- applied velocity ``d_k = (x_{k+1} - x_k) / |t_{k+1} - t_k|`` (``-v(x_k, t_k)`` for plain Euler);
- sensitivity ``S_k = a_{k+1} . d_k``, per sample.

Scaling every step's velocity by ``(1 + eps)`` changes the reward by
``dR/d(eps) = sum_k |t_{k+1} - t_k| S_k``, so ``S_k > 0`` means a larger step magnitude at step
``k`` raises the reward.

Two methods compute ``S``:

- ``"discrete"``: the exact gradient of the Euler sampler the audit uses, :func:`ngdiag.core.sampling.sample`
  itself (the same schedule check, velocity call, :func:`~ngdiag.core.sampling.euler_step` and casts:
  its final samples equal ``sample(velocity, x_init, times).x_final`` bit for bit). The forward
  pass runs ``sample`` without a graph and keeps ``x_0 ... x_K``; the backward walk recomputes one
  step at a time under autograd, the velocity with :func:`~ngdiag.core.sampling.velocity_at` and the
  update with :func:`~ngdiag.core.sampling.euler_step`, and takes one vector-Jacobian product (VJP) per
  step, so activation memory does not grow with ``K`` (``checkpoint=True``); the adjoint is
  accumulated in at least float32. With ``checkpoint=False`` autograd differentiates the whole
  ``sample(..., enable_grad=True)`` run in one graph instead (no recomputation, memory grows with ``K``).
- ``"continuous"``: the adjoint of the ODE itself, with :func:`torchdiffeq.odeint_adjoint`.
  Each interval ``[t_{k+1}, t_k]`` is integrated with the field ``s_k v(x, t)`` where ``s_k``
  (one per sample) is 1; then ``S_k = (dR/ds_k) / |t_{k+1} - t_k|``, the interval average of
  ``a(t) . d(t)``. It approximates the discrete value up to ``O(max |dt|)``.

For a velocity that does not depend on ``t`` the continuous ``a(t) . v(x(t))`` is conserved
along the flow (``d/dt (a . v) = -a^T J v + a^T J v = 0`` with ``J = dv/dx``), so the continuous
``S_k`` is the same at every step; the discrete ``S_k`` is only approximately constant (exactly
so for a linear field on a uniform grid).

Samples must be independent: ``R`` is per sample and the velocity must not mix samples (no
batch statistics), since ``a_K`` is the gradient of ``R.sum()``.

Example:
    >>> import torch
    >>> from ngdiag.sensitivity import norm_sensitivity
    >>> res = norm_sensitivity(
    ...     lambda x, t: -x,                     # dx/dt = -x
    ...     torch.ones(2, 1, dtype=torch.float64),
    ...     torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
    ...     lambda x: x.sum(dim=1),
    ... )
    >>> res.S.shape
    torch.Size([2, 2])
    >>> res.S[:, 0].tolist()     # a_2 = 1, a_1 = 1.5; d_0 = 1, d_1 = 1.5: constant (linear field, uniform grid)
    [1.5, 1.5]
    >>> res.directional_derivative.tolist()      # x_K = (1 + 0.5 (1 + eps))^2, dR/deps = 1.5
    [1.5, 1.5]
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torchdiffeq import odeint_adjoint

from ngdiag.core.tensors import check_finite
from ngdiag.core.errors import ConfigError, NgdiagError, NumericalError
from ngdiag.core.sampling import StepRecord, batch_time, check_schedule, euler_step, sample, velocity_at
from ngdiag.sensitivity.result import SensitivityResult

__all__ = ["norm_sensitivity", "FIXED_GRID_SOLVERS", "ADAPTIVE_SOLVERS"]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]

#: torchdiffeq solvers run on ``continuous_substeps`` equal substeps per interval.
FIXED_GRID_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
#: torchdiffeq solvers that choose their steps from ``rtol`` / ``atol``.
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

_METHODS = ("discrete", "continuous")
_ZERO_GRADIENT = (
    "the reward does not depend on the image (its gradient is zero); make sure it is differentiable "
    "and not computed under torch.no_grad() or on detached tensors"
)


def norm_sensitivity(
    velocity: Velocity,
    x_init: torch.Tensor,
    times: Union[torch.Tensor, Sequence[float]],
    reward: Reward,
    *,
    method: str = "discrete",
    checkpoint: bool = True,
    return_adjoint: bool = False,
    solver: str = "rk4",
    continuous_substeps: int = 4,
    rtol: float = 1e-7,
    atol: float = 1e-9,
) -> SensitivityResult:
    """Per-step, per-sample sensitivity of a reward to the velocity's magnitude (paper eq. 4-5).

    Args:
        velocity: ``v(x, t) -> tensor like x`` with ``t`` a tensor of shape ``(B,)`` in ``[0, 1]``
            (in ``x``'s dtype and device). It may close over conditioning and classifier-free
            guidance: pass the velocity the sampler applies. An ``nn.Module`` is fine; gradients
            are taken with respect to inputs only, so no parameter ``.grad`` is accumulated.
        x_init: ``(B, ...)`` noise at ``times[0]``. The sampler runs in its dtype (and, as diffusers'
            scheduler does, continues in the velocity's dtype after the first step).
        times: ``(K + 1,)`` strictly decreasing times in ``[0, 1]`` (a diffusers sigma schedule,
            ``t_0 = 1`` is noise, ``t_K = 0`` data), checked by :func:`ngdiag.core.sampling.check_schedule`.
        reward: ``R(x_K) -> (B,)``, one differentiable reward per sample (it may decode latents).
        method: ``"discrete"`` (exact gradient of the Euler sampler) or ``"continuous"``
            (:func:`torchdiffeq.odeint_adjoint` on the ODE).
        checkpoint: discrete method only. ``True`` stores the states and recomputes the velocity
            one step at a time in the backward walk (activation memory of one velocity call,
            one extra forward per step); ``False`` keeps the graph of the whole sampler
            (activation memory grows with ``K``, no recomputation). Same result either way.
        return_adjoint: also return the adjoints ``a_0 ... a_K`` (``(K + 1, B, ...)`` float64, CPU).
        solver: continuous method only, a torchdiffeq method: one of :data:`FIXED_GRID_SOLVERS`
            (``continuous_substeps`` equal steps per interval) or :data:`ADAPTIVE_SOLVERS`
            (``rtol`` / ``atol``). The adjoint ODE uses the same solver.
        continuous_substeps: substeps per interval for fixed-grid solvers.
        rtol, atol: tolerances for adaptive solvers.

    Returns:
        A :class:`SensitivityResult` with ``S`` of shape ``(K, B)`` (float64, CPU).

    Raises:
        ConfigError: bad shapes, a schedule that is not strictly decreasing in ``[0, 1]``, an unknown
            method or solver, a velocity or reward returning the wrong shape.
        NumericalError: a non-finite velocity, reward or adjoint (the message names the step).
        NgdiagError: a reward whose gradient is zero, or a velocity that carries no gradient.
    """
    times = _check_inputs(x_init, times, method, solver, continuous_substeps, rtol, atol)
    x_init = x_init.detach().clone()  # also turns an inference-mode tensor into a normal one
    if method == "discrete" and checkpoint:
        x_final, rewards, adjoints, S = _discrete_checkpointed(velocity, x_init, times, reward, return_adjoint)
    elif method == "discrete":
        x_final, rewards, adjoints, S = _discrete_full_graph(velocity, x_init, times, reward)
    else:
        x_final, rewards, adjoints, S = _continuous(
            velocity, x_init, times, reward, solver, continuous_substeps, rtol, atol, return_adjoint
        )
    return SensitivityResult(
        S=S,
        times=times.detach().to("cpu", torch.float64),
        reward=rewards,
        x_final=x_final.detach().cpu(),
        method=method,
        adjoint=torch.stack([a.detach().to("cpu", torch.float64) for a in adjoints]) if return_adjoint else None,
    )


# ----------------------------------------------------------------------------------------------
# Input checks and helpers
# ----------------------------------------------------------------------------------------------


def _check_inputs(x_init, times, method, solver, continuous_substeps, rtol, atol) -> torch.Tensor:
    if method not in _METHODS:
        raise ConfigError(f"unknown sensitivity method {method!r}; expected one of {', '.join(_METHODS)}")
    if not isinstance(x_init, torch.Tensor) or x_init.dim() < 2 or x_init.numel() == 0:
        shape = tuple(x_init.shape) if isinstance(x_init, torch.Tensor) else type(x_init).__name__
        raise ConfigError(f"x_init must be a non-empty tensor of shape (B, ...), got {shape}")
    if not x_init.is_floating_point():
        raise ConfigError(f"x_init must be a floating-point tensor, got {x_init.dtype}")
    times = check_schedule(times).detach().cpu()
    if method == "continuous":
        if solver not in FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS:
            raise ConfigError(
                f"unknown ODE solver {solver!r}; expected one of {', '.join(FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS)}"
            )
        if isinstance(continuous_substeps, bool) or not isinstance(continuous_substeps, int) or continuous_substeps < 1:
            raise ConfigError(f"continuous_substeps must be a positive integer, got {continuous_substeps!r}")
        if not (rtol > 0 and atol > 0):
            raise ConfigError(f"rtol and atol must be positive, got rtol={rtol!r}, atol={atol!r}")
    return times


def _at_step(k: int, times: torch.Tensor) -> str:
    return f"at step {k} (t={float(times[k]):.4g})"


def _checked_steps(times: torch.Tensor, needs_grad: bool) -> Callable[[StepRecord], None]:
    """Step callback: the applied velocity is finite and, for a graph, carries a gradient."""

    def check(step: StepRecord) -> None:
        v = step.velocity.step_velocity
        check_finite(v, f"the velocity is not finite {_at_step(step.step, times)}")
        if needs_grad and not v.requires_grad:
            raise _no_gradient(step.step, times)

    return check


def _check_reward(R, batch: int) -> torch.Tensor:
    if not isinstance(R, torch.Tensor) or tuple(R.shape) != (batch,):
        got = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise ConfigError(f"the reward must return a tensor of shape ({batch},), one value per sample, got {got}")
    check_finite(R, "the reward is not finite")
    if not R.requires_grad:
        raise NgdiagError(_ZERO_GRADIENT)
    return R


def _check_reward_gradient(a: Optional[torch.Tensor], final_step: int) -> torch.Tensor:
    if a is None or not bool(a.detach().ne(0).any()):
        raise NgdiagError(_ZERO_GRADIENT)
    check_finite(a, f"the reward gradient is not finite at the final state (step {final_step})")
    return a


def _no_gradient(k: int, times: torch.Tensor) -> NgdiagError:
    return NgdiagError(
        f"the velocity carries no gradient {_at_step(k, times)}; it must be differentiable in x "
        "(is it computed under torch.no_grad()?)"
    )


def _dot(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-sample dot product in float64, on CPU: (B,)."""
    return (a.double() * d.double()).reshape(a.shape[0], -1).sum(dim=1).cpu()


def _applied_velocity(states: List[torch.Tensor], times64: torch.Tensor, k: int) -> torch.Tensor:
    """``d_k = (x_{k+1} - x_k) / |t_{k+1} - t_k|`` in float64, from the stored states."""
    return (states[k + 1].double() - states[k].double()) / abs(float(times64[k + 1] - times64[k]))


# ----------------------------------------------------------------------------------------------
# Discrete method
# ----------------------------------------------------------------------------------------------


def _discrete_checkpointed(velocity, x_init, times, reward, keep_adjoints):
    steps, batch = times.numel() - 1, x_init.shape[0]
    times64 = times.double()
    states = sample(velocity, x_init, times, callback=_checked_steps(times, False), keep_states=True).states

    x_final = states[-1].detach().requires_grad_(True)
    with torch.enable_grad():
        R = _check_reward(reward(x_final), batch)
        (a,) = torch.autograd.grad(R.sum(), x_final, allow_unused=True)
    a = _check_reward_gradient(a, steps)

    # Accumulate the adjoint in at least float32 even when the model runs in half precision.
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    adjoints = [a]
    S = torch.empty(steps, batch, dtype=torch.float64)
    for k in reversed(range(steps)):
        S[k] = _dot(a, _applied_velocity(states, times64, k))
        if k == 0 and not keep_adjoints:
            break  # a_0 is not needed for S (S_k uses a_{k+1}): skip the last VJP
        a = _adjoint_step(velocity, states[k], times, k, a)
        if keep_adjoints:
            adjoints.append(a)
    adjoints.reverse()
    return states[-1], R.detach().to("cpu", torch.float64), adjoints, S


def _adjoint_step(velocity, x_k: torch.Tensor, times: torch.Tensor, k: int, a: torch.Tensor) -> torch.Tensor:
    """``a_k = a_{k+1} + J_k^T a_{k+1}`` with ``J_k`` the Jacobian of step ``k``'s update ``dt_k v(x_k, t_k)``.

    The step is recomputed under autograd exactly as :func:`~ngdiag.core.sampling.sample` took it
    (:func:`~ngdiag.core.sampling.velocity_at`, :func:`~ngdiag.core.sampling.euler_step`). The state's own
    path through the step contributes the identity, added here in the adjoint's precision.
    """
    x = x_k.detach().requires_grad_(True)
    with torch.enable_grad():
        v = velocity_at(velocity, x, batch_time(times[k], x), lambda: _at_step(k, times)).step_velocity
        if not v.requires_grad:
            raise _no_gradient(k, times)
        x_next = euler_step(x.detach(), v, times[k].to(x.device), times[k + 1].to(x.device))
        (vjp,) = torch.autograd.grad(x_next, x, grad_outputs=a.to(x_next.dtype), allow_unused=True)
    if vjp is not None:
        a = a + vjp.to(a.dtype)
    check_finite(a, f"the adjoint is not finite {_at_step(k, times)}")
    return a


def _discrete_full_graph(velocity, x_init, times, reward):
    steps, batch = times.numel() - 1, x_init.shape[0]
    times64 = times.double()
    with torch.enable_grad():
        run = sample(velocity, x_init.requires_grad_(True), times, callback=_checked_steps(times, True),
                     enable_grad=True, keep_states=True)
        states = run.states
        R = _check_reward(reward(states[-1]), batch)
        adjoints = list(torch.autograd.grad(R.sum(), states, allow_unused=True))
    _check_reward_gradient(adjoints[-1], steps)
    for k in reversed(range(steps)):
        if adjoints[k] is None:  # unreachable unless the velocity ignores x
            adjoints[k] = torch.zeros_like(states[k])
        check_finite(adjoints[k], f"the adjoint is not finite {_at_step(k, times)}")
    states = [x.detach() for x in states]
    S = torch.stack([_dot(adjoints[k + 1], _applied_velocity(states, times64, k)) for k in range(steps)])
    return states[-1], R.detach().to("cpu", torch.float64), adjoints, S


# ----------------------------------------------------------------------------------------------
# Continuous method
# ----------------------------------------------------------------------------------------------


class _ScaledField:
    """``f(t, x) = s * v(x, t)`` on one interval, ``s`` of shape ``(B,)`` (torchdiffeq's ``func(t, y)``)."""

    def __init__(self, velocity: Velocity, scale: torch.Tensor, where: str):
        self.velocity = velocity
        self.scale = scale
        self.where = where

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        def where() -> str:
            return f"{self.where} at t={float(t):.4g}"

        v = velocity_at(self.velocity, x, batch_time(t, x), where).step_velocity
        check_finite(v, lambda: f"the velocity is not finite {where()}")
        return self.scale.reshape((-1,) + (1,) * (x.dim() - 1)).to(v.dtype) * v.to(x.dtype)


def _uniform_grid(substeps: int):
    def grid_constructor(func, y0, t):
        grid = torch.linspace(float(t[0]), float(t[-1]), substeps + 1, dtype=t.dtype, device=t.device)
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    return grid_constructor


def _continuous(velocity, x_init, times, reward, solver, substeps, rtol, atol, keep_adjoints):
    steps, batch = times.numel() - 1, x_init.shape[0]
    times64 = times.double()
    options = {"grid_constructor": _uniform_grid(substeps)} if solver in FIXED_GRID_SOLVERS else None
    scales = [torch.ones(batch, dtype=x_init.dtype, device=x_init.device, requires_grad=True) for _ in range(steps)]

    # Integrate interval by interval so the solver never steps across a breakpoint t_k (where
    # s jumps) and the backward pass can report the interval where something goes wrong.
    starts, ends, x = [], [], x_init
    with torch.enable_grad():
        for k in range(steps):
            where = f"in step {k} (t from {float(times[k]):.4g} to {float(times[k + 1]):.4g})"
            start = x.detach().requires_grad_(True)
            span = times[k : k + 2].to(device=x.device, dtype=x.dtype)
            try:
                end = odeint_adjoint(
                    _ScaledField(velocity, scales[k], where), start, span,
                    method=solver, options=options, rtol=rtol, atol=atol, adjoint_params=(scales[k],),
                )[-1]
            except AssertionError as err:  # torchdiffeq's way of failing (e.g. 'underflow in dt')
                raise NumericalError(f"the ODE solver failed {where}: {err}") from None
            starts.append(start)
            ends.append(end)
            x = end
        x_final = ends[-1].detach().requires_grad_(True)
        R = _check_reward(reward(x_final), batch)
        (a,) = torch.autograd.grad(R.sum(), x_final, allow_unused=True)
    a = _check_reward_gradient(a, steps)

    adjoints = [a]
    S = torch.empty(steps, batch, dtype=torch.float64)
    for k in reversed(range(steps)):
        where = f"in step {k} (t from {float(times[k]):.4g} to {float(times[k + 1]):.4g})"
        try:
            a, dR_ds = torch.autograd.grad(ends[k], (starts[k], scales[k]), grad_outputs=a)
        except AssertionError as err:
            raise NumericalError(f"the ODE solver failed on the adjoint {where}: {err}") from None
        check_finite((a, dR_ds), f"the adjoint is not finite {where}")
        S[k] = dR_ds.detach().double().cpu() / abs(float(times64[k + 1] - times64[k]))
        if keep_adjoints:
            adjoints.append(a)
    adjoints.reverse()
    return x_final.detach(), R.detach().to("cpu", torch.float64), adjoints, S
