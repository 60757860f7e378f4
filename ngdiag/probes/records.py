"""One record type for every probe: velocity norms per step, call and sample.

A :class:`NormRecord` holds detached float32 CPU tensors shaped ``[step, call, sample]``:

- ``step`` ``k`` of the sampler, at time ``times[k]`` (``t = 1`` noise, ``t = 0`` data);
- ``call`` is ``"guided"`` (the velocity the sampler applies, after CFG) or ``"cond"`` (the
  conditional transformer output);
- ``sample`` is the global sample id (prompt ``i``, seed ``seed + i``).

Stored: ``norm_theta``, ``norm_ref``, ``cos`` and ``directional``; derived: ``ratio``, ``radial``,
``radial_share`` (CONVENTIONS "Norms and ratios"). :meth:`NormRecord.to_frame` gives the long
format ``(step, t, call, sample, metric, value)`` that ``records.parquet`` stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ngdiag.core.errors import ConfigError

__all__ = ["NormRecord", "StepRecorder", "CALLS", "METRICS"]

CALLS = ("guided", "cond")
STORED = ("norm_theta", "norm_ref", "cos", "directional")
METRICS = STORED + ("ratio", "radial", "radial_share")


@dataclass
class NormRecord:
    """Velocity norms of theta and ref along trajectories.

    Attributes:
        times: ``(S,)`` float64, ``t_k`` of each step.
        t_next: ``(S,)`` float64, ``t_{k+1}``.
        calls: names of the call axis, e.g. ``("guided", "cond")``.
        sample_ids: ``(N,)`` int64 global sample ids.
        norm_theta, norm_ref, cos, directional: ``(S, C, N)`` float32 tensors; ``directional`` is
            kept as computed by :func:`~ngdiag.probes.metrics.compare_velocities` (cancellation-free).
    """

    times: np.ndarray
    t_next: np.ndarray
    calls: tuple
    sample_ids: np.ndarray
    norm_theta: torch.Tensor
    norm_ref: torch.Tensor
    cos: torch.Tensor
    directional: torch.Tensor

    def __post_init__(self):
        shape = (len(self.times), len(self.calls), len(self.sample_ids))
        for name in STORED:
            if tuple(getattr(self, name).shape) != shape:
                raise ConfigError(f"record field {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")

    # ----- derived metrics (CONVENTIONS drift decomposition) -----
    @property
    def ratio(self) -> torch.Tensor:
        return self.norm_theta / self.norm_ref

    @property
    def radial(self) -> torch.Tensor:
        return (self.norm_theta - self.norm_ref) ** 2

    @property
    def radial_share(self) -> torch.Tensor:
        total = self.radial + self.directional
        return torch.where(total > 0, self.radial / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))

    @property
    def num_steps(self) -> int:
        return len(self.times)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    def metric(self, name: str, call: str = "guided") -> np.ndarray:
        """``(S, N)`` float64 array of ``name`` for one call."""
        if name not in METRICS:
            raise ConfigError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
        if call not in self.calls:
            raise ConfigError(f"unknown call {call!r}; this record has {', '.join(self.calls)}")
        return getattr(self, name)[:, self.calls.index(call), :].double().numpy()

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (step, call, sample, metric)."""
        S, C, N = len(self.times), len(self.calls), len(self.sample_ids)
        step = np.repeat(np.arange(S), C * N)
        t = np.repeat(self.times, C * N)
        call = np.tile(np.repeat(np.array(self.calls, dtype=object), N), S)
        sample = np.tile(self.sample_ids, S * C)
        frames = []
        for name in METRICS:
            values = getattr(self, name).reshape(-1).double().numpy()
            frames.append(pd.DataFrame({"step": step, "t": t, "call": call, "sample": sample, "metric": name, "value": values}))
        out = pd.concat(frames, ignore_index=True)
        out["t_next"] = np.tile(np.repeat(self.t_next, C * N), len(METRICS))
        return out

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "NormRecord":
        """Inverse of :meth:`to_frame` (only the stored metrics are read)."""
        if frame.empty:
            raise ConfigError("cannot build a record from an empty table")
        steps = np.sort(frame["step"].unique())
        calls = tuple(c for c in CALLS if c in set(frame["call"]))
        samples = np.sort(frame["sample"].unique()).astype(np.int64)
        first = frame[(frame["metric"] == "norm_theta")].drop_duplicates("step").set_index("step").loc[steps]
        arrays = {}
        for name in STORED:
            sub = frame[frame["metric"] == name]
            cube = sub.pivot_table(index=["step", "call"], columns="sample", values="value", aggfunc="first")
            cube = cube.reindex(pd.MultiIndex.from_product([steps, calls]), columns=samples)
            if cube.isna().to_numpy().any():
                raise ConfigError(f"the records table is incomplete: metric {name} has missing (step, call, sample) cells")
            arrays[name] = torch.from_numpy(cube.to_numpy().copy().reshape(len(steps), len(calls), len(samples))).to(torch.float32)
        return cls(
            times=first["t"].to_numpy(dtype=np.float64),
            t_next=first["t_next"].to_numpy(dtype=np.float64),
            calls=calls,
            sample_ids=samples,
            **arrays,
        )

    @classmethod
    def concat(cls, records: Sequence["NormRecord"]) -> "NormRecord":
        """Join records of the same schedule along the sample axis, sorted by sample id."""
        records = list(records)
        if not records:
            raise ConfigError("no records to join")
        first = records[0]
        for r in records[1:]:
            if r.calls != first.calls or not np.array_equal(r.times, first.times):
                raise ConfigError("cannot join records with different schedules or calls")
        ids = np.concatenate([r.sample_ids for r in records])
        if len(np.unique(ids)) != len(ids):
            raise ConfigError("cannot join records: some sample ids appear twice")
        order = np.argsort(ids, kind="stable")
        cat = {name: torch.cat([getattr(r, name) for r in records], dim=2)[:, :, torch.from_numpy(order)] for name in STORED}
        return cls(first.times.copy(), first.t_next.copy(), first.calls, ids[order], **cat)


class StepRecorder:
    """Collects per-step norms during sampling and builds a :class:`NormRecord`.

    Call :meth:`add` once per step with the comparisons of each call
    (:class:`ngdiag.probes.metrics.VelocityComparison`), then :meth:`record`.
    """

    def __init__(self, sample_ids: Sequence[int], calls: Sequence[str] = CALLS):
        self.sample_ids = np.asarray(list(sample_ids), dtype=np.int64)
        self.calls = tuple(calls)
        self._times, self._t_next = [], []
        self._rows = {name: [] for name in STORED}

    @property
    def num_steps(self) -> int:
        """How many steps were added so far."""
        return len(self._times)

    def add(self, t: float, t_next: float, comparisons: dict) -> None:
        missing = [c for c in self.calls if c not in comparisons]
        if missing:
            raise ConfigError(f"step record lacks calls {missing}")
        self._times.append(float(t))
        self._t_next.append(float(t_next))
        for name in STORED:
            self._rows[name].append(
                torch.stack([getattr(comparisons[c], name).detach().to("cpu", torch.float32) for c in self.calls])
            )

    def record(self) -> NormRecord:
        if not self._times:
            raise ConfigError("no steps were recorded")
        return NormRecord(
            times=np.asarray(self._times, dtype=np.float64),
            t_next=np.asarray(self._t_next, dtype=np.float64),
            calls=self.calls,
            sample_ids=self.sample_ids,
            **{name: torch.stack(rows) for name, rows in self._rows.items()},
        )
