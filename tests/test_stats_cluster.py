"""Inference that matches the claims: the cluster bootstrap over prompts, the t-weighted inflation and
``differs_from_zero`` (ngdiag.stats), and their place in the audit's summary.json."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.stats import (
    InflationSummary,
    bootstrap_mean_interval,
    bootstrap_unit,
    inflation_summary,
    step_weights,
)
from tests.helpers import run_cli


def _duplicated_prompts(*, prompts: int = 8, copies: int = 4, effect_sd: float = 0.05, noise_sd: float = 1e-4,
                        steps: int = 5, seed: int = 0):
    """Ratios of ``prompts`` prompts with distinct effects, each sampled ``copies`` times with tiny seed noise.

    Sample ``i`` uses prompt ``i mod prompts`` (the audit's rule). Returns ``(ratios, clusters)``.
    """
    rng = np.random.default_rng(seed)
    effect = rng.normal(0.05, effect_sd, size=prompts)
    clusters = np.arange(prompts * copies) % prompts
    log_r = effect[clusters][None, :] + rng.normal(0.0, noise_sd, size=(steps, prompts * copies))
    return np.exp(log_r), clusters


def _log_width(s: InflationSummary) -> float:
    return math.log1p(s.ci_high) - math.log1p(s.ci_low)


# ----------------------------------------------------------------------------- (i) cluster bootstrap
def test_duplicated_prompts_widen_the_interval():
    ratios, clusters = _duplicated_prompts()
    plain = inflation_summary(ratios)
    cluster = inflation_summary(ratios, clusters=clusters)
    assert plain.value == cluster.value
    assert (plain.interval_unit, plain.num_clusters, plain.method) == ("samples", 32, "BCa")
    assert (cluster.interval_unit, cluster.num_clusters, cluster.method) == ("prompts", 8, "percentile")
    # 32 samples that are 8 prompts x 4 near-copies: the sample bootstrap believes in sqrt(32) and is
    # too narrow by about sqrt(4) = 2; the cluster bootstrap resamples the 8 prompts.
    ratio = _log_width(cluster) / _log_width(plain)
    assert 1.5 < ratio < 2.6, ratio
    # The cluster interval is about the 8 prompt effects' interval: 2 z sd / sqrt(8), shrunk by the
    # bootstrap's sqrt((G - 1) / G).
    per_prompt = np.log(ratios).mean(axis=0)[:8]
    expected = 2 * 1.959964 * per_prompt.std(ddof=1) / math.sqrt(8) * math.sqrt(7 / 8)
    assert _log_width(cluster) == pytest.approx(expected, rel=0.2)


def test_cluster_bootstrap_is_the_bootstrap_of_prompt_means_for_equal_prompt_sizes():
    # With equal cluster sizes the resampled mean of the samples of the drawn prompts is the mean of
    # their prompt means: the same seeded draws by hand give the same percentile interval.
    ratios, clusters = _duplicated_prompts(seed=1)
    values = np.log(ratios).mean(axis=0)
    low, high, used = bootstrap_mean_interval(values, clusters=clusters, n_resamples=500, seed=3)
    prompt_means = np.array([values[clusters == g].mean() for g in range(8)])
    draws = np.random.default_rng(3).integers(0, 8, size=(500, 8))
    expected = np.percentile(prompt_means[draws].mean(axis=1), [2.5, 97.5])
    assert used == "percentile"
    np.testing.assert_allclose([low, high], expected, rtol=1e-12)


def test_each_sample_its_own_cluster_gives_exactly_the_plain_interval():
    rng = np.random.default_rng(2)
    ratios = np.exp(rng.normal(0.03, 0.05, size=(4, 24)))
    for method in ("BCa", "percentile"):
        plain = inflation_summary(ratios, method=method, seed=5)
        own = inflation_summary(ratios, method=method, seed=5, clusters=np.arange(24)[::-1])
        assert (own.value, own.ci_low, own.ci_high, own.method) == (plain.value, plain.ci_low, plain.ci_high,
                                                                    plain.method)
        assert (own.interval_unit, own.num_clusters) == ("samples", 24)
    values = np.log(ratios).mean(axis=0)
    assert bootstrap_mean_interval(values, clusters=[f"p{i}" for i in range(24)]) == bootstrap_mean_interval(values)


def test_cluster_labels_and_units():
    assert bootstrap_unit(None, 5) == ("samples", 5)
    assert bootstrap_unit([0, 1, 0, 1, 2], 5) == ("prompts", 3)
    assert bootstrap_unit(["a", "a", "a"], 3) == ("samples", 1)  # one prompt: the seeds are resampled
    assert bootstrap_unit([4, 2, 9], 3) == ("samples", 3)
    # A single prompt leaves nothing to resample across prompts: the samples are resampled.
    values = np.random.default_rng(0).normal(size=10)
    assert bootstrap_mean_interval(values, clusters=[7] * 10) == bootstrap_mean_interval(values)
    # Unequal prompt sizes (10 samples, 4 prompts), labels as strings; seeded.
    labels = [f"prompt {i % 4}" for i in range(10)]
    a = bootstrap_mean_interval(values, clusters=labels, seed=1)
    assert a == bootstrap_mean_interval(values, clusters=labels, seed=1) != bootstrap_mean_interval(values, clusters=labels, seed=2)
    assert a[0] < values.mean() < a[1] and a[2] == "percentile"
    assert bootstrap_mean_interval(np.full(6, 0.25), clusters=[0, 1] * 3) == (0.25, 0.25, "degenerate")


def test_bootstrap_mean_interval_rejects_bad_input():
    with pytest.raises(ConfigError, match="one label per value"):
        bootstrap_mean_interval([1.0, 2.0, 3.0], clusters=[0, 1])
    with pytest.raises(ConfigError, match="at least 2"):
        bootstrap_mean_interval([1.0])
    with pytest.raises(ConfigError, match="method"):
        bootstrap_mean_interval([1.0, 2.0], method="normal")
    with pytest.raises(NumericalError, match=r"\[1\]"):
        bootstrap_mean_interval([1.0, np.nan, 2.0])


# ----------------------------------------------------------------------------- (ii) t-weighted inflation
def test_t_weighted_inflation_on_a_planted_profile():
    grid = np.array([1.0, 0.95, 0.8, 0.5, 0.15, 0.0])  # uneven steps: 0.05, 0.15, 0.3, 0.35, 0.15
    profile = np.array([1.30, 1.20, 1.10, 1.02, 0.90])  # the ratio at each step
    offsets = np.random.default_rng(0).normal(0.0, 0.01, size=12)
    ratios = profile[:, None] * np.exp(offsets)[None, :]
    s = inflation_summary(ratios, times=grid)
    dt = np.array([0.05, 0.15, 0.3, 0.35, 0.15])
    by_hand = math.expm1(float(np.dot(dt, np.log(profile))) / dt.sum() + offsets.mean())
    assert s.t_weighted_value == pytest.approx(by_hand, rel=1e-12)
    unweighted = math.expm1(np.log(profile).mean() + offsets.mean())
    assert s.value == pytest.approx(unweighted, rel=1e-12) and abs(s.t_weighted_value - s.value) > 0.01
    assert s.t_weighted_ci_low < s.t_weighted_value < s.t_weighted_ci_high
    assert s.t_weighted_method == "BCa"
    # Each step's time alone means the last step ends at t = 0: the same weights.
    assert inflation_summary(ratios, times=grid[:-1]) == s
    np.testing.assert_allclose(step_weights(grid, 5), dt / dt.sum(), rtol=1e-15)


def test_t_weighted_equals_unweighted_for_a_constant_ratio():
    offsets = np.random.default_rng(1).normal(0.04, 0.02, size=16)
    ratios = np.exp(np.broadcast_to(offsets, (7, 16)))
    times = np.array([1.0, 0.97, 0.9, 0.7, 0.45, 0.3, 0.05])
    s = inflation_summary(ratios, times=times)
    assert s.t_weighted_value == pytest.approx(s.value, rel=1e-12)
    assert s.t_weighted_ci_low == pytest.approx(s.ci_low, rel=1e-9)
    assert s.t_weighted_ci_high == pytest.approx(s.ci_high, rel=1e-9)


def test_t_weighted_compares_schedules_like_with_like():
    # log r(t) = a t. The t-weighted value is Euler's own left Riemann sum of log r over t in [0, 1]: it
    # tends to exp(a / 2) - 1 with an error ~ 1 / steps whatever the schedule. The unweighted mean over
    # steps tends to a schedule-dependent average: SD3's shift 3 crowds the steps near t = 1.
    a, target = 0.2, math.expm1(0.1)

    def audit(steps: int, shift: float) -> InflationSummary:
        s = np.linspace(1.0, 0.0, steps + 1)
        grid = shift * s / (1 + (shift - 1) * s)
        ratios = np.exp(a * grid[:-1])[:, None] * np.exp(np.linspace(-0.01, 0.01, 8))[None, :]
        return inflation_summary(ratios, times=grid)

    errors = [abs(audit(n, 3.0).t_weighted_value - target) for n in (10, 28, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3
    flat, shifted = audit(28, 1.0), audit(28, 3.0)
    assert abs(flat.t_weighted_value - shifted.t_weighted_value) < 0.005  # measured 0.0018
    assert abs(flat.value - shifted.value) > 0.03  # measured 0.040


def test_step_times_are_checked():
    ratios = np.ones((3, 4)) * 1.1
    with pytest.raises(ConfigError, match="steps \\+ 1"):
        inflation_summary(ratios, times=[1.0, 0.5])
    with pytest.raises(NumericalError, match="non-finite"):
        inflation_summary(ratios, times=[1.0, np.nan, 0.2, 0.0])
    with pytest.raises(ConfigError, match="non-empty"):
        inflation_summary(ratios, times=[0.5, 0.5, 0.5, 0.5])
    assert inflation_summary(ratios).t_weighted_value is None


# ----------------------------------------------------------------------------- (iii) differs_from_zero
def test_differs_from_zero_both_ways():
    rng = np.random.default_rng(3)
    up = inflation_summary(1.05 * np.exp(rng.normal(0.0, 0.02, size=(3, 40))))
    down = inflation_summary(0.95 * np.exp(rng.normal(0.0, 0.02, size=(3, 40))))
    around = np.exp(rng.normal(0.0, 0.02, size=(3, 40)))
    around /= np.exp(np.log(around).mean())  # mean log-ratio exactly 0: the interval straddles 0
    zero = inflation_summary(around)
    assert up.differs_from_zero is True and up.ci_low > 0
    assert down.differs_from_zero is True and down.ci_high < 0
    assert zero.differs_from_zero is False and zero.ci_low < 0 < zero.ci_high
    # Within the tolerance and yet different from zero: the flag and the verdict answer different questions.
    small = inflation_summary(1.002 * np.exp(rng.normal(0.0, 0.001, size=(3, 40))))
    assert small.verdict == "no-inflation" and small.differs_from_zero is True
    assert inflation_summary(np.ones((2, 5))).differs_from_zero is False  # the exact interval [0, 0]
    # A summary built by hand gets the flag from its interval; JSON-safe.
    hand = InflationSummary(0.02, 0.01, 0.03, 0.95, 0.01, "inconclusive", 8, 4, "BCa")
    assert hand.differs_from_zero is True and hand.interval_unit == "samples"
    assert json.loads(json.dumps(hand.to_dict()))["differs_from_zero"] is True


# ----------------------------------------------------------------------------- (iv) the audit
@pytest.fixture(scope="module")
def planted_sd3(tmp_path_factory):
    from ngdiag.testing import save_planted_base, save_scaled_finetune

    root = tmp_path_factory.mktemp("cluster")
    base = save_planted_base(root / "base", "sd3")
    return base, save_scaled_finetune(base, root / "up", 1.08)


PROMPTS = ["a red cube", "a cat on a hill", "a lighthouse at dusk"]


def test_audit_resamples_prompts_when_samples_share_them(planted_sd3, tmp_path):
    from ngdiag.cli.audit import format_human
    from ngdiag.probes.records import NormRecord

    base, ckpt = planted_sd3
    out = tmp_path / "audit"
    code, stdout, err = run_cli("audit", ckpt, "--base", base, *[a for p in PROMPTS for a in ("--prompt", p)],
                                "--num-samples", 7, "--steps", 3, "--batch-size", 4, "--out", out, "--format", "json",
                                "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout) == summary
    inf = summary["inflation"]
    assert summary["schema_version"] == 1 and summary["num_samples"] == 7
    assert (inf["interval_unit"], inf["num_clusters"], inf["method"]) == ("prompts", 3, "percentile")
    assert inf["differs_from_zero"] is True and summary["verdict"] == "inflated"
    tw = inf["t_weighted"]
    assert set(tw) == {"value", "ci_low", "ci_high", "method"}
    assert tw["value"] == pytest.approx(0.08, abs=1e-6) and tw["ci_low"] <= tw["value"] <= tw["ci_high"]
    # The same numbers from the records: prompt i mod 3 as the cluster, the step grid from t and t_next.
    record = NormRecord.from_frame(pd.read_parquet(out / "records.parquet"))
    grid = np.append(record.times, record.t_next[-1])
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 4
    again = inflation_summary(record.metric("ratio", "guided"), clusters=np.arange(7) % 3, times=grid,
                              n_resamples=summary["config"]["n_resamples"], seed=summary["config"]["seed"])
    assert (again.value, again.ci_low, again.ci_high) == (inf["value"], inf["ci_low"], inf["ci_high"])
    assert (again.t_weighted_value, again.t_weighted_ci_low, again.t_weighted_ci_high) == (
        tw["value"], tw["ci_low"], tw["ci_high"])
    html = (out / "report.html").read_text()
    assert "bootstrap over prompts" in html and "t-weighted inflation" in html and "excludes 0" in html
    human = format_human(summary)
    assert "CI over 3 prompts" in human and "t-weighted :" in human


def test_audit_with_one_sample_per_prompt_resamples_samples(planted_sd3):
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.audit import AuditConfig, prompt_clusters, run_audit

    base, ckpt = planted_sd3
    config = AuditConfig(prompts=PROMPTS, num_samples=3, sampling=SamplingConfig(num_steps=2), batch_size=3)
    inf = run_audit(load_checkpoint(ckpt, base), config).summary()["inflation"]
    assert (inf["interval_unit"], inf["num_clusters"]) == ("samples", 3)
    assert inf["t_weighted"]["value"] == pytest.approx(0.08, abs=1e-6)
    # A prompt listed twice is one cluster.
    twice = AuditConfig(prompts=["a", "b", "a"], num_samples=6)
    assert prompt_clusters(twice, range(6)).tolist() == [0, 1, 0, 0, 1, 0]
