"""``ngdiag sweep``: every checkpoint of a run audited on the same samples (planted inflation 0, 3, 6, 9 %)."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from ngdiag.core.errors import ConfigError
from ngdiag.models.generation import SamplingConfig
from ngdiag.testing import TINY_CALL_KWARGS, save_scaled_finetune
from ngdiag.workflows.audit import AuditConfig
from ngdiag.workflows.sweep import find_checkpoints, run_sweep
from tests.helpers import run_cli

SCALES = {10: 1.00, 20: 1.03, 30: 1.06, 40: 1.09}
PROMPTS = ["a red circle", "a blue square", "a green star"]


@pytest.fixture(scope="module")
def planted_run(tiny_bases, tmp_path_factory):
    """A run folder whose checkpoint-N are full fine-tunes scaling the velocity by 1.00, 1.03, 1.06, 1.09,
    in flow_grpo's layout (RUN/checkpoints/checkpoint-N)."""
    run = tmp_path_factory.mktemp("sweep") / "run"
    for n, scale in SCALES.items():
        save_scaled_finetune(tiny_bases["sd3"], run / "checkpoints" / f"checkpoint-{n}", scale)
    return run, tiny_bases["sd3"]


def _config(**kw):
    sampling = SamplingConfig(num_steps=3, guidance_scale=2.0, **TINY_CALL_KWARGS["sd3"])
    return AuditConfig(prompts=PROMPTS, num_samples=6, sampling=sampling, seed=3, batch_size=6, **kw)


def test_sweep_returns_the_planted_inflation_in_order_and_marks_the_first_above(planted_run, tmp_path):
    run, base = planted_run
    out = tmp_path / "sweep"
    result = run_sweep(run, _config(reward="brightness"), out_dir=out, base=str(base), threshold=0.04)
    t = result.table
    assert list(t["iteration"]) == [10, 20, 30, 40]
    np.testing.assert_allclose(t["inflation"], [0.0, 0.03, 0.06, 0.09], atol=2e-5)
    assert result.first_above == 30  # 6 % is the first interval above 4 %
    assert list(t["above_threshold"]) == [False, False, True, True]
    assert list(t["differs_from_zero"]) == [False, True, True, True]
    # the base is sampled once (with the first checkpoint), every checkpoint's reward is paired with it
    assert set(result.audits[10].rewards["model"]) == {"base", "rl"}
    assert all(set(result.audits[n].rewards["model"]) == {"rl"} for n in (20, 30, 40))
    assert t.loc[0, "reward_delta"] == pytest.approx(0.0, abs=1e-6)  # checkpoint-10 is the base
    assert np.isfinite(t[["reward_delta_low", "reward_delta_high", "saturation_delta_low"]].to_numpy()).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "sweep" and summary["first_above"] == 30
    assert [c["iteration"] for c in summary["checkpoints"]] == [10, 20, 30, 40]
    assert pd.read_csv(out / "sweep.csv").shape[0] == 4
    html = (out / "report.html").read_text()
    assert "checkpoint-30" in html and "data:image/png;base64," in html
    for n in SCALES:
        assert (out / f"checkpoint-{n}" / "summary.json").is_file()

    # a rerun reads the finished audits instead of redoing them, with the same numbers
    mtime = os.stat(out / "checkpoint-20" / "records.parquet").st_mtime_ns
    again = run_sweep(run, _config(reward="brightness"), out_dir=out, base=str(base), threshold=0.04)
    assert again.reused == [10, 20, 30, 40]
    assert os.stat(out / "checkpoint-20" / "records.parquet").st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.table, t)


def test_find_checkpoints_layouts_and_errors(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-12").mkdir()
    (run / "checkpoint-x").mkdir()
    (run / "checkpoint-7").write_text("not a folder")
    assert [n for n, _ in find_checkpoints(run)] == [5, 12]
    (run / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(ConfigError, match="checkpoint-5 twice"):
        find_checkpoints(run)
    with pytest.raises(ConfigError, match="no checkpoint-N"):
        find_checkpoints(tmp_path / "run" / "checkpoint-5")
    with pytest.raises(ConfigError, match="is not a folder"):
        find_checkpoints(tmp_path / "missing")


def test_sweep_cli_and_refusals(planted_run, tmp_path):
    run, base = planted_run
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    args = ["sweep", run, "--base", base, "--prompt", "a red circle", "--prompt", "a blue square", "--num-samples", 2,
            "--steps", 2, "--height", 32, "--width", 32, "--quiet"]
    code, _, err = run_cli(*args, "--out", foreign)
    assert code != 0 and "did not write" in err and "Traceback" not in err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    code, _, err = run_cli(*args, "--out", run / "sweep")
    assert code != 0 and "Traceback" not in err and not (run / "sweep").exists()
    code, _, err = run_cli(*args, "--out", tmp_path / "x", "--threshold", "nan")
    assert code != 0 and not (tmp_path / "x").exists()
    code, out, err = run_cli(*args, "--out", tmp_path / "ok", "--threshold", "2", "--format", "json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["first_above"] == 20 and summary["threshold"] == pytest.approx(0.02)  # 3 % is the first above 2 %
