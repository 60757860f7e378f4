"""Reward-weighted flow matching (:func:`ngdiag.train.losses.flow_matching_loss`): config and loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngdiag.core.configs import check_choice, check_positive
from ngdiag.train.losses import LossTerms, flow_matching_loss
from ngdiag.train.methods.base import Method, MicroBatch, Points, Velocities

__all__ = ["FMConfig", "FlowMatching", "FM_WEIGHTINGS"]

FM_WEIGHTINGS = ("positive", "exp", "uniform")


@dataclass
class FMConfig:
    """Reward-weighted flow matching on the rollouts (:func:`ngdiag.train.losses.flow_matching_loss`).

    ``weighting``: ``"positive"`` trains on rollouts with a positive advantage (weight 1, else 0);
    ``"exp"`` uses ``w_i = exp(A_i / temperature)`` normalized to mean 1 over the iteration's
    rollouts; ``"uniform"`` is plain flow matching on the model's own samples (a control).
    """

    weighting: str = "positive"
    temperature: float = 1.0

    def validate(self) -> None:
        check_choice("fm.weighting", self.weighting, FM_WEIGHTINGS)
        check_positive("fm.temperature", self.temperature)

    def weights(self, advantages: torch.Tensor) -> torch.Tensor:
        """The per-rollout weights of all the iteration's rollouts, from their advantages."""
        if self.weighting == "uniform":
            return torch.ones_like(advantages)
        if self.weighting == "positive":
            return (advantages > 0).to(advantages.dtype)
        w = torch.exp(advantages / float(self.temperature))
        return w / w.mean()


class FlowMatching(Method):
    """Flow matching on the model's own rollouts, weighted by their advantages."""

    name = "fm"
    settings_class = FMConfig

    def base_loss(self, batch: MicroBatch, points: Points, v: Velocities) -> LossTerms:
        weight = self.settings.weights(batch.rollouts.advantages)[list(batch.units)]
        fm = flow_matching_loss(v.theta, points.x0, points.eps,
                                weight=weight.to(device=points.x0.device, dtype=torch.float32))
        value = float(fm.detach())
        return LossTerms(total=fm, terms={"loss": value, "fm_loss": value})
