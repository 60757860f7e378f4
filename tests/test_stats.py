"""Inflation summary, bootstrap intervals and verdicts (CONVENTIONS "Inflation summary and verdict")."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.stats import InflationSummary, inflation_summary, per_sample_log_ratio, per_step_summary, verdict_for


def _planted(factor: float, *, steps: int = 10, samples: int = 64, step_sd: float = 0.05, sample_sd: float = 0.02,
             seed: int = 0) -> np.ndarray:
    """Ratios ``factor * exp(noise)`` whose log-noise has exactly zero mean per sample and over samples.

    Step noise is antithetic within each sample (steps k and k + steps/2 cancel); sample offsets are
    antithetic across samples. So ``mean_i l_i = log(factor)`` up to rounding, and the samples still vary.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, step_sd, size=(steps // 2, samples))
    s = rng.normal(0.0, sample_sd, size=samples // 2)
    return factor * np.exp(np.concatenate([z, -z]) + np.concatenate([s, -s])[None, :])


def test_per_sample_log_ratio_hand_values():
    e = math.e
    ratios = [[e, 1.0, 1.0], [1.0, e**2, 1.0 / e]]  # 2 steps, 3 samples
    np.testing.assert_allclose(per_sample_log_ratio(ratios), [0.5, 1.0, -0.5], rtol=1e-15)
    out = per_sample_log_ratio(torch.tensor(ratios, dtype=torch.float64))
    assert out.shape == (3,) and out.dtype == np.float64


def test_per_sample_log_ratio_rejects_bad_ratios():
    r = np.ones((3, 4))
    r[1, 0] = 0.0
    r[1, 2] = -1.0
    r[2, 3] = np.nan
    with pytest.raises(NumericalError, match=r"^ratios has a non-positive or non-finite value at step 1 for samples \[0, 2\]$"):
        per_sample_log_ratio(r)
    with pytest.raises(NumericalError, match=r"step 0 for samples \[1\]"):
        per_sample_log_ratio([[1.0, np.inf]])
    with pytest.raises(ConfigError, match="steps, samples"):
        per_sample_log_ratio(np.ones(5))
    with pytest.raises(ConfigError):
        per_sample_log_ratio(np.ones((0, 3)))


@pytest.mark.parametrize(
    "low, high, tol, expected",
    [
        (0.02, 0.05, 0.01, "inflated"),
        (0.0100001, 0.05, 0.01, "inflated"),
        (0.01, 0.05, 0.01, "inconclusive"),  # CI low == tol is not inflated
        (-0.05, -0.02, 0.01, "deflated"),
        (-0.05, -0.01, 0.01, "inconclusive"),  # CI high == -tol is not deflated
        (-0.01, 0.01, 0.01, "no-inflation"),  # boundaries belong to [-tol, tol]
        (-0.005, 0.003, 0.01, "no-inflation"),
        (0.0, 0.0, 0.0, "no-inflation"),
        (0.001, 0.002, 0.0, "inflated"),
        (-0.002, -0.001, 0.0, "deflated"),
        (-0.02, 0.005, 0.01, "inconclusive"),
        (0.005, 0.02, 0.01, "inconclusive"),
        (-0.2, 0.2, 0.01, "inconclusive"),
        (0.3, 0.3, 0.1, "inflated"),
    ],
)
def test_verdict_table(low, high, tol, expected):
    assert verdict_for(low, high, tol) == expected


def test_verdict_rejects_bad_input():
    with pytest.raises(ConfigError):
        verdict_for(0.0, 0.1, -0.01)
    with pytest.raises(ConfigError):
        verdict_for(0.2, 0.1, 0.01)
    with pytest.raises(NumericalError):
        verdict_for(float("nan"), 0.1, 0.01)


def test_planted_inflation_exact_mean():
    ratios = _planted(1.08)
    s = inflation_summary(ratios)
    assert isinstance(s, InflationSummary)
    assert s.value == pytest.approx(0.08, abs=1e-12)
    assert s.ci_low < s.value < s.ci_high
    # 64 sample offsets with sd 0.02: the 95 % CI half-width is about 1.96 * 0.02 / 8 = 0.005 (x 1.08).
    assert 0.002 < s.ci_high - s.ci_low < 0.03
    assert s.verdict == "inflated"
    assert (s.num_steps, s.num_samples, s.method, s.confidence, s.tolerance) == (10, 64, "BCa", 0.95, 0.01)


def test_planted_inflation_with_unstructured_noise():
    rng = np.random.default_rng(5)
    ratios = 1.08 * np.exp(rng.normal(0.0, 0.05, size=(20, 200)))
    s = inflation_summary(ratios)
    assert s.value == pytest.approx(0.08, abs=0.002)
    assert s.ci_low < 0.08 < s.ci_high
    assert s.verdict == "inflated"


def test_planted_deflation():
    s = inflation_summary(_planted(0.95, seed=1))
    assert s.value == pytest.approx(-0.05, abs=1e-12)
    assert s.ci_low < s.value < s.ci_high < -0.01
    assert s.verdict == "deflated"


def test_exactly_no_effect_gives_zero_width_interval():
    s = inflation_summary(np.ones((8, 16)))
    assert (s.value, s.ci_low, s.ci_high) == (0.0, 0.0, 0.0)
    assert s.verdict == "no-inflation"
    assert s.method == "degenerate"
    d = json.loads(json.dumps(s.to_dict()))
    assert d == {
        "value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "confidence": 0.95, "tolerance": 0.01,
        "verdict": "no-inflation", "num_samples": 16, "num_steps": 8, "method": "degenerate",
        "interval_unit": "samples", "num_clusters": 16, "differs_from_zero": False, "t_weighted_value": None,
        "t_weighted_ci_low": None, "t_weighted_ci_high": None, "t_weighted_method": None,
    }
    frame = s.to_frame()
    assert isinstance(frame, pd.DataFrame) and frame.shape == (1, 16)
    assert frame.loc[0, "verdict"] == "no-inflation"


def test_identical_samples_with_step_noise_have_no_nan():
    # Every sample has l_i = log 1.08 (antithetic step noise), up to rounding.
    ratios = _planted(1.08, sample_sd=0.0)
    for method in ("BCa", "percentile"):
        s = inflation_summary(ratios, method=method)
        assert np.isfinite([s.value, s.ci_low, s.ci_high]).all()
        assert s.ci_low == pytest.approx(0.08, abs=1e-12) and s.ci_high == pytest.approx(0.08, abs=1e-12)
        assert s.verdict == "inflated"


def test_bca_nan_falls_back_to_percentile():
    # log-ratios one ulp apart: every resampled mean ties with the observed one and BCa is undefined.
    ratios = np.array([[2.0, np.nextafter(2.0, 3.0)] * 5])
    s = inflation_summary(ratios)
    assert s.method == "percentile"
    assert s.value == pytest.approx(1.0, abs=1e-12)
    assert s.ci_low == pytest.approx(1.0, abs=1e-12) and s.ci_high == pytest.approx(1.0, abs=1e-12)
    assert s.verdict == "inflated"


def test_wide_noisy_sample_is_inconclusive():
    rng = np.random.default_rng(2)
    ratios = 1.02 * np.exp(rng.normal(0.0, 0.3, size=(1, 16)) + rng.normal(0.0, 0.05, size=(10, 16)))
    s = inflation_summary(ratios)
    assert s.ci_low < -0.01 and s.ci_high > 0.01
    assert s.verdict == "inconclusive"


def test_bootstrap_interval_has_the_expected_width():
    # Normal log-ratios with sd 0.1 over 400 samples: 95 % half-width 1.96 * 0.1 / 20 = 0.0098 (log scale).
    rng = np.random.default_rng(3)
    ratios = np.exp(rng.normal(0.0, 0.1, size=(1, 400)))
    sd = np.log(ratios).std(ddof=1)
    expected = 2 * 1.959964 * sd / math.sqrt(400)
    for method in ("BCa", "percentile"):
        s = inflation_summary(ratios, method=method)
        width = math.log1p(s.ci_high) - math.log1p(s.ci_low)
        assert width == pytest.approx(expected, rel=0.15)
        assert s.method == method
    s90 = inflation_summary(ratios, confidence=0.9)
    width90 = math.log1p(s90.ci_high) - math.log1p(s90.ci_low)
    assert width90 == pytest.approx(expected * 1.644854 / 1.959964, rel=0.15)


def test_seed_reproducibility():
    ratios = _planted(1.03, seed=4, sample_sd=0.05)
    a = inflation_summary(ratios, seed=7)
    b = inflation_summary(ratios, seed=7)
    c = inflation_summary(ratios, seed=8)
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.value == c.value


def test_inflation_summary_rejects_bad_input():
    with pytest.raises(ConfigError, match="at least 2 samples"):
        inflation_summary(np.full((5, 1), 1.1))
    with pytest.raises(ConfigError, match="method"):
        inflation_summary(np.ones((2, 4)), method="normal")
    with pytest.raises(ConfigError):
        inflation_summary(np.ones((2, 4)), confidence=1.0)
    with pytest.raises(ConfigError):
        inflation_summary(np.ones((2, 4)), tolerance=-0.1)
    with pytest.raises(NumericalError, match="step 1"):
        inflation_summary(np.array([[1.0, 1.1], [1.0, 0.0]]))
    assert inflation_summary(np.ones((2, 4)), method="bca").method == "degenerate"


def test_per_step_summary_values_and_columns():
    rng = np.random.default_rng(6)
    steps, samples = 5, 100
    level = np.array([1.0, 1.02, 1.05, 1.10, 1.20])
    ratios = level[:, None] * np.exp(rng.normal(0.0, 0.05, size=(steps, samples)))
    ratios[0] = 1.0  # a constant step: exact interval, no NaN
    times = np.linspace(1.0, 0.2, steps)
    cos = rng.uniform(0.9, 1.0, size=(steps, samples))
    share = rng.uniform(0.0, 1.0, size=steps)
    df = per_step_summary(ratios, times, cos=cos, radial_share=share)
    assert list(df.columns) == ["step", "t", "mean_ratio", "ci_low", "ci_high", "mean_cos", "radial_share"]
    assert df["step"].tolist() == list(range(steps))
    np.testing.assert_array_equal(df["t"], times)
    np.testing.assert_allclose(df["mean_ratio"], ratios.mean(axis=1), rtol=1e-15)
    np.testing.assert_allclose(df["mean_cos"], cos.mean(axis=1), rtol=1e-15)
    np.testing.assert_array_equal(df["radial_share"], share)
    assert not df.isna().any().any()
    assert (df.loc[0, "ci_low"], df.loc[0, "ci_high"]) == (1.0, 1.0)
    inner = df.iloc[1:]
    assert (inner["ci_low"] < inner["mean_ratio"]).all() and (inner["mean_ratio"] < inner["ci_high"]).all()
    # Percentile CI of a mean of 100 samples: width about 2 * 1.96 * sd / 10.
    sd = ratios[1:].std(axis=1, ddof=1)
    np.testing.assert_allclose(inner["ci_high"] - inner["ci_low"], 2 * 1.959964 * sd / 10, rtol=0.2)
    assert df.attrs["confidence"] == 0.95


def test_per_step_summary_optional_columns_and_reproducibility():
    rng = np.random.default_rng(7)
    ratios = np.exp(rng.normal(0.0, 0.1, size=(3, 20)))
    a = per_step_summary(ratios, [1.0, 0.5, 0.25], seed=3)
    assert a["mean_cos"].isna().all() and a["radial_share"].isna().all()
    pd.testing.assert_frame_equal(a, per_step_summary(ratios, [1.0, 0.5, 0.25], seed=3))
    b = per_step_summary(ratios, [1.0, 0.5, 0.25], seed=4)
    assert not np.array_equal(a["ci_low"].to_numpy(), b["ci_low"].to_numpy())


def test_per_step_summary_rejects_bad_input():
    ratios = np.ones((3, 4))
    with pytest.raises(ConfigError, match="times"):
        per_step_summary(ratios, [1.0, 0.5])
    with pytest.raises(ConfigError, match="cos"):
        per_step_summary(ratios, [1.0, 0.5, 0.0], cos=np.ones((3, 5)))
    with pytest.raises(ConfigError, match="at least 2 samples"):
        per_step_summary(np.ones((3, 1)), [1.0, 0.5, 0.0])
    with pytest.raises(NumericalError, match="radial_share"):
        per_step_summary(ratios, [1.0, 0.5, 0.0], radial_share=[0.1, np.nan, 0.2])
    with pytest.raises(NumericalError, match="step 2"):
        per_step_summary(np.array([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), [1.0, 0.5, 0.0])
