"""Shards: ``--shard i/n`` runs the batches ``b`` with ``b % n == i`` of a run's fixed batches."""

from __future__ import annotations

from typing import Optional

from ngdiag.core.errors import ConfigError

__all__ = ["parse_shard", "shard_batches"]


def parse_shard(spec: Optional[str]) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if spec is None:
        return 0, 1
    try:
        i_text, n_text = str(spec).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"invalid shard {spec!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"invalid shard {spec!r}: need 0 <= i < n")
    return i, n


def shard_batches(num_batches: int, shard: tuple) -> list:
    """The batches of shard ``(i, n)`` among ``num_batches``: ``b % n == i``, in order."""
    i, n = shard
    return [b for b in range(num_batches) if b % n == i]
