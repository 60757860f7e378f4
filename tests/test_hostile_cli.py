"""Hostile input on the command line: every bad value is one line on stderr, exit 2, nothing written.

Each case runs the real command in-process and checks its exit code, that stderr is exactly one
line ``error: ...`` naming the problem (no traceback, no library log line before it), that the
output folder was not created, and that the input folders (checkpoint, base) are untouched. Values
are checked before anything is written or any model is loaded; sizes and pipeline call arguments
as soon as the pipeline is loaded, still before the run writes anything. Ctrl-C exits 130 with
``error: interrupted`` on a fresh line.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ngdiag.testing import save_scaled_finetune
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
NOT_UTF8 = "a red fox\n".encode() + b"\xff\xfe caf\xe9\n"


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tiny_bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = root / "sd3"
    shutil.copytree(tiny_bases["sd3"], base)
    ckpt = save_scaled_finetune(base, root / "ft", 1.05)
    klein = root / "klein"
    shutil.copytree(tiny_bases["flux2-klein"], klein)
    (klein / "ngdiag_defaults.json").unlink()  # as diffusers saves a pipeline: no ngdiag hints
    flux = root / "flux"
    shutil.copytree(tiny_bases["flux"], flux)
    bad_prompts = root / "prompts-latin1.txt"
    bad_prompts.write_bytes(NOT_UTF8)
    folders = {"base": base, "ckpt": ckpt, "klein": klein, "flux": flux}
    return {**folders, "bad_prompts": bad_prompts, "root": root}


def _check_one_line(code, err, expected_code, needle):
    lines = err.splitlines()
    assert code == expected_code, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- audit and sensitivity
SAMPLING_CASES = {
    # name: (extra arguments, message fragment)
    "height not a multiple": (["--height", "33"], "multiples of"),
    "height too large": (["--height", "1000000"], "height must lie in [1, 4096]"),
    "negative seed": (["--seed", "-1"], "the seed must lie in [0, 9223372036854775807]"),
    "seed 1e20": (["--seed", "1e20"], "'--seed'"),
    "seed beyond 64 bits": (["--seed", "100000000000000000000"], "the seed must lie in [0, 9223372036854775807]"),
    "last seed overflows": (["--seed", str(2**63 - 1)], "exceed 9223372036854775807"),
    "guidance nan": (["--guidance-scale", "nan"], "'nan' is not a finite number"),
    "guidance inf": (["--guidance-scale", "inf"], "'inf' is not a finite number"),
    "steps too many": (["--steps", "100000"], "the number of steps must lie in [1, 1000]"),
    "samples too many": (["--num-samples", "10000000"], "the number of samples must lie in [2, 1000000]"),
    "batch too large": (["--batch-size", "1000000"], "the batch size must lie in [1, 1024]"),
    "batch exhausts memory": (["--num-samples", "64", "--batch-size", "64", "--height", "4096", "--width", "4096"],
                              "would exhaust memory"),
    "prompts not UTF-8": (["--prompts", "{bad_prompts}"], "is not UTF-8 text"),
    "device tpu": (["--device", "tpu"], "unknown device 'tpu'"),
    "format xml": (["--format", "xml"], "got 'xml'"),
    "layers on SD3": (["--text-encoder-out-layers", "1,2"], "text_encoder_out_layers does not apply to SD3"),
    "layers not integers": (["--text-encoder-out-layers", "a,b"], "comma-separated list of integers"),
    "sequence too long": (["--max-sequence-length", "100000"], "max_sequence_length must be at most 512"),
    "sampling config missing": (["--sampling-from", "{root}/nowhere.yaml"], "sampling config not found"),
}
AUDIT_ONLY = {
    "tolerance nan": (["--tolerance", "nan"], "'nan' is not a finite number"),
    "confidence inf": (["--confidence", "inf"], "inf"),
    "fail-on-inflation nan": (["--fail-on-inflation", "nan"], "'nan' is not a finite number"),
}


def _fill(args, inputs):
    return [a.format(**{k: str(v) for k, v in inputs.items()}) for a in args]


@pytest.mark.parametrize("case", [*SAMPLING_CASES, *AUDIT_ONLY])
def test_audit_refuses(inputs, tmp_path, case):
    extra, needle = {**SAMPLING_CASES, **AUDIT_ONLY}[case]
    before = {k: _snapshot(inputs[k]) for k in ("base", "ckpt")}
    out = tmp_path / "out"
    code, _, err = run_cli("audit", inputs["ckpt"], "--base", inputs["base"], "--num-samples", "2", "--steps", "2",
                           "--out", out, *_fill(extra, inputs))
    _check_one_line(code, err, 2, needle)
    assert not out.exists()
    assert {k: _snapshot(inputs[k]) for k in ("base", "ckpt")} == before


@pytest.mark.parametrize("case", ["negative seed", "guidance nan", "height too large", "device tpu", "format xml",
                                  "prompts not UTF-8", "height not a multiple"])
def test_sensitivity_refuses(inputs, tmp_path, case):
    extra, needle = SAMPLING_CASES[case]
    out = tmp_path / "out"
    code, _, err = run_cli("sensitivity", inputs["base"], "--reward", "brightness", "--num-samples", "2", "--steps", "2",
                           "--out", out, *_fill(extra, inputs))
    _check_one_line(code, err, 2, needle)
    assert not out.exists()


def test_klein_call_arguments_that_do_not_fit_its_text_encoder(inputs, tmp_path):
    before = _snapshot(inputs["klein"])
    for extra, source in (([], "the FLUX.2-klein pipeline's default"), (["--text-encoder-out-layers", "1,5"], "command line")):
        out = tmp_path / f"out{len(extra)}"
        code, _, err = run_cli("audit", inputs["klein"], "--base", inputs["klein"], "--num-samples", "2", "--steps", "2",
                               "--height", "32", "--width", "32", "--out", out, *extra)
        _check_one_line(code, err, 2, "does not fit this FLUX.2-klein pipeline: its text encoder has 2 layers")
        assert "pass --text-encoder-out-layers" in err and f"(the value came from {source})" in err
        assert not out.exists()
    assert _snapshot(inputs["klein"]) == before


def test_negative_prompt_without_cfg(inputs, tmp_path):
    code, _, err = run_cli("audit", inputs["flux"], "--base", inputs["flux"], "--num-samples", "2", "--steps", "2",
                           "--negative-prompt", "blurry", "--out", tmp_path / "o")
    _check_one_line(code, err, 2, "a negative prompt has no effect: this FLUX.1 pipeline applies no CFG")
    assert not (tmp_path / "o").exists()


def test_library_warnings_and_log_lines_stay_off_stderr(inputs, tmp_path):
    """An SD3 LoRA file on a FLUX.1 base: peft warns (RuntimeWarning) while injecting it; whether the
    loader refuses the file or the size is refused after loading, stderr is one line."""
    from ngdiag.testing import save_lora_adapter

    lora = save_lora_adapter(inputs["base"], tmp_path / "lora", layout="diffusers")
    code, _, err = run_cli("audit", lora / "pytorch_lora_weights.safetensors", "--base", inputs["flux"], "--num-samples", "2",
                           "--steps", "2", "--height", "34", "--out", tmp_path / "o")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Warning" not in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- other commands
@pytest.mark.parametrize("args, needle", [
    (["inspect", "{ckpt}", "--format", "xml"], "--format must be one of human, json, got 'xml'"),
    (["merge", "{root}/s0", "{root}/s1", "--format", "xml", "--out", "{out}"], "got 'xml'"),
    (["merge-sensitivity", "{root}/s0", "{root}/s1", "--format", "xml", "--out", "{out}"], "got 'xml'"),
    (["compare", "{root}/a", "{root}/b", "--format", "xml", "--out", "{out}"], "got 'xml'"),
    (["compare", "{root}/a", "{root}/b", "--guidance-scale", "nan", "--out", "{out}"], "'nan' is not a finite number"),
    (["compare", "{root}/a", "{root}/b", "--device", "tpu", "--out", "{out}"], "unknown device 'tpu'"),
    (["compare", "{root}/a", "{root}/b", "--seed", "-1", "--out", "{out}"], "the seed must lie in"),
    (["compare", "{root}/a", "{root}/b", "--steps", "4,100000", "--out", "{out}"], "step counts in [1, 1000]"),
    (["--threads", "-1", "inspect", "{ckpt}"], "--threads must be 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_other_commands_refuse(inputs, tmp_path, args, needle):
    out = tmp_path / "out"
    code, _, err = run_cli(*_fill(args, {**inputs, "out": out}))
    _check_one_line(code, err, 2, needle)
    assert not out.exists()


# ----------------------------------------------------------------------------- train
def _train_config(base, out, **changes) -> dict:
    config = {
        "model": {"base": str(base)}, "lora": {"rank": 4, "alpha": 4}, "sampling": {"steps": 2, "guidance": 1.0},
        "rollouts": {"prompts": ["a red fox", "a blue lake"], "group_size": 2, "prompts_per_iteration": 2, "batch_size": 4},
        "optimizer": {"micro_batch_size": 4}, "reward": "brightness", "iterations": 1, "output_dir": str(out),
    }
    config.update(changes)
    return config


@pytest.mark.parametrize("case, overrides, needle", [
    ("rank beyond the layers", ["lora.rank=100000000"], "lora.rank=100000000 exceeds the targeted layers' dimensions"),
    ("logit mean nan", ["timesteps.logit_mean=nan"], "timesteps.logit_mean must be a finite number"),
    ("guidance inf", ["sampling.guidance=.inf"], "sampling.guidance must be a finite number"),
    ("steps beyond the sampler", ["sampling.steps=5000"], "sampling.steps: the number of steps must lie in [1, 1000], got 5000"),
    ("negative seed", ["seed=-1"], "seed must lie in [0, 2**63 - 1]"),
    ("format xml", ["--format", "xml"], "got 'xml'"),
    ("config not UTF-8", [], "is not UTF-8 text"),
    ("prompt file not UTF-8", ["rollouts.prompts_file={bad_prompts}"], "is not UTF-8 text"),
])
def test_train_refuses(inputs, tmp_path, case, overrides, needle):
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    text = yaml.safe_dump(_train_config(inputs["base"], out))
    config.write_bytes(text.encode() + b"# caf\xe9\n" if case == "config not UTF-8" else text.encode())
    args = []
    for item in _fill(overrides, inputs):
        args += [item] if item.startswith("--") or args[-1:] == ["--format"] else ["--set", item]
    start = time.perf_counter()
    code, _, err = run_cli("train", config, *args)
    _check_one_line(code, err, 2, needle)
    assert time.perf_counter() - start < 60  # refused before anything is allocated
    assert not out.exists()


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_exits_130_with_one_message_on_a_fresh_line(inputs, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_train_config(inputs["base"], tmp_path / "run", iterations=500)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "ngdiag.cli", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.time() + 300
    while time.time() < deadline and not re.search(rb" [1-9]\d*/500 \[", seen):
        seen += proc.stderr.read() or b""
        time.sleep(0.05)
    proc.send_signal(2)  # SIGINT, as Ctrl-C sends it
    os.set_blocking(proc.stderr.fileno(), True)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode()
    assert proc.returncode == 130, err
    assert err.endswith("\nerror: interrupted\n"), err[-300:]
    assert "Traceback" not in err and "Aborted" not in err
