"""Reward spec strings ``KIND[:PATH[,key=value...]]``: the registry of reward kinds and their grammar.

This module imports neither torch nor any model library, so that the command line can list the
reward kinds in its help and validate a spec before anything heavy is imported;
:mod:`ngdiag.rewards.scorers` maps each kind to its reward class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ngdiag.core.errors import ConfigError

__all__ = [
    "REWARD_KINDS",
    "REWARD_RAW_SCALES",
    "REWARD_SCALES",
    "REWARD_SPECS",
    "RewardKind",
    "RewardScale",
    "parse_reward_spec",
    "reward_kinds_help",
    "reward_scales",
]


@dataclass(frozen=True)
class RewardKind:
    """One reward kind: whether it takes a weights path, which ``key=value`` options, its usage."""

    usage: str
    needs_path: bool = False
    options: tuple[str, ...] = ()


#: Every reward kind :func:`ngdiag.rewards.scorers.load_reward` understands.
REWARD_SPECS: dict[str, RewardKind] = {
    "brightness": RewardKind("brightness"),
    "contrast": RewardKind("contrast"),
    "saturation": RewardKind("saturation"),
    "pickscore": RewardKind("pickscore:DIR[,processor=DIR]", True, ("processor",)),
    "clip": RewardKind("clip:DIR[,processor=DIR] or clip:FILE,arch=ARCH", True, ("processor", "arch")),
    "hpsv2": RewardKind("hpsv2:FILE[,arch=ARCH]", True, ("arch",)),
    "world": RewardKind("world:DIR[,vivid=W]", True, ("vivid",)),
}

#: The reward kinds, sorted.
REWARD_KINDS: tuple[str, ...] = tuple(sorted(REWARD_SPECS))


@dataclass(frozen=True)
class RewardScale:
    """A published alternative scale of a reward: ``published = factor * raw``.

    ``name`` labels the scale in results (``summary.json``, reports), ``description`` says what the
    rescaled number is and ``source`` names the file(s) that define it (repository and path).
    """

    name: str
    factor: float
    description: str
    source: str

    def apply(self, value):
        """``factor * value`` (a float, array or tensor)."""
        return value * self.factor


# The PickScore factor 1/26: flow_grpo's PickScore scorer (yifan123/flow_grpo,
# flow_grpo/pickscore_scorer.py, read in its forks ltt0716/flow_grpo_official and zhtmike/flow_grpo)
# and Flow-Factory's (X-GenGroup/Flow-Factory, src/flow_factory/rewards/pick_score.py) both divide
# exp(logit_scale) * cos by 26, commented "norm to 0-1", and train and log on that scale.
# HPSv2: flow_grpo's scorer (yifan123/flow_grpo, flow_grpo/hpsv2_scorer.py) returns the raw cosine,
# as HPSv2's own img_score.py does; HPSv2's benchmark (tgxs002/HPSv2, hpsv2/evaluation.py,
# evaluate_benchmark_all and evaluate_benchmark_DB) prints the mean cosine times 100.
_FLOW_GRPO_PICKSCORE = "yifan123/flow_grpo flow_grpo/pickscore_scorer.py; X-GenGroup/Flow-Factory src/flow_factory/rewards/pick_score.py"

#: Published alternative scales per reward kind (kinds without one are absent).
REWARD_SCALES: dict[str, tuple[RewardScale, ...]] = {
    "pickscore": (
        RewardScale("flow_grpo", 1 / 26,
                    "PickScore / 26, the reward flow_grpo and Flow-Factory train on and log (about 0.7-0.9)",
                    _FLOW_GRPO_PICKSCORE),
    ),
    "hpsv2": (
        RewardScale("flow_grpo", 1.0,
                    "the cosine itself, what flow_grpo's HPSv2 reward returns (equal to the raw scale)",
                    "yifan123/flow_grpo flow_grpo/hpsv2_scorer.py"),
        RewardScale("hpsv2_benchmark", 100.0,
                    "100 * cosine, the scale of HPSv2's benchmark tables (about 20-35)",
                    "tgxs002/HPSv2 hpsv2/evaluation.py"),
    ),
}

#: What the raw number of a reward kind is, for kinds that have published alternative scales.
REWARD_RAW_SCALES: dict[str, str] = {
    "pickscore": "exp(logit_scale) * cos, PickScore's own scale (Kirstain et al.; about 18-23 for real images)",
    "hpsv2": "cos(image, text), HPSv2's own img_score.py scale (about 0.2-0.35)",
}


def reward_scales(spec: str | None) -> tuple[str | None, tuple[RewardScale, ...]]:
    """``(raw scale description, alternative scales)`` of a reward spec, without loading anything.

    ``(None, ())`` for ``None``, for kinds without a published alternative scale and for specs that do
    not parse (a summary written by another version may hold any string).

    Example:
        >>> raw, scales = reward_scales("pickscore:/models/pickscore")
        >>> [(s.name, round(s.apply(21.5), 4)) for s in scales]
        [('flow_grpo', 0.8269)]
    """
    if spec is None:
        return None, ()
    try:
        kind, _, _ = split_reward_spec(spec)
    except ConfigError:
        return None, ()
    return REWARD_RAW_SCALES.get(kind), REWARD_SCALES.get(kind, ())


def reward_kinds_help() -> str:
    """The usage of every kind, for help texts: ``brightness, contrast, ..., pickscore:DIR[...]``."""
    return ", ".join(REWARD_SPECS[k].usage for k in REWARD_KINDS)


def existing_path(path: str | os.PathLike[str]) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ConfigError(f"reward weights not found: {path}")
    return resolved


def split_reward_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``(kind, path, options)`` of a spec string, checked against the registry (paths not checked)."""
    kind, sep, rest = str(spec).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in REWARD_SPECS:
        raise ConfigError(f"unknown reward kind {kind!r}; known kinds: {', '.join(REWARD_KINDS)}.")
    entry = REWARD_SPECS[kind]
    if not entry.needs_path:
        if sep:
            raise ConfigError(f"reward {kind!r} takes no path or options, got {spec!r}.")
        return kind, None, {}
    path, *option_items = rest.split(",")
    if not path.strip():
        raise ConfigError(f"reward {kind!r} needs a path: {kind}:PATH.")
    options: dict[str, str] = {}
    for item in option_items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in entry.options or not value.strip():
            known = ", ".join(f"{k}=..." for k in entry.options)
            raise ConfigError(f"bad option {item!r} for reward {kind!r}; known options: {known}.")
        options[key] = value.strip()
    return kind, path.strip(), options


def parse_reward_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """Validate a reward spec without loading weights: ``(kind, path, options)``.

    Raises :class:`ConfigError` for an unknown kind or option, or weights that do not exist.
    """
    kind, path, options = split_reward_spec(spec)
    if path is not None:
        existing_path(path)
    return kind, path, options
