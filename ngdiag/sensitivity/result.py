"""The result of a norm-scaling sensitivity run (paper eq. 4-5).

:class:`SensitivityResult` holds the per-step, per-sample sensitivities ``S[k, i]`` computed by
:func:`ngdiag.sensitivity.norm_sensitivity` and derives everything else from them: per-step
statistics over samples (mean, standard deviation with ``ddof=1``, noise-to-signal ratio,
standard error, share of positive samples), the directional derivative of the reward, and long
or summary pandas frames.

Intervals resample samples, never steps (the steps of one sample are not independent): a seeded
percentile bootstrap of the mean over samples, for each ``mu_k`` (:meth:`SensitivityResult.mean_interval`)
and for the mean ``dR/d(eps)`` (:meth:`SensitivityResult.directional_derivative_interval`).
:meth:`SensitivityResult.first_order_reward_change` turns the latter into the first-order reward
change of removing a measured inflation ``I``: scaling by ``1 / (1 + I)`` is ``eps = 1 / (1 + I) - 1``,
and the reward changes by ``eps * dR/d(eps)``.

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
    >>> change = res.first_order_reward_change(0.25)      # remove a 25 % inflation: eps = 1/1.25 - 1 = -0.2
    >>> round(change.eps, 12), round(change.mean, 12)     # -0.2 * mean dR/d(eps) = -0.2 * 0.5
    (-0.2, -0.1)
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ngdiag.core.errors import ConfigError

__all__ = ["SensitivityResult", "FirstOrderRewardChange", "removal_eps", "BOOTSTRAP_RESAMPLES"]

#: Default number of bootstrap resamples of every interval.
BOOTSTRAP_RESAMPLES = 2000
# Resampled values held in memory at once by one bootstrap batch (about 64 MB of float64).
_BATCH_ELEMENTS = 2**23


def removal_eps(inflation: float) -> float:
    """``eps = 1 / (1 + I) - 1 = -I / (1 + I)``: the relative velocity scaling that removes an inflation ``I``.

    ``I`` is a fraction (``0.059`` for 5.9 %), as the audit reports it; it must be finite and ``> -1``.
    """
    if isinstance(inflation, bool):
        raise ConfigError(f"the inflation must be a number, got {inflation!r}")
    try:
        value = float(inflation)
    except (TypeError, ValueError):
        raise ConfigError(f"the inflation must be a number (a fraction, e.g. 0.059 for 5.9 %), got {inflation!r}") from None
    if not math.isfinite(value) or value <= -1:
        raise ConfigError(f"the inflation must be a finite fraction above -1 (e.g. 0.059 for 5.9 %), got {inflation!r}")
    return 1.0 / (1.0 + value) - 1.0


def _check_bootstrap(confidence: float, n_resamples: int, seed: int) -> tuple[float, int, int]:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    return confidence, int(n_resamples), int(seed)


def _bootstrap_mean(data: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean along the last axis of ``data`` ``(m, B)``: ``(m,)`` low and high.

    One vectorised :func:`scipy.stats.bootstrap` call, seeded; NaN with fewer than 2 samples.
    """
    from scipy import stats as sps

    data = np.asarray(data, dtype=np.float64)
    if data.shape[-1] < 2:
        nan = np.full(data.shape[:-1], np.nan)
        return nan, nan.copy()
    keyword = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"
    batch = max(1, min(n_resamples, _BATCH_ELEMENTS // max(1, data.size)))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a constant row: the interval is that constant
        res = sps.bootstrap((data,), np.mean, n_resamples=n_resamples, batch=batch, vectorized=True, axis=-1,
                            confidence_level=confidence, method="percentile", **{keyword: np.random.default_rng(seed)})
    return np.asarray(res.confidence_interval.low, float), np.asarray(res.confidence_interval.high, float)


@dataclass(frozen=True)
class FirstOrderRewardChange:
    """The first-order reward change of removing an inflation ``I`` from every step's velocity.

    Removing ``I`` scales the applied velocity by ``1 / (1 + I)``, that is by ``(1 + eps)`` with
    ``eps = 1 / (1 + I) - 1``; to first order each sample's reward changes by ``eps * dR_i/d(eps)``.

    Attributes:
        inflation: ``I``, a fraction (``0.059`` for 5.9 %).
        eps: ``1 / (1 + I) - 1``.
        mean: ``eps * mean_i dR_i/d(eps)``, the predicted mean reward change.
        std: standard deviation over samples of ``eps * dR_i/d(eps)`` (``ddof=1``; NaN with one sample).
        ci_low, ci_high: the percentile-bootstrap interval of ``mean`` over samples (``eps`` times that
            of the mean ``dR/d(eps)``, bounds swapped when ``eps < 0``).
        confidence: the interval's level.
        num_samples: ``B``.
    """

    inflation: float
    eps: float
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


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

    def mean_interval(self, confidence: float = 0.95, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K,)`` low and high bounds of a percentile-bootstrap interval of each ``mu_k``.

        Samples are resampled (the same resampled sample sets at every step), seeded by ``seed``;
        with large ``B`` the width approaches ``2 z sigma_k / sqrt(B)`` (``z = 1.96`` at 95 %).
        NaN when ``B == 1``.
        """
        confidence, n_resamples, seed = _check_bootstrap(confidence, n_resamples, seed)
        low, high = _bootstrap_mean(self.S.numpy(), confidence, n_resamples, seed)
        return torch.from_numpy(low), torch.from_numpy(high)

    def directional_derivative_interval(self, confidence: float = 0.95, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                                        seed: int = 0) -> tuple[float, float]:
        """Percentile-bootstrap interval over samples of the mean ``dR/d(eps)``
        (:attr:`directional_derivative`); NaN when ``B == 1``."""
        confidence, n_resamples, seed = _check_bootstrap(confidence, n_resamples, seed)
        low, high = _bootstrap_mean(self.directional_derivative.numpy()[None, :], confidence, n_resamples, seed)
        return float(low[0]), float(high[0])

    def first_order_reward_change(self, inflation: float, confidence: float = 0.95, *,
                                  n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> FirstOrderRewardChange:
        """First-order reward change of removing the inflation ``inflation`` (a fraction, ``> -1``).

        ``eps = 1 / (1 + I) - 1``; the change is ``eps * dR/d(eps)`` per sample, its mean
        ``eps * mean(dR/d(eps))`` exactly, and its interval ``eps`` times
        :meth:`directional_derivative_interval` (the same resamples). A first-order estimate: it
        ignores the curvature of ``R`` in ``eps``, and a uniform scaling is not the audit's per-step,
        per-sample renormalization (paper eq. 3), which it approximates.
        """
        eps = removal_eps(inflation)
        confidence, n_resamples, seed = _check_bootstrap(confidence, n_resamples, seed)
        dr = self.directional_derivative
        low, high = self.directional_derivative_interval(confidence, n_resamples=n_resamples, seed=seed)
        low, high = sorted((eps * low, eps * high)) if math.isfinite(low) and math.isfinite(high) else (math.nan, math.nan)
        change = eps * dr
        return FirstOrderRewardChange(
            inflation=float(inflation), eps=eps, mean=eps * float(dr.mean()),
            std=float(change.std(correction=1)) if self.batch_size > 1 else math.nan,
            ci_low=low, ci_high=high, confidence=confidence, num_samples=self.batch_size)

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

    def summary_frame(self, confidence: float = 0.95, *, n_resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> pd.DataFrame:
        """One row per step: columns ``step, t, t_next, mean, mean_ci_low, mean_ci_high, std, nsr, stderr,
        frac_positive``; the interval is :meth:`mean_interval` with these arguments."""
        low, high = self.mean_interval(confidence, n_resamples=n_resamples, seed=seed)
        return pd.DataFrame(
            {
                "step": range(self.num_steps),
                "t": self.times[:-1].numpy(),
                "t_next": self.times[1:].numpy(),
                "mean": self.mean.numpy(),
                "mean_ci_low": low.numpy(),
                "mean_ci_high": high.numpy(),
                "std": self.std.numpy(),
                "nsr": self.nsr.numpy(),
                "stderr": self.stderr.numpy(),
                "frac_positive": self.frac_positive.numpy(),
            }
        )
