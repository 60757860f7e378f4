"""Where the inflation sits in the image: per-position ratio maps of ``||v_theta|| / ||v_ref||``.

At every step ``k`` and for every sample ``i`` the guided velocities of theta and ref (the same
``(x_t, t, c)``) are laid out on the latent grid ``(C, h, w)`` (packed tokens are unpacked by the
family adapter, :meth:`ngdiag.models.families.FamilyAdapter.latent_grid`, a permutation) and the
norm over channels is taken at each latent position ``p = (y, x)``::

    r_ik(p) = ||v_theta(p)|| / ||v_ref(p)||        (norm over the C channels at p)

Maps average log-ratios, as the inflation does (CONVENTIONS "Inflation summary and verdict"):

- per-sample map ``m_i(p) = exp(mean_k log r_ik(p))`` (mean over steps);
- per-step map ``M_k(p) = exp(mean_i log r_ik(p))`` (mean over samples);
- mean map ``M(p) = exp(mean_i mean_k log r_ik(p))``.

A planted scale by ``s`` on a region gives ``s`` exactly there and 1 elsewhere, in every map.

**Uniform or local.** The positive excess of the mean map at ``p`` is ``e(p) = max(0, log M(p))``.
The *top-10 % share* is the part of the total excess that falls on the 10 % of positions
(``ceil(0.1 P)`` of the ``P`` positions) with the largest excess::

    share = sum of the ceil(0.1 P) largest e(p) / sum_p e(p)

A uniform inflation puts the same excess everywhere: the share is ``ceil(0.1 P) / P``, about 0.1.
An inflation confined to a fraction ``f >= 0.1`` of the image gives about ``0.1 / f`` (0.4 for one
quadrant), and 1 when it is confined to 10 % or less. :func:`locality` reads it: ``"local"`` above
:data:`LOCAL_ABOVE` (0.3), ``"uniform"`` at or below :data:`UNIFORM_UP_TO` (0.2), ``"mixed"`` between,
``"none"`` without any positive excess (share undefined). The share describes where the excess
sits; it means little when the audit finds no inflation (then the excess is only noise).

Example:
    >>> import torch
    >>> from ngdiag.probes.spatial import log_ratio_map, top_share
    >>> theta = torch.ones(1, 4, 2, 2); theta[:, :, 0, 0] *= 2.0
    >>> float(log_ratio_map(theta, torch.ones(1, 4, 2, 2))[0, 0, 0].exp())
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ngdiag.core.errors import ConfigError, NumericalError

__all__ = [
    "TOP_FRACTION", "LOCAL_ABOVE", "UNIFORM_UP_TO", "position_norms", "log_ratio_map", "top_share", "locality",
    "SpatialRecorder", "SpatialMaps",
]

#: the fraction of positions whose share of the excess is measured
TOP_FRACTION = 0.1
#: a top-10 % share above this is "local"
LOCAL_ABOVE = 0.3
#: a top-10 % share at or below this is "uniform" (the uniform value is about 0.1)
UNIFORM_UP_TO = 0.2


def position_norms(grid: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h, w)``: the norm over channels at each latent position (float32, float64
    for float64 input)."""
    if grid.dim() != 4:
        raise ConfigError(f"position_norms needs a latent grid (B, C, h, w), got shape {tuple(grid.shape)}")
    dtype = torch.float64 if grid.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(grid.detach().to(dtype), dim=1)


def log_ratio_map(theta_grid: torch.Tensor, ref_grid: torch.Tensor, *, step: Optional[int] = None,
                  sample_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``log r(p) = log ||v_theta(p)|| - log ||v_ref(p)||`` per sample and position, ``(B, h, w)`` float64 on the CPU.

    Raises:
        ConfigError: the grids differ in shape.
        NumericalError: a position has a zero or non-finite norm (named with the step and samples).
    """
    if theta_grid.shape != ref_grid.shape:
        raise ConfigError(f"theta's and ref's grids differ: {tuple(theta_grid.shape)} and {tuple(ref_grid.shape)}")
    a, b = position_norms(theta_grid).cpu().double(), position_norms(ref_grid).cpu().double()
    for who, n in (("v_theta", a), ("v_ref", b)):
        bad = ~(torch.isfinite(n) & (n > 0))
        if bad.any():
            rows = torch.nonzero(bad.flatten(1).any(dim=1)).flatten().tolist()
            ids = [int(sample_ids[r]) for r in rows] if sample_ids is not None else rows
            where = f" at step {step}" if step is not None else ""
            raise NumericalError(f"{who} has a zero or non-finite norm at some latent positions{where} for samples {ids}: "
                                 "the spatial ratio map is undefined there")
    return a.log() - b.log()


def top_share(ratio_map, fraction: float = TOP_FRACTION) -> Optional[float]:
    """The share of the positive log-excess ``max(0, log map)`` on the top ``fraction`` of positions
    (``ceil(fraction * P)`` of ``P``); ``None`` when no position has an excess."""
    excess = np.maximum(np.log(np.asarray(ratio_map, dtype=np.float64)).ravel(), 0.0)
    total = float(excess.sum())
    if not total > 0:
        return None
    n = max(1, math.ceil(fraction * excess.size - 1e-9))
    return float(np.sort(excess)[::-1][:n].sum() / total)


def held_out_top_share(sample_maps, fraction: float = TOP_FRACTION) -> Optional[float]:
    """The top-``fraction`` share measured on held-out samples, so that noise does not read as a hot spot.

    The per-sample maps ``(N, h, w)`` (``N >= 4``) are split into two halves (even and odd rows); the top
    positions are chosen on one half's mean map (geometric mean over its samples) and their share of the
    positive log-excess is measured on the other half's, both ways, and the two shares averaged. A hot
    spot that is really there is found again in the other half (the same value as :func:`top_share` for
    noise-free maps); positions that were on top only by noise are not, and the share falls towards
    ``fraction``. ``None`` with fewer than 4 maps or when a half has no excess.
    """
    maps = np.log(np.asarray(sample_maps, dtype=np.float64))
    if maps.ndim != 3:
        raise ConfigError(f"sample maps need shape (N, h, w), got {maps.shape}")
    if len(maps) < 4:
        return None
    return held_out_share_of_halves(maps[0::2].mean(axis=0), maps[1::2].mean(axis=0), fraction)


def held_out_share_of_halves(first_log, second_log, fraction: float = TOP_FRACTION) -> Optional[float]:
    """:func:`held_out_top_share` from the two halves' mean log maps ``(h, w)`` (``None`` when a half
    has no excess)."""
    halves = [np.maximum(np.asarray(h, dtype=np.float64).ravel(), 0.0) for h in (first_log, second_log)]
    n = max(1, math.ceil(fraction * halves[0].size - 1e-9))
    shares = []
    for chosen, measured in ((halves[0], halves[1]), (halves[1], halves[0])):
        total = float(measured.sum())
        if not total > 0:
            return None
        top = np.argsort(-chosen, kind="stable")[:n]
        shares.append(float(measured[top].sum() / total))
    return float(np.mean(shares))


def locality(share: Optional[float]) -> str:
    """``"local"`` (share > 0.3), ``"uniform"`` (share <= 0.2), ``"mixed"`` between, ``"none"`` (no excess)."""
    if share is None:
        return "none"
    if share > LOCAL_ABOVE:
        return "local"
    return "uniform" if share <= UNIFORM_UP_TO else "mixed"


class SpatialRecorder:
    """Step callback for :func:`ngdiag.core.sampling.sample` with a :class:`~ngdiag.probes.paired.PairedVelocity`:
    records each step's log-ratio map of the guided velocities.

    Args:
        sample_ids: global ids of the batch's samples.
        layout: ``v -> (B, C, h, w)``, the family's latent grid of a velocity (e.g.
            ``lambda v: adapter.latent_grid(v, height, width)``).
    """

    def __init__(self, sample_ids: Sequence[int], layout: Callable[[torch.Tensor], torch.Tensor]):
        self.sample_ids = np.asarray(list(sample_ids), dtype=np.int64)
        self.layout = layout
        self.times: list = []
        self.maps: list = []

    def add(self, t: float, theta: torch.Tensor, ref: torch.Tensor, step: Optional[int] = None) -> None:
        """Add one step from theta's and ref's velocities in the transformer's layout."""
        log_map = log_ratio_map(self.layout(theta), self.layout(ref), step=step, sample_ids=self.sample_ids)
        self.times.append(float(t))
        self.maps.append(log_map.to(torch.float32).numpy())

    def __call__(self, step) -> None:
        ev = step.velocity
        self.add(step.t, ev.guided, ev.extras["ref"].guided, step=step.step)

    def log_maps(self) -> np.ndarray:
        """``(S, B, h, w)`` float32 log-ratio maps of the steps so far."""
        if not self.maps:
            raise ConfigError("no steps were recorded")
        return np.stack(self.maps)

    def part(self, keep: Optional[Sequence[int]] = None) -> dict:
        """What a batch contributes to :meth:`SpatialMaps.join`: ``times``, the sum over the batch's
        samples of the log-ratio maps per step ``(S, h, w)`` (float64), its sample count, and the
        mean-over-steps log maps of the samples ``keep`` (all when ``None``)."""
        logs = self.log_maps()
        kept = set(self.sample_ids.tolist() if keep is None else keep)
        keep_ids = np.asarray([i for i in self.sample_ids if i in kept], np.int64)
        rows = [int(np.nonzero(self.sample_ids == i)[0][0]) for i in keep_ids]
        per_sample = logs.astype(np.float64).mean(axis=0)  # (B, h, w): each sample's mean over steps
        odd = (self.sample_ids % 2).astype(bool)
        # the sums over even and odd sample ids of every sample, kept or not: the held-out share uses all samples
        halves = np.stack([per_sample[~odd].sum(axis=0), per_sample[odd].sum(axis=0)])
        return {"times": np.asarray(self.times, dtype=np.float64), "step_log_sum": logs.astype(np.float64).sum(axis=1),
                "count": len(self.sample_ids), "ids": keep_ids,
                "sample_log_maps": per_sample[rows].astype(np.float32),
                "half_log_sum": halves, "half_count": np.asarray([int((~odd).sum()), int(odd.sum())])}


@dataclass
class SpatialMaps:
    """Ratio maps on the latent grid ``(h, w)`` (module docstring for the definitions).

    Attributes:
        times: ``(S,)`` ``t_k`` of each step.
        num_samples: how many samples the mean maps average.
        step_maps: ``(S, h, w)``, ``M_k(p) = exp(mean_i log r_ik(p))``.
        mean_map: ``(h, w)``, ``M(p) = exp(mean_i mean_k log r_ik(p))``.
        sample_ids: ``(M,)`` the samples whose own map is kept (the report's image grid, or all with
            ``AuditConfig.spatial_maps``).
        sample_maps: ``(M, h, w)``, ``m_i(p) = exp(mean_k log r_ik(p))``.
        velocity: which velocity (``"guided"``).
        half_log_means: ``(2, h, w)``, the mean log maps of the samples with even and with odd ids (all
            samples, whichever maps are kept), from which the held-out share is computed; ``None`` for
            parts written before it existed.
    """

    times: np.ndarray
    num_samples: int
    step_maps: np.ndarray
    mean_map: np.ndarray
    sample_ids: np.ndarray
    sample_maps: np.ndarray
    velocity: str = "guided"
    half_log_means: Optional[np.ndarray] = None

    @property
    def grid(self) -> tuple:
        return tuple(int(n) for n in self.mean_map.shape)

    @property
    def top_share(self) -> Optional[float]:
        """The top-10 % share of the mean map's positive log-excess (:func:`top_share`)."""
        return top_share(self.mean_map)

    @property
    def held_out_top_share(self) -> Optional[float]:
        """The held-out share (:func:`held_out_top_share`) over all samples, from the even- and odd-id halves
        (at least 2 samples in each); without them (older parts), from the kept per-sample maps (at least 4)."""
        if self.half_log_means is not None:
            return held_out_share_of_halves(*self.half_log_means) if self.num_samples >= 4 else None
        return held_out_top_share(self.sample_maps) if len(self.sample_ids) >= 4 else None

    @property
    def locality(self) -> str:
        """:func:`locality` of the held-out share when there is one, else of the top share."""
        held = self.held_out_top_share
        return locality(held if held is not None else self.top_share)

    def sample_map(self, sample_id: int) -> np.ndarray:
        """``(h, w)`` map of one kept sample."""
        hits = np.nonzero(self.sample_ids == int(sample_id))[0]
        if not len(hits):
            raise ConfigError(f"no spatial map kept for sample {sample_id} (kept: {self.sample_ids.tolist()})")
        return self.sample_maps[hits[0]]

    @classmethod
    def join(cls, parts: Sequence[dict], velocity: str = "guided") -> "SpatialMaps":
        """The maps of a whole run from its batches' :meth:`SpatialRecorder.part` (summed in the order given)."""
        parts = list(parts)
        if not parts:
            raise ConfigError("no spatial parts to join")
        times = parts[0]["times"]
        for p in parts[1:]:
            if not np.array_equal(p["times"], times) or p["step_log_sum"].shape != parts[0]["step_log_sum"].shape:
                raise ConfigError("cannot join spatial maps of different schedules or grids")
        total = np.zeros_like(parts[0]["step_log_sum"], dtype=np.float64)
        for p in parts:
            total = total + p["step_log_sum"]
        n = int(sum(int(p["count"]) for p in parts))
        step_logs = total / n
        ids = np.concatenate([np.asarray(p["ids"], dtype=np.int64) for p in parts])
        maps = np.concatenate([np.asarray(p["sample_log_maps"], dtype=np.float32).reshape(-1, *total.shape[1:])
                               for p in parts])
        order = np.argsort(ids, kind="stable")
        halves = None
        if all("half_log_sum" in p for p in parts):
            sums = np.zeros_like(np.asarray(parts[0]["half_log_sum"], dtype=np.float64))
            counts = np.zeros(2)
            for p in parts:
                sums, counts = sums + p["half_log_sum"], counts + np.asarray(p["half_count"], dtype=np.float64)
            halves = sums / np.maximum(counts, 1.0)[:, None, None] if (counts >= 2).all() else None
        return cls(times=np.asarray(times, dtype=np.float64), num_samples=n, step_maps=np.exp(step_logs),
                   mean_map=np.exp(step_logs.mean(axis=0)), sample_ids=ids[order],
                   sample_maps=np.exp(maps[order].astype(np.float64)), velocity=velocity, half_log_means=halves)

    def summary(self) -> dict:
        """The ``spatial`` block of ``summary.json``."""
        share = self.top_share
        held = self.held_out_top_share
        return {
            "velocity": self.velocity,
            "grid": list(self.grid),
            "mean_map_min": float(self.mean_map.min()),
            "mean_map_max": float(self.mean_map.max()),
            "top_fraction": TOP_FRACTION,
            "top_share": share,
            "held_out_top_share": held,
            "locality": self.locality,
            "locality_from": "held_out_top_share" if held is not None else "top_share",
            "rule": f"local if the share > {LOCAL_ABOVE}, uniform if <= {UNIFORM_UP_TO}, mixed between, none without "
                    "excess; the held-out share (top positions chosen on the samples of even id, measured on those of "
                    "odd id and back: noise alone lifts the in-sample top share above 0.1) when there are at least 4 "
                    "samples, else the top share",
            "definition": "share of sum_p max(0, log M(p)) on the ceil(0.1 P) positions with the largest excess; "
                          "M(p) = exp(mean over samples and steps of log(||v_theta(p)|| / ||v_ref(p)||)), norms over "
                          "channels at latent position p",
            "num_sample_maps": int(len(self.sample_ids)),
            "file": "spatial.npz",
        }

    def arrays(self) -> dict:
        """The arrays ``spatial.npz`` stores."""
        out = {"times": self.times, "step_maps": self.step_maps, "mean_map": self.mean_map,
               "sample_ids": self.sample_ids, "sample_maps": self.sample_maps}
        if self.half_log_means is not None:
            out["half_log_means"] = self.half_log_means
        return out
