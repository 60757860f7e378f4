"""Checkpoints saved by other tools (PEFT, the diffusers training scripts, flow_grpo, Flow-Factory).

The ground truth is computed with diffusers and peft alone: ``PeftModel.from_pretrained`` or
``pipe.load_lora_weights`` on a freshly loaded base for theta, the freshly loaded base transformer for
the reference, both called with the exact inputs ngdiag's velocity models gave the transformer.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import ngdiag
from ngdiag.workflows.audit import AuditConfig, run_audit
from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.models.generation import SamplingConfig, prepare_batch
from ngdiag.models.loading import load_checkpoint
from ngdiag.testing import TINY_CALL_KWARGS
from tests.foreign_checkpoints import (
    fresh_pipeline,
    save_diffusers_script_lora,
    save_peft_folder,
    save_peft_prefixed_file,
)
from tests.helpers import run_cli

PROMPTS = ["a red cube", "a cat on a hill", "a lighthouse at dusk"]
THREE = ["sd3", "flux", "flux2-klein"]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def _transformer_calls(ckpt, t=0.6):
    """What ngdiag's theta and ref passed to the transformer, and what it returned: ``{name: (args, kwargs, out)}``."""
    batch = prepare_batch(ckpt, PROMPTS[:2], [3, 4], SamplingConfig(num_steps=2, guidance_scale=1.0))
    tt = torch.full((2,), t)
    calls = {}
    for name in ("theta", "ref"):
        seen = []
        hook = ckpt.pipeline.transformer.register_forward_hook(
            lambda m, a, k, o: seen.append((a, dict(k), _first(o).detach().clone())), with_kwargs=True)
        try:
            with torch.no_grad():
                getattr(ckpt, name)(batch.x_init, tt, **batch.conditioning.cond)
        finally:
            hook.remove()
        assert len(seen) == 1
        calls[name] = seen[0]
    return calls


def _run(model, call):
    args, kwargs, _ = call
    with torch.no_grad():
        return _first(model(*args, **kwargs))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _peft_truth(base, folder):
    """theta as peft alone computes it: ``PeftModel.from_pretrained`` on a freshly loaded base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_pipeline(base).transformer, str(folder)).eval()


def _assert_matches_truth(ckpt, theta_truth, base):
    calls = _transformer_calls(ckpt)
    pristine = fresh_pipeline(base).transformer.eval()
    expected_theta, expected_ref = _run(theta_truth, calls["theta"]), _run(pristine, calls["ref"])
    assert _max_diff(calls["theta"][2], expected_theta) <= 1e-6
    assert _max_diff(calls["ref"][2], expected_ref) <= 1e-6
    assert _max_diff(expected_theta, expected_ref) > 1e-3  # the checkpoint does something
    return calls


# ----------------------------------------------------------------------------- A1: modules_to_save
@pytest.mark.parametrize("family", THREE)
def test_modules_to_save_ref_is_the_base_module(tiny_bases, tmp_path, family):
    base = tiny_bases[family]
    folder = save_peft_folder(base, tmp_path / "mts", modules_to_save=["proj_out"], saved_scale=1.062, alpha=8.0)
    ckpt = load_checkpoint(folder, base)
    _assert_matches_truth(ckpt, _peft_truth(base, folder), base)
    assert ckpt.describe()["lora"]["modules_to_save"] == ["proj_out"]
    # Switching the adapter off and on leaves every weight frozen, as loaded.
    assert not any(p.requires_grad for p in ckpt.pipeline.transformer.parameters())


@pytest.mark.parametrize("family", THREE)
def test_modules_to_save_planted_inflation_in_audit_fused_pair_and_live_probe(tiny_bases, tmp_path, family):
    """A zero LoRA plus a trained proj_out copy scaled by 1.062: v_theta = 1.062 v_ref exactly (zero bias)."""
    base = tiny_bases[family]
    folder = save_peft_folder(base, tmp_path / "mts", modules_to_save=["proj_out"], saved_scale=1.062, zero_lora=True)
    ckpt = load_checkpoint(folder, base)
    cfg = dict(prompts=PROMPTS, sampling=SamplingConfig(num_steps=2, guidance_scale=4.0), batch_size=3)
    separate = run_audit(ckpt, AuditConfig(**cfg, fuse_lora=False))
    fused = run_audit(ckpt, AuditConfig(**cfg, fuse_lora=True))
    for result in (separate, fused):
        assert result.inflation.value == pytest.approx(0.062, abs=1e-5)
        assert result.inflation.ci_low <= 0.062 + 1e-5 and result.inflation.ci_high >= 0.062 - 1e-5
        assert result.verdict == "inflated"
        torch.testing.assert_close(result.record.ratio, torch.full_like(result.record.ratio, 1.062), rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.record.ratio, separate.record.ratio, rtol=0, atol=1e-6)

    pipe = ckpt.pipeline
    call = dict(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                **TINY_CALL_KWARGS[family])
    with ngdiag.probe(pipe) as rec:
        pipe(generator=[torch.Generator().manual_seed(i) for i in range(2)], **call)
    live = rec.record().ratio
    torch.testing.assert_close(live, torch.full_like(live, 1.062), rtol=0, atol=1e-5)


def test_flow_factory_checkpoint_with_modules_to_save_through_cli(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    ckpt = save_peft_folder(base, tmp_path / "ff", layout="flow-factory", modules_to_save=["proj_out"],
                            saved_scale=1.062, zero_lora=True)
    code, out, err = run_cli("audit", ckpt, "--base", base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                             "--steps", 2, "--out", tmp_path / "audit", "--format", "json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["inflation"]["value"] == pytest.approx(0.062, abs=1e-5) and summary["verdict"] == "inflated"
    assert summary["lora"]["modules_to_save"] == ["proj_out"]


# ----------------------------------------------------------------------------- rsLoRA and DoRA
@pytest.mark.parametrize("family", ["sd3", "flux2-klein"])
@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_rslora_and_dora_folders_match_peft(tiny_bases, tmp_path, family, variant):
    base = tiny_bases[family]
    folder = save_peft_folder(base, tmp_path / "run", layout="flow_grpo", rank=4, alpha=8.0,
                              use_rslora=variant == "rslora", use_dora=variant == "dora")
    ckpt = load_checkpoint(folder, base)
    _assert_matches_truth(ckpt, _peft_truth(base, folder / "lora"), base)
    lora = ckpt.describe()["lora"]
    assert lora["use_rslora"] is (variant == "rslora") and lora["use_dora"] is (variant == "dora")
    assert lora["alpha"] == 8.0 and lora["r"] == 4
    if variant == "dora":
        # peft cannot mix DoRA adapters in one batch: an explicit fused pair is refused with the reason.
        cfg = AuditConfig(prompts=PROMPTS[:2], sampling=SamplingConfig(num_steps=2), fuse_lora=True)
        with pytest.raises(ConfigError, match="DoRA"):
            run_audit(ckpt, cfg)


# ----------------------------------------------------------------------------- A2: base_model.model. keys
@pytest.mark.parametrize("family", THREE)
def test_peft_prefixed_diffusers_file_loads_like_its_peft_folder(tiny_bases, tmp_path, family):
    base = tiny_bases[family]
    folder, file = save_peft_prefixed_file(base, tmp_path / "grpo", rank=4, alpha=8.0, with_metadata=True,
                                           modules_to_save=["proj_out"], saved_scale=1.05)
    ckpt = load_checkpoint(file, base)
    assert ckpt.kind == "diffusers-lora"
    _assert_matches_truth(ckpt, _peft_truth(base, folder), base)
    assert ckpt.describe()["lora"]["alpha_source"] == "file metadata" and not ckpt.notes


def test_peft_prefixed_file_without_metadata(tiny_bases, tmp_path):
    base = tiny_bases["flux"]
    folder, file = save_peft_prefixed_file(base, tmp_path / "grpo", rank=4, alpha=8.0, with_metadata=False)
    ckpt = load_checkpoint(file, base, lora_alpha=8.0)
    _assert_matches_truth(ckpt, _peft_truth(base, folder), base)
    assert ckpt.describe()["lora"] == {"r": 4, "alpha": 8.0, "alpha_source": "--lora-alpha", "use_rslora": False,
                                       "use_dora": False, "modules_to_save": []}
    # A file that also holds full modules_to_save tensors but no metadata cannot say what they are.
    _, bare = save_peft_prefixed_file(base, tmp_path / "grpo2", modules_to_save=["proj_out"], with_metadata=False)
    with pytest.raises(CheckpointError, match=r"proj_out\.(weight|bias) is not a LoRA matrix"):
        load_checkpoint(bare, base)


# ----------------------------------------------------------------------------- A3: no alpha in the file
def test_diffusers_file_without_alpha_is_flagged_and_takes_an_explicit_alpha(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    old = save_diffusers_script_lora(base, tmp_path / "old", rank=4, alpha=16.0, with_metadata=False, seed=1)
    new = save_diffusers_script_lora(base, tmp_path / "new", rank=4, alpha=16.0, with_metadata=True, seed=1)

    def diffusers_truth(file):
        pipe = fresh_pipeline(base)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        return pipe.transformer.eval()

    trained = diffusers_truth(new)  # diffusers honours the metadata: alpha 16
    assumed = diffusers_truth(old)  # no alpha in the file: diffusers uses alpha = r = 4

    ckpt = load_checkpoint(old, base)
    _assert_matches_truth(ckpt, assumed, base)
    assert ckpt.describe()["lora"]["alpha"] == 4 and ckpt.describe()["lora"]["alpha_source"] == "assumed equal to r"
    assert len(ckpt.notes) == 1 and "--lora-alpha" in ckpt.notes[0] and ckpt.describe()["notes"] == ckpt.notes

    given = load_checkpoint(old, base, lora_alpha=16)
    calls = _assert_matches_truth(given, trained, base)
    assert not given.notes and given.describe()["lora"]["alpha_source"] == "--lora-alpha"
    assert _max_diff(calls["theta"][2], _run(assumed, calls["theta"])) > 1e-3  # the alpha matters here

    recorded = load_checkpoint(new, base)
    _assert_matches_truth(recorded, trained, base)
    assert not recorded.notes and recorded.describe()["lora"]["alpha_source"] == "file metadata"
    with pytest.raises(CheckpointError, match="records lora_alpha=16"):
        load_checkpoint(new, base, lora_alpha=8)
    with pytest.raises(ConfigError, match="lora_alpha"):
        load_checkpoint(new, base, lora_alpha=float("nan"))


def test_cli_prints_the_alpha_note_once_and_takes_lora_alpha(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    old = save_diffusers_script_lora(base, tmp_path / "old", rank=4, alpha=16.0, with_metadata=False)
    # The whole process, as a user runs it: exactly one line on stderr (no diffusers or peft output).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ngdiag.cli", "inspect", str(old), "--base", str(base), "--format", "json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "--lora-alpha" in lines[0], proc.stderr
    assert json.loads(proc.stdout)["lora"]["alpha_source"] == "assumed equal to r"

    code, out, err = run_cli("inspect", old, "--base", base, "--format", "json", "--lora-alpha", 16)
    assert code == 0 and err == "", err
    assert json.loads(out)["lora"]["alpha"] == 16.0

    audit = ["audit", old, "--base", base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", 2, "--quiet"]
    code, _, err = run_cli(*audit, "--out", tmp_path / "a")
    assert code == 0 and err.strip().splitlines() == [line for line in err.strip().splitlines() if "lora-alpha" in line]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["lora"]["alpha_source"] == "assumed equal to r" and len(summary["notes"]) == 1
    code, _, err = run_cli(*audit, "--out", tmp_path / "b", "--lora-alpha", 16)
    assert code == 0 and "warning" not in err, err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["lora"]["alpha"] == 16.0 and "notes" not in summary

    code, _, err = run_cli("sensitivity", old, "--base", base, "--reward", "brightness", "--prompt", PROMPTS[0],
                           "--prompt", PROMPTS[1], "--steps", 2, "--quiet", "--out", tmp_path / "s", "--lora-alpha", 16)
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "sensitivity.json").read_text())["lora"]["alpha"] == 16.0


def test_kohya_flux_file_is_converted_by_diffusers(tiny_bases, tmp_path):
    """Other trainers' formats still go through diffusers' converter (which folds alpha into the weights)."""
    from safetensors.torch import save_file

    base = tiny_bases["flux"]
    gen = torch.Generator().manual_seed(0)
    prefix = "lora_unet_double_blocks_0_img_attn_qkv"
    file = tmp_path / "kohya.safetensors"
    save_file({f"{prefix}.lora_down.weight": torch.randn(4, 32, generator=gen) * 0.1,
               f"{prefix}.lora_up.weight": torch.randn(96, 4, generator=gen) * 0.1,
               f"{prefix}.alpha": torch.tensor(8.0)}, str(file))
    pipe = fresh_pipeline(base)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    ckpt = load_checkpoint(file, base)
    _assert_matches_truth(ckpt, pipe.transformer.eval(), base)
    assert not ckpt.notes and ckpt.describe()["lora"]["alpha_source"] == "folded into the weights"


# ----------------------------------------------------------------------------- B5: another family's LoRA
def test_lora_of_another_family_is_refused(tiny_bases, tmp_path):
    sd3, flux = tiny_bases["sd3"], tiny_bases["flux"]
    file = save_diffusers_script_lora(sd3, tmp_path / "sd3-file")
    folder = save_peft_folder(sd3, tmp_path / "sd3-peft")
    # Premise: the SD3 adapter names modules FLUX does not have (its second joint block).
    flux_names = {n for n, _ in fresh_pipeline(flux).transformer.named_modules()}
    assert "transformer_blocks.1.attn.to_q" not in flux_names
    for path in (file, folder):
        with pytest.raises(CheckpointError, match="no module in the base model") as info:
            load_checkpoint(path, flux)
        assert "transformer_blocks.1." in str(info.value)
        code, out, err = run_cli("inspect", path, "--base", flux)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "no module" in lines[0], err
    # The whole process prints that one line: no peft warning, no diffusers log line before it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ngdiag.cli", "inspect", str(file), "--base", str(flux)],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# ----------------------------------------------------------------------------- B7: messages and silence
def test_peft_shape_mismatch_names_the_tensor_and_shapes(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    folder = save_peft_folder(base, tmp_path / "lora", rank=4, alpha=8.0)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, base)
    message = str(info.value)
    assert "\n" not in message and "Error(s) in loading" not in message
    assert "lora_A.weight" in message and "[4, 32]" in message and "[8, 32]" in message, message


def test_diffusers_lora_loading_prints_nothing(tiny_bases, tmp_path, capfd):
    base = tiny_bases["flux"]
    file = save_diffusers_script_lora(base, tmp_path / "lora")
    load_checkpoint(base)  # first imports out of the way
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_checkpoint(file, base)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "") and [str(w.message) for w in caught] == []
    assert ckpt.kind == "diffusers-lora" and not ckpt.notes


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_a_clean_error_even_with_allow_pickle(tiny_bases, tmp_path):
    base = tiny_bases["sd3"]
    marker = tmp_path / "executed"
    folder = save_peft_folder(base, tmp_path / "lora")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": _Payload(marker)},
               folder / "adapter_model.bin")
    lora_bin = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": _Payload(marker)}, lora_bin)
    for path in (folder, lora_bin):
        code, out, err = run_cli("inspect", path, "--base", base, "--allow-pickle")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (path, code, err)
        assert "weights_only" in lines[0] and "Traceback" not in err
        assert not marker.exists()
