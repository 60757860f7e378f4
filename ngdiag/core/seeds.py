"""Seeds: sample ``i`` of a run uses seed ``seed + i``, whatever batch, shard or resume computes it;
training derives every other seed from its config's ``seed`` and a name.

Each sample draws its noise from its own ``torch.Generator`` seeded this way, so that any subset
of samples (a batch, a shard, a resumed run) reproduces exactly the trajectories of a single run.
:func:`derive_seed` hashes its parts (stable across processes, platforms and runs).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

__all__ = ["sample_seeds", "derive_seed", "seeded_generator"]


def sample_seeds(seed: int, sample_ids: Sequence[int]) -> list[int]:
    """The seed of each sample in ``sample_ids``: ``seed + i``."""
    return [int(seed) + int(i) for i in sample_ids]


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from the parts (stable across processes, platforms and runs)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts):
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of the parts."""
    import torch

    return torch.Generator("cpu").manual_seed(derive_seed(*parts))
