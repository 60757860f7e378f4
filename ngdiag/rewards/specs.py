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

__all__ = ["RewardKind", "REWARD_SPECS", "REWARD_KINDS", "parse_reward_spec", "reward_kinds_help"]


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
