"""The result of a norm-scaling sensitivity run (paper eq. 4-5).

:class:`SensitivityResult` holds the per-step, per-sample sensitivities ``S[k, i]`` computed by
:func:`ngdiag.sensitivity.norm_sensitivity` and derives everything else from them: per-step
statistics over samples (mean, standard deviation with ``ddof=1``, noise-to-signal ratio,
standard error, share of positive samples), the directional derivative of the reward, and long
or summary pandas frames.

Example:
    >>> import torch
    >>> from ngdiag.sensitivity import SensitivityResult
    >>> res = SensitivityResult(
    ...     S=torch.tensor([[1.0, 3.0], [-1.0, -1.0]], dtype=torch.float64),
    ...     times=torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
    ...     reward=torch.zeros(2, dtype=torch.float64),
    ...     x_final=torch.zeros(2, 4),
    ...     method="discrete",
    ... )
    >>> res.mean.tolist(), res.nsr.tolist()
    ([2.0, -1.0], [0.7071067811865476, 0.0])
    >>> res.directional_derivative.tolist()
    [0.0, 1.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch

from ngdiag.core.errors import ConfigError

__all__ = ["SensitivityResult"]


@dataclass(repr=False)
class SensitivityResult:
    """Per-step, per-sample norm-scaling sensitivities of a reward.

    ``K`` is the number of sampler steps, ``B`` the number of samples. Step ``k`` goes from
    ``times[k]`` to ``times[k + 1]``.

    Attributes:
        S: ``(K, B)`` float64 on CPU. ``S[k, i] = a_{k+1} . d_k`` for sample ``i``: the adjoint
            after the step dotted with the applied velocity ``d_k = (x_{k+1} - x_k) / |dt_k|``
            (discrete method), or the interval average of ``a(t) . d(t)`` (continuous method).
            ``S[k, i] > 0`` means a larger step magnitude at step ``k`` raises the reward.
        times: ``(K + 1,)`` float64 on CPU, decreasing from ``t_0`` (noise) to ``t_K`` (data).
        reward: ``(B,)`` float64 on CPU, the rewards ``R(x_K)`` of the final samples.
        x_final: ``(B, ...)`` the final samples, detached, on CPU, in ``x_init``'s dtype.
        method: ``"discrete"`` or ``"continuous"``.
        adjoint: ``(K + 1, B, ...)`` float64 on CPU, the adjoints ``a_0 ... a_K`` with
            ``a_k = dR/dx_k``, when requested (``return_adjoint=True``); otherwise ``None``.
    """

    S: torch.Tensor
    times: torch.Tensor
    reward: torch.Tensor
    x_final: torch.Tensor
    method: str
    adjoint: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.S.dim() != 2:
            raise ConfigError(f"S must have shape (K, B), got {tuple(self.S.shape)}")
        steps, batch = self.S.shape
        if tuple(self.times.shape) != (steps + 1,):
            raise ConfigError(f"times must have shape ({steps + 1},) for {steps} steps, got {tuple(self.times.shape)}")
        if tuple(self.reward.shape) != (batch,):
            raise ConfigError(f"reward must have shape ({batch},), got {tuple(self.reward.shape)}")
        if self.adjoint is not None and tuple(self.adjoint.shape[:2]) != (steps + 1, batch):
            raise ConfigError(f"adjoint must have shape ({steps + 1}, {batch}, ...), got {tuple(self.adjoint.shape)}")

    def __repr__(self) -> str:
        return f"SensitivityResult(method={self.method!r}, steps={self.num_steps}, samples={self.batch_size})"

    @property
    def num_steps(self) -> int:
        """``K``, the number of sampler steps."""
        return self.S.shape[0]

    @property
    def batch_size(self) -> int:
        """``B``, the number of samples."""
        return self.S.shape[1]

    @property
    def step_sizes(self) -> torch.Tensor:
        """``(K,)`` step magnitudes ``|t_{k+1} - t_k|``."""
        return (self.times[:-1] - self.times[1:]).abs()

    @property
    def mean(self) -> torch.Tensor:
        """``(K,)`` per-step mean ``mu_k`` of ``S`` over samples."""
        return self.S.mean(dim=1)

    @property
    def std(self) -> torch.Tensor:
        """``(K,)`` per-step standard deviation ``sigma_k`` over samples (``ddof=1``; NaN when ``B == 1``)."""
        if self.batch_size < 2:
            return torch.full((self.num_steps,), math.nan, dtype=self.S.dtype)
        return self.S.std(dim=1, correction=1)

    @property
    def nsr(self) -> torch.Tensor:
        """``(K,)`` noise-to-signal ratio ``sigma_k / |mu_k|`` (``inf`` where ``mu_k == 0``)."""
        return self.std / self.mean.abs()

    @property
    def stderr(self) -> torch.Tensor:
        """``(K,)`` standard error of the per-step mean, ``sigma_k / sqrt(B)``."""
        return self.std / math.sqrt(self.batch_size)

    @property
    def frac_positive(self) -> torch.Tensor:
        """``(K,)`` share of samples with ``S[k, i] > 0``."""
        return (self.S > 0).to(self.S.dtype).mean(dim=1)

    @property
    def directional_derivative(self) -> torch.Tensor:
        """``(B,)`` ``sum_k |t_{k+1} - t_k| S[k]``: the derivative ``dR/d(eps)`` of each sample's reward
        when every step's applied velocity is scaled by ``(1 + eps)``."""
        return (self.step_sizes[:, None] * self.S).sum(dim=0)

    def to_frame(self) -> pd.DataFrame:
        """Long frame, one row per step and sample: columns ``step, t, t_next, sample, S``."""
        steps, batch = self.S.shape
        step = torch.arange(steps).repeat_interleave(batch)
        return pd.DataFrame(
            {
                "step": step.numpy(),
                "t": self.times[:-1][step].numpy(),
                "t_next": self.times[1:][step].numpy(),
                "sample": torch.arange(batch).repeat(steps).numpy(),
                "S": self.S.reshape(-1).numpy(),
            }
        )

    def summary_frame(self) -> pd.DataFrame:
        """One row per step: columns ``step, t, t_next, mean, std, nsr, stderr, frac_positive``."""
        return pd.DataFrame(
            {
                "step": range(self.num_steps),
                "t": self.times[:-1].numpy(),
                "t_next": self.times[1:].numpy(),
                "mean": self.mean.numpy(),
                "std": self.std.numpy(),
                "nsr": self.nsr.numpy(),
                "stderr": self.stderr.numpy(),
                "frac_positive": self.frac_positive.numpy(),
            }
        )
