"""Online Diffusion-DPO (:func:`ngdiag.train.losses.dpo_loss`): its config section, pairs and loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Sequence

import torch

from ngdiag.core.configs import check_at_least, check_positive
from ngdiag.core.errors import ConfigError
from ngdiag.train.advantages import dpo_pairs
from ngdiag.train.losses import LossTerms, dpo_loss
from ngdiag.train.methods.base import Method, MicroBatch, Points, Velocities

if TYPE_CHECKING:
    from ngdiag.train.config import RolloutConfig
    from ngdiag.train.rollouts import Rollouts

__all__ = ["DPOConfig", "DPO"]


@dataclass
class DPOConfig:
    """Online Diffusion-DPO (:func:`ngdiag.train.losses.dpo_loss`).

    Pairs are formed in each prompt group: the j-th best rollout against the j-th worst, for
    ``j < pairs_per_group`` (1: best against worst, as Flow-Factory; at most ``group_size // 2``).
    Both arms of a pair share the noise and ``t``.
    """

    beta: float = 2000.0
    pairs_per_group: int = 1

    def validate(self) -> None:
        check_positive("dpo.beta", self.beta)
        check_at_least("dpo.pairs_per_group", self.pairs_per_group, 1)


class DPO(Method):
    """Diffusion-DPO on (winner, loser) pairs of each prompt group; the reference is part of the loss."""

    name = "dpo"
    settings_class = DPOConfig
    unit = "pairs"
    min_group_size = 2
    arms = 2

    @property
    def reference_in_loss(self) -> bool:
        return True

    def units_per_iteration(self, rollouts: "RolloutConfig") -> int:
        return int(rollouts.prompts_per_iteration) * int(self.settings.pairs_per_group)

    def check_rollouts(self, rollouts: "RolloutConfig") -> None:
        if self.settings.pairs_per_group > rollouts.group_size // 2:
            raise ConfigError(
                f"dpo.pairs_per_group must be at most group_size // 2 = {rollouts.group_size // 2}, "
                f"got {self.settings.pairs_per_group}"
            )

    def units(self, rollouts: "Rollouts", group_size: int) -> list:
        return dpo_pairs(rollouts.rewards, group_size, self.settings.pairs_per_group)

    def prompt_rollouts(self, units: Sequence) -> List[int]:
        return [winner for winner, _ in units]

    def points(self, batch: MicroBatch):
        """Winners then losers; both arms of a pair share the noise and ``t``."""
        x0_all = batch.rollouts.x0
        x0 = torch.cat([x0_all[[w for w, _ in batch.units]], x0_all[[l for _, l in batch.units]]])
        eps_one = batch.noise()
        points = Points.at(x0, torch.cat([eps_one, eps_one]), batch.t)
        return points, batch.cond.repeat(2).cond

    def base_loss(self, batch: MicroBatch, points: Points, v: Velocities) -> LossTerms:
        b = len(batch.units)
        target = points.eps - points.x0
        return dpo_loss(v.theta[:b], v.theta[b:], v.ref[:b], v.ref[b:], target[:b], target[b:], beta=self.settings.beta)
