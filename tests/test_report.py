"""The report layer: figures, self-contained HTML, escaping, atomic writes, and a headless browser."""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from bs4 import BeautifulSoup

from ngdiag.core.errors import ConfigError
from ngdiag.report import figures as F
from ngdiag.report import html as H

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_PREFIX = "data:image/png;base64,"
EVIL_PROMPT = "<script>alert(1)</script> a cat & a dog"
EVIL_PATH = "/ckpt/run&co/<b>final</b>"
EVIL_CONFIG = '"><img src=x onerror=alert(1)>'
INTERVAL = "+8.0 % [7.8 %, 8.2 %] at 95 %, tolerance ±1 %"
N_SAMPLES, N_STEPS = 6, 5


# ----------------------------------------------------------------------------- synthetic inputs
def make_inputs(*, reward: bool = True, renorm: bool = True, images: bool = True):
    rng = np.random.default_rng(0)
    t = np.linspace(1.0, 0.2, N_STEPS)
    ratios = 1.08 * np.exp(0.01 * rng.standard_normal((N_STEPS, N_SAMPLES)))  # (steps, samples)
    frames = []
    for call, offset in (("guided", 0.0), ("cond", 0.5)):  # cond rows are planted far off: never plotted by default
        r = ratios + offset
        norm_ref = 10 + 5 * t
        frames.append(pd.DataFrame({
            "call": call, "step": np.arange(N_STEPS), "t": t, "mean_ratio": r.mean(axis=1),
            "ci_low": r.min(axis=1), "ci_high": r.max(axis=1), "mean_cos": np.linspace(0.99, 0.95, N_STEPS),
            "radial_share": np.linspace(0.8, 0.4, N_STEPS), "mean_norm_theta": norm_ref * r.mean(axis=1),
            "mean_norm_ref": norm_ref,
        }))
    per_step = pd.concat(frames, ignore_index=True)
    prompts = [EVIL_PROMPT, "a red bicycle", "a bowl of soup"]
    log_ratio = np.log(ratios).mean(axis=0)
    per_sample = pd.DataFrame({"sample": np.arange(N_SAMPLES), "prompt": [prompts[i % 3] for i in range(N_SAMPLES)],
                               "seed": 100 + np.arange(N_SAMPLES), "mean_ratio": ratios.mean(axis=0),
                               "log_ratio": log_ratio})
    guided = per_step[per_step["call"] == "guided"]
    summary = {
        "schema_version": 1,
        "verdict": "inflated",
        "inflation": {"value": 0.08, "ci_low": 0.078, "ci_high": 0.082, "confidence": 0.95, "tolerance": 0.01,
                      "method": "BCa"},
        "per_step": guided[["step", "t", "mean_ratio", "ci_low", "ci_high", "mean_cos", "radial_share"]].to_dict("records"),
        "num_samples": N_SAMPLES,
        "num_steps": N_STEPS,
        "checkpoint": EVIL_PATH,
        "base": "/models/sd3 & friends",
        "family": "sd3",
        "checkpoint_kind": "lora",
        "config": {"prompts": prompts, "seed": 100, "sampling": {"guidance_scale": 4.5, "note": EVIL_CONFIG}},
        "versions": {"ngdiag": "0.1.0", "torch": "2.x"},
    }
    if renorm:
        summary["renorm"] = {"velocity": "guided", "equation": "v' = v_theta * ||v_ref|| / ||v_theta|| (paper eq. 3)",
                             "rl_relative_distance_to_base_mean": 0.31, "rl_relative_distance_to_base_std": 0.05,
                             "rl_renorm_relative_distance_to_base_mean": 0.12,
                             "rl_renorm_relative_distance_to_base_std": 0.03}
    if reward:
        summary["reward"] = {"name": "pickscore:/models/ps&v1", "rows": [
            {"model": "base", "mean": 21.0, "std": 0.4, "n": 6},
            {"model": "rl", "mean": 22.5, "std": 0.3, "n": 6},
            {"model": "rl+renorm", "mean": 22.9, "std": 0.3, "n": 6}],
            "delta_rl_minus_base": 1.5, "delta_renorm_minus_rl": 0.4}
    imgs = None
    if images:
        g = np.random.default_rng(1)
        imgs = {"base": g.random((3, 3, 32, 32)), "rl": g.random((3, 3, 32, 32)),
                "rl+renorm": g.random((3, 3, 32, 32)).astype(np.float32)}
    return summary, per_step, per_sample, imgs, prompts


@pytest.fixture(scope="module")
def audit_html():
    summary, per_step, per_sample, images, prompts = make_inputs()
    return H.render_audit_report(summary, per_step, per_sample, images=images, prompts=prompts)


@pytest.fixture(scope="module")
def bare_html():
    summary, per_step, per_sample, _, _ = make_inputs(reward=False, renorm=False, images=False)
    return H.render_audit_report(summary, per_step, per_sample)


def soup_of(html: str) -> BeautifulSoup:
    return BeautifulSoup(html, "html.parser")


def png_size(uri: str) -> tuple:
    assert uri.startswith(DATA_PREFIX), uri[:40]
    raw = base64.b64decode(uri[len(DATA_PREFIX):], validate=True)
    assert raw[:8] == PNG_MAGIC
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def assert_self_contained(html: str) -> BeautifulSoup:
    soup = soup_of(html)
    assert soup.find("script") is None
    for tag in ("link", "iframe", "object", "embed", "base", "form"):
        assert soup.find(tag) is None, tag
    for el in soup.find_all(True):
        for name, value in el.attrs.items():
            value = " ".join(value) if isinstance(value, list) else str(value)
            assert not name.lower().startswith("on"), (el.name, name)
            assert "http://" not in value and "https://" not in value, (el.name, name, value[:80])
            if not value.startswith(DATA_PREFIX):  # base64 may contain "//" by chance
                assert "//" not in value, (el.name, name, value[:80])
    imgs = soup.find_all("img")
    assert imgs
    for img in imgs:
        w, h = png_size(img["src"])
        assert w > 100 and h > 100
        assert img.get("alt")
    styles = soup.find_all("style")
    assert len(styles) == 1 and ".kv" in styles[0].text
    css = styles[0].text
    assert "url(" not in css and "@import" not in css and "@font-face" not in css
    without_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert "http:" not in without_data and "https:" not in without_data
    return soup


# ----------------------------------------------------------------------------- formatting
def test_format_interval():
    assert H.format_interval({"value": 0.08, "ci_low": 0.078, "ci_high": 0.082, "confidence": 0.95,
                              "tolerance": 0.01}) == INTERVAL
    assert H.format_interval({"value": -0.031, "ci_low": -0.0449, "ci_high": -0.00004, "confidence": 0.9,
                              "tolerance": 0.005}) == "-3.1 % [-4.5 %, 0.0 %] at 90 %, tolerance ±0.5 %"
    assert H.format_interval({"value": None, "ci_low": float("nan"), "ci_high": 0.1, "confidence": 0.95,
                              "tolerance": 0.0}) == "n/a [n/a, 10.0 %] at 95 %, tolerance ±0 %"
    assert H.format_percent(-0.00001, sign=True) == "+0.0 %"


# ----------------------------------------------------------------------------- audit report
def test_verdict_banner(audit_html):
    soup = soup_of(audit_html)
    banner = soup.select_one("#verdict")
    assert "verdict-inflated" in banner["class"]
    assert banner.select_one(".verdict-value").get_text() == "inflated"
    assert banner.select_one(".interval").get_text() == INTERVAL
    assert "above +1 %" in banner.get_text()


@pytest.mark.parametrize("verdict,css", [("deflated", "verdict-deflated"), ("no-inflation", "verdict-no-inflation"),
                                         ("inconclusive", "verdict-inconclusive")])
def test_other_verdicts(verdict, css):
    summary, per_step, per_sample, _, _ = make_inputs(reward=False, renorm=False, images=False)
    summary["verdict"] = verdict
    html = H.render_audit_report(summary, per_step.iloc[:0].assign(), per_sample)  # no curves: only the banner
    banner = soup_of(html).select_one("#verdict")
    assert css in banner["class"] and banner.select_one(".verdict-value").get_text() == verdict


def test_bad_inputs_are_refused():
    summary, per_step, per_sample, _, _ = make_inputs(images=False)
    with pytest.raises(ConfigError, match="verdict"):
        H.render_audit_report({**summary, "verdict": "maybe"}, per_step, per_sample)
    with pytest.raises(ConfigError, match="schema_version"):
        H.render_audit_report({**summary, "schema_version": 99}, per_step, per_sample)
    with pytest.raises(ConfigError, match=r"\(N, 3, H, W\)"):
        H.render_audit_report(summary, per_step, per_sample, images={"rl": np.zeros((2, 32, 32))[None, None]})


def test_report_is_self_contained(audit_html, bare_html):
    soup = assert_self_contained(audit_html)
    assert len(soup.find_all("img")) == 5  # ratio, norms, histogram, cosine/radial, image grid
    bare = assert_self_contained(bare_html)
    assert len(bare.find_all("img")) == 4 and bare.select_one("#images") is None
    csp = soup.find("meta", attrs={"http-equiv": "Content-Security-Policy"})
    assert "default-src 'none'" in csp["content"] and "img-src data:" in csp["content"]


def test_user_strings_are_escaped(audit_html):
    soup = soup_of(audit_html)
    assert soup.find("script") is None and soup.find("b") is None
    assert not [img for img in soup.find_all("img") if not img["src"].startswith(DATA_PREFIX)]
    # Round trip: the text reads exactly as given.
    assert [li.get_text() for li in soup.select("ol.prompts li")][0] == EVIL_PROMPT
    assert EVIL_PROMPT in [td.get_text() for td in soup.select("#samples td")]
    facts = {th.get_text(): th.find_next_sibling("td").get_text() for th in soup.select("table.facts th")}
    assert facts["checkpoint"] == EVIL_PATH
    assert facts["base"] == "/models/sd3 & friends"
    assert soup.find("title").get_text() == f"ngdiag audit: {EVIL_PATH}"
    config = {th.get_text(): th.find_next_sibling("td").get_text() for th in soup.select("#config th")}
    assert config["sampling.note"] == EVIL_CONFIG
    assert config["prompts"].startswith("3 prompts")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a cat &amp; a dog" in audit_html
    assert "/ckpt/run&amp;co/&lt;b&gt;final&lt;/b&gt;" in audit_html


def test_reward_and_renorm_tables_only_when_given(audit_html, bare_html):
    soup = soup_of(audit_html)
    rows = [[td.get_text() for td in tr.find_all("td")] for tr in soup.select("#reward tr.reward-row")]
    assert rows == [["base", "21", "0.4", "6"], ["rl", "22.5", "0.3", "6"], ["rl+renorm", "22.9", "0.3", "6"]]
    deltas = {tr.td.get_text(): [td.get_text() for td in tr.find_all("td")[1:]]
              for tr in soup.select("#reward tr.delta-row")}
    se_rl_base = np.sqrt(0.4**2 / 6 + 0.3**2 / 6)
    assert deltas == {"RL − base": ["1.5", f"{se_rl_base:.4g}"], "RL+renorm − RL": ["0.4", f"{np.sqrt(0.03):.4g}"]}
    assert soup.select_one("#reward h2").get_text() == "Reward: pickscore:/models/ps&v1"
    renorm = [[td.get_text() for td in tr.find_all("td")] for tr in soup.select("#renorm table.data tbody tr")]
    assert renorm == [["rl", "0.31", "0.05"], ["rl+renorm", "0.12", "0.03"]]
    assert soup.select_one('nav a[href="#reward"]') is not None

    bare = soup_of(bare_html)
    for selector in ("#reward", "#renorm", "tr.reward-row", "tr.delta-row", 'nav a[href="#reward"]'):
        assert bare.select_one(selector) is None, selector


def test_reward_caption_names_only_the_models_in_the_table():
    summary, per_step, per_sample, _, _ = make_inputs(renorm=False, images=False)
    with_renorm = soup_of(H.render_audit_report(summary, per_step, per_sample))
    caption = with_renorm.select_one("#reward p.table-caption").get_text()
    assert caption.startswith("Reward of the base model, the RL model and the RL model with renormalization")

    # an audit without --renorm: its reward has no rl+renorm row, and the caption must not claim one
    summary["reward"]["rows"] = summary["reward"]["rows"][:2]
    summary["reward"].pop("delta_renorm_minus_rl")
    soup = soup_of(H.render_audit_report(summary, per_step, per_sample))
    caption = soup.select_one("#reward p.table-caption").get_text()
    assert "renormalization" not in caption.replace("without renormalization", ""), caption
    assert caption.startswith("Reward of the base model and the RL model"), caption
    assert [tr.td.get_text() for tr in soup.select("#reward tr.reward-row")] == ["base", "rl"]


@pytest.mark.parametrize("rl,renormed,expected", [
    (0.31, 0.12, "Renormalization brought the final latents within a mean relative distance of 0.12 of the base "
                 "model's (RL alone: 0.31), removing 61.3 % of the RL model's distance."),
    (0.041370211904900395, 2.387775637860003e-07,
     "Renormalization brought the final latents within a mean relative distance of 2.388e-07 of the base "
     "model's (RL alone: 0.04137), removing more than 99.9 % of the RL model's distance."),
    (0.2, 0.25, "Renormalization moved the final latents further from the base model's: mean relative distance "
                "0.25 against 0.2 for the RL model alone."),
])
def test_renorm_section_concludes_from_its_numbers(rl, renormed, expected):
    summary, per_step, per_sample, _, _ = make_inputs(reward=False, images=False)
    summary["renorm"]["rl_relative_distance_to_base_mean"] = rl
    summary["renorm"]["rl_renorm_relative_distance_to_base_mean"] = renormed
    soup = soup_of(H.render_audit_report(summary, per_step, per_sample))
    assert [p.get_text() for p in soup.select("#renorm p.conclusion")] == [expected]


def test_per_step_table_uses_guided_rows(audit_html):
    _, per_step, _, _, _ = make_inputs(images=False)
    guided = per_step[per_step["call"] == "guided"]
    body = soup_of(audit_html).select("#steps tbody tr")
    assert len(body) == N_STEPS
    shown = [float(tr.find_all("td")[2].get_text()) for tr in body]
    np.testing.assert_allclose(shown, guided["mean_ratio"], rtol=1e-3)


def test_per_sample_table_is_sorted_and_capped():
    summary, per_step, _, _, _ = make_inputs(reward=False, renorm=False, images=False)
    n = 100
    per_sample = pd.DataFrame({"sample": range(n), "prompt": ["p"] * n, "seed": range(n),
                               "mean_ratio": np.linspace(0.9, 1.2, n), "log_ratio": np.log(np.linspace(0.9, 1.2, n))})
    soup = soup_of(H.render_audit_report(summary, per_step, per_sample))
    rows = soup.select("#samples tbody tr")
    assert len(rows) == 40
    ratios = [float(tr.find_all("td")[2].get_text()) for tr in rows]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == pytest.approx(1.2) and ratios[-1] == pytest.approx(0.9)
    assert "100 samples" in soup.select_one("#samples").get_text()


def test_rendering_leaves_no_global_matplotlib_state():
    before = dict(matplotlib.rcParams)
    summary, per_step, per_sample, images, prompts = make_inputs()
    H.render_audit_report(summary, per_step, per_sample, images=images, prompts=prompts)
    assert dict(matplotlib.rcParams) == before
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


# ----------------------------------------------------------------------------- figures
def test_ratio_curve_plots_guided_against_inverted_t():
    _, per_step, _, _, _ = make_inputs(images=False)
    fig = F.ratio_curve(per_step)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo > hi  # t = 1 (noise) on the left
    assert ax.get_xlabel() == "t (1 = noise, 0 = data)"
    lines = {matplotlib.colors.to_hex(line.get_color()).upper(): line for line in ax.get_lines()}
    guided = per_step[per_step["call"] == "guided"]
    np.testing.assert_allclose(lines[F.THETA_COLOR].get_ydata(), guided["mean_ratio"])
    assert set(lines[F.REF_COLOR].get_ydata()) == {1.0}
    cond = F.ratio_curve(per_step, call="cond").axes[0]
    np.testing.assert_allclose(cond.get_lines()[0].get_ydata(), per_step[per_step["call"] == "cond"]["mean_ratio"])
    uri = H.figure_to_data_uri(fig)
    assert png_size(uri)[0] > 100 and fig.axes == []  # encoded, then released


def test_figure_colours_are_fixed():
    _, per_step, per_sample, images, _ = make_inputs()
    norms = F.norm_curves(per_step).axes[0]
    colours = {matplotlib.colors.to_hex(line.get_color()).upper(): line.get_label() for line in norms.get_lines()}
    assert colours == {F.THETA_COLOR: "current ||v_θ||", F.REF_COLOR: "reference ||v_ref||"}
    hist = F.ratio_histogram(per_sample).axes[0]
    assert matplotlib.colors.to_hex(hist.patches[0].get_facecolor()).upper() == F.THETA_COLOR
    assert len({F.THETA_COLOR, F.REF_COLOR, F.RENORM_COLOR, *F.RUN_COLORS}) == 3 + len(F.RUN_COLORS)
    drift = F.cosine_and_radial(per_step)
    assert len(drift.axes) == 2 and drift.axes[1].get_ylabel() == "radial share"


def test_constant_ratios_still_show_a_bar():
    per_sample = pd.DataFrame({"mean_ratio": np.full(16, 1.08), "log_ratio": np.full(16, np.log(1.08))})
    ax = F.ratio_histogram(per_sample).axes[0]
    bars = [p for p in ax.patches if p.get_height() > 0]
    lo, hi = ax.get_xlim()
    assert len(bars) == 1 and bars[0].get_height() == 16
    assert bars[0].get_width() >= 0.01 * (hi - lo)  # visible, not a sliver


def test_image_rows_in_model_order():
    summary, per_step, per_sample, images, _ = make_inputs(reward=False, renorm=False)
    shuffled = {"rl+renorm": images["rl+renorm"], "extra": images["rl"], "rl": images["rl"], "base": images["base"]}
    soup = soup_of(H.render_audit_report(summary, per_step, per_sample, images=shuffled))
    assert "One row per model (base, rl, rl+renorm, extra)" in soup.select_one("#images figcaption").get_text()


def test_image_grid_layout_and_tensor_input():
    _, _, _, images, _ = make_inputs()
    images["rl"] = torch.from_numpy(images["rl"]).float()
    fig = F.image_grid(images, max_images=2, column_labels=["seed 100", "seed 101"])
    axes = fig.axes
    assert len(axes) == 3 * 2
    assert [axes[i * 2].get_ylabel() for i in range(3)] == ["base", "rl", "rl+renorm"]
    assert [a.get_title() for a in axes[:2]] == ["seed 100", "seed 101"]
    big = F.image_grid({"rl": np.ones((1, 3, 1024, 512))}, max_side=128).axes[0].images[0].get_array()
    assert big.shape == (128, 64, 3)


def test_sensitivity_figures():
    frame = pd.DataFrame({"step": range(4), "t": [1.0, 0.75, 0.5, 0.25], "mean": [0.5, -0.2, 0.0, 1.0],
                          "std": [0.1, 0.4, 0.3, 0.2], "nsr": [0.2, 2.0, np.inf, 0.2],
                          "stderr": [0.05, 0.2, 0.15, 0.1], "frac_positive": [1, 0.25, 0.5, 1]})
    fig = F.sensitivity_curves(frame)
    ax_s, ax_n = fig.axes
    assert ax_n.get_yscale() == "log" and ax_n.get_xlim()[0] > ax_n.get_xlim()[1]
    assert len(ax_n.get_lines()[0].get_ydata()) == 3  # the infinite NSR is left out
    assert 0.0 in set(ax_s.get_lines()[-1].get_ydata())
    long = pd.DataFrame({"step": np.repeat(range(4), 5), "t": np.repeat(frame["t"], 5),
                         "S": np.random.default_rng(0).standard_normal(20)})
    spread = F.sensitivity_spread(long).axes[0]
    assert len(spread.collections) == 4 and spread.get_xticklabels()[0].get_text() == "0\n1.00"


def _labelled_y_ticks(ax) -> dict:
    """Position -> label text of the y tick labels a reader sees (inside the limits, not empty)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(ax.figure).draw()
    lo, hi = ax.get_ylim()
    labels = {}
    for tick in ax.get_yticklabels() + ax.get_yticklabels(minor=True):
        y = tick.get_position()[1]
        if tick.get_text() and lo * (1 - 1e-9) <= y <= hi * (1 + 1e-9):
            labels[y] = tick.get_text()
    return labels


@pytest.mark.parametrize("nsr", [[0.05, 0.3, 5.0, 2.0], [0.3, 2.0, 8.0, 0.5], [0.5, 3.0, 30.0, 120.0],
                                 [0.32, 0.4, 0.56, 0.35], [1.5, 2.0, 3.0, 4.0]])
def test_nsr_axis_is_labelled_with_plain_numbers_across_the_data(nsr):
    frame = pd.DataFrame({"step": range(4), "t": [1.0, 0.75, 0.5, 0.25], "mean": [0.5, -0.2, 0.1, 1.0],
                          "stderr": [0.05, 0.2, 0.15, 0.1], "nsr": nsr})
    ax_n = F.sensitivity_curves(frame).axes[1]
    labels = _labelled_y_ticks(ax_n)
    for y, text in labels.items():
        assert float(text) == pytest.approx(y, rel=1e-12), (y, text)  # "1", "10", "0.2": no mathtext
    assert labels.get(1.0) == "1"
    assert max(labels) >= max(nsr) and min(labels) <= min(nsr), (nsr, sorted(labels))
    assert len(labels) >= 3, labels


# ----------------------------------------------------------------------------- other reports
def test_sensitivity_report():
    per_step = pd.DataFrame({"step": range(3), "t": [1.0, 0.6, 0.3], "t_next": [0.6, 0.3, 0.0], "mean": [0.5, -0.2, 1.0],
                             "std": [0.1, 0.8, 0.2], "nsr": [0.2, 4.0, 0.2], "stderr": [0.05, 0.4, 0.1],
                             "frac_positive": [1.0, 0.25, 1.0]})
    long = pd.DataFrame({"step": np.repeat(range(3), 4), "t": np.repeat(per_step["t"], 4), "sample": np.tile(range(4), 3),
                         "S": np.random.default_rng(0).standard_normal(12)})
    summary = {"schema_version": 1, "method": "discrete", "reward": "aesthetic:<x>", "model": "theta",
               "num_samples": 4, "num_steps": 3, "nsr_median": 0.2, "nsr_min": 0.2, "nsr_max": 4.0,
               "fraction_of_steps_with_nsr_above_3": 1 / 3, "directional_derivative": {"mean": 0.3, "std": 0.1},
               "reward_mean": 5.5, "checkpoint": EVIL_PATH, "config": {"prompts": [EVIL_PROMPT]},
               "versions": {"ngdiag": "0.1.0"}}
    html = H.render_sensitivity_report(summary, per_step, long)
    soup = assert_self_contained(html)
    assert len(soup.find_all("img")) == 2
    numbers = {th.get_text(): th.find_next_sibling("td").get_text() for th in soup.select("#summary th")}
    assert numbers["share of steps with NSR > 3"] == "33.3 %"
    assert numbers["dR/dε (every step scaled by 1 + ε)"].startswith("0.3 ± 0.1")
    assert len(soup.select("#steps tbody tr")) == 3
    assert soup.find("x") is None and "aesthetic:<x>" in soup.get_text()


def test_compare_report():
    def metrics(slope):
        it = np.arange(10)
        return pd.DataFrame({"iteration": it, "reward_mean": 20 + 0.1 * it, "reward_std": 0.5,
                             "inflation": slope * it})

    _, per_step, _, images, _ = make_inputs()
    context = {"runs": [{"name": "nft", "metrics": metrics(0.01)}, {"name": "nft + <NormGuard>", "metrics": metrics(0.0)}],
               "table": [{"run": "nft", "steps": 4, "reward": 21.2}, {"run": "nft + <NormGuard>", "steps": 4,
                                                                       "reward": 21.9, "inflation": 0.001}],
               "ratio_curves": {"nft": per_step, "nft + <NormGuard>": per_step},
               "images": {"nft / 4 steps": images["rl"], "normguard / 4 steps": images["base"]}}
    soup = assert_self_contained(H.render_compare_report(context))
    assert len(soup.find_all("img")) == 3
    assert [th.get_text() for th in soup.select("#table thead th")] == ["run", "steps", "reward", "inflation"]
    assert [td.get_text() for td in soup.select("#table tbody tr")[0].find_all("td")] == ["nft", "4", "21.2", ""]
    assert "nft + <NormGuard>" in soup.select_one("ul.runs").get_text() and soup.find("normguard") is None
    fig = F.training_curves(context["runs"][0]["metrics"], context["runs"][1]["metrics"], ["a", "b"])
    colours = [matplotlib.colors.to_hex(line.get_color()).upper() for line in fig.axes[0].get_lines()]
    assert colours == [F.RUN_COLORS[0].upper(), F.RUN_COLORS[1].upper()]
    with pytest.raises(ConfigError):
        H.render_compare_report({"runs": []})


def test_compare_report_concludes_which_run_inflated_more():
    runs = [{"name": "A: plain (nft, lam=0)", "metrics": pd.DataFrame({"iteration": [0, 1], "reward_mean": [1.0, 2.0]})},
            {"name": "B: <guarded> (nft, lam=1)", "metrics": pd.DataFrame({"iteration": [0, 1], "reward_mean": [1.0, 1.5]})}]
    inflation = [
        # 8 steps: B below A, separated intervals (B listed first: the order must not matter)
        {"name": runs[1]["name"], "steps": 8, "value": 0.0123, "ci_low": 0.004, "ci_high": 0.0201, "confidence": 0.95},
        {"name": runs[0]["name"], "steps": 8, "value": 0.1234, "ci_low": 0.101, "ci_high": 0.145, "confidence": 0.95},
        # 4 steps: B above A, overlapping intervals
        {"name": runs[0]["name"], "steps": 4, "value": 0.05, "ci_low": 0.02, "ci_high": 0.08, "confidence": 0.95},
        {"name": runs[1]["name"], "steps": 4, "value": 0.061, "ci_low": 0.03, "ci_high": 0.09, "confidence": 0.95},
    ]
    soup = soup_of(H.render_compare_report({"runs": runs, "inflation": inflation}))
    assert [p.get_text() for p in soup.select("#conclusion p.conclusion")] == [
        "At 8 sampling steps, A: plain (nft, lam=0) inflated more than B: <guarded> (nft, lam=1), by 11.1 percentage "
        "points: +12.3 % [10.1 %, 14.5 %] against +1.2 % [0.4 %, 2.0 %] (95 % intervals); the intervals do not overlap.",
        "At 4 sampling steps, B: <guarded> (nft, lam=1) inflated more than A: plain (nft, lam=0), by 1.1 percentage "
        "points: +6.1 % [3.0 %, 9.0 %] against +5.0 % [2.0 %, 8.0 %] (95 % intervals); the intervals overlap, so "
        "these samples do not separate the two runs.",
    ]
    assert soup.select_one('nav a[href="#conclusion"]') is not None and soup.find("guarded") is None
    assert soup_of(H.render_compare_report({"runs": runs})).select_one("#conclusion") is None  # no numbers, no claim


# ----------------------------------------------------------------------------- atomic writes
def test_write_html_is_atomic(tmp_path, monkeypatch, audit_html):
    path = tmp_path / "report.html"
    H.write_html(audit_html, path)
    assert path.read_text(encoding="utf-8") == audit_html
    assert os.stat(path).st_mode & 0o444 == 0o444

    path.write_text("OLD REPORT")
    summary, per_step, per_sample, _, _ = make_inputs(images=False)
    with pytest.raises(ConfigError):  # failure while rendering: nothing is written
        H.write_html(H.render_audit_report({**summary, "verdict": "bogus"}, per_step, per_sample), path)
    assert path.read_text() == "OLD REPORT"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    for target in ("fsync", "replace"):  # failure after part of the new report reached the disk
        with monkeypatch.context() as m:
            m.setattr(os, target, fail)  # the os module, which every atomic write uses
            with pytest.raises(OSError, match="disk full"):
                H.write_html(audit_html, path)
        assert path.read_text() == "OLD REPORT", target
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"], target  # no temp file left


# ----------------------------------------------------------------------------- a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_BROWSER_ERRORS = re.compile(r"Failed to load resource|Refused to|Content Security Policy|Uncaught|:CONSOLE[:(]")


@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_in_headless_chromium(tmp_path, audit_html):
    page = H.write_html(audit_html, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    base = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,2400"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [line for line in dom.stderr.splitlines() if _BROWSER_ERRORS.search(line)]
    assert not errors, errors
    soup = soup_of(dom.stdout)
    assert soup.select_one(".verdict-value").get_text() == "inflated"
    assert soup.select_one(".interval").get_text() == INTERVAL
    assert soup.find("script") is None
    out = subprocess.run([*base, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=90,
                         env=env)
    assert out.returncode == 0 and shot.read_bytes()[:8] == PNG_MAGIC, out.stderr[-2000:]
    assert not [line for line in out.stderr.splitlines() if _BROWSER_ERRORS.search(line)]
