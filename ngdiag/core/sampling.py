"""Euler sampling of flow-matching models, step for step as diffusers does it.

Time convention (see ``docs/conventions.md``): ``x_t = (1 - t) x0 + t eps``, ``t = 1`` is noise,
``t = 0`` data, velocity ``v = eps - x0``. A schedule is a decreasing tensor ``sigmas`` of
``K + 1`` values from ``t_0`` (about 1) to ``t_K = 0``; step ``k`` goes from ``sigmas[k]`` to
``sigmas[k + 1]`` with::

    x_{k+1} = x_k + (t_{k+1} - t_k) * v_k

computed exactly as ``FlowMatchEulerDiscreteScheduler.step`` computes it (state upcast to
float32, result cast back to the velocity's dtype).

Every model follows one contract: ``v = model(x, t, **cond)`` with ``t`` a float tensor of shape
``(B,)`` in ``[0, 1]``. :class:`GuidedVelocity` adds classifier-free guidance on top of it
(:func:`apply_guidance` is the one guidance formula, Qwen-Image's per-token rescale included);
:func:`sample` runs the loop with a per-step callback (what probes record), an intervention that
replaces the velocity a step applies (renormalization), and an ``enable_grad`` flag. The
reward adjoint (:mod:`ngdiag.sensitivity.adjoint`) differentiates this very loop: it runs
:func:`sample` forward and recomputes single steps with :func:`velocity_at` and :func:`euler_step`.

Example:
    >>> import torch
    >>> from ngdiag.core.sampling import sample
    >>> x1 = torch.ones(2, 3)
    >>> sigmas = torch.tensor([1.0, 0.5, 0.0])
    >>> out = sample(lambda x, t: x, x1, sigmas)   # dx/dt = x, integrated from t=1 to t=0
    >>> out.x_final
    tensor([[0.2500, 0.2500, 0.2500],
            [0.2500, 0.2500, 0.2500]])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Union

import torch

from ngdiag.core.errors import ConfigError

__all__ = [
    "VelocityModel",
    "VelocityEval",
    "GuidedVelocity",
    "apply_guidance",
    "GUIDANCE_RESCALES",
    "StepRecord",
    "SampleResult",
    "euler_step",
    "batch_time",
    "velocity_at",
    "sample",
    "check_schedule",
]


class VelocityModel(Protocol):
    """The velocity contract: ``v = model(x, t, **cond)``, ``t`` of shape ``(B,)`` in ``[0, 1]``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor: ...


@dataclass
class VelocityEval:
    """Velocities computed at one ``(x_t, t)``.

    Attributes:
        cond: the conditional model output, shape of ``x``.
        guided: the velocity after guidance (equals ``cond`` without CFG).
        uncond: the unconditional output when CFG is used, else ``None``.
        applied: the velocity the sampler steps with; ``None`` means ``guided``. Interventions
            (renormalization) and paired evaluations set it.
        extras: anything a paired or probing evaluation wants to pass to the step callback.
    """

    cond: torch.Tensor
    guided: torch.Tensor
    uncond: Optional[torch.Tensor] = None
    applied: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)

    @property
    def step_velocity(self) -> torch.Tensor:
        return self.guided if self.applied is None else self.applied


def _cat_cond(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    out = {}
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor) and va.dim() > 0 and vb is not None:
            out[key] = torch.cat([va, vb], dim=0)
        else:
            out[key] = va
    return out


GUIDANCE_RESCALES = (None, "token_norm")


def apply_guidance(
    v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float, rescale: Optional[str] = None
) -> torch.Tensor:
    """The guided velocity from the conditional and unconditional ones, as the pipelines compute it.

    ``v_uncond + w * (v_cond - v_uncond)``; with ``rescale="token_norm"`` the result is then
    rescaled per token to the conditional velocity's norm over the last (channel) axis, as
    QwenImagePipeline does (``comb * ||cond||_-1 / ||comb||_-1``).
    """
    if rescale not in GUIDANCE_RESCALES:
        raise ConfigError(f"unknown guidance rescale {rescale!r}; use None or 'token_norm'")
    guided = v_uncond + guidance_scale * (v_cond - v_uncond)
    if rescale == "token_norm":
        guided = guided * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
    return guided


class GuidedVelocity:
    """Classifier-free guidance around a velocity model.

    ``v_guided = v_uncond + w * (v_cond - v_uncond)`` when ``uncond`` is given and ``w != 1``
    (exactly the expression the diffusers pipelines use); otherwise ``v_guided = v_cond``.

    Args:
        model: any :class:`VelocityModel`.
        cond: keyword arguments for the conditional call (prompt embeddings...).
        uncond: keyword arguments for the unconditional call, or ``None`` for no CFG.
        guidance_scale: ``w``.
        batched: evaluate uncond and cond in one forward on the concatenated batch
            ``[uncond; cond]``, as StableDiffusion3Pipeline does.
        rescale: ``None``, or ``"token_norm"``: after CFG, rescale the guided velocity of every token
            to the norm of the conditional one over the last (channel) axis, as QwenImagePipeline
            does (``comb * ||cond||_-1 / ||comb||_-1``). This is part of the guided velocity.
    """

    def __init__(
        self,
        model: VelocityModel,
        cond: Optional[Mapping[str, Any]] = None,
        uncond: Optional[Mapping[str, Any]] = None,
        guidance_scale: float = 1.0,
        batched: bool = False,
        rescale: Optional[str] = None,
    ):
        if rescale not in GUIDANCE_RESCALES:
            raise ConfigError(f"unknown guidance rescale {rescale!r}; use None or 'token_norm'")
        self.model = model
        self.cond = dict(cond or {})
        self.uncond = None if uncond is None else dict(uncond)
        self.guidance_scale = float(guidance_scale)
        self.batched = batched
        self.rescale = rescale

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> VelocityEval:
        if not self.uses_cfg:
            v = self.model(x, t, **self.cond)
            return VelocityEval(cond=v, guided=v)
        if self.batched:
            both = self.model(torch.cat([x, x]), torch.cat([t, t]), **_cat_cond(self.uncond, self.cond))
            v_uncond, v_cond = both.chunk(2)
        else:
            v_cond = self.model(x, t, **self.cond)
            v_uncond = self.model(x, t, **self.uncond)
        return VelocityEval(cond=v_cond, guided=self.guide(v_cond, v_uncond), uncond=v_uncond)

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """This velocity's guidance applied to a conditional and an unconditional output (:func:`apply_guidance`)."""
        return apply_guidance(v_cond, v_uncond, self.guidance_scale, self.rescale)


@dataclass
class StepRecord:
    """What the per-step callback receives.

    Attributes:
        step: index ``k``.
        t, t_next: ``sigmas[k]`` and ``sigmas[k + 1]`` as floats.
        x: the state ``x_k`` at ``t``, shape ``(B, ...)``.
        x_next: the state after the step.
        velocity: the :class:`VelocityEval` at ``(x_k, t_k)``.
    """

    step: int
    t: float
    t_next: float
    x: torch.Tensor
    x_next: torch.Tensor
    velocity: VelocityEval

    @property
    def v_cond(self) -> torch.Tensor:
        return self.velocity.cond

    @property
    def v_guided(self) -> torch.Tensor:
        return self.velocity.guided


@dataclass
class SampleResult:
    """Output of :func:`sample`.

    Attributes:
        x_final: the state at ``sigmas[-1]``, shape of ``x_init``.
        sigmas: the schedule used, ``(K + 1,)``.
        states: ``[x_0, ..., x_K]`` when ``keep_states`` was set, else ``None``.
    """

    x_final: torch.Tensor
    sigmas: torch.Tensor
    states: Optional[list] = None


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step, the same arithmetic as ``FlowMatchEulerDiscreteScheduler.step``.

    ``sigma`` and ``sigma_next`` are 0-dim tensors from the schedule. Low-precision states are
    upcast to float32 for the update, as the scheduler does (float64 stays float64); ``dt * v`` is
    computed in ``v``'s dtype and the new state is returned in ``v``'s dtype. The sampler and the
    reward adjoint both step with this function, so these casts are the same in both.
    """
    dt = sigma_next - sigma
    return (x.to(torch.promote_types(x.dtype, torch.float32)) + dt * v).to(v.dtype)


def check_schedule(sigmas) -> torch.Tensor:
    """Validate a schedule: 1-D floats, at least two values, finite, strictly decreasing, within [0, 1].

    A sequence of Python floats becomes a float64 tensor (the values as given); a tensor is
    returned as it is, so a diffusers float32 schedule stays float32.
    """
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if not sigmas.is_floating_point():
        raise ConfigError(f"a schedule needs floating-point times, got {sigmas.dtype}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ConfigError(f"a schedule needs a 1-D tensor of at least 2 times, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ConfigError("the schedule contains non-finite times")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ConfigError("the schedule must be strictly decreasing (t=1 is noise, t=0 is data)")
    if sigmas.min() < 0 or sigmas.max() > 1:
        raise ConfigError("schedule times must lie in [0, 1] (diffusers sigmas, not timesteps in 0..1000)")
    return sigmas


def batch_time(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model's ``t`` for the state ``x``: the schedule time ``sigma`` (0-dim) as ``(B,)`` in ``x``'s dtype and device."""
    return sigma.reshape(()).expand(x.shape[0]).to(device=x.device, dtype=x.dtype)


def velocity_at(velocity: Callable[..., Any], x: torch.Tensor, t: torch.Tensor, where: Callable[[], str]) -> VelocityEval:
    """Evaluate a step velocity at ``(x, t)`` as :func:`sample` does, and check what it returns.

    ``velocity(x, t)`` may return a tensor (taken as the guided velocity) or a :class:`VelocityEval`;
    the velocity the step applies must be a tensor of ``x``'s shape (its dtype may differ).
    ``where()`` names the place in messages (``"at step 3 (t=0.5)"``).

    Raises:
        ConfigError: the velocity returns something else.
    """
    out = velocity(x, t)
    ev = out if isinstance(out, VelocityEval) else VelocityEval(cond=out, guided=out)
    v = ev.step_velocity
    if not isinstance(v, torch.Tensor):
        raise ConfigError(f"the velocity must return a tensor, got {type(v).__name__} {where()}")
    if v.shape != x.shape:
        raise ConfigError(f"the velocity returned shape {tuple(v.shape)} {where()}, expected {tuple(x.shape)} like x")
    return ev


def sample(
    velocity: Union[VelocityModel, GuidedVelocity, Callable[..., Any]],
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Optional[Callable[[StepRecord], None]] = None,
    intervention: Optional[Callable[[int, torch.Tensor, VelocityEval], torch.Tensor]] = None,
    enable_grad: bool = False,
    keep_states: bool = False,
) -> SampleResult:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    Args:
        velocity: a :class:`VelocityModel` called as ``velocity(x, t)`` (conditioning already bound),
            a :class:`GuidedVelocity`, or any callable returning a tensor or a :class:`VelocityEval`.
        x_init: the state at ``sigmas[0]``, shape ``(B, ...)``.
        sigmas: decreasing schedule of ``K + 1`` times (float32 for diffusers parity), checked by
            :func:`check_schedule`.
        callback: called after every step with a :class:`StepRecord`.
        intervention: ``f(step, t, eval) -> v`` replacing the velocity the step applies
            (e.g. :func:`ngdiag.probes.renorm.rl_renorm_intervention`); ``eval.applied`` is set to its
            result.
        enable_grad: keep the autograd graph (for adjoints); default is no graph.
        keep_states: also return the list of all states ``x_0 ... x_K``.

    Raises:
        ConfigError: a bad schedule, or a velocity that returns no tensor of ``x``'s shape.
    """
    sigmas = check_schedule(sigmas)
    states = [x_init] if keep_states else None
    grad_ctx = contextlib.nullcontext() if enable_grad else torch.no_grad()
    x = x_init
    with grad_ctx:
        for k in range(sigmas.numel() - 1):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            t = batch_time(sigma, x)
            ev = velocity_at(velocity, x, t, lambda k=k, sigma=sigma: f"at step {k} (t={float(sigma):.4g})")
            if intervention is not None:
                ev.applied = intervention(k, t, ev)
            x_next = euler_step(x, ev.step_velocity, sigma.to(x.device), sigma_next.to(x.device))
            if callback is not None:
                callback(StepRecord(k, float(sigma), float(sigma_next), x, x_next, ev))
            x = x_next
            if keep_states:
                states.append(x)
    return SampleResult(x_final=x, sigmas=sigmas, states=states)
