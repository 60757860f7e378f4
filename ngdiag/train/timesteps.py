"""Training timesteps: which noise levels ``t`` a training step visits.

Time convention (CONVENTIONS "Time, interpolant, velocity"): ``x_t = (1 - t) x0 + t eps``,
``t = 1`` is pure noise, ``t = 0`` is data; ``t`` is diffusers' sigma (Flow-Factory's
``timestep / 1000``). Every sampler returns ``n`` values of ``t`` in ``[t_min, t_max]``, drawn from
an explicit ``torch.Generator`` so that a run is reproducible and the same on every process.

Kinds:

- ``"uniform"``: stratified uniform: ``[0, 1)`` is split into ``n`` equal strata, one uniform draw
  in each, the strata shuffled; then the time shift and the map to ``[t_min, t_max]``. Stratifying
  lowers the variance of a small batch of timesteps without changing the distribution (each draw
  is marginally uniform).
- ``"logit-normal"``: ``t = sigmoid(mean + std * z)`` with ``z ~ N(0, 1)`` (the SD3 training
  distribution), then the time shift and the map to ``[t_min, t_max]``.
- ``"stratified"``: discrete stratified sampling of the sampler's own schedule (the ``K`` sigmas
  the rollouts visited, the family's time shift included): the step indices ``0 .. K-1`` are
  split into ``n`` contiguous strata and one index is drawn uniformly in each (Flow-Factory's
  ``TimeSampler.discrete``); only schedule times inside ``[t_min, t_max]`` are eligible.

Time shift (the SD3 / FLUX scheduler's, applied to the continuous kinds): with ``s = shift``,
``t' = s t / (1 + (s - 1) t)``; ``s > 1`` moves the mass towards noise (``t = 1``), ``s = 1`` is
the identity.

Example:
    >>> import torch
    >>> from ngdiag.train.timesteps import sample_timesteps, time_shift
    >>> float(time_shift(torch.tensor(0.5), 3.0))
    0.75
    >>> t = sample_timesteps("uniform", 4, torch.Generator().manual_seed(0))
    >>> sorted((t * 4).floor().int().tolist())   # one draw per stratum
    [0, 1, 2, 3]
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ngdiag.core.errors import ConfigError

__all__ = ["TIMESTEP_KINDS", "time_shift", "sample_timesteps"]

TIMESTEP_KINDS = ("uniform", "logit-normal", "stratified")


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * t / (1 + (shift - 1) * t)``: the flow-matching scheduler's static time shift."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def _check(kind: str, n: int, shift: float, t_min: float, t_max: float) -> None:
    if kind not in TIMESTEP_KINDS:
        raise ConfigError(f"unknown timestep kind {kind!r}; choose one of {', '.join(TIMESTEP_KINDS)}")
    if int(n) < 1:
        raise ConfigError(f"the number of training timesteps must be at least 1, got {n}")
    if not math.isfinite(shift) or shift <= 0:
        raise ConfigError(f"timestep shift must be a finite number > 0, got {shift}")
    if not (0.0 <= t_min < t_max <= 1.0):
        raise ConfigError(f"timestep range must satisfy 0 <= t_min < t_max <= 1, got [{t_min}, {t_max}]")


def sample_timesteps(
    kind: str,
    n: int,
    generator: torch.Generator,
    *,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    schedule: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Draw ``n`` training times ``t`` in ``[t_min, t_max]``, float32 on the CPU, shape ``(n,)``.

    Args:
        kind: ``"uniform"``, ``"logit-normal"`` or ``"stratified"`` (see the module docstring).
        n: how many times.
        generator: a CPU ``torch.Generator``; the only source of randomness.
        shift: time shift of the continuous kinds (``1.0``: none).
        t_min, t_max: the range of ``t``.
        logit_mean, logit_std: parameters of ``"logit-normal"``.
        schedule: the sampler's sigmas ``(K + 1,)`` (decreasing, terminal 0 included), required by
            ``"stratified"``.

    Raises:
        ConfigError: unknown kind, bad range or shift, missing schedule, or no schedule time in range.
    """
    _check(kind, n, float(shift), float(t_min), float(t_max))
    n = int(n)
    if kind == "stratified":
        if schedule is None:
            raise ConfigError("stratified timesteps need the sampler's schedule")
        sigmas = torch.as_tensor(schedule, dtype=torch.float32).reshape(-1)[:-1]
        eligible = torch.nonzero((sigmas >= t_min - 1e-6) & (sigmas <= t_max + 1e-6)).reshape(-1)
        if eligible.numel() == 0:
            raise ConfigError(f"no step of the sampling schedule lies in [{t_min}, {t_max}]")
        lo, hi = int(eligible.min()), int(eligible.max()) + 1  # index span [lo, hi)
        edges = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
        lower, upper = edges[:-1], edges[1:]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = torch.clamp((lower + u * (upper - lower)).floor().long(), lo, hi - 1)
        return sigmas[idx].clone()
    if kind == "uniform":
        u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        u = u[torch.randperm(n, generator=generator)]
    else:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(float(logit_mean) + float(logit_std) * z)
    u = time_shift(u, float(shift))
    return (float(t_min) + u * (float(t_max) - float(t_min))).to(torch.float32)
