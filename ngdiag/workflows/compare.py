"""Compare two training runs (typically the same settings without and with NormGuard).

:func:`compare_runs` reads both run folders and:

1. takes each run's metrics log (``metrics.jsonl``): reward mean / std, ``norm_ratio_mean``,
   ``inflation``, penalty and hinge-active fraction against the iteration;
2. audits each run's final checkpoint against the shared base at every step count of ``steps``
   (:func:`ngdiag.workflows.audit.run_audit`, theta's trajectory, guided velocity, the same prompts and
   seeds for every model): the inflation with its bootstrap interval, the per-step ratio curve,
   the reward of the run and of the base on the same seeds, and an image grid;
3. builds a table shaped like the paper's Table 3: one row per model (base, run A, run B) and
   step count, with the reward and the inflation in percent.

The result renders to one self-contained HTML page (:meth:`CompareResult.save_html`) through
``ngdiag.report.html.render_compare_report``; :meth:`CompareResult.report_context` documents the
context it passes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from ngdiag.core.errors import ConfigError
from ngdiag.train.config import TrainConfig
from ngdiag.train.run_folder import CONFIG_FILE, latest_checkpoint, read_metrics

__all__ = ["RunInfo", "CompareResult", "compare_runs", "load_run", "run_inputs", "check_compare_output", "HISTORY_COLUMNS"]

HISTORY_COLUMNS = (
    "reward_mean", "reward_std", "norm_ratio_mean", "inflation", "penalty", "hinge_active_fraction", "loss",
)


@dataclass
class RunInfo:
    """One training run folder.

    Attributes:
        label: ``"A"`` or ``"B"``; name: the folder name; path: the folder.
        config: its resolved :class:`TrainConfig`.
        checkpoint: its newest complete ``checkpoint-N`` folder.
        metrics: its metrics log, one row per iteration.
    """

    label: str
    name: str
    path: Path
    config: TrainConfig
    checkpoint: Path
    metrics: pd.DataFrame

    @property
    def display(self) -> str:
        lam = self.config.normguard.lam
        return f"{self.label}: {self.name} ({self.config.method}, lam={lam:g})"

    def describe(self) -> dict:
        return {
            "label": self.label,
            "name": self.name,
            "display": self.display,
            "path": str(self.path),
            "checkpoint": str(self.checkpoint),
            "method": self.config.method,
            "lam": float(self.config.normguard.lam),
            "iterations": int(len(self.metrics)),
            "reward": self.config.reward,
            "base": self.config.model.base,
        }


def load_run(path, label: str) -> RunInfo:
    """Read a run folder written by :func:`ngdiag.train.trainer.train` (:mod:`ngdiag.train.run_folder`)."""
    folder = Path(path).resolve()
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"{folder} is not an ngdiag training run ({CONFIG_FILE} missing)")
    try:
        config = TrainConfig.from_dict(yaml.safe_load(cfg_file.read_text()) or {})
    except yaml.YAMLError:
        raise ConfigError(f"{cfg_file} is not readable YAML") from None
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise ConfigError(f"{folder} has no checkpoint yet; train it first")
    metrics = pd.DataFrame(read_metrics(folder))
    if metrics.empty:
        raise ConfigError(f"{folder} has no metrics log (metrics.jsonl is missing or empty)")
    return RunInfo(label, folder.name, folder, config, checkpoint, metrics)


@dataclass
class CompareResult:
    """The comparison of two runs.

    Attributes:
        runs: the two :class:`RunInfo`, A then B.
        steps: the step counts of the ablation.
        reward: the reward spec used to score images.
        history: long table ``run, iteration, metric, value`` from both metrics logs.
        per_step: per-step ratio curves of the final checkpoints: ``model, steps, step, t, mean_ratio,
            ci_low, ci_high`` (guided velocity, theta's trajectory).
        rewards: per-sample rewards ``model, steps, sample, reward`` (models ``base``, ``A``, ``B``).
        table: the Table 3 shaped summary (see :func:`compare_runs`).
        images: ``{model: {steps: array (G, 3, H, W) in [0, 1]}}``.
        prompts: the prompts of the ablation samples (sample ``i`` uses ``prompts[i % len]``).
    """

    runs: list
    steps: list
    reward: str
    history: pd.DataFrame
    per_step: pd.DataFrame
    rewards: pd.DataFrame
    table: pd.DataFrame
    images: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list)
    num_samples: int = 0
    seed: int = 0
    confidence: float = 0.95

    def summary(self) -> dict:
        """A JSON-safe summary: runs, settings and the table."""
        return {
            "runs": [r.describe() for r in self.runs],
            "steps": list(self.steps),
            "reward": self.reward,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "table": _records(self.table),
        }

    def table_wide(self) -> pd.DataFrame:
        """The table in the paper's Table 3 layout: one row per model (base, A, B), and for each step
        count a reward column and an inflation (%) column."""
        names = {"base": "base", **{r.label: r.display for r in self.runs}}
        rows = []
        for model in ("base", *[r.label for r in self.runs]):
            row = {"model": names[model]}
            for k in self.steps:
                sub = self.table[(self.table["model"] == model) & (self.table["steps"] == k)]
                if sub.empty:
                    continue
                rec = sub.iloc[0]
                row[f"reward @{k} steps"] = float(rec["reward_mean"])
                row[f"inflation % @{k} steps"] = float(rec["inflation_pct"])
            rows.append(row)
        return pd.DataFrame(rows)

    def report_context(self) -> dict:
        """The context of ``ngdiag.report.html.render_compare_report``.

        ``runs``: ``[{"name", "metrics"}]`` (each run's metrics log as a DataFrame: ``iteration``,
        ``reward_mean``, ``reward_std``, ``inflation``...); ``table``: one row per model and step
        count (reward with its spread, inflation with its interval and verdict; :meth:`table_wide` has
        the same numbers in the paper's Table 3 layout); ``ratio_curves``: per-step ratio curves
        of the final checkpoints at the first step count; ``images``: one grid row per model and
        step count; ``inflation``: the runs' final inflation per step count (fractions with their
        interval), from which the report writes its conclusion; ``title``, ``notes``, ``config`` (the compare settings and the config keys in
        which the runs differ) and ``versions``.
        """
        from ngdiag.core.configs import config_diff
        from ngdiag.runs import versions

        names = {"base": "base", **{r.label: r.display for r in self.runs}}
        first = self.steps[0]
        curves = {}
        for run in self.runs:
            sub = self.per_step[(self.per_step["model"] == run.label) & (self.per_step["steps"] == first)]
            curves[f"{run.display}, {first} steps"] = sub[["step", "t", "mean_ratio", "ci_low", "ci_high"]].reset_index(drop=True)
        images = {}
        for k in self.steps:
            for model in ("base", *[r.label for r in self.runs]):
                if k in self.images.get(model, {}):
                    images[f"{model}, {k} steps"] = self.images[model][k]  # short row labels: base, A, B
        table = [
            {
                "model": names[rec["model"]],
                "steps": rec["steps"],
                "reward": rec["reward_mean"],
                "reward std": rec["reward_std"],
                "inflation %": rec["inflation_pct"],
                "CI low %": rec["ci_low_pct"],
                "CI high %": rec["ci_high_pct"],
                "verdict": rec["verdict"],
            }
            for rec in sorted(_records(self.table), key=lambda r: (-int(r["steps"]), r["model"] != "base", str(r["model"])))
        ]
        inflation = [
            {"name": names[rec["model"]], "steps": rec["steps"], "value": rec["inflation_pct"] / 100,
             "ci_low": rec["ci_low_pct"] / 100, "ci_high": rec["ci_high_pct"] / 100, "confidence": self.confidence}
            for rec in _records(self.table) if rec["model"] != "base" and rec.get("inflation_pct") is not None
        ]
        diffs = config_diff(self.runs[0].config.to_dict(), self.runs[1].config.to_dict(), skip=("output_dir",))
        notes = [
            f"Reward {self.reward}; {self.num_samples} samples per model and step count, prompt i mod "
            f"{len(self.prompts)} and seed {self.seed} + i for every model (run A's prompts).",
            "Inflation of a final checkpoint: exp(mean over samples of mean over steps of log ||v_theta|| / "
            "||v_ref||) - 1, guided velocity on the checkpoint's own trajectory, with a bootstrap interval "
            "over samples; the base is the reference (0 % by definition).",
            "Training curves: inflation at the training points of each iteration (conditional velocity, "
            "forward-process states built from the rollouts), from each run's metrics log.",
            f"Ratio curves: the final checkpoints at {first} steps.",
        ]
        return {
            "title": f"ngdiag compare: {self.runs[0].name} vs {self.runs[1].name}",
            "runs": [{"name": r.display, "metrics": r.metrics} for r in self.runs],
            "table": table,
            "inflation": inflation,
            "ratio_curves": curves,
            "images": images,
            "notes": notes,
            "config": {
                "compare": {"steps": list(self.steps), "reward": self.reward, "num_samples": self.num_samples,
                            "seed": self.seed},
                "runs": {r.label: {"path": str(r.path), "checkpoint": str(r.checkpoint)} for r in self.runs},
                "differences (A -> B)": diffs or ["none"],
            },
            "versions": versions(),
        }

    def render_html(self) -> str:
        from ngdiag.report.html import render_compare_report

        return render_compare_report(self.report_context())

    def save_html(self, path, *, overwrite: bool = False) -> Path:
        """Write the report to ``path`` (one self-contained HTML file); returns the path.

        ``path`` must not be a symbolic link, a folder, or inside a run folder or the base; an
        existing file is replaced only with ``overwrite`` and when it is an ngdiag compare report.
        """
        from ngdiag.report.html import write_html

        html = self.render_html()
        path = check_compare_output(path, self.inputs(), overwrite=overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_html(html, path)
        return path

    def inputs(self) -> list:
        """``(label, path)`` of the folders the comparison reads (runs and base)."""
        return run_inputs(self.runs)


def run_inputs(runs: Sequence[RunInfo]) -> list:
    """``(label, path)`` of what a comparison of ``runs`` reads: the run folders and their base."""
    return [*((f"run {r.label}", r.path) for r in runs), *(("base", r.config.model.base) for r in runs)]


def is_compare_report(path) -> bool:
    """Whether ``path`` is a report ``ngdiag compare`` wrote (its generator tag and title)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return '<meta name="generator" content="ngdiag">' in head and "<title>ngdiag compare:" in head


def check_compare_output(path, inputs, *, overwrite: bool = False) -> Path:
    """Check the report path before anything is computed (see :meth:`CompareResult.save_html`)."""
    from ngdiag.runs import check_output_file

    return check_output_file(path, inputs=inputs, overwrite=overwrite, owned=is_compare_report, what="report file")


def _records(frame: pd.DataFrame) -> list:
    out = []
    for row in frame.to_dict(orient="records"):
        clean = {}
        for k, v in row.items():
            if isinstance(v, (np.integer,)):
                v = int(v)
            elif isinstance(v, (np.floating, float)):
                v = None if not math.isfinite(float(v)) else float(v)
            clean[k] = v
        out.append(clean)
    return out


def _history(runs: Sequence[RunInfo]) -> pd.DataFrame:
    frames = []
    for run in runs:
        cols = [c for c in HISTORY_COLUMNS if c in run.metrics.columns]
        long = run.metrics[["iteration", *cols]].melt(id_vars="iteration", var_name="metric", value_name="value")
        long.insert(0, "run", run.label)
        frames.append(long)
    return pd.concat(frames, ignore_index=True).dropna(subset=["value"])


def compare_runs(
    run_a,
    run_b,
    *,
    steps: Sequence[int] = (28, 10, 4),
    reward: Optional[str] = None,
    num_samples: int = 8,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 4,
    grid_size: int = 4,
    device="cpu",
    progress: Optional[Callable[[int, int], None]] = None,
) -> CompareResult:
    """Compare two run folders (see the module docstring).

    Args:
        run_a, run_b: training run folders (``config.yaml``, ``metrics.jsonl``, ``checkpoint-N``).
        steps: sampling step counts of the few-step ablation.
        reward: reward spec; default: run A's training reward.
        num_samples: samples per model and step count (the bootstrap unit of the inflation).
        guidance_scale: default: run A's sampling guidance.
        seed: sample ``i`` uses seed ``seed + i`` and prompt ``i mod len(prompts)`` (run A's prompts).
        batch_size, grid_size: audit batch size and number of images per grid.
        device: where the models run.
        progress: ``f(done, total)`` after each audit (``2 * len(steps)`` audits).

    Returns:
        A :class:`CompareResult`. Its ``table`` has one row per model (``base``, ``A``, ``B``) and step
        count with ``reward_mean``, ``reward_std``, ``inflation_pct`` (``100 x inflation``, 0 for the
        base by definition), ``ci_low_pct``, ``ci_high_pct`` and ``verdict``.

    Raises:
        ConfigError: a folder that is not a run, runs trained from different bases, bad settings.
    """
    from ngdiag.workflows.audit import AuditConfig, run_audit
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.train.config import check_reward_spec

    steps = [int(s) for s in steps]
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"steps must be positive step counts, got {steps}")
    if int(num_samples) < 2:
        raise ConfigError(f"compare needs at least 2 samples per model for an interval, got {num_samples}")
    runs = [load_run(run_a, "A"), load_run(run_b, "B")]
    bases = {str(Path(r.config.model.base)) for r in runs}
    if len(bases) != 1:
        raise ConfigError(f"the runs were trained from different bases ({', '.join(sorted(bases))}); compare runs of one base")
    base = bases.pop()
    spec = reward or runs[0].config.reward
    check_reward_spec(spec)
    cfg = runs[0].config
    prompts = cfg.rollouts.load_prompts()
    guidance = cfg.sampling.guidance_scale if guidance_scale is None else float(guidance_scale)

    per_step, rewards, rows = [], [], []
    images: Dict[str, dict] = {}
    total, done = 2 * len(steps), 0
    base_rows: Dict[int, dict] = {}
    for run in runs:
        ckpt = load_checkpoint(run.checkpoint, base, device=device)
        for k in steps:
            sampling = dataclasses.replace(cfg.sampling, num_steps=k, guidance_scale=guidance)
            audit = AuditConfig(prompts=prompts, num_samples=int(num_samples), sampling=sampling, seed=int(seed),
                                batch_size=int(batch_size), reward=spec, grid_size=int(grid_size))
            result = run_audit(ckpt, audit, report=False)
            guided = result.per_step[result.per_step["call"] == "guided"]
            frame = guided[["step", "t", "mean_ratio", "ci_low", "ci_high"]].copy()
            frame.insert(0, "steps", k)
            frame.insert(0, "model", run.label)
            per_step.append(frame)
            scores = result.rewards
            for model_key, name in (("rl", run.label), ("base", "base")):
                sub = scores[scores["model"] == model_key]
                if name == "base" and k in base_rows:
                    continue
                rewards.append(pd.DataFrame({"model": name, "steps": k, "sample": sub["sample"].to_numpy(),
                                             "reward": sub["reward"].to_numpy()}))
                values = sub["reward"].to_numpy(dtype=float)
                row = {
                    "model": name,
                    "steps": k,
                    "reward_mean": float(values.mean()),
                    "reward_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                }
                if name == "base":
                    row.update({"inflation_pct": 0.0, "ci_low_pct": 0.0, "ci_high_pct": 0.0, "verdict": "reference"})
                    base_rows[k] = row
                else:
                    inf = result.inflation
                    row.update({"inflation_pct": 100 * inf.value, "ci_low_pct": 100 * inf.ci_low,
                                "ci_high_pct": 100 * inf.ci_high, "verdict": inf.verdict})
                    rows.append(row)
            for model_key, name in (("rl", run.label), ("base", "base")):
                if model_key in result.images:
                    images.setdefault(name, {})[k] = result.images[model_key]
            done += 1
            if progress is not None:
                progress(done, total)
        del ckpt
    order = {"base": 0, "A": 1, "B": 2}
    table = pd.DataFrame(list(base_rows.values()) + rows)
    table = table.sort_values(by=["steps", "model"], key=lambda c: c.map(order) if c.name == "model" else -c,
                              ignore_index=True)
    return CompareResult(
        runs=runs, steps=steps, reward=spec, history=_history(runs), per_step=pd.concat(per_step, ignore_index=True),
        rewards=pd.concat(rewards, ignore_index=True), table=table, images=images, prompts=prompts,
        num_samples=int(num_samples), seed=int(seed), confidence=float(audit.confidence),
    )
