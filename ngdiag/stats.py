"""Inflation summary, bootstrap confidence intervals and verdicts (CONVENTIONS "Inflation summary and verdict").

Input is a table of norm ratios ``r_ik = ||v_theta|| / ||v_ref||`` of shape ``(steps, samples)``.
Samples are the independent unit (the steps of one sample are not independent), so every interval
resamples samples, never steps:

- per-sample log-ratio ``l_i = mean_k log r_ik``;
- inflation ``exp(mean_i l_i) - 1``, a fraction (x100 for percent);
- its confidence interval: a seeded bootstrap over samples of ``mean_i l_i`` (BCa or percentile),
  mapped through ``exp(.) - 1``; when samples share prompts, a cluster bootstrap over prompts
  (:func:`bootstrap_mean_interval` with ``clusters``: whole prompts are resampled, percentile);
- ``differs_from_zero``: the interval excludes 0;
- the t-weighted inflation ``exp(mean_i lw_i) - 1`` with ``lw_i = sum_k dt_k log r_ik / sum_k dt_k`` and
  ``dt_k = |t_k - t_{k+1}|`` (an approximation of the integral of ``log r`` over ``t``, so that audits with
  different step counts compare like with like), with its own interval over the same unit;
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
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats as _sps

from ngdiag.core.errors import ConfigError, NumericalError

__all__ = [
    "VERDICTS",
    "per_sample_log_ratio",
    "verdict_for",
    "bootstrap_mean_interval",
    "mean_interval",
    "bootstrap_unit",
    "InflationSummary",
    "step_weights",
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


def _check_values(values, name: str = "values") -> np.ndarray:
    v = _to_numpy(values, name)
    if v.ndim != 1 or v.shape[0] < 2:
        raise ConfigError(f"{name} must be a 1-D array of at least 2 numbers (the bootstrap resamples them), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise NumericalError(f"{name} has non-finite values at {_index_list(np.nonzero(~np.isfinite(v))[0])}")
    return v


def _cluster_codes(clusters, n: int) -> tuple[np.ndarray, int]:
    """Cluster labels (any numbers or strings, one per value) as codes ``0..G-1`` and ``G``."""
    c = np.asarray(clusters.detach().cpu().numpy() if hasattr(clusters, "detach") else clusters)
    if c.shape != (n,):
        raise ConfigError(f"clusters must give one label per value, shape ({n},), got {c.shape}")
    try:
        labels, codes = np.unique(c, return_inverse=True)
    except TypeError:
        raise ConfigError("clusters must be labels of one type (numbers or strings)") from None
    return codes.reshape(n), len(labels)


def mean_interval(values, *, clusters=None, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple:
    """``(mean, low, high)`` of ``values`` (e.g. per-sample paired differences): the percentile interval of
    :func:`bootstrap_mean_interval`, over samples, or over prompts when ``clusters`` (each sample's prompt) repeats.

    All values equal give the exact interval ``[mean, mean]``; fewer than 2 values give NaN bounds.
    """
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean()) if v.size else math.nan
    if v.size < 2:
        return mean, math.nan, math.nan
    lo, hi, _ = bootstrap_mean_interval(v, clusters=clusters, confidence=confidence, method="percentile",
                                        n_resamples=n_resamples, seed=seed)
    return mean, float(lo), float(hi)


def bootstrap_unit(clusters, num_values: int) -> tuple[str, int]:
    """What :func:`bootstrap_mean_interval` resamples for these ``clusters``: ``(unit, num_clusters)``.

    ``unit`` is ``"prompts"`` when there are at least 2 distinct clusters and fewer than ``num_values``
    (some values share a cluster: the cluster bootstrap), else ``"samples"``. ``num_clusters`` is the
    number of distinct clusters (``num_values`` when ``clusters`` is ``None``).
    """
    if clusters is None:
        return "samples", int(num_values)
    _, g = _cluster_codes(clusters, int(num_values))
    return ("prompts" if 2 <= g < num_values else "samples"), int(g)


def _cluster_percentile(v: np.ndarray, codes: np.ndarray, g: int, *, confidence: float, n_resamples: int,
                        seed: int) -> tuple[float, float]:
    """Percentile interval of the mean from resampling whole clusters with replacement (vectorised)."""
    sums = np.bincount(codes, weights=v, minlength=g)
    counts = np.bincount(codes, minlength=g).astype(np.float64)
    rng = np.random.default_rng(seed)
    batch = max(1, min(n_resamples, _BATCH_ELEMENTS // g))
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, batch):  # a few batches at most, each one vectorised
        idx = rng.integers(0, g, size=(min(batch, n_resamples - start), g))
        means[start:start + len(idx)] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def bootstrap_mean_interval(
    values,
    *,
    clusters=None,
    confidence: float = 0.95,
    method: str = "BCa",
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, str]:
    """Seeded bootstrap confidence interval of ``mean(values)``: ``(low, high, method_used)``.

    Without ``clusters`` (or when every value is its own cluster) this is ``scipy.stats.bootstrap`` of
    the mean over values, with ``np.random.default_rng(seed)``: BCa, or percentile when asked for or
    when BCa is undefined (``method_used`` says which). With ``clusters`` (one label per value, e.g.
    each sample's prompt) and at least 2 but fewer distinct clusters than values, it is a cluster
    bootstrap: each resample draws ``G`` clusters with replacement from the ``G`` clusters and takes
    the mean of all the values of the drawn clusters, ``sum_j S_{c_j} / sum_j n_{c_j}`` (cluster sums
    ``S_c``, sizes ``n_c``); the interval is the percentile interval of those means. scipy's BCa has no
    cluster form, so ``method_used`` is then ``"percentile"`` whatever ``method`` asks. A single
    cluster leaves nothing to resample across clusters: the values are resampled (check with
    :func:`bootstrap_unit`). All values equal give ``(mean, mean, "degenerate")``.

    Args:
        values: 1-D array-like of at least 2 finite numbers (e.g. per-sample log-ratios).
        clusters: optional labels, one per value (numbers or strings).
        confidence: confidence level in (0, 1).
        method: ``"BCa"`` or ``"percentile"`` (case-insensitive).
        n_resamples: bootstrap resamples.
        seed: the same seed gives the same interval.

    Raises:
        ConfigError: fewer than 2 values, clusters of the wrong shape, or an invalid option.
        NumericalError: a non-finite value, or a non-finite interval.

    Example:
        >>> import numpy as np
        >>> lo, hi, used = bootstrap_mean_interval(np.repeat([0.0, 1.0, 2.0, 3.0], 3), clusters=np.repeat(range(4), 3))
        >>> used, lo <= 1.5 <= hi
        ('percentile', True)
    """
    key = str(method).lower()
    if key not in _METHODS:
        raise ConfigError(f"method must be 'BCa' or 'percentile', got {method!r}")
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    v = _check_values(values)
    codes, g = (None, len(v)) if clusters is None else _cluster_codes(clusters, len(v))
    if np.all(v == v[0]):
        mean = float(v.mean())
        return mean, mean, "degenerate"
    if 2 <= g < len(v):
        lo, hi = _cluster_percentile(v, codes, g, confidence=confidence, n_resamples=n_resamples, seed=seed)
        used = "percentile"
    else:
        used = _METHODS[key]
        kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
        lo, hi = _bootstrap_mean_ci(v, method=used, **kw)
        if used == "BCa" and not (np.isfinite(lo) and np.isfinite(hi)):
            used = "percentile"
            lo, hi = _bootstrap_mean_ci(v, method=used, **kw)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise NumericalError("the bootstrap confidence interval of the mean is not finite")
    return float(lo), float(hi), used


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
        num_samples: number of samples.
        num_steps: number of sampling steps averaged in each ``l_i``.
        method: how the interval was obtained: ``"BCa"``, ``"percentile"`` (asked for, the fallback
            when BCa is undefined, or always for the cluster bootstrap), or ``"degenerate"`` when all
            ``l_i`` are equal and the interval is the single value ``[value, value]``.
        interval_unit: what the bootstrap resampled: ``"samples"``, or ``"prompts"`` (the cluster
            bootstrap, when samples share prompts).
        num_clusters: number of distinct prompts (clusters) given; ``num_samples`` when none were.
        differs_from_zero: the interval excludes 0 (``ci_low > 0`` or ``ci_high < 0``); set from the
            interval when not given.
        t_weighted_value: the t-weighted inflation ``exp(mean_i lw_i) - 1``, ``lw_i = sum_k dt_k log r_ik
            / sum_k dt_k`` with ``dt_k = |t_k - t_{k+1}|``; ``None`` without step times.
        t_weighted_ci_low, t_weighted_ci_high, t_weighted_method: its interval (same unit, seed and
            settings) and how it was obtained.
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
    interval_unit: str = "samples"
    num_clusters: Optional[int] = None
    differs_from_zero: Optional[bool] = None
    t_weighted_value: Optional[float] = None
    t_weighted_ci_low: Optional[float] = None
    t_weighted_ci_high: Optional[float] = None
    t_weighted_method: Optional[str] = None

    def __post_init__(self):
        if self.differs_from_zero is None:
            object.__setattr__(self, "differs_from_zero", bool(self.ci_low > 0 or self.ci_high < 0))

    def to_dict(self) -> dict:
        """JSON-safe dict of Python floats, ints, bools, strings and ``None``."""
        return asdict(self)

    def to_frame(self) -> pd.DataFrame:
        """One-row DataFrame with one column per field."""
        return pd.DataFrame([self.to_dict()])

    def __str__(self) -> str:
        unit = f", over {self.num_clusters} prompts" if self.interval_unit == "prompts" else ""
        text = (
            f"inflation {self.value:+.2%} ({self.confidence:.0%} CI {self.ci_low:+.2%} to {self.ci_high:+.2%}, "
            f"{self.method}{unit}, {self.num_samples} samples x {self.num_steps} steps): {self.verdict}"
        )
        if self.t_weighted_value is not None:
            text += (f"; t-weighted {self.t_weighted_value:+.2%} "
                     f"(CI {self.t_weighted_ci_low:+.2%} to {self.t_weighted_ci_high:+.2%})")
        return text


def step_weights(times, num_steps: int) -> np.ndarray:
    """Step sizes ``dt_k = |t_k - t_{k+1}|`` of ``num_steps`` steps, normalised to sum to 1.

    ``times`` is either the grid ``t_0 .. t_K`` (shape ``(num_steps + 1,)``) or the time of each step
    ``t_0 .. t_{K-1}`` (shape ``(num_steps,)``), whose last step then ends at ``t_K = 0`` (CONVENTIONS
    "Time": sampling ends at data).

    Raises:
        ConfigError: a shape that fits neither, or step sizes that sum to 0.
        NumericalError: a non-finite time.
    """
    t = _to_numpy(times, "times")
    if t.shape == (num_steps,):
        t = np.append(t, 0.0)
    if t.shape != (num_steps + 1,):
        raise ConfigError(f"times must have shape (steps + 1,) = ({num_steps + 1},) (the grid) or (steps,) = "
                          f"({num_steps},) (each step's t, the last step ending at 0), got {t.shape}")
    if not np.isfinite(t).all():
        raise NumericalError(f"times has non-finite values at {_index_list(np.nonzero(~np.isfinite(t))[0])}")
    dt = np.abs(np.diff(t))
    if not dt.sum() > 0:
        raise ConfigError("times must span a non-empty interval: every step size |t_k - t_{k+1}| is 0")
    return dt / dt.sum()


def inflation_summary(
    ratios,
    *,
    confidence: float = 0.95,
    tolerance: float = 0.01,
    method: str = "BCa",
    n_resamples: int = 2000,
    seed: int = 0,
    clusters=None,
    times=None,
) -> InflationSummary:
    """Inflation, its bootstrap CI and the verdict (CONVENTIONS "Inflation summary and verdict").

    ``l_i = mean_k log r_ik``; inflation ``= exp(mean_i l_i) - 1``; the CI is
    :func:`bootstrap_mean_interval` of the ``l_i``, seeded with ``np.random.default_rng(seed)``, mapped
    through ``exp(.) - 1``: ``scipy.stats.bootstrap`` over samples, or, when ``clusters`` says that
    samples share prompts, the cluster bootstrap over prompts (percentile). All ``l_i`` equal gives the
    exact interval ``[value, value]``; a NaN BCa interval (degenerate resamples) falls back to percentile.
    With ``times`` the t-weighted inflation ``exp(mean_i lw_i) - 1``, ``lw_i = sum_k w_k log r_ik`` with
    ``w_k = dt_k / sum_j dt_j`` (:func:`step_weights`), gets its own interval the same way.

    Args:
        ratios: ``r_ik``, shape ``(steps, samples)``, all finite and > 0.
        confidence: confidence level in (0, 1).
        tolerance: verdict tolerance (fraction) >= 0.
        method: ``"BCa"`` or ``"percentile"`` (case-insensitive).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed; the same seed gives the same interval.
        clusters: optional label of each sample's prompt, shape ``(samples,)``.
        times: optional step times: the grid ``(steps + 1,)`` or each step's ``t_k`` ``(steps,)``.

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
    unit, num_clusters = bootstrap_unit(clusters, num_samples)
    weights = None if times is None else step_weights(times, num_steps)
    kw = dict(clusters=clusters, confidence=confidence, method=method, n_resamples=n_resamples, seed=seed)

    log_r = np.log(r)
    per_sample = log_r.mean(axis=0)
    value = float(np.expm1(per_sample.mean()))
    lo_log, hi_log, used = bootstrap_mean_interval(per_sample, **kw)
    lo, hi = (value, value) if used == "degenerate" else (float(np.expm1(lo_log)), float(np.expm1(hi_log)))
    tw = {}
    if weights is not None:
        weighted = (log_r * weights[:, None]).sum(axis=0)
        tw_value = float(np.expm1(weighted.mean()))
        tw_lo, tw_hi, tw_used = bootstrap_mean_interval(weighted, **kw)
        tw = dict(t_weighted_value=tw_value, t_weighted_method=tw_used,
                  t_weighted_ci_low=tw_value if tw_used == "degenerate" else float(np.expm1(tw_lo)),
                  t_weighted_ci_high=tw_value if tw_used == "degenerate" else float(np.expm1(tw_hi)))
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
        interval_unit=unit,
        num_clusters=num_clusters,
        **tw,
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
