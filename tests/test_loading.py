"""Checkpoint formats, the (theta, ref) pair, and bad input."""

import json
import shutil

import pytest
import torch

from ngdiag.core.errors import CheckpointError
from ngdiag.models.generation import SamplingConfig, prepare_batch
from ngdiag.models.loading import load_checkpoint
from ngdiag.testing import save_lora_adapter, save_scaled_finetune, save_tiny_pipeline
from tests.helpers import run_cli


def _velocities(ckpt, which=("theta", "ref"), t=0.6):
    batch = prepare_batch(ckpt, ["a red cube", "two dogs"], [3, 4], SamplingConfig(num_steps=2, guidance_scale=1.0))
    tt = torch.full((2,), t)
    out = {}
    with torch.no_grad():
        for name in which:
            model = getattr(ckpt, name)
            out[name] = model(batch.x_init, tt, **batch.conditioning.cond)
    return out, batch


def test_pipeline_folder_loads_with_and_without_base(tiny_bases):
    ckpt = load_checkpoint(tiny_bases["sd3"])
    assert ckpt.kind == "pipeline" and ckpt.family == "sd3" and ckpt.ref is None
    with pytest.raises(CheckpointError, match="--base"):
        ckpt.require_ref()
    paired = load_checkpoint(tiny_bases["sd3"], base=tiny_bases["sd3"])
    v, _ = _velocities(paired)
    torch.testing.assert_close(v["theta"], v["ref"], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2-klein", "qwenimage"])
def test_full_finetune_folder(tiny_bases, tmp_path, family):
    ft = save_scaled_finetune(tiny_bases[family], tmp_path / "ft", 1.08)
    ckpt = load_checkpoint(ft, base=tiny_bases[family])
    assert ckpt.kind == "transformer" and ckpt.family == family
    assert ckpt.theta.transformer is not ckpt.ref.transformer
    v, _ = _velocities(ckpt)
    torch.testing.assert_close(v["theta"], 1.08 * v["ref"], rtol=1e-5, atol=1e-6)


def test_peft_adapter_matches_peftmodel_and_ref_is_pristine(tiny_bases, tmp_path):
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    lora = save_lora_adapter(tiny_bases["sd3"], tmp_path / "lora", rank=4, alpha=12.0)
    assert json.loads((lora / "adapter_config.json").read_text())["lora_alpha"] == 12.0
    ckpt = load_checkpoint(lora, base=tiny_bases["sd3"])
    assert ckpt.kind == "peft-lora" and ckpt.is_lora
    v, batch = _velocities(ckpt)

    base = DiffusionPipeline.from_pretrained(tiny_bases["sd3"], local_files_only=True).transformer.eval()
    tt = torch.full((2,), 0.6)
    cond = batch.conditioning.cond
    kwargs = dict(hidden_states=batch.x_init, timestep=tt * 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                  pooled_projections=cond["pooled_projections"], return_dict=False)
    with torch.no_grad():
        pristine = base(**kwargs)[0]
        peft_model = PeftModel.from_pretrained(base, str(lora)).eval()
        via_peft = peft_model(**kwargs)[0]
    assert (v["theta"] - via_peft).abs().max().item() <= 1e-6
    torch.testing.assert_close(v["ref"], pristine, rtol=0, atol=0)
    assert (v["theta"] - v["ref"]).abs().max().item() > 1e-4  # the adapter does something
    # The scaling alpha / r is honoured: with alpha = r the velocity differs.
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 4
    other = tmp_path / "lora_alpha_r"
    shutil.copytree(lora, other)
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    v2, _ = _velocities(load_checkpoint(other, base=tiny_bases["sd3"]), which=("theta",))
    assert (v2["theta"] - v["theta"]).abs().max().item() > 1e-5


def test_nested_trainer_layout_and_base_from_adapter_config(tiny_bases, tmp_path):
    run = tmp_path / "run"
    save_lora_adapter(tiny_bases["flux"], run / "checkpoint-100" / "lora", rank=2, alpha=3.0)
    ckpt = load_checkpoint(run / "checkpoint-100")  # base read from adapter_config.json
    assert ckpt.kind == "peft-lora" and ckpt.family == "flux"
    assert ckpt.base_path == str(tiny_bases["flux"].resolve())
    save_lora_adapter(tiny_bases["flux"], run / "checkpoint-200" / "lora", rank=2, alpha=3.0)
    with pytest.raises(CheckpointError, match="several adapters"):
        load_checkpoint(run)


def test_diffusers_lora_file_equals_peft_folder(tiny_bases, tmp_path):
    peft_dir = save_lora_adapter(tiny_bases["flux2-klein"], tmp_path / "peft", rank=4, alpha=6.0, seed=3)
    diff_dir = save_lora_adapter(tiny_bases["flux2-klein"], tmp_path / "diff", rank=4, alpha=6.0, seed=3, layout="diffusers")
    a = load_checkpoint(peft_dir, base=tiny_bases["flux2-klein"])
    b = load_checkpoint(diff_dir / "pytorch_lora_weights.safetensors", base=tiny_bases["flux2-klein"])
    assert b.kind == "diffusers-lora"
    va, _ = _velocities(a)
    vb, _ = _velocities(b)
    assert (va["theta"] - vb["theta"]).abs().max().item() <= 1e-6
    torch.testing.assert_close(va["ref"], vb["ref"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input
def _tiny_sd1(path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ngdiag.testing import tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=600, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _bad_inputs(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    cases = {}
    cases["missing path"] = ([str(tmp_path / "nope")], "not found")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("hello")
    cases["unknown format"] = ([str(unknown)], "unknown checkpoint format")
    lora = save_lora_adapter(base, tmp_path / "lora_bad", rank=4, alpha=8.0)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["r"] = 8
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    cases["adapter shapes"] = ([str(lora), "--base", str(base)], "does not fit the base")
    cases["epsilon pipeline"] = ([str(_tiny_sd1(tmp_path / "sd1"))], "not a flow-matching model")
    pickled = tmp_path / "pickled"
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(base, local_files_only=True).transformer.save_pretrained(pickled, safe_serialization=False)
    cases["pickle weights"] = ([str(pickled), "--base", str(base)], "--allow-pickle")
    cases["uncached hub id"] = (["no-such-org/no-such-model-xyz"], "not in the local Hugging Face cache")
    corrupted = tmp_path / "corrupted"
    shutil.copytree(base, corrupted)
    weights = corrupted / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    cases["corrupted safetensors"] = ([str(corrupted)], "corrupted safetensors file")
    return cases


def test_bad_input_gives_one_line_and_exit_2(tiny_bases, tmp_path):
    for name, (args, needle) in _bad_inputs(tiny_bases, tmp_path).items():
        code, out, err = run_cli("inspect", *args)
        assert code == 2, (name, code, err)
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert "Traceback" not in err


def test_pickle_weights_load_with_the_flag(tiny_bases, tmp_path):
    from diffusers import DiffusionPipeline

    pickled = tmp_path / "pickled"
    DiffusionPipeline.from_pretrained(tiny_bases["sd3"], local_files_only=True).transformer.save_pretrained(
        pickled, safe_serialization=False)
    ckpt = load_checkpoint(pickled, base=tiny_bases["sd3"], allow_pickle=True)
    assert ckpt.kind == "transformer"


def test_inspect_reports_format(tiny_bases, tmp_path):
    lora = save_lora_adapter(tiny_bases["sd3"], tmp_path / "lora", rank=2, alpha=4.0)
    code, out, err = run_cli("inspect", lora, "--base", tiny_bases["sd3"], "--format", "json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "peft-lora" and info["family"] == "sd3" and info["has_reference"] is True


def test_save_tiny_pipeline_roundtrip(tmp_path):
    path = save_tiny_pipeline(tmp_path / "klein", "flux2-klein")
    assert (path / "model_index.json").is_file() and (path / "ngdiag_defaults.json").is_file()
    assert load_checkpoint(path).family == "flux2-klein"


def test_cached_hub_id_loads_offline(tiny_bases, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd3"
    shutil.copytree(tiny_bases["sd3"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = load_checkpoint("tiny-org/tiny-sd3")
    assert ckpt.family == "sd3" and ckpt.path.endswith(commit)
    code, _, err = run_cli("inspect", "tiny-org/not-cached")
    assert code == 2 and "not in the local Hugging Face cache" in err
