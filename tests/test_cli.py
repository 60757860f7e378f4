"""The command line a newcomer meets: fast help without heavy imports, honest flags and defaults,
pipeline call arguments, the sampling settings used and where they came from, progress and resume
notes, and the thread setting.

Runs on the tiny random pipelines of ``ngdiag.testing`` (32x32 images, 2-3 Euler steps).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ngdiag.testing import save_scaled_finetune
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["inspect", "audit", "merge", "sensitivity", "merge-sensitivity", "attribute", "merge-attribution", "train",
            "compare", "sweep"]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "pandas", "scipy", "matplotlib")


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _help_probe(args):
    """Run ``ngdiag ARGS`` (a help request) in a fresh interpreter; returns (rc, help text, heavy modules, seconds)."""
    code = (
        "import json, sys, time, io, contextlib\n"
        "t = time.perf_counter()\n"
        "from ngdiag.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc = main({list(args)!r})\n"
        "print(json.dumps({'rc': rc, 'help': buf.getvalue(), 'seconds': time.perf_counter() - t,\n"
        f"                  'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in COMMANDS]], ids=lambda a: " ".join(a))
def test_help_imports_no_heavy_module(args):
    probe = _help_probe(args)
    print(f"ngdiag {' '.join(args)}: {probe['seconds']:.2f} s in-process")  # measured, not asserted
    assert probe["rc"] == 0 and "Usage:" in probe["help"]
    assert probe["heavy"] == [], f"ngdiag {' '.join(args)} imported {probe['heavy']}"
    assert "<bool>" not in probe["help"]  # flags take no value


def _group():
    import typer

    from ngdiag.cli import app

    return typer.main.get_command(app)


def test_device_defaults_to_auto_everywhere():
    commands = _group().commands
    with_device = {name: cmd for name, cmd in commands.items() if any(p.name == "device" for p in cmd.params)}
    assert set(with_device) == {"audit", "sensitivity", "attribute", "compare", "sweep"}
    for name, cmd in with_device.items():
        param = next(p for p in cmd.params if p.name == "device")
        assert param.default == "auto", name
        assert "cuda when available" in param.help, name


def test_reward_help_lists_every_kind_from_the_registry():
    from ngdiag.rewards.scorers import REWARD_KINDS, load_reward
    from ngdiag.rewards.specs import REWARD_SPECS

    for kind, entry in REWARD_SPECS.items():  # the registry is what load_reward understands
        if not entry.needs_path:
            assert load_reward(kind).name == kind
    for name in ("audit", "sensitivity", "compare", "sweep"):
        param = next(p for p in _group().commands[name].params if p.name == "reward")
        words = set(re.findall(r"[a-z0-9]+", param.help))
        assert set(REWARD_KINDS) <= words, (name, param.help)


def test_every_command_has_an_example_and_a_format_option():
    for name, cmd in _group().commands.items():
        assert "Example:" in (cmd.help or ""), name
        assert any(p.name == "output_format" for p in cmd.params), name


# ----------------------------------------------------------------------------- an audit, told
@pytest.fixture(scope="module")
def sd3_pair(tiny_bases, tmp_path_factory):
    base = tiny_bases["sd3"]
    return save_scaled_finetune(base, tmp_path_factory.mktemp("cli") / "ft", 1.05), base


def _audit(ckpt, base, out, *extra):
    return run_cli("audit", ckpt, "--base", base, "--num-samples", 2, "--batch-size", 2, "--out", out, *extra)


def test_audit_tells_its_prompts_settings_reward_and_records_effective_values(sd3_pair, tmp_path):
    ckpt, base = sd3_pair
    code, out, err = _audit(ckpt, base, tmp_path / "a", "--steps", 2, "--reward", "brightness")
    assert code == 0, err
    lines = err.splitlines()
    assert "no --prompts or --prompt given: using the 8 built-in prompts" in lines
    sampling_line = next(line for line in lines if line.startswith("sampling: "))
    assert "2 steps, guidance 4.5, 32x32, max_sequence_length 16" in sampling_line
    assert "steps: command line" in sampling_line and "guidance: ngdiag's default" in sampling_line
    assert f"report: {tmp_path / 'a' / 'report.html'}" in lines
    assert "reward     : brightness" in out.splitlines()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    sampling = summary["config"]["sampling"]
    # the effective values: the tiny pipeline's recorded call arguments, not null
    assert (sampling["num_steps"], sampling["guidance_scale"], sampling["height"], sampling["width"],
            sampling["max_sequence_length"]) == (2, 4.5, 32, 32, 16)
    assert sampling["origin"]["max_sequence_length"] == "the pipeline folder's ngdiag_defaults.json"
    assert sampling["origin"]["num_steps"] == "command line"


def test_pipeline_call_arguments_reach_the_pipeline(sd3_pair, tmp_path):
    ckpt, base = sd3_pair
    common = ["--steps", 2, "--prompt", "a red cube on a hill", "--prompt", "a lighthouse at dusk", "--quiet"]
    runs = {}
    for name, extra in {"default": [], "16": ["--max-sequence-length", 16], "8": ["--max-sequence-length", 8],
                        "negative": ["--negative-prompt", "blurry"]}.items():
        code, _, err = _audit(ckpt, base, tmp_path / name, *common, *extra)
        assert code == 0, (name, err)
        runs[name] = pd.read_parquet(tmp_path / name / "records.parquet")
    pd.testing.assert_frame_equal(runs["default"], runs["16"])  # the recorded default is the one used
    theta = lambda f: f[f["metric"] == "norm_theta"]["value"].to_numpy()  # noqa: E731
    assert not (theta(runs["8"]) == theta(runs["default"])).all()
    assert not (theta(runs["negative"]) == theta(runs["default"])).all()
    summary = json.loads((tmp_path / "negative" / "summary.json").read_text())
    assert summary["config"]["sampling"]["negative_prompt"] == "blurry"


def test_klein_without_hints_takes_its_call_arguments_from_the_command_line(tiny_bases, tmp_path):
    klein = tmp_path / "klein"
    shutil.copytree(tiny_bases["flux2-klein"], klein)
    (klein / "ngdiag_defaults.json").unlink()  # a pipeline folder as diffusers saves it
    code, _, err = run_cli("audit", klein, "--base", klein, "--num-samples", 2, "--steps", 2, "--height", 32, "--width", 32,
                           "--max-sequence-length", 32, "--text-encoder-out-layers", "1,2", "--out", tmp_path / "a",
                           "--quiet")
    assert code == 0, err
    sampling = json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["sampling"]
    assert sampling["text_encoder_out_layers"] == [1, 2] and sampling["max_sequence_length"] == 32


# ----------------------------------------------------------------------------- settings of the training run
@pytest.fixture(scope="module")
def trained_run(tiny_bases, tmp_path_factory):
    """A real ``ngdiag train`` run (1, then 2 iterations) at 3 steps and guidance 1, and its stderr on resume."""
    root = tmp_path_factory.mktemp("run")
    config = {
        "model": {"base": str(tiny_bases["sd3"])}, "lora": {"rank": 4, "alpha": 4},
        "sampling": {"steps": 3, "guidance": 1.0},
        "rollouts": {"prompts": ["a red fox", "a blue lake"], "group_size": 2, "prompts_per_iteration": 2, "batch_size": 4},
        "optimizer": {"micro_batch_size": 4}, "reward": "brightness", "iterations": 1, "checkpoint_every": 1,
        "output_dir": str(root / "run"),
    }
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    code, _, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    code, _, err = run_cli("train", cfg, "--set", "iterations=2")
    assert code == 0, err
    return root / "run", err


def test_train_says_that_it_resumed(trained_run):
    run, err = trained_run
    assert f"train: resuming the run in {run} from checkpoint-1 (1 of 2 iterations done)" in err.splitlines()


def test_audit_uses_the_settings_of_the_checkpoints_training_run(trained_run, tiny_bases, tmp_path):
    run, _ = trained_run
    code, _, err = run_cli("audit", run / "checkpoint-2", "--base", tiny_bases["sd3"], "--num-samples", 2,
                           "--out", tmp_path / "a")
    assert code == 0, err
    assert any(line.startswith("using the sampling settings recorded by the run that trained this checkpoint "
                               f"({run / 'config.yaml'}): --steps, --guidance-scale") for line in err.splitlines())
    sampling = json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["sampling"]
    assert (sampling["num_steps"], sampling["guidance_scale"]) == (3, 1.0)
    assert sampling["origin"]["num_steps"] == sampling["origin"]["guidance_scale"] == str(run / "config.yaml")
    # a value on the command line wins
    code, _, err = run_cli("audit", run / "checkpoint-2", "--base", tiny_bases["sd3"], "--num-samples", 2,
                           "--steps", 2, "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    sampling = json.loads((tmp_path / "b" / "summary.json").read_text())["config"]["sampling"]
    assert (sampling["num_steps"], sampling["guidance_scale"]) == (2, 1.0)
    assert sampling["origin"]["num_steps"] == "command line"


def test_sampling_from_a_flow_factory_config(sd3_pair, tmp_path):
    ckpt, base = sd3_pair
    ff = tmp_path / "flow_factory.yaml"  # the keys of Flow-Factory's examples/*/default.yaml
    ff.write_text(yaml.safe_dump({"model": {"finetune_type": "lora", "model_type": "sd3-5"},
                                  "train": {"trainer_type": "nft", "resolution": 32, "num_inference_steps": 3,
                                            "guidance_scale": 1.0},
                                  "eval": {"resolution": 512, "num_inference_steps": 40, "guidance_scale": 4.5}}))
    code, _, err = _audit(ckpt, base, tmp_path / "a", "--sampling-from", ff)
    assert code == 0, err
    sampling = json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["sampling"]
    assert (sampling["num_steps"], sampling["guidance_scale"], sampling["height"], sampling["width"]) == (3, 1.0, 32, 32)
    assert sampling["origin"]["num_steps"] == str(ff)
    assert f"steps, guidance, size: {ff}" in next(line for line in err.splitlines() if line.startswith("sampling: "))


# ----------------------------------------------------------------------------- sensitivity and merges
def test_sensitivity_prints_its_report_and_merge_sensitivity_has_json(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    args = ["sensitivity", base, "--reward", "brightness", "--prompt", "a fox", "--prompt", "a bowl",
            "--num-samples", 2, "--batch-size", 1, "--steps", 2]
    code, _, err = run_cli(*args, "--out", tmp_path / "single", "--quiet", "--format", "json")
    assert code == 0, err
    for i in range(2):
        code, _, err = run_cli(*args, "--out", tmp_path / f"s{i}", "--shard", f"{i}/2")
        assert code == 0, err
    code, out, err = run_cli("merge-sensitivity", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "m", "--format", "json")
    assert code == 0, err
    assert f"report: {tmp_path / 'm' / 'report.html'}" in err.splitlines()
    assert json.loads(out)["per_step"] == json.loads((tmp_path / "single" / "sensitivity.json").read_text())["per_step"]
    code, out, err = run_cli(*args, "--out", tmp_path / "told")
    assert code == 0, err
    assert f"report: {tmp_path / 'told' / 'report.html'}" in err.splitlines()


# ----------------------------------------------------------------------------- progress and resume
def _rates(err: str) -> list:
    return [float(x) for x in re.findall(r"([\d.]+)batch/s", err)]


def test_interrupted_audit_resumes_and_says_how_many_batches_it_reused(sd3_pair, tmp_path):
    ckpt, base = sd3_pair
    out = tmp_path / "a"
    args = ["audit", str(ckpt), "--base", str(base), "--prompt", "a red cube", "--prompt", "a blue lake",
            "--num-samples", "12", "--batch-size", "1", "--steps", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "ngdiag.cli", *args], env=_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.time() + 300
    os.set_blocking(proc.stderr.fileno(), False)
    while time.time() < deadline and not re.search(rb" [1-9]\d*/12 \[", seen):
        chunk = proc.stderr.read()
        seen += chunk or b""
        time.sleep(0.05)
    proc.send_signal(2)  # SIGINT: Ctrl-C
    os.set_blocking(proc.stderr.fileno(), True)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode()
    assert proc.returncode == 130, err
    assert err.endswith("\nerror: interrupted\n") and "Traceback" not in err
    done = len(list((out / "parts").glob("records-*.parquet")))
    assert 1 <= done < 12
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert f"audit: resuming the unfinished run in {out}: {done} of 12 batches already done are reused" in err.splitlines()
    assert "12/12" in err
    assert all(rate < 100 for rate in _rates(err)), _rates(err)  # no rate from counting reused batches


# ----------------------------------------------------------------------------- threads
def _threads_in_fresh_process(cli_args, env_threads):
    code = ("import sys, torch\n"
            "from ngdiag.cli import main\n"
            f"rc = main({cli_args!r})\n"
            "print(rc, torch.get_num_threads())\n")
    env = _env()
    env.pop("OMP_NUM_THREADS", None)
    if env_threads is not None:
        env["OMP_NUM_THREADS"] = env_threads
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-2:]


def test_threads_option_environment_and_default():
    version = ["--version"]
    # torch is imported after the CLI set OMP_NUM_THREADS: the explicit value, then the environment, then 1
    assert _threads_in_fresh_process(["--threads", "3", "inspect", "--help"], None) == ["0", "3"]
    assert _threads_in_fresh_process(["inspect", "--help"], "2") == ["0", "2"]
    assert _threads_in_fresh_process(["inspect", "--help"], None) == ["0", "1"]
    assert _threads_in_fresh_process(version, None)[0] == "0"


def test_threads_in_process_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = run_cli("--threads", 2, "inspect", "--help")
        assert code == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
