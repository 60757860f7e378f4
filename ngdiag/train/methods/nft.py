"""DiffusionNFT (:func:`ngdiag.train.losses.nft_loss`): its config section and its loss on the rollouts."""

from __future__ import annotations

from dataclasses import dataclass

from ngdiag.core.configs import check_positive
from ngdiag.train.losses import LossTerms, nft_loss
from ngdiag.train.methods.base import MicroBatch, OldPolicyMethod, Points, Velocities, check_old_policy_settings

__all__ = ["NFTConfig", "NFT"]


@dataclass
class NFTConfig:
    """DiffusionNFT (:func:`ngdiag.train.losses.nft_loss`); the fields but ``old_decay`` are its keyword arguments.

    Attributes:
        beta: mixing strength of the implicit positive / negative policies (``> 0``).
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]``.
        kl_beta: weight of the velocity KL to the reference (needs a reference forward when ``> 0``).
        old_decay: the old policy is an EMA of the LoRA weights, updated after every iteration:
            ``old <- d old + (1 - d) theta``; ``0`` makes it the policy that sampled the rollouts.
    """

    beta: float = 1.0
    adv_clip_max: float = 5.0
    kl_beta: float = 0.0
    old_decay: float = 0.0

    def validate(self) -> None:
        check_positive("nft.beta", self.beta)
        check_old_policy_settings("nft", self)


class NFT(OldPolicyMethod):
    """DiffusionNFT on the rollouts, with the old policy as the sampling policy."""

    name = "nft"
    settings_class = NFTConfig

    def base_loss(self, batch: MicroBatch, points: Points, v: Velocities) -> LossTerms:
        advantages = batch.advantages(points.x0)
        return nft_loss(v.theta, v.old, points.x_t, points.x0, points.t, advantages, v_ref=v.ref, **self.loss_options())
