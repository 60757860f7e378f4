"""Training with the NormGuard penalty (paper eq. 7-8) on top of velocity-local losses.

The losses are pure functions on tensors (:mod:`ngdiag.train.losses`); the trainer, its config
and the ``ngdiag train`` command build on them.
"""

from ngdiag.train.losses import (
    LossTerms,
    NormGuardTerms,
    awm_loss,
    dpo_loss,
    flow_matching_loss,
    nft_loss,
    normguard_penalty,
    with_normguard,
)

__all__ = [
    "LossTerms",
    "NormGuardTerms",
    "normguard_penalty",
    "with_normguard",
    "flow_matching_loss",
    "nft_loss",
    "awm_loss",
    "dpo_loss",
]
