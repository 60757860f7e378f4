"""Advantage Weighted Matching (:func:`ngdiag.train.losses.awm_loss`): its config section and its loss."""

from __future__ import annotations

from dataclasses import dataclass

from ngdiag.core.configs import check_choice, check_nonneg, check_positive
from ngdiag.core.errors import ConfigError
from ngdiag.train.losses import AWM_WEIGHTINGS, LossTerms, awm_loss
from ngdiag.train.methods.base import MicroBatch, OldPolicyMethod, Points, Velocities, check_old_policy_settings

__all__ = ["AWMConfig", "AWM"]


@dataclass
class AWMConfig:
    """Advantage Weighted Matching (:func:`ngdiag.train.losses.awm_loss`); ``old_decay`` as for NFT.

    The old policy supplies both the PPO ratio's denominator and, when ``ema_kl_beta > 0``, the
    EMA velocity of the EMA KL term. The fields but ``old_decay`` are ``awm_loss``'s keyword arguments
    (``weighting`` is one of :data:`ngdiag.train.losses.AWM_WEIGHTINGS`).
    """

    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    weighting: str = "Uniform"
    ghuber_power: float = 0.25
    kl_beta: float = 0.0
    ema_kl_beta: float = 0.0
    old_decay: float = 0.0

    def validate(self) -> None:
        check_old_policy_settings("awm", self)
        check_nonneg("awm.clip_range", self.clip_range)
        if self.clip_range >= 1:
            raise ConfigError(f"awm.clip_range must be < 1, got {self.clip_range}")
        check_choice("awm.weighting", self.weighting, AWM_WEIGHTINGS)
        check_positive("awm.ghuber_power", self.ghuber_power)
        check_nonneg("awm.ema_kl_beta", self.ema_kl_beta)


class AWM(OldPolicyMethod):
    """AWM on the rollouts: a PPO-clipped ratio to the old policy, which is also the EMA of the EMA KL."""

    name = "awm"
    settings_class = AWMConfig

    def base_loss(self, batch: MicroBatch, points: Points, v: Velocities) -> LossTerms:
        v_ema = v.old if self.settings.ema_kl_beta > 0 else None  # the old policy is the EMA
        return awm_loss(v.theta, v.old, points.x0, points.eps, points.t, batch.advantages(points.x0),
                        v_ref=v.ref, v_ema=v_ema, **self.loss_options())
