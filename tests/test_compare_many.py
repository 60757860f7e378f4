"""``ngdiag compare`` of any number of runs: a grid over two settings, a curve over one, paired differences."""

import json

import numpy as np
import pytest
import yaml
from bs4 import BeautifulSoup

from ngdiag.testing import save_planted_base
from ngdiag.workflows.compare import compare_runs, load_runs, varying_settings
from tests.helpers import run_cli

PROMPTS = ["a red cube", "a cat on a hill"]
HELD_OUT = ["a green ball", "a dog in the snow", "a blue house"]


def _train(base, out, lam, kl_beta):
    cfg = {
        "model": {"base": str(base)}, "lora": {"rank": 2, "alpha": 2}, "method": "nft", "normguard": {"lam": lam},
        "nft": {"kl_beta": kl_beta}, "sampling": {"steps": 2, "guidance": 1.0}, "timesteps": {"num": 1},
        "optimizer": {"lr": 0.05, "micro_batch_size": 4},
        "rollouts": {"prompts": PROMPTS, "group_size": 2, "prompts_per_iteration": 2, "batch_size": 4},
        "reward": "brightness", "iterations": 2, "checkpoint_every": 1, "output_dir": str(out),
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("train", path, "--quiet")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-many")
    base = save_planted_base(root / "base", "sd3")
    runs = {(lam, kl): _train(base, root / f"lam{lam}-kl{kl}", lam, kl) for lam in (0.0, 1.0) for kl in (0.0, 0.1)}
    return runs


def test_four_runs_in_two_settings_render_a_grid(four_runs, tmp_path):
    paths = list(four_runs.values())
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("\n".join(HELD_OUT) + "\n")
    out = tmp_path / "cmp.html"
    code, stdout, err = run_cli("compare", *paths, "--steps", "2", "--num-samples", 6, "--prompts", prompts,
                                "--seed", 5, "--out", out, "--format", "json", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["layout"] == "grid" and summary["prompts"] == HELD_OUT and summary["baseline"] == "base"
    assert [sorted(k for k in s if k != "label") for s in summary["settings"]] == [["nft.kl_beta", "normguard.lam"]] * 4
    assert {(s["normguard.lam"], s["nft.kl_beta"]) for s in summary["settings"]} == set(four_runs)
    assert {r["model"] for r in summary["paired"]} == {"A", "B", "C", "D"}
    for row in summary["paired"]:  # every paired difference has its interval, around its mean
        for key in ("ratio_delta", "reward_delta", "saturation_delta"):
            assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"], (row["model"], key)
    table = {(r["model"], r["steps"]): r for r in summary["table"]}
    for label in "ABCD":  # against the base, the paired norm ratio is the inflation itself
        row = next(r for r in summary["paired"] if r["model"] == label)
        assert row["ratio_delta"] * 100 == pytest.approx(table[(label, 2)]["inflation_pct"], rel=1e-9, abs=1e-9)
    soup = BeautifulSoup(out.read_text(), "html.parser")
    assert soup.select_one("#layout img") is not None and soup.select_one("#paired table") is not None
    assert "Grid over the settings" in soup.get_text()
    assert len(soup.select("img")) == 4  # training curves, the grid, ratio curves, image grid


def test_a_run_against_itself_differs_by_zero_and_one_setting_gives_a_curve(four_runs, tmp_path):
    a = four_runs[(0.0, 0.0)]
    # the same run twice: paired differences against A are exactly 0, with the exact interval [0, 0]
    same = compare_runs(a, a, steps=[2], num_samples=4, baseline="A")
    zero = same.paired[same.paired["model"] == "B"].iloc[0]
    for key in ("ratio_delta", "reward_delta", "saturation_delta", "sharpness_delta"):
        assert zero[key] == zero[f"{key}_low"] == zero[f"{key}_high"] == 0.0, key
    assert list(same.settings.columns) == ["label", "checkpoint"] and same.layout is None  # two runs: no layout
    # three runs differing in normguard.lam only: a curve against it
    mid = _train(a.parent / "base", tmp_path / "lam0.5", 0.5, 0.0)
    curve = compare_runs(a, mid, four_runs[(1.0, 0.0)], steps=[1], num_samples=2)
    assert curve.layout == "curve" and list(curve.settings.columns) == ["label", "normguard.lam"]
    assert list(curve.layout_frame()["normguard.lam"]) == [0.0, 0.5, 1.0]
    soup = BeautifulSoup(curve.render_html(), "html.parser")
    assert "Curve over the settings" in soup.get_text() and soup.select_one("#layout img") is not None
    # checkpoints of one run: the checkpoint is the setting
    ckpts = load_runs([a / "checkpoint-1", a / "checkpoint-2", four_runs[(1.0, 0.0)] / "checkpoint-2"])
    assert [r.name for r in ckpts] == ["lam0.0-kl0.0/checkpoint-1", "lam0.0-kl0.0/checkpoint-2", "lam1.0-kl0.0/checkpoint-2"]
    assert varying_settings(ckpts)["checkpoint"].tolist() == [1, 2, 2]


def test_compare_refuses_a_bad_baseline_before_any_model_is_loaded(four_runs, tmp_path):
    paths = list(four_runs.values())[:2]
    code, _, err = run_cli("compare", *paths, "--baseline", "Z", "--out", tmp_path / "x.html", "--quiet")
    assert code != 0 and "--baseline must be" in err and not (tmp_path / "x.html").exists()
    code, _, err = run_cli("compare", paths[0], "--out", tmp_path / "x.html", "--quiet")
    assert code != 0 and "at least two" in err and "Traceback" not in err
