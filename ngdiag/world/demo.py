"""``ngdiag demo``: the paper's analyses on the shipped miniature world, one report each.

The world (``ngdiag/world/assets``: the base pipeline, the judge, and two DiffusionNFT fine-tunes made
with ``ngdiag train``, without and with NormGuard) is copied to ``OUT/world``; then

1. norm inflation along the trajectory of both fine-tunes (paper Figure 3);
2. inference-time renormalization of the unregularised fine-tune: reward and quality with and without
   it, image grids (Table 1, Figure 5);
3. S(t): mean, spread and NSR for the unregularised fine-tune and the world's reward (Figure 4);
4. regularised vs unregularised: reward, quality measures, grids (Table 3, Figure 7);
5. the few-step ablation (Table 4), from one ``ngdiag compare`` of the two runs;
6. inflation and quality across the checkpoints of each run (Table 5), from one ``ngdiag sweep`` per run;
7. where in the image (spatial maps) and in which blocks (``ngdiag attribute``) the unregularised
   fine-tune's inflation sits (not a claim of the paper);

each as ``OUT/<n>-<name>.html`` beside the underlying audits and sensitivity runs (``OUT/runs/``), all
linked from ``OUT/index.html``. Every number on a page is measured in this run; each page says whether it
agrees with the paper, by a rule written next to it (page 7 only states what it measured).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ngdiag.core.errors import ConfigError
from ngdiag.quality import MEASURES

__all__ = ["DemoSettings", "FULL", "QUICK", "run_demo", "ANALYSES"]

Progress = Optional[Callable[[str], None]]

#: The run folders of the shipped world, as labels the pages use.
RUN_LABELS = {"nft-plain": "NFT", "nft-normguard": "NFT + NormGuard (λ = 1)"}
#: Pages, in order: file stem -> title.
ANALYSES = {
    "1-inflation": "Norm inflation along the trajectory (paper Figure 3)",
    "2-renorm": "Inference-time renormalization does not undo the drift (Table 1, Figure 5)",
    "3-sensitivity": "Norm-scaling sensitivity S(t) (Figure 4)",
    "4-normguard": "NormGuard vs no regularisation (Table 3, Figure 7)",
    "5-few-steps": "Few-step sampling (Table 4)",
    "6-checkpoints": "Across training (Table 5)",
    "7-where": "Where in the image, and which blocks (spatial maps, attribution)",
}
#: The measures the pages show, with their labels (all of ngdiag.quality.MEASURES).
MEASURE_LABELS = {
    "clipping_rate": "clipping", "saturation": "saturation", "colourfulness": "colourfulness",
    "high_frequency_energy": "HF energy", "sharpness": "sharpness", "luminance": "luminance", "contrast": "contrast",
}
#: Artefact measures the paper describes (over-saturation, over-sharpening, lighting), used in the rules.
ARTEFACTS = ("saturation", "colourfulness", "clipping_rate", "high_frequency_energy", "luminance")
#: The sweeps mark the first checkpoint whose inflation interval lies above this (the early-stopping question).
SWEEP_THRESHOLD = 0.05


@dataclass(frozen=True)
class DemoSettings:
    """Sample sizes and step counts of the demo."""

    num_samples: int = 32
    steps: int = 28
    few_steps: tuple = (10, 4)
    checkpoint_samples: int = 16
    sensitivity_samples: int = 8
    sensitivity_steps: int = 28
    attribution_samples: int = 8
    guidance: float = 4.5
    seed: int = 1_000_000


FULL = DemoSettings()
QUICK = DemoSettings(num_samples=8, steps=10, few_steps=(4,), checkpoint_samples=4, sensitivity_samples=2,
                     sensitivity_steps=10, attribution_samples=4)


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


# ----------------------------------------------------------------------------- measuring
class _World:
    """The installed world: paths, and one loaded checkpoint per adapter folder (cached)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "base"
        self.judge = root / "judge"
        self.runs = {name: root / "runs" / name for name in RUN_LABELS}
        for name, path in self.runs.items():
            if not path.is_dir():
                raise ConfigError(f"the world at {root} has no run {name}")

    @property
    def fd_encoder(self) -> str:
        """The judge's features (before its heads) as the image encoder of every Fréchet distance."""
        return f"world:{self.judge}"

    @cached_property
    def reward(self) -> str:
        """The reward spec the fine-tunes were trained with (from the unregularised run's config.yaml)."""
        import yaml

        config = yaml.safe_load((self.runs["nft-plain"] / "config.yaml").read_text(encoding="utf-8"))
        spec = config.get("reward") if isinstance(config, dict) else None
        if not isinstance(spec, str) or not spec.startswith("world:"):
            raise ConfigError(f"the run {self.runs['nft-plain']} was not trained with a world reward")
        return spec

    def checkpoints(self, run: str) -> list[tuple[int, Path]]:
        found = []
        for path in self.runs[run].iterdir():
            if path.is_dir() and path.name.startswith("checkpoint-") and path.name[11:].isdigit():
                found.append((int(path.name[11:]), path))
        return sorted(found)

    def final(self, run: str) -> Path:
        return self.checkpoints(run)[-1][1]


def _prompts(count: int) -> list[str]:
    from ngdiag.world.build import held_out

    return held_out(count)[0]


def _audit(world: _World, checkpoint: Path, out: Path, settings: DemoSettings, *, steps: int, num_samples: int,
           renorm: bool):
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.audit import AuditConfig, run_audit

    ckpt = load_checkpoint(checkpoint, world.base)
    config = AuditConfig(
        prompts=_prompts(num_samples), num_samples=num_samples, seed=settings.seed, batch_size=min(num_samples, 32),
        sampling=SamplingConfig(num_steps=steps, guidance_scale=settings.guidance), reward=world.reward,
        renorm=renorm, grid_size=8, fd_encoder=world.fd_encoder, spatial_maps=True,
    )
    return run_audit(ckpt, config, out_dir=out, overwrite=True)


def _sensitivity(world: _World, checkpoint: Path, out: Path, settings: DemoSettings, audit: Path):
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.sensitivity import SensitivityConfig, audit_reference, run_sensitivity

    ckpt = load_checkpoint(checkpoint, world.base)
    n = settings.sensitivity_samples
    measured = audit_reference(audit)  # the audit's inflation, and its reward change under renorm
    config = SensitivityConfig(
        prompts=_prompts(n), num_samples=n, seed=settings.seed, batch_size=n, reward=world.reward,
        sampling=SamplingConfig(num_steps=settings.sensitivity_steps, guidance_scale=settings.guidance),
        inflation=measured["inflation"], audit=measured,
    )
    return run_sensitivity(ckpt, config, out_dir=out, overwrite=True)


def _compare(world: _World, settings: DemoSettings):
    from ngdiag.workflows.compare import compare_runs

    return compare_runs(world.runs["nft-plain"], world.runs["nft-normguard"], steps=list(settings.few_steps),
                        reward=world.reward, prompts=_prompts(settings.num_samples), num_samples=settings.num_samples,
                        guidance_scale=settings.guidance, seed=settings.seed, batch_size=min(settings.num_samples, 32),
                        grid_size=8, fd_encoder=world.fd_encoder)


def _sweep(world: _World, run: str, out: Path, settings: DemoSettings):
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.workflows.audit import AuditConfig
    from ngdiag.workflows.sweep import run_sweep

    n = settings.checkpoint_samples
    config = AuditConfig(prompts=_prompts(n), num_samples=n, seed=settings.seed, batch_size=min(n, 32),
                         sampling=SamplingConfig(num_steps=settings.steps, guidance_scale=settings.guidance),
                         reward=world.reward, grid_size=8, fd_encoder=world.fd_encoder)
    return run_sweep(world.runs[run], config, out_dir=out, base=str(world.base), threshold=SWEEP_THRESHOLD)


def _attribution(world: _World, checkpoint: Path, out: Path, settings: DemoSettings):
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.attribution import AttributionConfig, run_attribution

    ckpt = load_checkpoint(checkpoint, world.base)
    n = settings.attribution_samples
    config = AttributionConfig(prompts=_prompts(n), num_samples=n, seed=settings.seed, batch_size=n, group="block",
                               sampling=SamplingConfig(num_steps=settings.steps, guidance_scale=settings.guidance))
    return run_attribution(ckpt, config, out_dir=out, overwrite=True)


# ----------------------------------------------------------------------------- tables
def _interval(inflation) -> str:
    return f"{inflation.value:+.1%} [{inflation.ci_low:+.1%}, {inflation.ci_high:+.1%}]"


def _model_rows(models: dict) -> pd.DataFrame:
    """One row per (label -> (audit, model name)): reward and quality means with their spread."""
    rows = []
    for label, (audit, model) in models.items():
        row = {"model": label}
        rewards = audit.rewards[audit.rewards["model"] == model]["reward"].to_numpy(float)
        row["reward"] = f"{rewards.mean():.3f} ± {rewards.std(ddof=1):.3f}"
        sub = audit.quality[audit.quality["model"] == model]
        for k, name in MEASURE_LABELS.items():
            row[name] = f"{sub[k].mean():.4f}"
        fd = audit.frechet.get(model)
        row["FD to base"] = "0 (reference)" if model == "base" else (f"{fd.value:.3g}" if fd is not None else "")
        rows.append(row)
    return pd.DataFrame(rows)


def _paired(audit_a, model_a: str, audit_b, model_b: str, column: str, frame: str = "quality") -> np.ndarray:
    """Per-sample ``a - b`` of ``column`` (same prompts and seeds)."""
    a = getattr(audit_a, frame)
    b = getattr(audit_b, frame)
    va = a[a["model"] == model_a].sort_values("sample")[column].to_numpy(float)
    vb = b[b["model"] == model_b].sort_values("sample")[column].to_numpy(float)
    return va - vb


def _mean_interval(diff: np.ndarray, audit, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-sample ``diff`` of ``audit``'s samples and its 95 % percentile bootstrap interval, over
    prompts where samples share a prompt (as the audit's own interval)."""
    from ngdiag.workflows.audit import prompt_clusters
    from ngdiag.stats import mean_interval

    return mean_interval(diff, clusters=prompt_clusters(audit.config, np.arange(len(diff))), seed=seed)


def _fmt_diff(mean: float, low: float, high: float) -> str:
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


# ----------------------------------------------------------------------------- the pages
def _page_inflation(audits: dict) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of

    plain, reg = audits["nft-plain"], audits["nft-normguard"]
    curves = {RUN_LABELS[k]: a.per_step for k, a in audits.items()}
    def guided_ratios(audit) -> np.ndarray:
        return audit.per_step[audit.per_step["call"] == "guided"]["mean_ratio"].to_numpy(float)

    steps = guided_ratios(plain)
    spread = float(steps.max() - steps.min())
    table = pd.DataFrame([
        {"run": RUN_LABELS[k], "inflation [95 % CI]": _interval(a.inflation), "verdict": a.verdict,
         "per-step ratio, min..max": f"{guided_ratios(a).min():.3f} .. {guided_ratios(a).max():.3f}"}
        for k, a in audits.items()
    ])
    value = plain.inflation.value
    in_range = 0.05 <= value <= 0.15
    agrees = plain.inflation.ci_low > 0 and reg.inflation.value < value
    verdict = (f"{'Agrees' if agrees else 'Does not agree'} with the paper: the unregularised fine-tune is inflated by "
               f"{_interval(plain.inflation)}{' (inside' if in_range else ' (outside'} the paper's 5-15 % range), the "
               f"NormGuard fine-tune by {_interval(reg.inflation)}.")
    return {
        "id": "inflation", "title": ANALYSES["1-inflation"], "verdict": verdict,
        "paragraphs": [
            "What was measured: at every sampling step of each fine-tune's own trajectory, the ratio of the guided "
            "velocity norms ||v_θ(x_t, t)|| / ||v_ref(x_t, t)|| against the base at the same (x_t, t, c); the "
            "inflation is exp(mean log ratio) - 1 over steps and samples, with a BCa bootstrap interval over samples.",
            f"Uniformity: the unregularised per-step mean ratio spans {spread:.3f} from its lowest to its highest step "
            "(the paper reports an increase that is roughly uniform along the trajectory).",
            "Rule: agrees when the unregularised interval lies above 0 and NormGuard's inflation is smaller.",
        ],
        "tables": [table_of(table, caption=f"{plain.record.num_samples} samples per run, {plain.record.num_steps} steps.")],
        "figures": [figure_block(F.ratio_curves(curves), alt="per-step norm ratio of both fine-tunes",
                                 caption="Mean ratio per step with its 95 % interval over samples (t = 1 is noise).")],
    }


def _quality_deltas(audit, models: dict) -> pd.DataFrame:
    """Paired differences against the base: one row per model label, one column per measure (and reward)."""
    rows = []
    for label, (other, model) in models.items():
        row = {"vs base": label}
        diff = _paired(other, model, audit, "base", "reward", frame="rewards")
        row["reward"] = _fmt_diff(*_mean_interval(diff, audit))
        for k, name in MEASURE_LABELS.items():
            row[name] = _fmt_diff(*_mean_interval(_paired(other, model, audit, "base", k), audit))
        rows.append(row)
    return pd.DataFrame(rows)


def _gap_closed(audit, measure: str) -> Optional[float]:
    """Share of the RL-vs-base gap of ``measure`` that renormalization closes (1: all; None: no gap)."""
    rl = _paired(audit, "rl", audit, "base", measure).mean()
    renorm = _paired(audit, "rl+renorm", audit, "base", measure).mean()
    if abs(rl) < 1e-9:
        return None
    return float(1 - renorm / rl)


def _page_renorm(audits: dict) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of

    a = audits["nft-plain"]
    models = {"NFT": (a, "rl"), "NFT + renorm": (a, "rl+renorm")}
    # only the measures where the fine-tune differs from the base beyond the noise (95 % CI excludes 0)
    gaps = [m for m in ARTEFACTS if np.prod(_mean_interval(_paired(a, "rl", a, "base", m), a)[1:]) > 0]
    closed = {MEASURE_LABELS[m]: _gap_closed(a, m) for m in gaps}
    shares = [v for v in closed.values() if v is not None]
    reward = a.summary()["reward"]
    if not shares:
        verdict = ("Cannot be compared with the paper: the fine-tune's quality measures do not differ from the "
                   "base's beyond the noise, so there is no artefact for renormalization to undo.")
    else:
        median = float(np.median(shares))
        verdict = (f"{'Agrees' if median < 0.5 else 'Does not agree'} with the paper: renormalization closes a median "
                   f"{median:.0%} of the gap to the base over the measures where the fine-tune differs from it "
                   f"({', '.join(f'{k} {v:.0%}' for k, v in closed.items())}).")
    return {
        "id": "renorm", "title": ANALYSES["2-renorm"], "verdict": verdict,
        "paragraphs": [
            "What was measured: the unregularised fine-tune sampled plainly (NFT) and with RL renormalization at "
            "every step (paper eq. 3: v' = v_θ ||v_ref|| / ||v_θ||), against the base on the same prompts and seeds; "
            "the world reward and each quality measure per sample, and paired differences with 95 % bootstrap intervals.",
            f"Reward: base {reward['rows'][0]['mean']:.3f}, NFT {reward['rows'][1]['mean']:.3f}, NFT + renorm "
            f"{reward['rows'][2]['mean']:.3f} (means over {a.record.num_samples} samples).",
            "Rule: agrees when renormalization closes less than half of the gap (median over those of saturation, "
            "colourfulness, clipping, HF energy and luminance whose NFT-vs-base interval excludes 0): rescaling the "
            "norm leaves the direction, and the artefacts, in place.",
        ],
        "tables": [
            table_of(_model_rows({"base": (a, "base"), **models}),
                     caption="Means over samples. FD to base: Fréchet distance of each model's images to the base's, "
                             f"on the judge's features ({a.config.num_samples} images each; biased upwards at this size, "
                             "so compare the rows, not the values with other studies)."),
            table_of(_quality_deltas(a, models), caption="Paired differences against the base, mean [95 % CI]."),
        ],
        "figures": [figure_block(F.image_grid({"base": a.images["base"], "NFT": a.images["rl"],
                                               "NFT + renorm": a.images["rl+renorm"]}, max_images=8),
                                 alt="image grid: base, NFT, NFT with renorm", caption="Same prompt and seed per column.")],
    }


def _page_sensitivity(run) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of

    summary = run.summary()
    per_step = run.per_step()
    mean_abs = float(np.abs(per_step["mean"]).mean())
    std_mean = float(per_step["std"].mean())
    nsr = summary["nsr_median"]
    agrees = nsr is not None and nsr >= 3
    verdict = (f"{'Agrees' if agrees else 'Does not agree'} with the paper: the median noise-to-signal ratio of S(t) "
               f"over steps is {nsr:.1f} (paper: 3x-100x); mean |E S| {mean_abs:.3g} against a spread of {std_mean:.3g}.")
    table = per_step[[c for c in ("step", "t", "mean", "mean_ci_low", "mean_ci_high", "std", "nsr", "frac_positive")
                      if c in per_step.columns]].copy()
    dr = summary["directional_derivative"]
    first = summary.get("first_order_reward_change")
    cost = ""
    if first is not None:
        cost = (f"Removing the audit's inflation ({first['inflation']:+.1%}, every step's velocity scaled by "
                f"1 / (1 + I)) changes the reward by {first['mean']:+.4g} [{first['ci_low']:+.4g}, {first['ci_high']:+.4g}] "
                "to first order (eps · dR/d(eps)).")
        measured = first.get("measured_renorm_reward_change")
        if measured:
            cost += (f" The audit measured RL renormalization (eq. 3, each step rescaled to ||v_ref||) changing it by "
                     f"{measured['mean']:+.4g} ± {measured['stderr']:.3g} (standard error, {measured['num_samples']} samples): "
                     "the paper's Table 1 change next to the first-order prediction. They agree only as far as the "
                     "inflation is uniform along the trajectory.")
    return {
        "id": "sensitivity", "title": ANALYSES["3-sensitivity"], "verdict": verdict,
        "paragraphs": [
            "What was measured: S(t) = v_θ · a(t), the derivative of the world reward with respect to a uniform "
            "rescaling of the velocity at step t, from the exact discrete adjoint of the sampler, per sample and step "
            f"({summary['num_samples']} samples, {summary['num_steps']} steps); NSR = std / |mean| over samples.",
            f"dR/d(eps) of a global rescaling: {dr['mean']:+.4g} [{dr['ci_low']:+.4g}, {dr['ci_high']:+.4g}] "
            f"(95 % interval over samples; std {dr['std']:.4g}).",
            *([cost] if cost else []),
            "Rule: agrees when the median NSR is at least 3 (no coherent reward signal in the norm).",
            "The full sensitivity report, and the report of every audit behind these pages, are in the demo's "
            "output folder under runs/.",
        ],
        "tables": [table_of(table, caption="Per step: mean and spread of S over samples.")],
        "figures": [figure_block(F.sensitivity_curves(per_step), alt="S(t) mean and spread",
                                 caption="Mean S(t) with its spread over samples.")],
    }


def _page_normguard(audits: dict) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of

    plain, reg = audits["nft-plain"], audits["nft-normguard"]
    models = {"NFT": (plain, "rl"), RUN_LABELS["nft-normguard"]: (reg, "rl")}
    rows = _model_rows({"base": (plain, "base"), **models})
    rows.insert(1, "inflation", ["0 (reference)", _interval(plain.inflation), _interval(reg.inflation)])
    sat_plain = _paired(plain, "rl", plain, "base", "saturation").mean()
    sat_reg = _paired(reg, "rl", plain, "base", "saturation").mean()
    r_plain = _paired(plain, "rl", plain, "base", "reward", frame="rewards").mean()
    r_reg = _paired(reg, "rl", plain, "base", "reward", frame="rewards").mean()
    agrees = plain.inflation.ci_low > 0 and reg.inflation.value < plain.inflation.value and abs(sat_reg) < abs(sat_plain)
    verdict = (f"{'Agrees' if agrees else 'Does not agree'} with the paper: NormGuard changes the inflation from "
               f"{plain.inflation.value:+.1%} to {reg.inflation.value:+.1%}, the saturation gain over the base from "
               f"{sat_plain:+.4f} to {sat_reg:+.4f}, and the reward gain from {r_plain:+.3f} to {r_reg:+.3f}.")
    return {
        "id": "normguard", "title": ANALYSES["4-normguard"], "verdict": verdict,
        "paragraphs": [
            "What was measured: both fine-tunes were trained by the same `ngdiag train` config, one with "
            "normguard.lam = 0 and one with lam = 1, and sampled on the same held-out prompts and seeds as the base.",
            "Rule: agrees when the unregularised fine-tune is inflated (interval above 0) and NormGuard lowers both "
            "the inflation and the saturation gain over the base.",
        ],
        "tables": [
            table_of(rows, caption="Means over samples (reward ± std). FD to base: Fréchet distance of the images to "
                                   f"the base's on the judge's features ({plain.config.num_samples} images each)."),
            table_of(_quality_deltas(plain, models), caption="Paired differences against the base, mean [95 % CI]."),
        ],
        "figures": [figure_block(F.image_grid({"base": plain.images["base"], "NFT": plain.images["rl"],
                                               "NFT + NormGuard": reg.images["rl"]}, max_images=8),
                                 alt="image grid: base, NFT, NFT + NormGuard", caption="Same prompt and seed per column.")],
    }


def _page_few_steps(audits: dict, compared, steps: int, report: str) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of

    rows = []
    names = {"A": "nft-plain", "B": "nft-normguard"}
    for run, audit in audits.items():  # the main audits at the full step count
        sat = _mean_interval(_paired(audit, "rl", audit, "base", "saturation"), audit)
        rew = _mean_interval(_paired(audit, "rl", audit, "base", "reward", frame="rewards"), audit)
        rows.append({"run": RUN_LABELS[run], "steps": steps, "inflation [95 % CI]": _interval(audit.inflation),
                     "t-weighted": f"{audit.inflation.t_weighted_value:+.1%}",
                     "reward vs base": _fmt_diff(*rew), "saturation vs base": _fmt_diff(*sat)})
    table = compared.table
    for rec in compared.paired.to_dict("records"):
        if rec["model"] == "base":
            continue
        t = table[(table["model"] == rec["model"]) & (table["steps"] == rec["steps"])].iloc[0]
        inf = compared.inflation_of(rec["model"], rec["steps"])
        rows.append({"run": RUN_LABELS[names[rec["model"]]], "steps": int(rec["steps"]),
                     "inflation [95 % CI]": f"{t['inflation_pct'] / 100:+.1%} [{t['ci_low_pct'] / 100:+.1%}, {t['ci_high_pct'] / 100:+.1%}]",
                     "t-weighted": f"{inf.t_weighted_value:+.1%}",
                     "reward vs base": _fmt_diff(rec["reward_delta"], rec["reward_delta_low"], rec["reward_delta_high"]),
                     "saturation vs base": _fmt_diff(rec["saturation_delta"], rec["saturation_delta_low"],
                                                     rec["saturation_delta_high"])})
    rows.sort(key=lambda r: (r["run"], -r["steps"]))
    fewest = min(compared.steps)
    plain = compared.inflation_of("A", fewest)
    agrees = plain.ci_low > 0
    verdict = (f"{'Agrees' if agrees else 'Does not agree'} with the paper: at {fewest} steps the unregularised "
               f"fine-tune is inflated by {_interval(plain)} (at {steps} steps {_interval(audits['nft-plain'].inflation)}).")
    return {
        "id": "few-steps", "title": ANALYSES["5-few-steps"], "verdict": verdict,
        "paragraphs": [
            "What was measured: both fine-tunes at each step count on the same prompts and seeds; the fewer-step "
            "rows come from one `ngdiag compare` of the two runs (the base sampled once per step count), the "
            f"{steps}-step rows from the main audits.",
            "t-weighted: the inflation with each step's log-ratio weighted by its step size |t_k - t_(k+1)|, "
            "an estimate of the mean over t in [0, 1] that compares step counts like with like.",
            "Rule: agrees when the unregularised fine-tune's interval lies above 0 at the fewest steps (the paper "
            "finds the inflation at few-step sampling too).",
        ],
        "links": [{"href": report, "text": "the ngdiag compare report of the two runs",
                   "note": "paired differences with intervals, ratio curves, image grids"}],
        "tables": [table_of(pd.DataFrame(rows), caption="Paired differences against the base, mean [95 % CI].")],
        "figures": [figure_block(F.run_curves([r.metrics for r in compared.runs], [r.display for r in compared.runs]),
                                 alt="training curves of both runs", caption="Reward and inflation during training, "
                                 "from each run's metrics log.")],
    }


def _inflation_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its ``inflation``, ``ci_low`` and ``ci_high`` fractions as one column of text in percent."""
    text = [f"{v:+.1%} [{lo:+.1%}, {hi:+.1%}]" for v, lo, hi in zip(frame["inflation"], frame["ci_low"], frame["ci_high"])]
    out = frame.drop(columns=["inflation", "ci_low", "ci_high"])
    out.insert(2, "inflation [95 % CI]", text)
    return out


def _page_checkpoints(sweeps: dict, reports: dict, threshold: float) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of
    from scipy.stats import spearmanr

    rows = []
    for run, sweep in sweeps.items():
        for rec in sweep.table.to_dict("records"):
            rows.append({"run": RUN_LABELS[run], "iteration": rec["iteration"], "inflation": rec["inflation"],
                         "ci_low": rec["ci_low"], "ci_high": rec["ci_high"],
                         "reward vs base": _fmt_diff(rec["reward_delta"], rec["reward_delta_low"], rec["reward_delta_high"]),
                         "saturation vs base": _fmt_diff(rec["saturation_delta"], rec["saturation_delta_low"],
                                                         rec["saturation_delta_high"])})
    frame = pd.DataFrame(rows)
    plain = frame[frame["run"] == RUN_LABELS["nft-plain"]]
    rho = float(spearmanr(plain["iteration"], plain["inflation"]).statistic) if len(plain) > 2 else float("nan")
    agrees = rho > 0 and plain["inflation"].iloc[-1] > plain["inflation"].iloc[0]
    first = sweeps["nft-plain"].first_above
    stop = (f"the first checkpoint whose interval lies above {threshold:.0%} is checkpoint-{first}" if first is not None
            else f"no checkpoint's interval lies above {threshold:.0%}")
    verdict = (f"{'Agrees' if agrees else 'Does not agree'} with the paper: the unregularised inflation goes from "
               f"{plain['inflation'].iloc[0]:+.1%} at iteration {plain['iteration'].iloc[0]} to "
               f"{plain['inflation'].iloc[-1]:+.1%} at {plain['iteration'].iloc[-1]} (Spearman ρ = {rho:.2f}); {stop}.")
    return {
        "id": "checkpoints", "title": ANALYSES["6-checkpoints"], "verdict": verdict,
        "paragraphs": [
            "What was measured: `ngdiag sweep` of each run: every checkpoint-N audited on the same prompts and seeds "
            "(inflation, world reward, quality), the base sampled once per sweep and paired with every checkpoint.",
            f"Early stopping: the sweep marks the first checkpoint whose inflation interval lies above {threshold:.0%}.",
            "Rule: agrees when the unregularised inflation rises with the iteration (Spearman ρ > 0, last above first).",
        ],
        "links": [{"href": href, "text": f"the sweep report of {RUN_LABELS[run]}", "note": "one table and one report per run"}
                  for run, href in reports.items()],
        "tables": [table_of(_inflation_text(frame), caption="Inflation with its 95 % CI; reward and saturation as "
                                                          "mean paired differences against the base [95 % CI].")],
        "figures": [figure_block(F.inflation_by_iteration(frame, run_column="run"), alt="inflation against iteration",
                                 caption="Inflation of each checkpoint with its 95 % interval.")],
    }


def _page_where(audit, attribution) -> dict:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, table_of

    maps = audit.spatial
    share, held, locality = maps.top_share, maps.held_out_top_share, maps.locality
    table = attribution.table
    top = table.iloc[0]
    total = attribution.summary()["total"]
    verdict = (f"Not a claim of the paper, measured here: the unregularised fine-tune's inflation is {locality} across "
               f"the image (the top 10 % of latent positions, chosen on half of the samples, hold {held:.0%} of the "
               f"positive log-excess of the other half; 10 % would be perfectly even), and {top['group']} carries "
               f"{top['loo_share']:.0%} of it when switched off alone.")
    rows = pd.DataFrame({
        "group": table["group"],
        "leave-one-out effect [95 % CI]": [f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in
                                           zip(table["loo_effect"], table["loo_ci_low"], table["loo_ci_high"])],
        "share": [f"{v:.0%}" for v in table["loo_share"]],
        **({"single-group effect [95 % CI]": [f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in
                                              zip(table["single_effect"], table["single_ci_low"], table["single_ci_high"])]}
           if "single_effect" in table else {}),
    })
    images = audit.images.get("rl")
    grid_maps = maps.sample_maps[: len(images)] if images is not None else maps.sample_maps
    figure_maps = F.spatial_maps(grid_maps, maps.mean_map, images=images)
    figure_bars = F.attribution_bars(table)  # the table carries its total in attrs["total"]
    return {
        "id": "where", "title": ANALYSES["7-where"], "verdict": verdict,
        "paragraphs": [
            "What was measured: the ratio ||v_θ(p)|| / ||v_ref(p)|| at every latent position p of the unregularised "
            f"fine-tune's main audit ({audit.record.num_samples} samples; geometric mean over steps), and per-block "
            f"attribution: each transformer block's LoRA switched off alone on the same states "
            f"({attribution.config.num_samples} samples), the change in the mean log-ratio.",
            f"Total mean log-ratio {total['log_ratio']:+.4f}; the leave-one-out effects sum to "
            f"{attribution.summary()['sum_loo_effects']:+.4f} (the rest is interaction between blocks).",
            "Top-10 % share: the share of the positive log-excess max(0, log M(p)) that falls on the 10 % of "
            f"positions with the most: {share:.0%} on the mean map of all samples. Position noise alone lifts that "
            "number above 10 %, so the reading uses the held-out share: positions chosen on half of the samples, "
            f"their share measured on the other half ({held:.0%}); local above 30 %, uniform at or below 20 %.",
        ],
        "links": [{"href": "runs/attribution/report.html", "text": "the ngdiag attribute report",
                   "note": "ranked table, bar chart, sums against the total"},
                  {"href": f"runs/nft-plain-{audit.record.num_steps}steps/report.html",
                   "text": "the audit report of the unregularised fine-tune", "note": "maps per sample and per step"}],
        "tables": [table_of(rows, caption="Per block, ranked: effect on the mean log-ratio with its 95 % interval "
                                          "and its share of the total.")],
        "figures": [figure_block(figure_maps, alt="spatial ratio maps under the images",
                                 caption="Top: the fine-tune's images; below: each sample's ratio map on the latent "
                                         "grid, and the mean map over all samples (last column)."),
                    figure_block(figure_bars, alt="attribution bars", caption="Effect of each block on the mean "
                                 "log-ratio with its interval; the dashed line is the total.")],
    }


# ----------------------------------------------------------------------------- the demo
#: What a demo writes into its folder (and all that a rerun deletes there).
DEMO_ENTRIES = ("demo.json", "index.html", *(f"{stem}.html" for stem in ANALYSES), "world", "runs")


def _clear_earlier_demo(out: Path) -> None:
    """Delete an earlier demo's entries in ``out``; refuse a folder holding anything the demo did not write."""
    import shutil

    from ngdiag.runs import LOCK_FILE, MANIFEST_FILE

    entries = {p.name for p in out.iterdir()} - {LOCK_FILE, MANIFEST_FILE}
    if entries and "demo.json" not in entries:
        raise ConfigError(f"--out {out} is not empty and holds no earlier ngdiag demo; choose another folder")
    foreign = sorted(entries - set(DEMO_ENTRIES))
    if foreign:
        raise ConfigError(f"--out {out} holds files an ngdiag demo did not write ({', '.join(foreign[:3])}); "
                          "move them or choose another folder")
    for name in entries:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def run_demo(out, *, quick: bool = False, world=None, progress: Progress = None) -> dict:
    """Run the seven analyses into folder ``out``; returns the findings (also written to ``out/demo.json``).

    ``out`` must be empty, absent, or an earlier demo's folder holding nothing else (its entries are
    replaced); it is locked for the whole run, so a second demo into it is refused. ``world``: a shipped
    world folder (default: the one in the package, ``ngdiag/world/assets``).
    """
    from ngdiag.runs import lock_output

    with lock_output(out, what="demo folder") as folder:
        return _run_demo(folder, quick=quick, world=world, progress=progress)


def _run_demo(folder, *, quick: bool, world, progress: Progress) -> dict:
    from ngdiag.report.html import render_demo_page
    from ngdiag.runs import versions
    from ngdiag.world.build import ASSETS, install_world

    settings = QUICK if quick else FULL
    out = folder.path
    _clear_earlier_demo(out)
    t0 = time.time()
    folder.write_text("demo.json", json.dumps({"status": "running", "quick": quick}) + "\n")
    world = _World(install_world(out / "world", ASSETS if world is None else world))
    runs = out / "runs"
    timings = {}

    def timed(name, fn):
        start = time.time()
        result = fn()
        timings[name] = round(time.time() - start, 1)
        return result

    audits = {}
    for run in RUN_LABELS:
        _say(progress, f"audit of {run} at {settings.steps} steps ({settings.num_samples} samples, renorm, reward)")
        audits[run] = timed(f"audit {run}", lambda run=run: _audit(
            world, world.final(run), runs / f"{run}-{settings.steps}steps", settings, steps=settings.steps,
            num_samples=settings.num_samples, renorm=True))
    _say(progress, f"sensitivity of nft-plain ({settings.sensitivity_samples} samples)")
    sens = timed("sensitivity", lambda: _sensitivity(world, world.final("nft-plain"), runs / "sensitivity", settings,
                                                     runs / f"nft-plain-{settings.steps}steps"))
    _say(progress, f"compare of both runs at {', '.join(map(str, settings.few_steps))} steps")
    compared = timed("compare", lambda: _compare(world, settings))
    folder.write_text("runs/compare.html", compared.render_html())
    sweeps, sweep_reports = {}, {}
    for run in RUN_LABELS:
        _say(progress, f"sweep of {run} ({len(world.checkpoints(run))} checkpoints)")
        sweeps[run] = timed(f"sweep {run}", lambda run=run: _sweep(world, run, runs / f"{run}-sweep", settings))
        sweep_reports[run] = f"runs/{run}-sweep/report.html"

    _say(progress, f"attribution of nft-plain by block ({settings.attribution_samples} samples)")
    attribution = timed("attribution", lambda: _attribution(world, world.final("nft-plain"), runs / "attribution", settings))

    _say(progress, "writing the reports")
    pages = {
        "1-inflation": _page_inflation(audits),
        "2-renorm": _page_renorm(audits),
        "3-sensitivity": _page_sensitivity(sens),
        "4-normguard": _page_normguard(audits),
        "5-few-steps": _page_few_steps(audits, compared, settings.steps, "runs/compare.html"),
        "6-checkpoints": _page_checkpoints(sweeps, sweep_reports, SWEEP_THRESHOLD),
        "7-where": _page_where(audits["nft-plain"], attribution),
    }
    ver = versions()
    for stem, section in pages.items():
        section["links"] = [{"href": "index.html", "text": "all analyses"}] + list(section.get("links", []))
        folder.write_text(f"{stem}.html", render_demo_page(section["title"], [section], versions=ver))
    seconds = round(time.time() - t0, 1)
    index_sections = [{
        "id": "analyses", "title": "The analyses",
        "paragraphs": [
            "The miniature world: 32x32 scenes of one shape (circle, square, triangle, cross) in one of six colours "
            "on a dark, light or gray background, lit from one side, with a caption naming all four. The base is an "
            "SD3-family diffusers pipeline trained on them by flow matching; the reward is the world's judge "
            "(prompt alignment) plus a vividness preference; the two fine-tunes are DiffusionNFT LoRA runs of "
            "`ngdiag train`, without and with NormGuard. Everything was generated by ngdiag from one seed.",
            f"{'Quick' if quick else 'Full'} run: {settings.num_samples} samples per audit at {settings.steps} steps, "
            f"{seconds:.0f} s in all.",
        ],
        "links": [{"href": f"{stem}.html", "text": ANALYSES[stem], "note": pages[stem]["verdict"]} for stem in pages],
    }]
    folder.write_text("index.html", render_demo_page("ngdiag demo: the NormGuard findings on a miniature world",
                                                           index_sections, versions=ver))
    findings = {
        "status": "done", "quick": quick, "settings": asdict(settings), "seconds": seconds, "timings": timings,
        "verdicts": {stem: page["verdict"] for stem, page in pages.items()},
        "inflation": {run: {"value": a.inflation.value, "ci_low": a.inflation.ci_low, "ci_high": a.inflation.ci_high,
                            "verdict": a.verdict} for run, a in audits.items()},
        "sensitivity": {k: sens.summary()[k] for k in ("nsr_median", "nsr_min", "nsr_max")},
        "versions": ver,
    }
    folder.write_text("demo.json", json.dumps(findings, indent=2, default=float) + "\n")
    return findings
