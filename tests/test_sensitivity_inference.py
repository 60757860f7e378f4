"""Inference on S(t): bootstrap intervals of mu_k and dR/d(eps), and the first-order reward cost of
removing an inflation, on planted S tables of known mean and spread, a planted fine-tune through the
audit and the sensitivity commands, and bad --inflation / --audit values."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ngdiag.core.errors import ConfigError
from ngdiag.sensitivity import SensitivityResult, removal_eps
from ngdiag.workflows.audit import reward_block
from ngdiag.workflows.sensitivity import audit_reference
from tests.helpers import run_cli

Z95 = 1.959963984540054


def _planted(mu, sigma, n: int, times=None, seed: int = 0) -> SensitivityResult:
    """``S[k] = mu_k + sigma_k z_k`` with ``z_k`` standardised to sample mean 0 and std (ddof 1) exactly 1,
    so that the batch mean is exactly ``mu_k`` and the batch spread exactly ``sigma_k``."""
    mu = torch.tensor(mu, dtype=torch.float64)
    sigma = torch.tensor(sigma, dtype=torch.float64)
    z = torch.randn(len(mu), n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = (z - z.mean(dim=1, keepdim=True)) / z.std(dim=1, correction=1, keepdim=True)
    times = torch.linspace(1.0, 0.0, len(mu) + 1, dtype=torch.float64) if times is None else times
    return SensitivityResult(S=mu[:, None] + sigma[:, None] * z, times=times, reward=torch.zeros(n, dtype=torch.float64),
                             x_final=torch.zeros(n, 1), method="discrete")


def test_mean_interval_covers_the_planted_mean_with_the_normal_width():
    mu, sigma, n = [1.0, -2.0, 0.05, 3.0], [1.0, 2.0, 0.5, 4.0], 2000
    res = _planted(mu, sigma, n)
    torch.testing.assert_close(res.mean, torch.tensor(mu, dtype=torch.float64), rtol=0, atol=1e-12)
    low, high = res.mean_interval()
    assert low.shape == high.shape == (4,) and low.dtype == torch.float64
    expected = 2 * Z95 * torch.tensor(sigma, dtype=torch.float64) / math.sqrt(n)
    ratio = (high - low) / expected
    assert bool(((low < res.mean) & (res.mean < high)).all())
    assert bool(((ratio > 0.9) & (ratio < 1.1)).all()), ratio  # measured 0.97-1.02 (2000 resamples)
    # the interval is centred on the mean for normal data: its midpoint is within 10 % of a half-width
    assert bool((((low + high) / 2 - res.mean).abs() < 0.1 * expected / 2).all())
    # seeded: the same seed gives the same interval, another seed a slightly different one
    assert all(torch.equal(a, b) for a, b in zip(res.mean_interval(), (low, high)))
    assert not torch.equal(res.mean_interval(seed=1)[0], low)
    # the level: a 68 % interval is 1.96 times narrower than the 95 % one
    low68, high68 = res.mean_interval(0.6827)
    assert ((high - low) / (high68 - low68)).sub(Z95).abs().max().item() < 0.15


def test_mean_interval_of_few_samples_is_wider_and_degenerate_cases():
    wide = _planted([0.0], [1.0], 10)
    low, high = wide.mean_interval()
    assert low.item() < 0 < high.item()
    # percentile bootstrap of n = 10: about 2 * 1.96 / sqrt(10) * sqrt(9 / 10) wide (plug-in spread)
    assert 0.7 < (high - low).item() / (2 * Z95 / math.sqrt(10)) < 1.1
    constant = SensitivityResult(S=torch.full((2, 5), 0.25, dtype=torch.float64), times=torch.tensor([1.0, 0.5, 0.0]).double(),
                                 reward=torch.zeros(5, dtype=torch.float64), x_final=torch.zeros(5, 1), method="discrete")
    low, high = constant.mean_interval()
    assert low.tolist() == high.tolist() == [0.25, 0.25]
    single = SensitivityResult(S=torch.ones(3, 1, dtype=torch.float64), times=torch.linspace(1, 0, 4).double(),
                               reward=torch.zeros(1, dtype=torch.float64), x_final=torch.zeros(1, 1), method="discrete")
    assert all(math.isnan(v) for v in single.mean_interval()[0].tolist())
    assert all(math.isnan(v) for v in single.directional_derivative_interval())
    assert math.isnan(single.first_order_reward_change(0.1).ci_low)
    for bad in ({"confidence": 1.0}, {"confidence": 0}, {"n_resamples": 0}, {"n_resamples": 2.5}, {"seed": -1}):
        with pytest.raises(ConfigError):
            wide.mean_interval(**bad)


def test_summary_frame_carries_the_interval_columns():
    res = _planted([1.0, 2.0], [1.0, 1.0], 50)
    frame = res.summary_frame()
    assert list(frame.columns) == ["step", "t", "t_next", "mean", "mean_ci_low", "mean_ci_high", "std", "nsr", "stderr",
                                   "frac_positive"]
    low, high = res.mean_interval()
    assert frame["mean_ci_low"].tolist() == low.tolist() and frame["mean_ci_high"].tolist() == high.tolist()


def test_directional_derivative_interval_on_a_planted_table():
    # Non-uniform steps summing to 1 and S[k, i] = c_i at every step: dR_i/d(eps) = c_i exactly.
    times = torch.tensor([1.0, 0.9, 0.6, 0.2, 0.0], dtype=torch.float64)
    n = 3000
    c = _planted([0.4], [1.5], n).S[0]
    res = SensitivityResult(S=c.repeat(4, 1), times=times, reward=torch.zeros(n, dtype=torch.float64),
                            x_final=torch.zeros(n, 1), method="discrete")
    torch.testing.assert_close(res.directional_derivative, c, rtol=0, atol=1e-12)
    low, high = res.directional_derivative_interval()
    assert low < 0.4 < high
    ratio = (high - low) / (2 * Z95 * 1.5 / math.sqrt(n))
    print(f"dR/d(eps) interval width / normal width: {ratio:.4f}")
    assert 0.9 < ratio < 1.1, ratio
    # the same resamples as the per-step intervals: equal rows give the same interval
    step_low, step_high = res.mean_interval()
    assert low == pytest.approx(step_low[0].item(), abs=1e-12) and high == pytest.approx(step_high[0].item(), abs=1e-12)


@pytest.mark.parametrize("inflation", [0.059, 0.25, -0.2, 0.0])
def test_first_order_reward_change_is_eps_times_the_directional_derivative(inflation):
    res = _planted([1.0, -0.5, 2.0], [1.0, 3.0, 0.5], 200, seed=3)
    change = res.first_order_reward_change(inflation)
    eps = 1.0 / (1.0 + inflation) - 1.0
    assert change.eps == eps == removal_eps(inflation)
    assert change.mean == eps * float(res.directional_derivative.mean())  # exactly
    assert change.std == pytest.approx(abs(eps) * float(res.directional_derivative.std()), rel=1e-12)
    low, high = res.directional_derivative_interval()
    assert (change.ci_low, change.ci_high) == tuple(sorted((eps * low, eps * high)))
    assert change.ci_low <= change.mean <= change.ci_high
    assert change.inflation == inflation and change.confidence == 0.95 and change.num_samples == 200
    if inflation > 0:
        assert eps < 0 and change.mean < 0  # mean dR/d(eps) = 0.2 * 1 + 0.2 * (-0.5) + ... > 0 here


def test_removal_eps_refuses_what_no_scaling_removes():
    assert removal_eps(0.059) == pytest.approx(-0.059 / 1.059, rel=1e-15)
    for bad in (-1, -1.5, float("nan"), float("inf"), "abc", None, True):
        with pytest.raises(ConfigError):
            removal_eps(bad)


def _fake_audit(folder, inflation=0.059, rewards=True, reward_spec="saturation"):
    """An audit folder whose summary.json has the audit's own reward block (``reward_block``)."""
    folder.mkdir()
    doc = {"schema_version": 1, "inflation": {"value": inflation, "ci_low": 0.05, "ci_high": 0.07}, "checkpoint": "ckpt"}
    if rewards:
        frame = pd.DataFrame({"sample": [0, 1, 2, 0, 1, 2], "model": ["rl"] * 3 + ["rl+renorm"] * 3,
                              "reward": [1.0, 2.0, 3.0, 0.5, 1.0, 2.0]})
        doc["reward"] = reward_block(frame, reward_spec)
    (folder / "summary.json").write_text(json.dumps(doc))
    return folder


def test_audit_reference_reads_the_inflation_and_the_renorm_change(tmp_path):
    ref = audit_reference(_fake_audit(tmp_path / "a"))
    assert ref["inflation"] == 0.059 and ref["reward"] == "saturation" and ref["path"] == str(tmp_path / "a")
    change = ref["renorm_reward_change"]
    # paired differences rl+renorm - rl: -0.5, -1, -1
    assert change["mean"] == pytest.approx(-5 / 6) and change["num_samples"] == 3
    std = float(np.std([-0.5, -1.0, -1.0], ddof=1))
    assert change["std"] == pytest.approx(std) and change["stderr"] == pytest.approx(std / math.sqrt(3))
    assert audit_reference(_fake_audit(tmp_path / "b", rewards=False))["renorm_reward_change"] is None


# ----------------------------------------------------------------------------- the command
BASE_ARGS = ["--reward", "saturation", "--prompt", "a fox", "--prompt", "a bowl of fruit", "--num-samples", 4,
             "--steps", 3, "--batch-size", 2, "--quiet"]


def test_cli_with_inflation_writes_intervals_and_the_first_order_change(tiny_bases, tmp_path):
    out = tmp_path / "sens"
    code, stdout, err = run_cli("sensitivity", tiny_bases["flux"], *BASE_ARGS, "--inflation", 0.059, "--out", out)
    assert code == 0, err
    assert "first-order reward change" in stdout and "CI low" in stdout
    summary = json.loads((out / "sensitivity.json").read_text())
    assert summary["intervals"] == {"method": "percentile bootstrap over samples", "confidence": 0.95,
                                    "n_resamples": 2000, "seed": 0}
    dd = summary["directional_derivative"]
    assert dd["ci_low"] <= dd["mean"] <= dd["ci_high"]
    for row in summary["per_step"]:
        assert row["mean_ci_low"] <= row["mean"] <= row["mean_ci_high"]
    block = summary["first_order_reward_change"]
    eps = 1 / 1.059 - 1
    assert block["inflation"] == 0.059 and block["eps"] == pytest.approx(eps, rel=1e-15)
    assert block["mean"] == pytest.approx(eps * dd["mean"], rel=1e-12)
    assert (block["ci_low"], block["ci_high"]) == pytest.approx(tuple(sorted((eps * dd["ci_low"], eps * dd["ci_high"]))))
    assert block["audit"] is None and block["measured_renorm_reward_change"] is None
    assert summary["config"]["inflation"] == 0.059
    html = (out / "report.html").read_text()
    assert "first-order reward change of removing 5.9 % inflation" in html and "95 % CI low" in html
    # --inflation changes the summary only: the parts are the same run (the fingerprint leaves it out)
    from ngdiag.workflows.sensitivity import SensitivityConfig

    cfg = SensitivityConfig(**summary["config"])
    assert cfg.fingerprint({}) == SensitivityConfig(**{**summary["config"], "inflation": None}).fingerprint({})


def test_planted_finetune_first_order_prediction_matches_the_audit_renorm(tiny_bases, tmp_path):
    """A fine-tune whose velocity is exactly 1.08 x the base's: the audit measures an inflation of 8 %
    and its RL renorm gives back the base exactly, so the measured renorm change is R(base) - R(rl).
    Scaling the fine-tune by 1/1.08 is the base too, so eps * dR/d(eps) predicts that change to second order."""
    from ngdiag.testing import save_scaled_finetune

    base = tiny_bases["sd3"]
    ckpt = save_scaled_finetune(base, tmp_path / "ft", 1.08)
    common = ["--prompt", "a fox", "--prompt", "a bowl of fruit", "--num-samples", 4, "--steps", 3, "--batch-size", 4,
              "--guidance-scale", 3.0, "--quiet", "--format", "json"]
    code, _, err = run_cli("audit", ckpt, "--base", base, "--renorm", "--reward", "saturation", *common, "--out", tmp_path / "audit")
    assert code == 0, err
    code, stdout, err = run_cli("sensitivity", ckpt, "--base", base, "--reward", "saturation", *common,
                                "--audit", tmp_path / "audit", "--out", tmp_path / "sens")
    assert code == 0, err
    block = json.loads(stdout)["first_order_reward_change"]
    assert block["inflation"] == pytest.approx(0.08, abs=1e-5)
    assert block["audit"] == str(tmp_path / "audit") and block["same_reward"] is True
    measured = block["measured_renorm_reward_change"]
    assert measured["num_samples"] == 4
    rel = abs(block["mean"] - measured["mean"]) / abs(measured["mean"])
    print(f"planted 1.08: inflation {block['inflation']:.6g}, predicted {block['mean']:.6g} "
          f"[{block['ci_low']:.4g}, {block['ci_high']:.4g}], measured {measured['mean']:.6g}, relative gap {rel:.3g}")
    assert rel < 0.05, (block["mean"], measured["mean"], rel)  # second order in eps; measured 0.0054
    text = run_cli("sensitivity", ckpt, "--base", base, "--reward", "saturation", *common[:-2], "--audit", tmp_path / "audit",
                   "--out", tmp_path / "sens")
    assert text[0] == 2 and "already exists" in text[2]  # a finished run is not redone


@pytest.mark.parametrize("case", ["not a number", "nan", "minus one", "below minus one", "missing audit", "audit is a file",
                                  "no summary", "no inflation", "broken json", "both", "another checkpoint"])
def test_bad_inflation_or_audit_is_one_line_and_writes_nothing(tiny_bases, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file.txt").write_text("x")
    no_inflation = tmp_path / "no_inflation"
    no_inflation.mkdir()
    (no_inflation / "summary.json").write_text(json.dumps({"inflation": {"value": None}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    extra, message = {
        "not a number": (["--inflation", "abc"], "'abc' is not a number"),
        "nan": (["--inflation", "nan"], "not a finite number"),
        "minus one": (["--inflation", "-1"], "--inflation must be a fraction above -1"),
        "below minus one": (["--inflation", "-3"], "--inflation must be a fraction above -1"),
        "missing audit": (["--audit", tmp_path / "nowhere"], "does not exist"),
        "audit is a file": (["--audit", tmp_path / "file.txt"], "is not a folder"),
        "no summary": (["--audit", empty], "holds no summary.json"),
        "no inflation": (["--audit", no_inflation], "records no inflation value"),
        "broken json": (["--audit", broken], "is not readable JSON"),
        "both": (["--inflation", "0.05", "--audit", _fake_audit(tmp_path / "audit")], "not both"),
        "another checkpoint": (["--audit", _fake_audit(tmp_path / "other")], "its inflation is another model's"),
    }[case]
    out = tmp_path / "out"
    code, stdout, err = run_cli("sensitivity", tiny_bases["flux"], *BASE_ARGS, *extra, "--out", out)
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
