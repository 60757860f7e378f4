"""The audit: planted effects of known size through the CLI, renorm, live probe, resume, shards, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import ngdiag
from ngdiag.workflows.audit import AuditConfig, run_audit
from ngdiag.models.generation import SamplingConfig, prepare_batch
from ngdiag.models.loading import load_checkpoint
from ngdiag.probes.paired import PairedVelocity
from ngdiag.probes.renorm import rl_renorm_intervention
from ngdiag.core.sampling import sample
from ngdiag.testing import TINY_CALL_KWARGS, save_lora_adapter, save_rotated_finetune, save_scaled_finetune
from tests.helpers import run_cli

PROMPTS = ["a red cube", "a cat on a hill", "a lighthouse at dusk"]


@pytest.fixture(scope="module")
def planted(tiny_bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    out = {}
    for fam in ("sd3", "flux"):
        for scale in (1.08, 0.95):
            out[(fam, scale)] = save_scaled_finetune(tiny_bases[fam], root / f"{fam}-{scale}", scale)
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def _audit_cli(ckpt, base, out, *extra):
    return run_cli("audit", ckpt, "--base", base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", PROMPTS[2],
                   "--num-samples", 6, "--steps", 3, "--batch-size", 3, "--out", out, "--format", "json", "--quiet", *extra)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_planted_inflation_and_deflation_through_cli(planted, tiny_bases, tmp_path, family):
    code, out, err = _audit_cli(planted[(family, 1.08)], tiny_bases[family], tmp_path / "up")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["schema_version"] == 1 and summary["family"] == family
    assert summary["inflation"]["value"] == pytest.approx(0.08, abs=1e-6)
    assert summary["verdict"] == "inflated"
    assert summary["num_samples"] == 6 and summary["num_steps"] == 3 and len(summary["per_step"]) == 3
    assert all(row["mean_ratio"] == pytest.approx(1.08, abs=1e-6) for row in summary["per_step"])
    on_disk = json.loads((tmp_path / "up" / "summary.json").read_text())
    assert on_disk["inflation"] == summary["inflation"]
    records = pd.read_parquet(tmp_path / "up" / "records.parquet")
    assert set(records.columns) >= {"step", "t", "call", "sample", "metric", "value"}
    assert set(records["sample"]) == set(range(6)) and set(records["call"]) == {"guided", "cond"}
    steps = pd.read_csv(tmp_path / "up" / "steps.csv")
    assert len(steps) == 6  # 3 steps x 2 calls
    assert (tmp_path / "up" / "report.html").is_file()

    code, out, err = _audit_cli(planted[(family, 0.95)], tiny_bases[family], tmp_path / "down")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["inflation"]["value"] == pytest.approx(-0.05, abs=1e-6)
    assert summary["verdict"] == "deflated"


def test_lora_adapters_planted_and_zero(tiny_bases, tmp_path):
    zero = save_lora_adapter(tiny_bases["sd3"], tmp_path / "zero", zero=True)
    code, out, err = _audit_cli(zero, tiny_bases["sd3"], tmp_path / "zero-out")
    assert code == 0, err
    assert json.loads(out)["verdict"] == "no-inflation"
    assert json.loads(out)["inflation"]["value"] == 0.0  # B = 0: theta is the reference, bit for bit
    # A LoRA on the output projection that scales it by exactly 1.08: B A = 0.08 W with alpha = r.
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model

    pipe = DiffusionPipeline.from_pretrained(tiny_bases["sd3"], local_files_only=True)
    w = pipe.transformer.proj_out.weight.detach().clone()
    config = LoraConfig(r=w.shape[1], lora_alpha=w.shape[1], target_modules=["proj_out"])
    model = get_peft_model(pipe.transformer, config)
    with torch.no_grad():
        layer = model.base_model.model.proj_out
        layer.lora_A["default"].weight.copy_(torch.eye(w.shape[1]))
        layer.lora_B["default"].weight.copy_(0.08 * w)
    model.save_pretrained(tmp_path / "lora108")
    code, out, err = _audit_cli(tmp_path / "lora108", tiny_bases["sd3"], tmp_path / "lora-out")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["inflation"]["value"] == pytest.approx(0.08, abs=1e-6) and summary["verdict"] == "inflated"


@pytest.mark.parametrize("family", ["sd3", "qwenimage"])
def test_rotated_finetunes_split_drift_as_planted(tiny_bases, tmp_path, family):
    # A rotation of every token's output channels keeps the norm (ratio 1, radial share 0) and turns the
    # direction by a known angle; with a scale on top the radial share follows from the CONVENTIONS
    # identity ||a - b||^2 = (||a|| - ||b||)^2 + 2 ||a|| ||b|| (1 - cos), here with ||a|| = s ||b||.
    angle = 0.3
    for scale in (1.0, 1.08):
        ckpt = save_rotated_finetune(tiny_bases[family], tmp_path / f"rot-{scale}", angle, scale=scale)
        code, out, err = _audit_cli(ckpt, tiny_bases[family], tmp_path / f"out-{scale}")  # CFG 4.5 (true CFG for Qwen-Image)
        assert code == 0, err
        summary = json.loads(out)
        records = pd.read_parquet(tmp_path / f"out-{scale}" / "records.parquet")
        share = (scale - 1) ** 2 / ((scale - 1) ** 2 + 2 * scale * (1 - math.cos(angle)))
        for call in ("guided", "cond"):
            values = {m: records[(records["call"] == call) & (records["metric"] == m)]["value"].to_numpy()
                      for m in ("ratio", "cos", "radial_share")}
            assert len(values["ratio"]) == 6 * 3
            np.testing.assert_allclose(values["ratio"], scale, rtol=0, atol=1e-6)
            np.testing.assert_allclose(values["cos"], math.cos(angle), rtol=0, atol=1e-6)
            np.testing.assert_allclose(values["radial_share"], share, rtol=0, atol=1e-6)
        assert summary["inflation"]["value"] == pytest.approx(scale - 1, abs=1e-6)
        for row in summary["per_step"]:
            assert row["mean_ratio"] == pytest.approx(scale, abs=1e-6)
            assert row["mean_cos"] == pytest.approx(math.cos(angle), abs=1e-6)
            assert row["radial_share"] == pytest.approx(share, abs=1e-6)
        assert summary["verdict"] == ("no-inflation" if scale == 1.0 else "inflated")


def test_renorm_reproduces_reference_trajectory(planted, tiny_bases):
    ckpt = load_checkpoint(planted[("sd3", 1.08)], tiny_bases["sd3"])
    batch = prepare_batch(ckpt, PROMPTS, [0, 1, 2], SamplingConfig(num_steps=4, guidance_scale=4.0))
    theta, ref = batch.conditioning.guided(ckpt.theta), batch.conditioning.guided(ckpt.ref)
    base = sample(ref, batch.x_init, batch.sigmas).x_final
    rl = sample(theta, batch.x_init, batch.sigmas).x_final
    renormed = sample(PairedVelocity(theta, ref), batch.x_init, batch.sigmas,
                      intervention=rl_renorm_intervention(sample_ids=[0, 1, 2])).x_final
    assert _relative(renormed, base) <= 1e-6  # measured 3.5e-7: float32 rounding
    assert _relative(rl, base) > 1e-3


def test_audit_with_renorm_and_reward_reports_table(planted, tiny_bases):
    ckpt = load_checkpoint(planted[("flux", 1.08)], tiny_bases["flux"])
    cfg = AuditConfig(prompts=PROMPTS, num_samples=4, sampling=SamplingConfig(num_steps=3), batch_size=2,
                      renorm=True, reward="brightness", grid_size=2)
    result = run_audit(ckpt, cfg)
    block = result.summary()["reward"]
    rows = {r["model"]: r for r in block["rows"]}
    assert set(rows) == {"base", "rl", "rl+renorm"} and all(r["n"] == 4 for r in rows.values())
    # Paired spread of the deltas: per-sample differences of the same prompt and seed.
    per_sample = result.rewards.pivot_table(index="sample", columns="model", values="reward")
    assert block["delta_rl_minus_base_std"] == pytest.approx((per_sample["rl"] - per_sample["base"]).std(ddof=1))
    # Renormalising the 1.08 model gives back the base trajectory, hence the base reward.
    assert rows["rl+renorm"]["mean"] == pytest.approx(rows["base"]["mean"], abs=1e-6)
    assert result.renorm["rl_renorm_relative_distance_to_base_mean"] < 1e-6
    assert result.renorm["rl_relative_distance_to_base_mean"] > 1e-3
    assert set(result.images) == {"base", "rl", "rl+renorm"} and result.images["rl"].shape[0] == 2


@pytest.mark.parametrize("family", ["sd3", "flux2-klein", "qwenimage"])
def test_live_pipeline_probe_equals_audit(tiny_bases, tmp_path, family):
    lora = save_lora_adapter(tiny_bases[family], tmp_path / "lora", rank=4, alpha=8.0)
    ckpt = load_checkpoint(lora, tiny_bases[family])
    cfg = AuditConfig(prompts=PROMPTS, sampling=SamplingConfig(num_steps=3, guidance_scale=4.0), batch_size=3)
    audit = run_audit(ckpt, cfg).record
    pipe = ckpt.pipeline
    guidance = dict(true_cfg_scale=4.0, negative_prompt=" ") if family == "qwenimage" else dict(guidance_scale=4.0)
    call = dict(prompt=PROMPTS, num_inference_steps=3, output_type="latent", **guidance, **TINY_CALL_KWARGS[family])
    plain = pipe(generator=[torch.Generator().manual_seed(i) for i in range(3)], **call).images
    with ngdiag.probe(pipe) as rec:
        probed = pipe(generator=[torch.Generator().manual_seed(i) for i in range(3)], **call).images
    assert torch.equal(plain, probed)  # read-only probe: bit-identical output
    live = rec.record()
    np.testing.assert_array_equal(live.times, audit.times)
    for name in ("norm_theta", "norm_ref", "cos", "directional"):  # the same numbers, not close ones
        torch.testing.assert_close(getattr(live, name), getattr(audit, name), rtol=0, atol=0)
    # The hooks are gone after the block.
    assert "step" not in pipe.scheduler.__dict__ and not pipe.transformer._forward_hooks


def test_live_probe_names_a_non_finite_reference_like_the_audit(planted, tiny_bases):
    # The live probe checks theta's and ref's velocities with the audit's check: step, time and samples.
    import copy

    from ngdiag.core.errors import NumericalError

    ckpt = load_checkpoint(planted[("sd3", 1.08)], tiny_bases["sd3"])
    bad_ref = copy.deepcopy(ckpt.ref.transformer)
    with torch.no_grad():
        bad_ref.proj_out.weight[0, 0] = float("inf")
    call = dict(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=4.0, output_type="latent", **TINY_CALL_KWARGS["sd3"])
    with pytest.raises(NumericalError, match=r"^ref's velocity is not finite at step 0 \(t=1\.0000\) for samples \[0, 1\]$"):
        with ngdiag.probe(ckpt.pipeline, ref=bad_ref):
            ckpt.pipeline(generator=[torch.Generator().manual_seed(i) for i in range(2)], **call)


def test_live_probe_renorm_changes_output(planted, tiny_bases):
    ckpt = load_checkpoint(planted[("sd3", 1.08)], tiny_bases["sd3"])
    pipe = ckpt.pipeline
    call = dict(prompt=PROMPTS[:2], num_inference_steps=3, guidance_scale=4.0, output_type="latent", **TINY_CALL_KWARGS["sd3"])
    with ngdiag.probe(pipe, ref=ckpt.ref.transformer, renorm="rl") as rec:
        out = pipe(generator=[torch.Generator().manual_seed(i) for i in range(2)], **call).images
    base_pipe = load_checkpoint(tiny_bases["sd3"]).pipeline
    base = base_pipe(generator=[torch.Generator().manual_seed(i) for i in range(2)], **call).images
    assert _relative(out, base) <= 1e-6
    torch.testing.assert_close(rec.record().ratio, torch.full_like(rec.record().ratio, 1.08), rtol=1e-6, atol=0)


def test_shards_merge_to_the_single_run(planted, tiny_bases, tmp_path):
    ckpt, base = planted[("sd3", 1.08)], tiny_bases["sd3"]
    code, _, err = _audit_cli(ckpt, base, tmp_path / "single")
    assert code == 0, err
    for i in range(2):
        code, _, err = _audit_cli(ckpt, base, tmp_path / f"shard{i}", "--shard", f"{i}/2")
        assert code == 0, err
        assert not (tmp_path / f"shard{i}" / "summary.json").exists()
    code, out, err = run_cli("merge", tmp_path / "shard0", tmp_path / "shard1", "--out", tmp_path / "merged", "--format", "json")
    assert code == 0, err
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    for key in ("verdict", "inflation", "per_step", "num_samples"):
        assert merged[key] == single[key]
    a = pd.read_parquet(tmp_path / "single" / "records.parquet")
    b = pd.read_parquet(tmp_path / "merged" / "records.parquet")
    pd.testing.assert_frame_equal(a, b)
    code, _, err = run_cli("merge", tmp_path / "shard0", "--out", tmp_path / "half")
    assert code == 2 and "shards" in err


def test_resume_after_sigkill(planted, tiny_bases, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "ngdiag.cli", "audit", str(planted[("sd3", 1.08)]), "--base", str(tiny_bases["sd3"]),
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-samples", 8, "--steps", 6, "--batch-size", 1,
            "--out", str(out), "--format", "json", "--quiet"]
    args = [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = out / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("records-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("records-*.parquet")))
    assert 2 <= done < 8, done
    assert not (out / "summary.json").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = subprocess.run(args[:-5] + ["--out", str(tmp_path / "clean"), "--format", "json", "--quiet"], env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((tmp_path / "clean" / "summary.json").read_text())
    for key in ("verdict", "inflation", "per_step"):
        assert a[key] == b[key]


def test_fail_on_inflation_exit_code(planted, tiny_bases, tmp_path):
    code, _, err = _audit_cli(planted[("sd3", 1.08)], tiny_bases["sd3"], tmp_path / "a", "--fail-on-inflation", 5)
    assert code == 1 and "inflation check failed" in err
    code, _, err = _audit_cli(planted[("sd3", 1.08)], tiny_bases["sd3"], tmp_path / "b", "--fail-on-inflation", 10)
    assert code == 0, err


def test_bad_audit_input(planted, tiny_bases, tmp_path):
    ckpt, base = planted[("sd3", 1.08)], tiny_bases["sd3"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    cases = {
        "empty prompt file": (["--prompts", empty], "has no prompts"),
        "unknown reward": (["--reward", "aesthetic-v9"], "unknown reward kind"),
        "missing reward weights": (["--reward", f"pickscore:{tmp_path / 'nowhere'}"], "reward weights not found"),
        "existing out": (["--out", existing], "already exists"),
        "bad shard": (["--shard", "3/2"], "invalid shard"),
        "bad shard text": (["--shard", "half"], "invalid shard"),
        "bad image size": (["--height", 7, "--width", 7], "multiples of"),
        "no samples": (["--num-samples", 1], "at least 2 samples"),
    }
    for name, (extra, needle) in cases.items():
        args = ["audit", ckpt, "--base", base, "--prompt", "a cat", "--prompt", "a dog", "--steps", 2, "--quiet"]
        if "--out" not in extra:
            args += ["--out", tmp_path / f"out-{len(name)}"]
        code, out, err = run_cli(*args, *extra)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (name, code, err)
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: "), (name, err)
    assert (existing / "keep.txt").read_text() == "precious" and sorted(p.name for p in existing.iterdir()) == ["keep.txt"]


def test_nan_checkpoint_names_step_and_samples(tiny_bases, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_bases["sd3"], local_files_only=True)
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] = float("nan")
    pipe.transformer.save_pretrained(tmp_path / "nan")
    code, out, err = run_cli("audit", tmp_path / "nan", "--base", tiny_bases["sd3"], "--prompt", "a cat", "--prompt", "a dog",
                             "--steps", 2, "--out", tmp_path / "o", "--quiet")
    assert code == 2
    assert "not finite at step 0" in err and "samples [0, 1]" in err and len(err.strip().splitlines()) == 1


def test_fused_lora_pair_matches_two_passes(tiny_bases, tmp_path):
    lora = save_lora_adapter(tiny_bases["flux2-klein"], tmp_path / "lora", rank=4, alpha=8.0)
    ckpt = load_checkpoint(lora, tiny_bases["flux2-klein"])
    base_cfg = dict(prompts=PROMPTS, sampling=SamplingConfig(num_steps=3, guidance_scale=4.0), batch_size=3)
    separate = run_audit(ckpt, AuditConfig(**base_cfg, fuse_lora=False)).record
    fused = run_audit(ckpt, AuditConfig(**base_cfg, fuse_lora=True)).record
    # One batched matmul instead of two: float32 rounding only (measured 2.4e-7 on the ratio, 0 on the cosine).
    torch.testing.assert_close(fused.ratio, separate.ratio, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused.cos, separate.cos, rtol=0, atol=1e-6)


def test_fused_lora_pair_is_off_by_default(tiny_bases, tmp_path, monkeypatch):
    """fuse_lora=None (the default) runs two passes on every device until a GPU measurement says
    otherwise (docs/performance.md); None is still the stored value, so fingerprints are unchanged."""
    import ngdiag.workflows.audit as audit_module

    lora = save_lora_adapter(tiny_bases["sd3"], tmp_path / "lora", rank=4, alpha=8.0)
    ckpt = load_checkpoint(lora, tiny_bases["sd3"])
    cfg = AuditConfig(prompts=PROMPTS[:2], sampling=SamplingConfig(num_steps=2))
    assert cfg.fuse_lora is None and cfg.to_dict()["fuse_lora"] is None

    def refuse(*args, **kwargs):
        raise AssertionError("the fused pair ran without fuse_lora=True")

    monkeypatch.setattr(audit_module, "FusedLoraPair", refuse)
    assert run_audit(ckpt, cfg).record.num_steps == 2
    with pytest.raises(AssertionError, match="without fuse_lora=True"):
        run_audit(ckpt, AuditConfig(prompts=PROMPTS[:2], sampling=SamplingConfig(num_steps=2), fuse_lora=True))


def test_torchrun_two_processes_equal_single_run(planted, tiny_bases, tmp_path):
    ckpt, base = planted[("flux", 1.08)], tiny_bases["flux"]
    common = ["audit", str(ckpt), "--base", str(base), "--num-samples", "6", "--steps", "3", "--batch-size", "2",
              "--format", "json", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "ngdiag.cli", *common, "--out", str(tmp_path / "multi")],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert json.loads(launched.stdout)["verdict"] == "inflated"  # only rank 0 prints the summary
    code, _, err = run_cli(*common, "--out", tmp_path / "single")
    assert code == 0, err
    a = json.loads((tmp_path / "multi" / "summary.json").read_text())
    b = json.loads((tmp_path / "single" / "summary.json").read_text())
    for key in ("verdict", "inflation", "per_step", "num_samples"):
        assert a[key] == b[key]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "multi" / "records.parquet"),
                                  pd.read_parquet(tmp_path / "single" / "records.parquet"))
    assert sorted(p.name for p in (tmp_path / "multi.shards").iterdir()) == ["0-of-2", "1-of-2"]
