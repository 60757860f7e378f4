"""Published alternative reward scales (PickScore / 26 as flow_grpo and Flow-Factory log it, HPSv2 x 100
as its benchmark prints it): the factors, the scorers that expose them, the audit's reward block and the
report that names them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from bs4 import BeautifulSoup

from ngdiag.core.errors import ConfigError
from ngdiag.report import html as H
from ngdiag.rewards.scorers import BrightnessReward, ClipScoreReward, HPSv2Reward, PickScoreReward, load_reward
from ngdiag.rewards.specs import REWARD_SCALES, RewardScale, reward_scales
from ngdiag.workflows.audit import reward_block
from tests.test_rewards import clip_dir  # noqa: F401  (fixture: a tiny PickScore-style CLIP folder)


def test_scale_factors_give_the_published_values():
    # flow_grpo/pickscore_scorer.py and Flow-Factory's pick_score.py: exp(logit_scale) * cos / 26
    assert PickScoreReward.rescaled(21.5, "flow_grpo") == pytest.approx(0.8269230769)
    assert PickScoreReward.rescaled(26.0, "flow_grpo") == pytest.approx(1.0)
    # flow_grpo/hpsv2_scorer.py returns the cosine; HPSv2's hpsv2/evaluation.py prints 100 * cosine
    assert HPSv2Reward.rescaled(0.275, "flow_grpo") == pytest.approx(0.275)
    assert HPSv2Reward.rescaled(0.275, "hpsv2_benchmark") == pytest.approx(27.5)
    tensor = PickScoreReward.rescaled(torch.tensor([13.0, 20.8]), "flow_grpo")
    torch.testing.assert_close(tensor, torch.tensor([0.5, 0.8]))


def test_scorers_expose_their_scales_by_name_and_others_have_none():
    assert set(PickScoreReward.scales) == {"flow_grpo"}
    assert set(HPSv2Reward.scales) == {"flow_grpo", "hpsv2_benchmark"}
    for cls in (PickScoreReward, HPSv2Reward):
        assert cls.raw_scale
        for name, scale in cls.scales.items():
            assert isinstance(scale, RewardScale) and scale.name == name and scale.description and "/" in scale.source
    assert dict(ClipScoreReward.scales) == {} and BrightnessReward.raw_scale is None
    with pytest.raises(ConfigError, match="no scale 'flow_grpo'; its scales: none"):
        BrightnessReward.rescaled(0.5, "flow_grpo")
    with pytest.raises(ConfigError, match="its scales: flow_grpo"):
        PickScoreReward.rescaled(20.0, "hpsv2_benchmark")


def test_scales_are_found_from_the_spec_without_loading():
    raw, scales = reward_scales("pickscore:/no/such/folder,processor=/neither")
    assert raw.startswith("exp(logit_scale) * cos") and [s.name for s in scales] == ["flow_grpo"]
    assert reward_scales("hpsv2:/no/such.pt")[1] == REWARD_SCALES["hpsv2"]
    for spec in (None, "brightness", "clip:/x", "not-a-kind:/x"):
        assert reward_scales(spec) == (None, ())


def test_pickscore_on_the_flow_grpo_scale_is_flow_factorys_formula(clip_dir):  # noqa: F811
    """The factor applied to ngdiag's PickScore equals the trainers' computation on the same model:
    ``logit_scale.exp() * (text_embs * image_embs).sum(-1) / 26`` with L2-normalised embeddings."""
    reward = load_reward(f"pickscore:{clip_dir}")
    images, prompts = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)), ["a cat", "a dog"]
    with torch.no_grad():
        ours = reward.rescaled(reward(images, prompts), "flow_grpo")
        model = reward.model
        image = model.get_image_features(pixel_values=reward.preprocess(images))
        image = getattr(image, "pooler_output", image)
        tokens = reward.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        text = getattr(text, "pooler_output", text)
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        theirs = model.logit_scale.exp() * (text * image).sum(dim=-1) / 26
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def _rewards() -> pd.DataFrame:
    raw = {"base": [20.0, 21.0, 22.0], "rl": [21.0, 23.0, 22.5], "rl+renorm": [20.5, 22.0, 22.0]}
    return pd.DataFrame([{"sample": i, "model": m, "reward": v} for m, vals in raw.items() for i, v in enumerate(vals)])


def test_reward_block_adds_each_named_scale():
    frame = _rewards()
    block = reward_block(frame, "pickscore:/models/pickscore")
    assert block["raw_scale"].startswith("exp(logit_scale) * cos")
    scaled = block["scales"]["flow_grpo"]
    assert scaled["factor"] == pytest.approx(1 / 26) and "Flow-Factory" in scaled["source"]
    for raw_row, row in zip(block["rows"], scaled["rows"]):
        assert row["model"] == raw_row["model"] and row["n"] == raw_row["n"] == 3
        values = frame.loc[frame["model"] == row["model"], "reward"].to_numpy() / 26
        assert row["mean"] == pytest.approx(values.mean()) and row["std"] == pytest.approx(values.std(ddof=1))
    wide = frame.pivot_table(index="sample", columns="model", values="reward") / 26
    assert scaled["delta_rl_minus_base"] == pytest.approx((wide["rl"] - wide["base"]).mean())
    assert scaled["delta_rl_minus_base_std"] == pytest.approx((wide["rl"] - wide["base"]).std(ddof=1))
    assert scaled["delta_renorm_minus_rl"] == pytest.approx((wide["rl+renorm"] - wide["rl"]).mean())
    hps = reward_block(frame.assign(reward=frame["reward"] / 80), "hpsv2:/models/HPS_v2.1_compressed.pt")
    assert set(hps["scales"]) == {"flow_grpo", "hpsv2_benchmark"}
    assert hps["scales"]["hpsv2_benchmark"]["rows"][0]["mean"] == pytest.approx(100 * 21.0 / 80)
    assert hps["scales"]["flow_grpo"]["rows"] == hps["rows"]
    for spec in ("brightness", None):  # no published alternative: the block is as before
        assert "scales" not in reward_block(frame, spec) and "raw_scale" not in reward_block(frame, spec)


def test_audit_report_names_the_scale():
    summary = {
        "schema_version": 1, "verdict": "inflated", "num_samples": 3, "num_steps": 2, "checkpoint": "ckpt",
        "inflation": {"value": 0.08, "ci_low": 0.07, "ci_high": 0.09, "confidence": 0.95, "tolerance": 0.01},
        "reward": reward_block(_rewards(), "pickscore:/models/pickscore"),
    }
    per_step = pd.DataFrame({"step": [0, 1], "t": [1.0, 0.5], "mean_ratio": [1.08, 1.08], "ci_low": [1.07, 1.07],
                             "ci_high": [1.09, 1.09], "mean_cos": [0.99, 0.99], "radial_share": [0.5, 0.5],
                             "mean_norm_theta": [1.08, 1.08], "mean_norm_ref": [1.0, 1.0]})
    per_sample = pd.DataFrame({"sample": [0, 1, 2], "prompt": ["a"] * 3, "seed": [0, 1, 2],
                               "mean_ratio": [1.08] * 3, "log_ratio": [np.log(1.08)] * 3})
    soup = BeautifulSoup(H.render_audit_report(summary, per_step, per_sample), "html.parser")
    assert "raw scale: exp(logit_scale) * cos" in soup.select_one("#reward p.table-caption").get_text()
    table = soup.select_one('#reward table.scale-table[data-scale="flow_grpo"]')
    caption = soup.select_one("#reward p.scale-caption").get_text()
    assert "flow_grpo scale" in caption and "pick_score.py" in caption and "PickScore / 26" in caption
    rows = {tr.td.get_text(): [td.get_text() for td in tr.find_all("td")[1:]] for tr in table.select("tr")[1:]}
    assert rows["base"][0] == H._num(21.0 / 26) and rows["rl"][0] == H._num(22.1666666667 / 26)
    # the paired standard error on the scale is the raw one times 1/26
    diff = np.array([1.0, 2.0, 0.5]) / 26
    assert rows["RL − base"] == [H._num(diff.mean()), H._num(diff.std(ddof=1) / np.sqrt(3))]


def test_tiny_audit_with_a_pickscore_like_reward_reports_the_scale(tmp_path, clip_dir):  # noqa: F811
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.testing import save_planted_base, save_scaled_finetune
    from ngdiag.workflows.audit import AuditConfig, run_audit

    base = save_planted_base(tmp_path / "base", "sd3")
    ckpt = load_checkpoint(save_scaled_finetune(base, tmp_path / "ft", 1.08), base)
    cfg = AuditConfig(prompts=["a red cube", "a cat"], num_samples=2, sampling=SamplingConfig(num_steps=2), batch_size=2,
                      reward=f"pickscore:{clip_dir}", grid_size=0)
    block = run_audit(ckpt, cfg).summary()["reward"]
    scaled = block["scales"]["flow_grpo"]
    assert [r["model"] for r in scaled["rows"]] == ["base", "rl"]
    for raw_row, row in zip(block["rows"], scaled["rows"]):
        assert row["mean"] == pytest.approx(raw_row["mean"] / 26) and row["std"] == pytest.approx(raw_row["std"] / 26)
    assert scaled["delta_rl_minus_base"] == pytest.approx(block["delta_rl_minus_base"] / 26)
