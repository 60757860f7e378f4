"""S(t) on real (tiny) pipelines: the identity through transformer + VAE + CLIP reward, the CLI, bad input."""

import json

import pytest
import torch

from ngdiag.models.generation import SamplingConfig, prepare_batch
from ngdiag.models.loading import load_checkpoint
from ngdiag.core.sampling import sample
from ngdiag.sensitivity import norm_sensitivity
from ngdiag.rewards.scorers import load_reward
from ngdiag.workflows.sensitivity import SensitivityConfig, checkpoint_velocity, run_sensitivity
from tests.helpers import run_cli
from tests.test_rewards import clip_dir  # noqa: F401  (fixture: a tiny PickScore-style CLIP folder)

PROMPTS = ["a red cube on a table", "a cat on a hill"]


def _setup(tiny_bases, clip_dir, dtype):  # noqa: F811
    ckpt = load_checkpoint(tiny_bases["sd3"], dtype=dtype)
    batch = prepare_batch(ckpt, PROMPTS, [5, 6], SamplingConfig(num_steps=4, guidance_scale=3.0))
    velocity = checkpoint_velocity(ckpt, batch.conditioning)
    reward = load_reward(f"pickscore:{clip_dir}", dtype=dtype)
    h, w = batch.config.height, batch.config.width

    def reward_of_latents(x):
        return reward(ckpt.adapter.decode(x, h, w), PROMPTS)

    return ckpt, batch, velocity, reward_of_latents


def _finite_difference(velocity, batch, reward_of_latents, h):
    def scaled(c):
        return lambda x, t: (1 + c) * velocity(x, t)

    with torch.no_grad():
        up = reward_of_latents(sample(scaled(h), batch.x_init, batch.sigmas).x_final)
        down = reward_of_latents(sample(scaled(-h), batch.x_init, batch.sigmas).x_final)
    return ((up - down) / (2 * h)).double()


def test_identity_through_transformer_vae_and_clip_float64(tiny_bases, clip_dir):  # noqa: F811
    ckpt, batch, velocity, reward_of_latents = _setup(tiny_bases, clip_dir, torch.float64)
    assert batch.x_init.dtype == torch.float64
    result = norm_sensitivity(velocity, batch.x_init, batch.sigmas.double(), reward_of_latents)
    fd = _finite_difference(velocity, batch, reward_of_latents, 1e-4)
    rel = ((result.directional_derivative - fd).abs() / fd.abs()).max().item()
    assert rel <= 1e-6, rel


def test_identity_through_transformer_vae_and_clip_float32(tiny_bases, clip_dir):  # noqa: F811
    # Tolerance: float32 rewards carry ~1e-7 relative rounding; with h = 1e-2 the central difference has
    # rounding error ~ |R| * 1e-7 / h ~ 1e-4 absolute and truncation error O(h^2) ~ 1e-4 relative; we
    # allow 2 % of |dR/d eps| (measured: well below, see the float64 test for the exact identity).
    ckpt, batch, velocity, reward_of_latents = _setup(tiny_bases, clip_dir, torch.float32)
    result = norm_sensitivity(velocity, batch.x_init, batch.sigmas, reward_of_latents)
    fd = _finite_difference(velocity, batch, reward_of_latents, 1e-2)
    rel = ((result.directional_derivative - fd).abs() / fd.abs()).max().item()
    assert rel <= 2e-2, rel
    assert result.S.shape == (4, 2)


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adjoint_forward_pass_is_the_audit_sampler_bit_for_bit(tiny_bases, tmp_path, dtype, checkpoint):
    """The discrete adjoint differentiates the audit's own sampler: its final samples are the audit's
    trajectory of theta to the last bit (float32, and bfloat16 where a copied step once cast differently)."""
    from ngdiag.probes.paired import PairedVelocity, PairRecorder
    from ngdiag.testing import save_scaled_finetune

    ckpt = load_checkpoint(save_scaled_finetune(tiny_bases["sd3"], tmp_path / "ft", 1.08), tiny_bases["sd3"], dtype=dtype)
    batch = prepare_batch(ckpt, PROMPTS, [5, 6], SamplingConfig(num_steps=4, guidance_scale=3.0))
    assert batch.x_init.dtype == dtype
    audit = sample(PairedVelocity(batch.conditioning.guided(ckpt.theta), batch.conditioning.guided(ckpt.ref)),
                   batch.x_init, batch.sigmas, callback=PairRecorder([5, 6])).x_final  # what run_audit samples

    def reward(x):
        return -(x.float() - 0.3).square().mean(dim=(1, 2, 3))

    result = norm_sensitivity(checkpoint_velocity(ckpt, batch.conditioning), batch.x_init, batch.sigmas, reward,
                              checkpoint=checkpoint)
    assert result.x_final.dtype == audit.dtype == dtype
    assert torch.equal(result.x_final, audit)
    assert torch.equal(result.reward, reward(audit).double())


def test_run_and_cli_write_outputs_and_merge_shards(tiny_bases, tmp_path):
    base = tiny_bases["flux"]
    args = ["sensitivity", base, "--reward", "saturation", "--prompt", "a fox", "--prompt", "a bowl of fruit",
            "--num-samples", 4, "--steps", 3, "--batch-size", 2, "--quiet", "--format", "json"]
    code, out, err = run_cli(*args, "--out", tmp_path / "single")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_samples"] == 4 and summary["num_steps"] == 3 and len(summary["per_step"]) == 3
    assert {"mean", "std", "nsr", "stderr", "frac_positive"} <= set(summary["per_step"][0])
    assert (tmp_path / "single" / "report.html").is_file() and (tmp_path / "single" / "records.parquet").is_file()
    for i in range(2):
        code, _, err = run_cli(*args, "--out", tmp_path / f"s{i}", "--shard", f"{i}/2")
        assert code == 0, err
    code, _, err = run_cli("merge-sensitivity", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = json.loads((tmp_path / "merged" / "sensitivity.json").read_text())
    assert merged["per_step"] == summary["per_step"]


def test_api_matches_direct_adjoint(tiny_bases):
    ckpt = load_checkpoint(tiny_bases["flux2-klein"])
    cfg = SensitivityConfig(prompts=PROMPTS, reward="contrast", sampling=SamplingConfig(num_steps=3, guidance_scale=3.0))
    run = run_sensitivity(ckpt, cfg)
    batch = prepare_batch(ckpt, PROMPTS, [0, 1], cfg.sampling)
    reward = load_reward("contrast")
    h, w = batch.config.height, batch.config.width
    direct = norm_sensitivity(checkpoint_velocity(ckpt, batch.conditioning), batch.x_init, batch.sigmas,
                              lambda x: reward(ckpt.adapter.decode(x, h, w), PROMPTS))
    torch.testing.assert_close(run.result.S, direct.S, rtol=1e-6, atol=1e-9)


def test_bad_sensitivity_input(tiny_bases, tmp_path, clip_dir):  # noqa: F811
    base = tiny_bases["sd3"]
    common = ["--prompt", "a cat", "--prompt", "a dog", "--steps", 2, "--quiet"]
    code, _, err = run_cli("sensitivity", base, "--reward", f"pickscore:{tmp_path / 'missing'}", *common, "--out", tmp_path / "a")
    assert code == 2 and err.startswith("error: reward weights not found") and len(err.strip().splitlines()) == 1
    # A CLIP whose vision tower ends in a constant (post-layernorm weight 0, bias kept): the reward
    # no longer depends on the image, so its gradient is exactly zero.
    import shutil

    import transformers

    blind = tmp_path / "blind_clip"
    shutil.copytree(clip_dir, blind)
    model = transformers.CLIPModel.from_pretrained(blind)
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.zero_()
        model.vision_model.post_layernorm.bias.normal_()
    model.save_pretrained(blind)
    code, _, err = run_cli("sensitivity", base, "--reward", f"pickscore:{blind}", *common, "--out", tmp_path / "b")
    assert code == 2 and "does not depend on the image" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("sensitivity", base, "--reward", "saturation", "--method", "backwards", *common, "--out", tmp_path / "c")
    assert code == 2 and "method" in err


def test_nan_checkpoint_names_the_step(tiny_bases, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_bases["sd3"], local_files_only=True)
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] = float("inf")
    pipe.transformer.save_pretrained(tmp_path / "inf")
    code, _, err = run_cli("sensitivity", tmp_path / "inf", "--base", tiny_bases["sd3"], "--reward", "saturation",
                           "--prompt", "a cat", "--prompt", "a dog", "--steps", 2, "--quiet", "--out", tmp_path / "o")
    assert code == 2 and "step 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["sd3", "flux2-klein"])
def test_gradient_checkpointing_changes_nothing_but_cost(tiny_bases, family):
    """Off by default (docs/performance.md): the same S and rewards bit for bit with it on, and the same
    fingerprint, so a run started with either value resumes with the other."""
    ckpt = load_checkpoint(tiny_bases[family])
    cfg = SensitivityConfig(prompts=PROMPTS, reward="contrast", sampling=SamplingConfig(num_steps=3, guidance_scale=3.0))
    assert cfg.gradient_checkpointing is False
    on = SensitivityConfig(**{**cfg.to_dict(), "sampling": cfg.sampling, "gradient_checkpointing": True})
    assert cfg.fingerprint({"path": "x"}) == on.fingerprint({"path": "x"})
    a, b = run_sensitivity(ckpt, cfg).result, run_sensitivity(ckpt, on).result
    assert torch.equal(a.S, b.S) and torch.equal(a.reward, b.reward)
    assert not any(getattr(m, "is_gradient_checkpointing", False) for m in (ckpt.pipeline.transformer, ckpt.pipeline.vae))
