"""Seeds: sample ``i`` of a run uses seed ``seed + i``, whatever batch, shard or resume computes it.

Each sample draws its noise from its own ``torch.Generator`` seeded this way, so that any subset
of samples (a batch, a shard, a resumed run) reproduces exactly the trajectories of a single run.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["sample_seeds"]


def sample_seeds(seed: int, sample_ids: Sequence[int]) -> list[int]:
    """The seed of each sample in ``sample_ids``: ``seed + i``."""
    return [int(seed) + int(i) for i in sample_ids]
