"""Rewards that score generated images: the torch-free registry of reward kinds and specs
(:mod:`ngdiag.rewards.specs`), the scorers (:mod:`ngdiag.rewards.scorers`) and their image
preprocessing (:mod:`ngdiag.rewards.preprocess`). Names are imported lazily, so that parsing a spec
stays cheap."""

from ngdiag.core.lazy import lazy_attributes

_LAZY = {
    "load_reward": "ngdiag.rewards.scorers",
    **dict.fromkeys(("REWARD_KINDS", "parse_reward_spec", "split_reward_spec"), "ngdiag.rewards.specs"),
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
