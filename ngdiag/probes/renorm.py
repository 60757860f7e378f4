"""Inference-time velocity renormalization (paper eq. 2 and 3; CONVENTIONS "Inference-time renormalization").

Both interventions keep the direction of a velocity and replace its per-sample norm by a target norm:

- RL renorm (eq. 3): ``v' = v_theta * ||v_ref|| / ||v_theta||``, the audited model's velocity brought
  back to the reference's magnitude (on the guided velocity by default, ``cond`` as an option; the
  caller chooses which velocities to pass).
- CFG renorm (eq. 2): ``v' = v_cfg * ||v_cond|| / ||v_cfg||``, the guided velocity brought back to the
  magnitude of the conditional one.

A zero or non-finite norm is never turned into a silent NaN: :func:`check_finite_norms` raises
:class:`~ngdiag.errors.NumericalError` naming the velocity, the step and the samples.

Example:
    >>> import torch
    >>> from ngdiag.probes.renorm import rl_renorm
    >>> rl_renorm(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]]))
    tensor([[0.6000, 0.8000]])
"""

from __future__ import annotations

from typing import Optional

import torch

from ngdiag.errors import ConfigError, NumericalError, sample_list
from ngdiag.probes.metrics import velocity_norm

__all__ = ["rl_renorm", "cfg_renorm", "check_finite_norms", "check_finite_tensor"]



def _where(step: Optional[int]) -> str:
    return "" if step is None else f" at step {int(step)}"


def check_finite_norms(norms: torch.Tensor, *, what: str, step: Optional[int] = None) -> None:
    """Raise when any per-sample norm is zero or non-finite.

    Args:
        norms: per-sample norms, shape ``(B,)``.
        what: the velocity's name for the message (``"v_theta"``, ``"v_cfg"``...).
        step: step index for the message, if known.

    Raises:
        NumericalError: e.g. ``"v_theta has a zero or non-finite norm at step 3 for samples [0, 2]"``.
    """
    norms = torch.as_tensor(norms).detach()
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        raise NumericalError(f"{what} has a zero or non-finite norm{_where(step)} for samples {sample_list(bad)}")


def check_finite_tensor(v: torch.Tensor, *, what: str, step: Optional[int] = None) -> None:
    """Raise when any element of a velocity is NaN or infinite.

    Args:
        v: velocity of shape ``(B, ...)``.
        what: the velocity's name for the message.
        step: step index for the message, if known.

    Raises:
        NumericalError: e.g. ``"v_ref has non-finite values at step 3 for samples [1]"``, listing every
            sample with at least one non-finite element.
    """
    v = v.detach()
    if v.dim() == 0:
        raise ConfigError(f"{what} needs a batch dimension, got a 0-dim tensor")
    bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise NumericalError(f"{what} has non-finite values{_where(step)} for samples {sample_list(bad)}")


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
