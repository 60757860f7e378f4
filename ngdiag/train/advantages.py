"""Advantages from rewards, and winner / loser pairs, for online RL on prompt groups.

Rollouts come in groups: ``group_size`` samples of the same prompt with different noise seeds,
stored contiguously (samples ``g * G .. g * G + G - 1`` form group ``g``). The advantage of a sample
says how much better it is than its group (GRPO-style group normalization, as Flow-GRPO,
DiffusionNFT and Flow-Factory compute it)::

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)      normalize="group"
    A_i = (r_i - mean_group(r)) / (std_all(r) + eps)        normalize="global"
    A_i =  r_i - mean_group(r)                              normalize="none"

``std`` is the population standard deviation (``ddof = 0``); a group of equal rewards gets
advantage 0. Rewards are gathered from every process before this is computed, so all processes
hold the same advantages.

Example:
    >>> import torch
    >>> group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, eps=0.0).tolist()
    [-1.0, 1.0, 0.0, 0.0]
    >>> dpo_pairs(torch.tensor([0.1, 0.9, 0.5, 0.3]), 4, per_group=2)
    [(1, 0), (2, 3)]
"""

from __future__ import annotations

import torch

from ngdiag.core.errors import ConfigError

__all__ = ["ADVANTAGE_NORMALIZATIONS", "group_advantages", "dpo_pairs"]

ADVANTAGE_NORMALIZATIONS = ("group", "global", "none")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ConfigError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if int(group_size) < 1 or rewards.numel() % int(group_size):
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, int(group_size))


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalized advantages, shape ``(N,)``, float64 (see the module docstring).

    Args:
        rewards: ``(N,)`` rewards, groups of ``group_size`` stored contiguously.
        group_size: ``G``; a group of one sample gets advantage 0.
        normalize: ``"group"``, ``"global"`` or ``"none"``.
        eps: added to the standard deviation.
    """
    if normalize not in ADVANTAGE_NORMALIZATIONS:
        raise ConfigError(f"unknown advantage normalization {normalize!r}; choose one of {', '.join(ADVANTAGE_NORMALIZATIONS)}")
    r = _groups(rewards.detach().to(torch.float64).cpu(), group_size)
    if not torch.isfinite(r).all():
        raise ConfigError("rewards contain non-finite values")
    centred = r - r.mean(dim=1, keepdim=True)
    if normalize != "none":
        std = r.std(dim=1, correction=0, keepdim=True) if normalize == "group" else r.std(correction=0)
        scale = std + eps
        # a group of equal rewards has zero advantage, also with eps = 0 (no 0 / 0)
        centred = centred / torch.where(scale > 0, scale, torch.ones_like(scale))
    return centred.reshape(-1)


def dpo_pairs(rewards: torch.Tensor, group_size: int, per_group: int = 1) -> list[tuple[int, int]]:
    """Winner / loser pairs inside each group: the j-th best with the j-th worst, ``j < per_group``.

    ``per_group = 1`` pairs the best with the worst rollout of each group (Flow-Factory's online DPO);
    up to ``group_size // 2`` pairs per group use every rollout once. Returns global sample indices
    ``(winner, loser)``, group by group, best pair first. Ties are broken by sample index (stable
    sort), so the pairing is deterministic.
    """
    r = _groups(rewards.detach().to(torch.float64).cpu(), group_size)
    g = r.shape[1]
    if g < 2:
        raise ConfigError("DPO needs groups of at least 2 samples (rollouts.group_size >= 2)")
    if not 1 <= int(per_group) <= g // 2:
        raise ConfigError(f"pairs per group must lie in [1, {g // 2}] for groups of {g}, got {per_group}")
    pairs = []
    for k, row in enumerate(r):
        order = torch.sort(row, descending=True, stable=True).indices.tolist()
        for j in range(int(per_group)):
            pairs.append((k * g + order[j], k * g + order[g - 1 - j]))
    return pairs
