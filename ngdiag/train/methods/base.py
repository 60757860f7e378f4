"""What a training method is to the trainer: the velocities it needs and its loss on a micro batch.

A method (one module each: :mod:`~ngdiag.train.methods.nft`, ``awm``, ``dpo``, ``fm``) defines its
config section (a dataclass with ``validate()``) beside a :class:`Method` subclass that says

- which forwards its loss needs: :attr:`Method.uses_old_policy` (``v_old``, the EMA of the LoRA
  weights) and :attr:`Method.needs_reference` (``v_ref``, the adapter switched off);
- what an optimizer step splits: :meth:`Method.units` (rollout ids, or (winner, loser) pairs);
- where the loss is evaluated: :meth:`Method.points` (by default one point per rollout);
- its own loss there: :meth:`Method.base_loss`, a call of a pure function of :mod:`ngdiag.train.losses`.

:meth:`Method.loss` puts them together for one :class:`MicroBatch` at one time ``t``: the points,
the velocities there (the trainer's forwards), the base loss plus the NormGuard penalty on the same
velocities (:meth:`Method.penalized`). The trainer owns the models, the optimizer and the
processes; a method never touches them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, List, NamedTuple, Optional, Sequence

import torch

from ngdiag.core.configs import check_nonneg, check_positive
from ngdiag.core.errors import ConfigError
from ngdiag.train.losses import LossTerms, with_normguard

if TYPE_CHECKING:
    from ngdiag.models.families import Conditioning
    from ngdiag.train.config import RolloutConfig
    from ngdiag.train.rollouts import Rollouts

__all__ = [
    "Method", "OldPolicyMethod", "MicroBatch", "Points", "Velocities", "VelocityFn", "StepLoss", "log_ratios",
    "check_old_policy_settings",
]


class Velocities(NamedTuple):
    """The velocities at a batch of training points, each ``(B, ...)`` float32.

    ``theta``: the LoRA'd model, with gradient; ``ref``: the adapter switched off (``None`` when
    neither a loss term nor the ``monitor.ratio`` diagnostic needs it); ``old``: the old policy
    (``None`` for methods without one).
    """

    theta: torch.Tensor
    ref: Optional[torch.Tensor]
    old: Optional[torch.Tensor]


#: ``velocities(x_t, t, cond)``: the trainer's forwards at ``x_t`` (``(B, ...)``), times ``t`` (``(B,)``)
#: and conditioning tensors ``cond`` (a :class:`~ngdiag.models.families.Conditioning`'s ``cond``).
VelocityFn = Callable[[torch.Tensor, torch.Tensor, dict], Velocities]


class StepLoss(NamedTuple):
    """A micro batch's loss and the per-sample ``log(||v_theta|| / ||v_ref||)`` (empty without ``v_ref``)."""

    terms: LossTerms
    log_ratios: List[float]


@dataclass
class MicroBatch:
    """One micro batch of training units at one training time ``t``.

    Attributes:
        units: the units (rollout ids, or ``(winner, loser)`` pairs for DPO).
        positions: their positions in the iteration's list of units (they seed the noise).
        t: the training time, shared by the micro batch.
        rollouts: all the iteration's rollouts (final latents, rewards, advantages).
        cond: the conditioning of the units' prompts (no CFG), one row per unit.
        noise_of: ``noise_of(position)``: the noise ``eps`` of the unit at that position and this ``t``.
    """

    units: list
    positions: List[int]
    t: float
    rollouts: "Rollouts"
    cond: "Conditioning"
    noise_of: Callable[[int], torch.Tensor]

    def noise(self) -> torch.Tensor:
        """The units' noise, ``(B, ...)``."""
        return torch.stack([self.noise_of(p) for p in self.positions])

    def advantages(self, like: torch.Tensor) -> torch.Tensor:
        """The advantages of units that are rollout ids, on ``like``'s device."""
        return self.rollouts.advantages[list(self.units)].to(like.device)


class Points(NamedTuple):
    """Training points: clean latents ``x0``, noise ``eps``, ``x_t = (1 - t) x0 + t eps`` (``(B, ...)``)
    and ``t`` (``(B,)``), CONVENTIONS "Time, interpolant, velocity"."""

    x0: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor

    @classmethod
    def at(cls, x0: torch.Tensor, eps: torch.Tensor, t: float) -> "Points":
        """The points of ``x0`` and ``eps`` at the time ``t`` (a float shared by the batch)."""
        t_vec = torch.full((x0.shape[0],), float(t), device=x0.device, dtype=torch.float32)
        return cls(x0, eps, (1.0 - t) * x0 + t * eps, t_vec)


def log_ratios(v_theta: torch.Tensor, v_ref: torch.Tensor) -> List[float]:
    """Per-sample ``log(||v_theta|| / ||v_ref||)`` (detached), as floats."""
    nt = v_theta.detach().reshape(v_theta.shape[0], -1).float().norm(dim=1)
    nr = v_ref.detach().reshape(v_ref.shape[0], -1).float().norm(dim=1)
    return torch.log(nt / nr).double().cpu().tolist()


def check_old_policy_settings(section: str, settings) -> None:
    """The settings an old-policy method's section shares: ``adv_clip_max > 0``, ``kl_beta >= 0`` and
    the old policy's EMA decay ``old_decay`` in ``[0, 1)``."""
    check_positive(f"{section}.adv_clip_max", settings.adv_clip_max)
    check_nonneg(f"{section}.kl_beta", settings.kl_beta)
    if not 0 <= settings.old_decay < 1:
        raise ConfigError(f"{section}.old_decay must lie in [0, 1), got {settings.old_decay}")


class Method(ABC):
    """A training method (see the module docstring). Built from its config section and the NormGuard weight.

    Class attributes:
        name: the config's ``method`` and the name of the method's config section.
        settings_class: the dataclass of that section, defined beside the method.
        uses_old_policy: the loss needs ``v_old`` (the trainer keeps the EMA of the LoRA weights).
        unit: what an optimizer step splits: ``"rollouts"`` or ``"pairs"``.
        min_group_size: the smallest ``rollouts.group_size`` the method works with.
        arms: the parts its velocities stack (DPO: 2, winners then losers).
    """

    name: ClassVar[str]
    settings_class: ClassVar[type]
    uses_old_policy: ClassVar[bool] = False
    unit: ClassVar[str] = "rollouts"
    min_group_size: ClassVar[int] = 1
    arms: ClassVar[int] = 1

    def __init__(self, settings, lam: float):
        self.settings = settings
        self.lam = float(lam)

    # ------------------------------------------------------------------ what it needs
    @property
    def reference_in_loss(self) -> bool:
        """Whether the method's own loss uses ``v_ref`` (a KL to the reference, DPO)."""
        return False

    @property
    def needs_reference(self) -> bool:
        """Whether a loss term needs ``v_ref``: NormGuard (``lam > 0``) or the method's own loss."""
        return self.lam > 0 or self.reference_in_loss

    @property
    def old_decay(self) -> float:
        """``d`` of the old policy's update ``old <- d old + (1 - d) theta`` (0 without an old policy)."""
        return float(self.settings.old_decay) if self.uses_old_policy else 0.0

    # ------------------------------------------------------------------ units
    def units_per_iteration(self, rollouts: "RolloutConfig") -> int:
        """Training units per iteration."""
        return rollouts.samples_per_iteration

    def check_rollouts(self, rollouts: "RolloutConfig") -> None:
        """Refuse rollout settings the method cannot train on (:class:`~ngdiag.core.errors.ConfigError`)."""

    def units(self, rollouts: "Rollouts", group_size: int) -> list:
        """The iteration's training units, in order: by default every rollout id."""
        return list(range(rollouts.x0.shape[0]))

    def prompt_rollouts(self, units: Sequence) -> List[int]:
        """The rollout whose prompt conditions each unit."""
        return list(units)

    # ------------------------------------------------------------------ loss
    def points(self, batch: MicroBatch):
        """``(points, cond)``: the micro batch's training points and their conditioning tensors.

        By default the units are rollout ids: one point per rollout, with the unit's noise.
        """
        return Points.at(batch.rollouts.x0[list(batch.units)], batch.noise(), batch.t), batch.cond.cond

    @abstractmethod
    def base_loss(self, batch: MicroBatch, points: Points, v: Velocities) -> LossTerms:
        """The method's own loss (a pure function of :mod:`ngdiag.train.losses`) at ``points``."""

    def loss(self, batch: MicroBatch, velocities: VelocityFn) -> StepLoss:
        """The loss of one micro batch at one time ``t``, NormGuard included, and its log-ratios."""
        points, cond = self.points(batch)
        v = velocities(points.x_t, points.t, cond)
        return self.penalized(self.base_loss(batch, points, v), v)

    def penalized(self, base: LossTerms, v: Velocities) -> StepLoss:
        """``base`` plus the NormGuard penalty (paper eq. 7-8) on the same velocities, and the log-ratios.

        The velocities stack :attr:`arms` equal parts (DPO: winners then losers); the penalty is the
        mean over all their samples. Without ``v_ref`` (nothing needs it) ``base`` is returned.
        """
        if v.ref is None:
            return StepLoss(base, [])
        if self.arms == 1:
            terms = with_normguard(base, v.theta, v.ref, self.lam)
        else:
            terms = with_normguard(base, v.theta.chunk(self.arms), v.ref.chunk(self.arms), self.lam)
        return StepLoss(terms, log_ratios(v.theta, v.ref))


class OldPolicyMethod(Method):
    """A method that compares the policy with the old policy (NFT, AWM).

    Its section has ``kl_beta`` (a KL to the reference, which then needs ``v_ref``) and
    ``old_decay`` (the old policy's EMA decay).
    """

    uses_old_policy = True

    @property
    def reference_in_loss(self) -> bool:
        return self.settings.kl_beta > 0

    def loss_options(self) -> dict:
        """The section's settings that are keyword arguments of the method's loss function (all but ``old_decay``)."""
        return {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "old_decay"}
