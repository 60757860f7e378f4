"""Inference-time velocity renormalization (paper eq. 2 and 3; CONVENTIONS "Inference-time renormalization").

Both interventions keep the direction of a velocity and replace its per-sample norm by a target norm:

- RL renorm (eq. 3): ``v' = v_theta * ||v_ref|| / ||v_theta||``, the audited model's velocity brought
  back to the reference's magnitude (on the guided velocity by default, ``cond`` as an option; the
  caller chooses which velocities to pass).
- CFG renorm (eq. 2): ``v' = v_cfg * ||v_cond|| / ||v_cfg||``, the guided velocity brought back to the
  magnitude of the conditional one.

:func:`rl_renorm` and :func:`cfg_renorm` work on tensors. In sampling they act as interventions of
:func:`ngdiag.core.sampling.sample`, which hands them the step index: :func:`rl_renorm_intervention` (with
a :class:`~ngdiag.probes.paired.PairedVelocity`, whose evaluation carries the reference's
velocities) and :func:`cfg_renorm_intervention` (theta alone suffices). The live probe applies the
same interventions inside a pipeline call, so both give the same images bit for bit.

A zero or non-finite norm is never turned into a silent NaN:
:func:`~ngdiag.core.tensors.check_finite_norms` raises :class:`~ngdiag.core.errors.NumericalError` naming
the velocity, the step and the samples.

Example:
    >>> import torch
    >>> from ngdiag.probes.renorm import rl_renorm
    >>> rl_renorm(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]]))
    tensor([[0.6000, 0.8000]])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ngdiag.core.tensors import check_finite_norms, velocity_norm
from ngdiag.core.errors import ConfigError
from ngdiag.probes.paired import check_pair_finite
from ngdiag.core.sampling import GuidedVelocity, VelocityEval

__all__ = ["rl_renorm", "cfg_renorm", "rl_renorm_intervention", "cfg_renorm_intervention", "RENORM_TARGETS"]

#: What RL renormalization rescales: the guided velocity, or each call (cond, uncond) before guidance.
RENORM_TARGETS = ("guided", "cond")

Intervention = Callable[[int, torch.Tensor, VelocityEval], torch.Tensor]


def _renorm(
    v: torch.Tensor, target: torch.Tensor, *, what: str, target_what: str, step: Optional[int]
) -> torch.Tensor:
    if v.shape != target.shape:
        raise ConfigError(
            f"{what} and {target_what} must have the same shape, got {tuple(v.shape)} and {tuple(target.shape)}"
        )
    norm = velocity_norm(v)
    target_norm = velocity_norm(target)
    check_finite_norms(norm, what=what, step=step)
    check_finite_norms(target_norm, what=target_what, step=step)
    scale = (target_norm / norm).reshape(-1, *([1] * (v.dim() - 1)))
    return (v.to(scale.dtype) * scale).to(v.dtype)


def rl_renorm(v_theta: torch.Tensor, v_ref: torch.Tensor, *, step: Optional[int] = None) -> torch.Tensor:
    """RL renorm, paper eq. 3: ``v' = v_theta * ||v_ref|| / ||v_theta||`` per sample.

    Args:
        v_theta: velocity of the model under audit, shape ``(B, ...)``.
        v_ref: reference velocity at the same ``(x_t, t, c)``, same shape.
        step: step index, only used in error messages.

    Returns:
        Tensor of ``v_theta``'s shape and dtype with ``v_theta``'s direction and ``v_ref``'s norm. The
        scale is computed in float32 (float64 for float64 inputs); autograd is kept.

    Raises:
        ConfigError: the shapes differ.
        NumericalError: ``v_theta`` or ``v_ref`` has a zero or non-finite norm for some sample.
    """
    return _renorm(v_theta, v_ref, what="v_theta", target_what="v_ref", step=step)


def cfg_renorm(v_cfg: torch.Tensor, v_cond: torch.Tensor, *, step: Optional[int] = None) -> torch.Tensor:
    """CFG renorm, paper eq. 2: ``v' = v_cfg * ||v_cond|| / ||v_cfg||`` per sample.

    Args:
        v_cfg: guided velocity ``v_uncond + w (v_cond - v_uncond)``, shape ``(B, ...)``.
        v_cond: conditional velocity at the same ``(x_t, t, c)``, same shape.
        step: step index, only used in error messages.

    Returns:
        Tensor of ``v_cfg``'s shape and dtype with ``v_cfg``'s direction and ``v_cond``'s norm.

    Raises:
        ConfigError: the shapes differ.
        NumericalError: ``v_cfg`` or ``v_cond`` has a zero or non-finite norm for some sample.
    """
    return _renorm(v_cfg, v_cond, what="v_cfg", target_what="v_cond", step=step)


def rl_renorm_intervention(
    on: str = "guided", *, guidance: Optional[GuidedVelocity] = None, sample_ids: Optional[Sequence[int]] = None
) -> Intervention:
    """RL renorm (eq. 3) as an intervention of :func:`ngdiag.core.sampling.sample` on a paired trajectory.

    The step velocity must be a :class:`~ngdiag.probes.paired.PairedVelocity` (its evaluation
    carries the reference's in ``extras["ref"]``). Every step first checks that theta's and ref's
    guided velocities are finite (:func:`~ngdiag.probes.paired.check_pair_finite`), then applies

    - ``on="guided"``: theta's guided velocity rescaled to the norm of ref's guided velocity;
    - ``on="cond"``: theta's conditional and unconditional outputs each rescaled to ref's, then
      ``guidance``'s own guidance (:meth:`~ngdiag.core.sampling.GuidedVelocity.guide`, Qwen-Image's
      per-token rescale included).

    Args:
        on: ``"guided"`` or ``"cond"``.
        guidance: theta's :class:`~ngdiag.core.sampling.GuidedVelocity`; needed for ``on="cond"``.
        sample_ids: global sample ids for error messages.
    """
    if on not in RENORM_TARGETS:
        raise ConfigError(f"renorm_on must be 'guided' or 'cond', got {on!r}")
    if on == "cond" and guidance is None:
        raise ConfigError("RL renormalization on 'cond' needs theta's guidance to combine the renormalized calls")

    def intervene(step: int, t: torch.Tensor, ev: VelocityEval) -> torch.Tensor:
        ref = _reference(ev)
        check_pair_finite(ev, step=step, t=t[0], sample_ids=sample_ids)
        if on == "guided":
            return rl_renorm(ev.guided, ref.guided, step=step)
        cond = rl_renorm(ev.cond, ref.cond, step=step)
        if ev.uncond is None:
            return cond
        return guidance.guide(cond, rl_renorm(ev.uncond, ref.uncond, step=step))

    return intervene


def cfg_renorm_intervention(*, sample_ids: Optional[Sequence[int]] = None) -> Intervention:
    """CFG renorm (eq. 2) as an intervention of :func:`ngdiag.core.sampling.sample`: theta's guided velocity
    rescaled to the norm of its own conditional output.

    It needs no reference: the step velocity may be theta's :class:`~ngdiag.core.sampling.GuidedVelocity`
    or a :class:`~ngdiag.probes.paired.PairedVelocity` (both give the same steps). The guided
    velocities are checked to be finite first (theta's, and ref's when present).
    """

    def intervene(step: int, t: torch.Tensor, ev: VelocityEval) -> torch.Tensor:
        check_pair_finite(ev, step=step, t=t[0], sample_ids=sample_ids)
        return cfg_renorm(ev.guided, ev.cond, step=step)

    return intervene


def _reference(ev: VelocityEval) -> VelocityEval:
    if "ref" not in ev.extras:
        raise ConfigError("RL renormalization needs the reference's velocity: sample with a PairedVelocity")
    return ev.extras["ref"]
