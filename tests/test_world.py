"""The shipped miniature world: it loads through diffusers and peft alone as through ngdiag, its base is
recognisable, its manifest is intact, the committed demo's numbers are what an audit measures, and
``ngdiag demo --quick`` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from ngdiag.world.build import ASSETS, PLACEHOLDER, install_world

ROOT = Path(__file__).resolve().parents[1]
DEMO_JSON = ROOT / "reports" / "demo" / "demo.json"

pytestmark = pytest.mark.skipif(not (ASSETS / "world.json").is_file(), reason="no shipped world (ngdiag world-build --ship)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return install_world(tmp_path_factory.mktemp("world") / "world")


def test_manifest_matches_the_shipped_files():
    import hashlib

    manifest = json.loads((ASSETS / "world.json").read_text())
    files = {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*") if p.is_file() and p.name != "world.json"}
    assert files == set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, name
    assert manifest["bytes"] < 12 * 2**20


def test_install_points_the_runs_at_the_copy(world, tmp_path, monkeypatch):
    import yaml

    texts = [p.read_text() for p in world.rglob("*") if p.name in ("config.yaml", "run.json", "adapter_config.json")]
    assert texts and all(PLACEHOLDER not in t for t in texts)
    assert any(str(world.resolve() / "base") in t for t in texts)
    # every path a run records is the copy's, whatever the working folder (no path of the machine that built it)
    monkeypatch.chdir(tmp_path)
    for run in ("nft-plain", "nft-normguard"):
        config = yaml.safe_load((world / "runs" / run / "config.yaml").read_text())
        assert Path(config["model"]["base"]) == world.resolve() / "base"
        assert Path(config["output_dir"]) == world.resolve() / "runs" / run
        assert config["reward"].startswith(f"world:{world.resolve() / 'judge'},")
        from ngdiag.rewards.specs import parse_reward_spec

        parse_reward_spec(config["reward"])
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        install_world(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _diffusers_pipeline(path):
    from diffusers import StableDiffusion3Pipeline

    # the folder has no T5 (model_index.json records text_encoder_3 as null): diffusers needs it passed as None
    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, local_files_only=True)


def _velocity(transformer, pipe, prompts, x, t):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=1)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample


def test_base_and_fine_tunes_load_as_diffusers_and_peft_load_them(world):
    from peft import PeftModel

    from ngdiag.models.loading import load_checkpoint

    pipe = _diffusers_pipeline(world / "base")
    prompts = ["a red circle on a dark background, lit from the left", "a blue cross on a gray background, lit from above"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([0.7, 0.3])
    v_base = _velocity(pipe.transformer, pipe, prompts, x, t)
    for run in ("nft-plain", "nft-normguard"):
        final = sorted((world / "runs" / run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        peft_model = PeftModel.from_pretrained(_diffusers_pipeline(world / "base").transformer, final).eval()
        v_truth = _velocity(peft_model, pipe, prompts, x, t)
        ckpt = load_checkpoint(final, world / "base")
        embeds, _, pooled, _ = ckpt.adapter.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                               do_classifier_free_guidance=False, max_sequence_length=1)
        with torch.no_grad():
            v_theta = ckpt.theta(x, t, encoder_hidden_states=embeds, pooled_projections=pooled)
            v_ref = ckpt.ref(x, t, encoder_hidden_states=embeds, pooled_projections=pooled)
        assert torch.allclose(v_ref, v_base, atol=1e-5), run
        assert torch.allclose(v_theta, v_truth, atol=1e-5), run
        assert not torch.allclose(v_truth, v_base, atol=1e-3), f"{run}: the adapter changes nothing"


def test_the_base_draws_the_shape_its_prompt_names(world):
    """At least 90 % of held-out samples (plain diffusers call, 28 steps, guidance 4.5) are judged to be the
    prompt's shape by the world's judge."""
    from ngdiag.world.build import held_out, judge_accuracy, sample_images
    from ngdiag.world.judge import load_judge

    prompts, seeds, labels = held_out(128)
    images = sample_images(_diffusers_pipeline(world / "base"), prompts, seeds, steps=28, guidance=4.5)
    accuracy = judge_accuracy(load_judge(world / "judge"), images, labels)
    assert accuracy["shape"] >= 0.9, accuracy
    assert min(accuracy["colour"], accuracy["background"], accuracy["light"]) >= 0.9, accuracy


@pytest.mark.skipif(not DEMO_JSON.is_file(), reason="no committed demo report")
def test_the_committed_demo_reports_what_an_audit_measures(world):
    """The audit of the unregularised fine-tune at the committed demo's settings gives its inflation."""
    from ngdiag.world.demo import DemoSettings, _audit, _World

    demo = json.loads(DEMO_JSON.read_text())
    settings = DemoSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in demo["settings"].items()})
    w = _World(world)
    for run in ("nft-plain", "nft-normguard"):
        result = _audit(w, w.final(run), world.parent / f"audit-{run}", settings, steps=settings.steps,
                        num_samples=settings.num_samples, renorm=True)
        committed = demo["inflation"][run]
        assert result.verdict == committed["verdict"]
        assert result.inflation.value == pytest.approx(committed["value"], rel=1e-4, abs=1e-6)
        assert result.inflation.ci_low == pytest.approx(committed["ci_low"], rel=1e-3, abs=1e-5)


def test_demo_quick_writes_every_report(tmp_path):
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli("demo", "--out", out, "--quick")
    assert code == 0, stderr
    index = (out / "index.html").read_text()
    for stem in ("1-inflation", "2-renorm", "3-sensitivity", "4-normguard", "5-few-steps", "6-checkpoints", "7-where"):
        assert f'href="{stem}.html"' in index
        page = (out / f"{stem}.html").read_text()
        assert ("with the paper" if stem != "7-where" else "Not a claim of the paper") in page
    findings = json.loads((out / "demo.json").read_text())
    assert findings["status"] == "done" and len(findings["verdicts"]) == 7
    assert "audit of nft-plain" in stderr
    # a rerun into the same folder replaces the earlier demo
    code, _, stderr = run_cli("demo", "--out", out, "--quick", "--quiet")
    assert code == 0, stderr


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, stderr = run_cli("demo", "--out", tmp_path, "--quick")
    assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_audit_quality_is_measured_on_the_images_diffusers_makes(world, tmp_path):
    """The audit's per-sample quality of the base equals ngdiag.quality on a plain diffusers call's images
    (same prompts and seeds), clipping counted on diffusers' VAE output before its clamp."""
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.quality import MEASURES
    from ngdiag.workflows.audit import AuditConfig, run_audit
    from ngdiag.world.build import held_out

    final = sorted((world / "runs" / "nft-plain").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    prompts = held_out(3)[0]
    config = AuditConfig(prompts=prompts, num_samples=3, seed=7, batch_size=3, reward=f"world:{world / 'judge'}",
                         sampling=SamplingConfig(num_steps=6, guidance_scale=4.5))
    result = run_audit(load_checkpoint(final, world / "base"), config, out_dir=tmp_path / "audit")
    assert (tmp_path / "audit" / "quality.csv").is_file()
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert set(summary["quality"]["models"]) == {"base", "rl"}
    pipe = _diffusers_pipeline(world / "base")
    out = pipe(prompt=prompts, num_inference_steps=6, guidance_scale=4.5, height=32, width=32, max_sequence_length=1,
               generator=[torch.Generator().manual_seed(7 + i) for i in range(3)], output_type="latent").images
    with torch.no_grad():
        raw = pipe.vae.decode(out / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample / 2 + 0.5
    base = result.quality[result.quality["model"] == "base"].sort_values("sample")
    for name, measure in MEASURES.items():
        assert base[name].to_numpy() == pytest.approx(measure(raw).numpy(), rel=1e-4, abs=1e-6), name


def test_demo_replaces_only_what_a_demo_wrote(tmp_path):
    """An earlier demo's folder that also holds the user's file is refused as a whole: nothing is deleted."""
    (tmp_path / "demo.json").write_text("{}")
    (tmp_path / "my-notes.txt").write_text("mine")
    code, _, stderr = run_cli("demo", "--out", tmp_path, "--quick")
    assert code == 2 and "my-notes.txt" in stderr and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ngdiag")) == ["demo.json", "my-notes.txt"]
    assert (tmp_path / "my-notes.txt").read_text() == "mine"


def test_a_second_demo_into_a_busy_folder_is_refused(tmp_path):
    from ngdiag.runs import lock_output

    with lock_output(tmp_path / "demo"):
        code, _, stderr = run_cli("demo", "--out", tmp_path / "demo", "--quick")
    assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo" / "demo.json").exists()


def test_world_build_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("world-build", tmp_path)
    assert code == 2 and "no earlier world build" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
