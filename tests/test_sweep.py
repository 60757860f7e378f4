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
    def checkpoint(path):
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text("{}")  # what detect_format recognises as a PEFT adapter

    run = tmp_path / "run"
    checkpoint(run / "checkpoint-5")
    checkpoint(run / "checkpoint-12")
    checkpoint(run / "checkpoint-x")
    (run / "checkpoint-7").write_text("not a folder")
    (run / "checkpoint-9").mkdir()  # still being written: skipped
    skipped = []
    assert [n for n, _ in find_checkpoints(run, skipped=skipped)] == [5, 12]
    assert [n for n, _, _ in skipped] == [9]
    checkpoint(run / "checkpoints" / "checkpoint-5")
    with pytest.raises(ConfigError, match="checkpoint-5 twice"):
        find_checkpoints(run)
    with pytest.raises(ConfigError, match="no complete checkpoint-N"):
        find_checkpoints(tmp_path / "run" / "checkpoint-9")
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


def test_sweep_refuses_another_commands_folder_and_resumes_an_interrupted_sweep(planted_run, tmp_path, monkeypatch):
    import ngdiag.workflows.audit as audit_module
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.audit import run_audit

    run, base = planted_run
    # an audit folder is not a sweep folder: refused, the audit left as it was
    audit_dir = tmp_path / "audit"
    run_audit(load_checkpoint(run / "checkpoints" / "checkpoint-20", base), _config(), out_dir=audit_dir)
    before = {p.name: p.read_bytes() for p in audit_dir.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="an ngdiag sweep did not write"):
        run_sweep(run, _config(), out_dir=audit_dir, base=str(base))
    assert {p.name: p.read_bytes() for p in audit_dir.iterdir() if p.is_file()} == before

    # killed during its second checkpoint: the rerun reads the first and does the rest
    calls = []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_audit(*args, **kwargs)

    monkeypatch.setattr(audit_module, "run_audit", dies_on_the_second)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(run, _config(), out_dir=out, base=str(base))
    monkeypatch.undo()
    assert json.loads((out / "sweep.json").read_text())["status"] == "running"
    again = run_sweep(run, _config(), out_dir=out, base=str(base))
    assert again.reused == [10] and list(again.table["iteration"]) == [10, 20, 30, 40]
    assert json.loads((out / "sweep.json").read_text())["status"] == "done"


def test_an_incomplete_checkpoint_is_skipped_and_the_run_config_gives_the_settings(planted_run, tmp_path):
    import shutil

    import yaml

    run, base = planted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "checkpoint-50").mkdir()  # a trainer still writing it
    (copy / "config.yaml").write_text(yaml.safe_dump({
        "model": {"base": str(base)}, "reward": "brightness", "sampling": {"steps": 2, "guidance": 1.5},
        "rollouts": {"prompts": ["a red circle", "a blue square"]}}))
    code, out, err = run_cli("sweep", copy, "--num-samples", 2, "--height", 32, "--width", 32, "--out", tmp_path / "s",
                             "--format", "json")
    assert code == 0, err
    summary = json.loads(out)
    assert [c["iteration"] for c in summary["checkpoints"]] == [10, 20, 30, 40]
    assert summary["skipped"][0]["iteration"] == 50 and "skipping checkpoint-50" in err
    assert summary["config"]["sampling"]["num_steps"] == 2 and summary["config"]["sampling"]["guidance_scale"] == 1.5
    assert summary["config"]["prompts"] == ["a red circle", "a blue square"]  # the run's training prompts


def test_fd_encoder_must_be_an_image_encoder(planted_run, tmp_path):
    run, base = planted_run
    args = ["sweep", run, "--base", base, "--num-samples", 2, "--steps", 2, "--reward", "brightness", "--quiet"]
    code, _, err = run_cli(*args, "--fd-encoder", f"clip:{base}", "--out", tmp_path / "a")  # a pipeline, not CLIP
    assert code == 2 and err.startswith("error: --fd-encoder:") and "not a transformers CLIP folder" in err
    code, _, err = run_cli(*args, "--fd-encoder", "foo:bar", "--out", tmp_path / "b")
    assert code == 2 and "--fd-encoder: unknown encoder kind" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
