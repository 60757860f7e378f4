"""Rewards that score generated images: the torch-free registry of reward kinds and specs
(:mod:`ngdiag.rewards.specs`), the scorers (:mod:`ngdiag.rewards.scorers`) and their image
preprocessing (:mod:`ngdiag.rewards.preprocess`). Names are imported lazily, so that parsing a spec
stays cheap."""

_LAZY = {
    "load_reward": "ngdiag.rewards.scorers",
    "REWARD_KINDS": "ngdiag.rewards.specs",
    "parse_reward_spec": "ngdiag.rewards.specs",
    "split_reward_spec": "ngdiag.rewards.specs",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ngdiag.rewards' has no attribute {name!r}")
