"""Inflation summary, bootstrap confidence intervals and verdicts (CONVENTIONS "Inflation summary and verdict").

Input is a table of norm ratios ``r_ik = ||v_theta|| / ||v_ref||`` of shape ``(steps, samples)``.
Samples are the independent unit (the steps of one sample are not independent), so every interval
resamples samples, never steps:

- per-sample log-ratio ``l_i = mean_k log r_ik``;
- inflation ``exp(mean_i l_i) - 1``, a fraction (x100 for percent);
- its confidence interval: a seeded bootstrap over samples of ``mean_i l_i`` (BCa or percentile),
  mapped through ``exp(.) - 1``;
- verdict with tolerance ``tol``: ``inflated`` if CI low > tol, ``deflated`` if CI high < -tol,
  ``no-inflation`` if the CI lies inside ``[-tol, tol]``, ``inconclusive`` otherwise;
- per-step curves: mean and percentile-bootstrap CI of ``r_ik`` over samples at each step.

Example:
    >>> import numpy as np
    >>> from ngdiag.stats import inflation_summary
    >>> ratios = np.full((4, 8), 1.08)               # 4 steps, 8 samples, every ratio 1.08
    >>> s = inflation_summary(ratios)
    >>> round(s.value, 6), s.ci_low == s.ci_high == s.value, s.verdict
    (0.08, True, 'inflated')
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as _sps

from ngdiag.core.errors import ConfigError, NumericalError

__all__ = [
    "VERDICTS",
    "per_sample_log_ratio",
    "verdict_for",
    "InflationSummary",
    "inflation_summary",
    "per_step_summary",
]

VERDICTS = ("inflated", "deflated", "no-inflation", "inconclusive")
_METHODS = {"bca": "BCa", "percentile": "percentile"}
_MAX_LISTED = 10
# Resampled values held in memory at once by one bootstrap batch (about 64 MB of float64).
_BATCH_ELEMENTS = 2**23
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(_sps.bootstrap).parameters else "random_state"


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an array of numbers") from None


def _index_list(idx: np.ndarray) -> str:
    idx = [int(i) for i in idx]
    if len(idx) <= _MAX_LISTED:
        return str(idx)
    return "[" + ", ".join(str(i) for i in idx[:_MAX_LISTED]) + f", ...] ({len(idx)} in all)"


def _check_ratios(ratios) -> np.ndarray:
    r = _to_numpy(ratios, "ratios")
    if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise ConfigError(f"ratios must have shape (steps, samples) with at least one of each, got {r.shape}")
    bad = ~np.isfinite(r) | (r <= 0)
    if bad.any():
        k = int(np.nonzero(bad.any(axis=1))[0][0])
        raise NumericalError(
            f"ratios has a non-positive or non-finite value at step {k} for samples {_index_list(np.nonzero(bad[k])[0])}"
        )
    return r


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return confidence


def _check_resamples(n_resamples: int) -> int:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples}")
    return int(n_resamples)


def _bootstrap_mean_ci(
    data: np.ndarray, *, confidence: float, method: str, n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap CI of the mean along the last axis; NaN where scipy cannot compute it."""
    batch = max(1, min(n_resamples, _BATCH_ELEMENTS // max(1, data.size)))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # A degenerate resample distribution makes BCa return NaN with warnings; callers handle NaN.
        warnings.simplefilter("ignore", _sps.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _sps.bootstrap(
            (data,),
            np.mean,
            n_resamples=n_resamples,
            batch=batch,
            vectorized=True,
            axis=-1,
            confidence_level=confidence,
            method=method,
            **{_RNG_KEYWORD: np.random.default_rng(seed)},
        )
    return np.asarray(res.confidence_interval.low, float), np.asarray(res.confidence_interval.high, float)


def per_sample_log_ratio(ratios) -> np.ndarray:
    """Per-sample log-ratio ``l_i = mean_k log r_ik`` (CONVENTIONS "Inflation summary and verdict").

    Args:
        ratios: ``r_ik = ||v_theta|| / ||v_ref||``, array-like or tensor of shape ``(steps, samples)``.

    Returns:
        float64 array of shape ``(samples,)``.

    Raises:
        ConfigError: ``ratios`` is not a non-empty 2-D array.
        NumericalError: a ratio is zero, negative or non-finite (named with its step and samples).
    """
    return np.log(_check_ratios(ratios)).mean(axis=0)


def verdict_for(ci_low: float, ci_high: float, tolerance: float) -> str:
    """Verdict from a confidence interval of the inflation (fractions) and a tolerance ``tol >= 0``.

    ``"inflated"`` if ``ci_low > tol``; ``"deflated"`` if ``ci_high < -tol``; ``"no-inflation"`` if
    ``-tol <= ci_low`` and ``ci_high <= tol``; ``"inconclusive"`` otherwise. The boundaries are strict
    for the first two: a CI low exactly equal to ``tol`` is not ``inflated``.

    Raises:
        ConfigError: a negative or non-finite tolerance, or ``ci_low > ci_high``.
        NumericalError: a NaN bound.
    """
    lo, hi, tol = float(ci_low), float(ci_high), float(tolerance)
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if math.isnan(lo) or math.isnan(hi):
        raise NumericalError("the confidence interval has a NaN bound")
    if lo > hi:
        raise ConfigError(f"the confidence interval is reversed: low {lo} > high {hi}")
    if lo > tol:
        return "inflated"
    if hi < -tol:
        return "deflated"
    if -tol <= lo and hi <= tol:
        return "no-inflation"
    return "inconclusive"


@dataclass(frozen=True)
class InflationSummary:
    """Velocity-norm inflation of ``theta`` against ``ref`` with its bootstrap CI and verdict.

    Attributes:
        value: inflation ``exp(mean_i l_i) - 1`` as a fraction (0.08 means +8 %).
        ci_low, ci_high: confidence interval of ``value``, same units.
        confidence: confidence level of the interval, e.g. 0.95.
        tolerance: the verdict's tolerance, a fraction.
        verdict: one of :data:`VERDICTS`, from :func:`verdict_for`.
        num_samples: number of samples (the bootstrap unit).
        num_steps: number of sampling steps averaged in each ``l_i``.
        method: how the interval was obtained: ``"BCa"``, ``"percentile"`` (asked for, or the fallback
            when BCa is undefined), or ``"degenerate"`` when all ``l_i`` are equal and the interval is
            the single value ``[value, value]``.
    """

    value: float
    ci_low: float
    ci_high: float
    confidence: float
    tolerance: float
    verdict: str
    num_samples: int
    num_steps: int
    method: str

    def to_dict(self) -> dict:
        """JSON-safe dict of Python floats, ints and strings."""
        return asdict(self)

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame with one column per field."""
        return pd.DataFrame([self.to_dict()])

    def __str__(self) -> str:
        return (
            f"inflation {self.value:+.2%} ({self.confidence:.0%} CI {self.ci_low:+.2%} to {self.ci_high:+.2%}, "
            f"{self.method}, {self.num_samples} samples x {self.num_steps} steps): {self.verdict}"
        )


def inflation_summary(
    ratios,
    *,
    confidence: float = 0.95,
    tolerance: float = 0.01,
    method: str = "BCa",
    n_resamples: int = 2000,
    seed: int = 0,
) -> InflationSummary:
    """Inflation, its bootstrap CI over samples and the verdict (CONVENTIONS "Inflation summary and verdict").

    ``l_i = mean_k log r_ik``; inflation ``= exp(mean_i l_i) - 1``; the CI is
    ``scipy.stats.bootstrap`` of ``mean_i l_i`` over samples, seeded with
    ``np.random.default_rng(seed)``, mapped through ``exp(.) - 1``. All ``l_i`` equal gives the exact
    interval ``[value, value]``; a NaN BCa interval (degenerate resamples) falls back to percentile.

    Args:
        ratios: ``r_ik``, shape ``(steps, samples)``, all finite and > 0.
        confidence: confidence level in (0, 1).
        tolerance: verdict tolerance (fraction) >= 0.
        method: ``"BCa"`` or ``"percentile"`` (case-insensitive).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed; the same seed gives the same interval.

    Raises:
        ConfigError: fewer than 2 samples, or an invalid option.
        NumericalError: a non-positive or non-finite ratio.
    """
    key = str(method).lower()
    if key not in _METHODS:
        raise ConfigError(f"method must be 'BCa' or 'percentile', got {method!r}")
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    tolerance = float(tolerance)
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"tolerance must be a finite number >= 0, got {tolerance}")
    r = _check_ratios(ratios)
    num_steps, num_samples = r.shape
    if num_samples < 2:
        raise ConfigError(
            f"an inflation summary needs at least 2 samples (the bootstrap resamples samples), got {num_samples}"
        )

    log_r = np.log(r).mean(axis=0)
    mean_log = float(log_r.mean())
    value = float(np.expm1(mean_log))
    if np.all(log_r == log_r[0]):
        lo = hi = value
        used = "degenerate"
    else:
        used = _METHODS[key]
        kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
        lo_log, hi_log = _bootstrap_mean_ci(log_r, method=used, **kw)
        if used == "BCa" and not (np.isfinite(lo_log) and np.isfinite(hi_log)):
            used = "percentile"
            lo_log, hi_log = _bootstrap_mean_ci(log_r, method=used, **kw)
        if not (np.isfinite(lo_log) and np.isfinite(hi_log)):
            raise NumericalError("the bootstrap confidence interval of the inflation is not finite")
        lo, hi = float(np.expm1(lo_log)), float(np.expm1(hi_log))
    return InflationSummary(
        value=value,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        tolerance=tolerance,
        verdict=verdict_for(lo, hi, tolerance),
        num_samples=int(num_samples),
        num_steps=int(num_steps),
        method=used,
    )


def _per_step_column(x, num_steps: int, num_samples: int, name: str) -> np.ndarray:
    if x is None:
        return np.full(num_steps, np.nan)
    a = _to_numpy(x, name)
    if a.shape == (num_steps, num_samples):
        a = a.mean(axis=1)
    elif a.shape != (num_steps,):
        raise ConfigError(
            f"{name} must have shape (steps, samples) = {(num_steps, num_samples)} or (steps,), got {a.shape}"
        )
    if not np.isfinite(a).all():
        raise NumericalError(f"{name} has non-finite values at steps {_index_list(np.nonzero(~np.isfinite(a))[0])}")
    return a


def per_step_summary(
    ratios,
    times,
    *,
    cos=None,
    radial_share=None,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-step curve of the norm ratio: mean of ``r_ik`` over samples with a percentile bootstrap CI.

    CONVENTIONS "Inflation summary and verdict", last item. The CI resamples samples at each step
    (one vectorised ``scipy.stats.bootstrap`` call along the samples axis, seeded). A step where all
    samples have the same ratio gets the exact interval ``[mean, mean]``.

    Args:
        ratios: ``r_ik``, shape ``(steps, samples)``, finite and > 0, at least 2 samples.
        times: ``t_k`` of each step, shape ``(steps,)``.
        cos: optional cosines, shape ``(steps, samples)`` (averaged over samples) or ``(steps,)``.
        radial_share: optional radial shares, shape ``(steps, samples)`` (averaged) or ``(steps,)``.
        confidence: confidence level in (0, 1).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        DataFrame with one row per step and columns ``step`` (int), ``t``, ``mean_ratio``, ``ci_low``,
        ``ci_high``, ``mean_cos``, ``radial_share`` (the last two NaN when not given);
        ``attrs["confidence"]`` holds the level.

    Raises:
        ConfigError: shapes that do not match, fewer than 2 samples, or an invalid option.
        NumericalError: a non-positive or non-finite ratio, or non-finite times, cosines or shares.
    """
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    r = _check_ratios(ratios)
    num_steps, num_samples = r.shape
    if num_samples < 2:
        raise ConfigError(f"per-step intervals need at least 2 samples, got {num_samples}")
    t = _to_numpy(times, "times")
    if t.shape != (num_steps,):
        raise ConfigError(f"times must have shape (steps,) = ({num_steps},), got {t.shape}")
    if not np.isfinite(t).all():
        raise NumericalError(f"times has non-finite values at steps {_index_list(np.nonzero(~np.isfinite(t))[0])}")
    mean_cos = _per_step_column(cos, num_steps, num_samples, "cos")
    share = _per_step_column(radial_share, num_steps, num_samples, "radial_share")

    mean_ratio = r.mean(axis=1)
    ci_low, ci_high = mean_ratio.copy(), mean_ratio.copy()
    varies = ~np.all(r == r[:, :1], axis=1)
    if varies.any():
        lo, hi = _bootstrap_mean_ci(
            r[varies], confidence=confidence, method="percentile", n_resamples=n_resamples, seed=seed
        )
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise NumericalError("the per-step bootstrap confidence interval is not finite")
        ci_low[varies], ci_high[varies] = lo, hi
    frame = pd.DataFrame(
        {
            "step": np.arange(num_steps),
            "t": t,
            "mean_ratio": mean_ratio,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "mean_cos": mean_cos,
            "radial_share": share,
        }
    )
    frame.attrs["confidence"] = confidence
    return frame
