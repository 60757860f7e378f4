"""Per-layer attribution: a LoRA whose only non-zero module sits in one block, a full fine-tune that
differs only in its output projection, exact restoration of the model, the command and its refusals."""

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

import ngdiag
from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.models.groups import AdapterGroups, group_name
from ngdiag.models.loading import load_checkpoint
from ngdiag.models.pair import adapter_layers
from ngdiag.testing import save_lora_adapter, save_scaled_finetune
from ngdiag.workflows.attribution import AttributionConfig, run_attribution
from ngdiag.workflows.audit import AuditConfig, run_audit
from tests.helpers import run_cli

PROMPTS = ["a red cube", "a cat on a hill", "a lighthouse at dusk"]
ONLY = "transformer_blocks.1.attn.to_out.0"


@pytest.fixture(scope="module")
def planted(tiny_bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("attribution")
    return {
        "lora": save_lora_adapter(tiny_bases["sd3"], root / "lora", init_scale=0.5, nonzero_modules=[ONLY]),
        "scaled": save_scaled_finetune(tiny_bases["sd3"], root / "scaled", 1.1),
        "same": save_scaled_finetune(tiny_bases["sd3"], root / "same", 1.0),
    }


def _config(**kw):
    return AttributionConfig(prompts=PROMPTS, num_samples=4, sampling=ngdiag.SamplingConfig(num_steps=3), batch_size=2,
                             **kw)


def test_group_names():
    assert group_name("transformer_blocks.3.attn.to_out.0", "block") == "transformer_blocks.3"
    assert group_name("single_transformer_blocks.12.proj_mlp", "block") == "single_transformer_blocks.12"
    assert group_name("proj_out", "block") == "proj_out"
    assert group_name("transformer_blocks.3.attn.to_q", "module") == "transformer_blocks.3.attn.to_q"
    with pytest.raises(ConfigError, match="group must be one of block, module"):
        group_name("x", "layer")


def test_lora_in_one_block_is_attributed_to_that_block(planted, tiny_bases):
    ckpt = load_checkpoint(planted["lora"], tiny_bases["sd3"])
    result = run_attribution(ckpt, _config())
    table = result.table
    assert set(table["group"]) == {"transformer_blocks.0", "transformer_blocks.1"}
    top = table.iloc[0]
    assert top["group"] == "transformer_blocks.1" and top["rank"] == 1
    assert top["loo_share"] > 0.95 and top["single_share"] > 0.95
    other = table.iloc[1]
    assert other["loo_effect"] == 0.0 and other["single_effect"] == 0.0  # B = 0: switching it changes nothing
    summary = result.summary()
    assert summary["total"]["log_ratio"] != 0.0
    assert summary["sum_loo_effects"] == pytest.approx(summary["total"]["log_ratio"], abs=1e-12)
    assert summary["sum_single_effects"] == pytest.approx(summary["total"]["log_ratio"], abs=1e-12)
    assert summary["top_group"]["group"] == "transformer_blocks.1"
    # the total is the audit's per-sample log-ratio on the same samples
    audit = run_audit(ckpt, AuditConfig(prompts=PROMPTS, num_samples=4, sampling=ngdiag.SamplingConfig(num_steps=3),
                                        batch_size=2))
    np.testing.assert_allclose(result.total, audit.per_sample["log_ratio"].to_numpy(), rtol=0, atol=1e-6)
    # the adapter is exactly as before: every layer on again
    assert all(not m.disable_adapters for m in adapter_layers(ckpt.pipeline.transformer))


def test_module_groups_find_the_one_module(planted, tiny_bases):
    ckpt = load_checkpoint(planted["lora"], tiny_bases["sd3"])
    result = run_attribution(ckpt, _config(group="module", single=False))
    assert len(result.table) == 8 and "single_effect" not in result.table.columns  # 4 targets x 2 blocks
    assert result.table.iloc[0]["group"] == ONLY and result.table.iloc[0]["loo_share"] > 0.95
    assert "sum_single_effects" not in result.summary()


def test_full_finetune_swaps_weights_back_and_restores_them(planted, tiny_bases):
    ckpt = load_checkpoint(planted["scaled"], tiny_bases["sd3"])
    before = {k: v.clone() for k, v in ckpt.theta.transformer.state_dict().items()}
    base_before = {k: v.clone() for k, v in ckpt.ref.transformer.state_dict().items()}
    result = run_attribution(ckpt, _config())
    assert result.table["group"].tolist() == ["proj_out"] and result.kind == "weights"
    row = result.table.iloc[0]
    assert row["loo_effect"] == pytest.approx(np.log(1.1), abs=1e-6)
    assert row["single_effect"] == pytest.approx(np.log(1.1), abs=1e-6)
    for k, v in ckpt.theta.transformer.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in ckpt.ref.transformer.state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_refusals_in_python(planted, tiny_bases):
    with pytest.raises(CheckpointError, match="nothing to attribute"):
        run_attribution(load_checkpoint(planted["same"], tiny_bases["sd3"]), _config())
    with pytest.raises(CheckpointError, match="no reference model"):
        run_attribution(load_checkpoint(tiny_bases["sd3"]), _config())
    with pytest.raises(ConfigError, match="--group must be one of block, module"):
        _config(group="layer")
    with pytest.raises(CheckpointError, match="no LoRA adapter"):
        AdapterGroups(torch.nn.Linear(2, 2))


def _attribute(ckpt, base, out, *extra):
    return run_cli("attribute", ckpt, "--base", base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                   "--num-samples", 4, "--steps", 2, "--batch-size", 2, "--out", out, "--format", "json", "--quiet", *extra)


def test_cli_writes_table_summary_and_report(planted, tiny_bases, tmp_path):
    out = tmp_path / "attr"
    code, stdout, err = _attribute(planted["lora"], tiny_bases["sd3"], out)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["schema_version"] == 1 and summary["group_by"] == "block" and summary["switch"] == "lora"
    assert summary["groups"][0]["group"] == "transformer_blocks.1" and summary["groups"][0]["loo_share"] > 0.95
    assert json.loads((out / "summary.json").read_text()) == summary
    table = pd.read_csv(out / "attribution.csv")
    assert table["group"].iloc[0] == "transformer_blocks.1" and ONLY in table["modules"].iloc[0]
    assert len(pd.read_csv(out / "samples.csv")) == 4 * 2
    html = (out / "report.html").read_text()
    assert "transformer_blocks.1" in html and "sum of single-group effects" in html
    # a finished run is replaced only with --overwrite; the human format ranks the groups
    code, stdout, err = _attribute(planted["lora"], tiny_bases["sd3"], out, "--format", "human")
    assert code == 2 and "--overwrite" in err
    code, stdout, err = _attribute(planted["lora"], tiny_bases["sd3"], out, "--format", "human", "--overwrite")
    assert code == 0, err
    first = next(line for line in stdout.splitlines() if line.startswith("   1  "))
    assert first.endswith("transformer_blocks.1") and "1.000" in first


def test_cli_refusals(planted, tiny_bases, tmp_path):
    out = tmp_path / "bad"
    code, _, err = _attribute(planted["lora"], tiny_bases["sd3"], out, "--group", "layer")
    assert code == 2 and err.strip().count("\n") == 0 and "--group must be one of block, module" in err
    assert not out.exists()  # refused before anything is written
    code, _, err = _attribute(planted["same"], tiny_bases["sd3"], tmp_path / "same")
    assert code == 2 and "nothing to attribute" in err and err.strip().count("\n") == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text("mine")
    code, _, err = _attribute(planted["lora"], tiny_bases["sd3"], foreign)
    assert code == 2 and "did not write" in err
    assert (foreign / "summary.json").read_text() == "mine"


def test_cost_against_one_audit(planted, tiny_bases, capsys):
    """Not asserted: the time of an attribution (2 blocks, single on) against one audit of the same samples."""
    ckpt = load_checkpoint(planted["lora"], tiny_bases["sd3"])
    audit_config = AuditConfig(prompts=PROMPTS, num_samples=4, sampling=ngdiag.SamplingConfig(num_steps=3), batch_size=2)
    run_audit(ckpt, audit_config)  # warm-up
    start = time.perf_counter()
    run_audit(ckpt, audit_config)
    audit_time = time.perf_counter() - start
    start = time.perf_counter()
    run_attribution(ckpt, _config())
    ratio = (time.perf_counter() - start) / audit_time
    with capsys.disabled():
        print(f"\nattribution / audit time ratio (G=2 blocks, single on): {ratio:.2f}")


def test_shards_merge_into_the_single_run(planted, tiny_bases, tmp_path):
    from ngdiag.workflows.attribution import merge_attributions

    ckpt = load_checkpoint(planted["lora"], tiny_bases["sd3"])
    config = _config()
    single = run_attribution(ckpt, config, out_dir=tmp_path / "single")
    for i in range(2):
        assert run_attribution(ckpt, config, out_dir=tmp_path / f"s{i}", shard=(i, 2)) is None
    merged = merge_attributions([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert (tmp_path / "merged" / "summary.json").read_bytes() == (tmp_path / "single" / "summary.json").read_bytes()
    pd.testing.assert_frame_equal(merged.table, single.table)
