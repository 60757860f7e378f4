"""Training with the NormGuard penalty (paper eq. 7-8) on top of velocity-local losses.

The losses are pure functions on tensors (:mod:`ngdiag.train.losses`); the trainer, its config
and the ``ngdiag train`` command build on them.
"""

from ngdiag.train.config import TrainConfig, load_config
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
    "TrainConfig",
    "load_config",
    "train",
    "compare_runs",
    "LossTerms",
    "NormGuardTerms",
    "normguard_penalty",
    "with_normguard",
    "flow_matching_loss",
    "nft_loss",
    "awm_loss",
    "dpo_loss",
]


def __getattr__(name):
    # The trainer and the comparison pull in diffusers/peft; import them on first use.
    if name == "train":
        from ngdiag.train.trainer import train

        return train
    if name == "compare_runs":
        from ngdiag.train.compare import compare_runs

        return compare_runs
    raise AttributeError(f"module 'ngdiag.train' has no attribute {name!r}")
