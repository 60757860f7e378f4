"""Compare any number of training runs or checkpoints (NormGuard vs none, a lambda sweep, lambda x KL).

:func:`compare_runs` reads the runs (run folders, or ``checkpoint-N`` folders inside run folders) and:

1. takes each run's metrics log (``metrics.jsonl``): reward mean / std, ``norm_ratio_mean``,
   ``inflation``, penalty and hinge-active fraction against the iteration;
2. audits each run's final checkpoint (or the checkpoint given) against the shared base at every step
   count of ``steps`` (:func:`ngdiag.workflows.audit.run_audit`, theta's trajectory, guided velocity),
   on the same prompts (held-out ones with ``prompts``) and seeds for every model. The base is sampled
   and scored once per step count, not once per run;
3. builds a table shaped like the paper's Table 3 (one row per model and step count: reward and inflation
   with its interval), and a table of paired differences against a chosen ``baseline`` (a run's label or
   ``"base"``): reward, norm ratio and every image-quality measure, sample by sample on the same prompt
   and seed, with bootstrap intervals (over prompts when samples share prompts);
4. finds the training settings in which the runs differ: one setting gives a curve (e.g. inflation and
   reward against ``normguard.lam``), two a grid (``normguard.lam`` x ``nft.kl_beta``).

The result renders to one self-contained HTML page (:meth:`CompareResult.save_html`) through
``ngdiag.report.html.render_compare_report``; :meth:`CompareResult.report_context` documents the
context it passes.
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from ngdiag.core.errors import ConfigError
from ngdiag.train.config import TrainConfig
from ngdiag.train.run_folder import CONFIG_FILE, latest_checkpoint, read_metrics

__all__ = ["RunInfo", "CompareResult", "compare_runs", "load_run", "run_inputs", "check_compare_output",
           "HISTORY_COLUMNS", "varying_settings"]

HISTORY_COLUMNS = (
    "reward_mean", "reward_std", "norm_ratio_mean", "inflation", "penalty", "hinge_active_fraction", "loss",
)
#: Config keys that never count as a difference between runs.
_NOT_SETTINGS = ("output_dir", "iterations", "checkpoint_every", "resume", "model.base", "rollouts.prompts_file",
                 "rollouts.prompts", "logging")


@dataclass
class RunInfo:
    """One training run folder (or one of its checkpoints).

    Attributes:
        label: ``"A"``, ``"B"``, ...; name: the folder name (``run/checkpoint-N`` for a checkpoint given
            explicitly); path: the run folder.
        config: its resolved :class:`TrainConfig`.
        checkpoint: the ``checkpoint-N`` folder compared (the newest complete one unless given).
        metrics: its metrics log, one row per iteration.
    """

    label: str
    name: str
    path: Path
    config: TrainConfig
    checkpoint: Path
    metrics: pd.DataFrame

    @property
    def iteration(self) -> Optional[int]:
        tail = self.checkpoint.name.rpartition("-")[2]
        return int(tail) if tail.isdigit() else None

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
    """Read a run folder written by :func:`ngdiag.train.trainer.train` (:mod:`ngdiag.train.run_folder`), or one
    ``checkpoint-N`` folder inside such a run folder (that checkpoint is compared instead of the newest)."""
    folder = Path(path).resolve()
    checkpoint = None
    name = folder.name
    if not (folder / CONFIG_FILE).is_file() and folder.name.startswith("checkpoint-") and (folder.parent / CONFIG_FILE).is_file():
        checkpoint, folder = folder, folder.parent
        name = f"{folder.name}/{checkpoint.name}"
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"{folder} is not an ngdiag training run ({CONFIG_FILE} missing)")
    try:
        config = TrainConfig.from_dict(yaml.safe_load(cfg_file.read_text()) or {})
    except yaml.YAMLError:
        raise ConfigError(f"{cfg_file} is not readable YAML") from None
    if checkpoint is None:
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None:
            raise ConfigError(f"{folder} has no checkpoint yet; train it first")
    metrics = pd.DataFrame(read_metrics(folder))
    if metrics.empty:
        raise ConfigError(f"{folder} has no metrics log (metrics.jsonl is missing or empty)")
    return RunInfo(label, name, folder, config, checkpoint, metrics)


def _labels(count: int) -> list:
    letters = string.ascii_uppercase
    return [letters[i] if i < 26 else f"R{i + 1}" for i in range(count)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out


def varying_settings(runs: Sequence[RunInfo]) -> pd.DataFrame:
    """One row per run (``label``) and one column per training setting whose value differs between the runs
    (dotted config keys such as ``normguard.lam``; ``checkpoint`` when the same run appears at several
    checkpoints). Settings that do not shape the model (output folder, logging) are left out."""
    flats = [_flat(r.config.to_dict()) for r in runs]
    keys = sorted(set().union(*flats))
    cols = {}
    for key in keys:
        if any(key == s or key.startswith(s + ".") for s in _NOT_SETTINGS):
            continue
        values = [f.get(key) for f in flats]
        if len({repr(v) for v in values}) > 1:
            cols[key] = values
    iterations = [r.iteration for r in runs]
    if len({str(r.path) for r in runs}) < len(runs) or (not cols and len(set(iterations)) > 1):
        cols["checkpoint"] = iterations
    return pd.DataFrame({"label": [r.label for r in runs], **cols})


@dataclass
class CompareResult:
    """The comparison of several runs.

    Attributes:
        runs: the :class:`RunInfo`, labelled A, B, C... in the order given.
        steps: the step counts of the ablation.
        reward: the reward spec used to score images.
        history: long table ``run, iteration, metric, value`` from the metrics logs.
        per_step: per-step ratio curves of the compared checkpoints: ``model, steps, step, t, mean_ratio,
            ci_low, ci_high`` (guided velocity, theta's trajectory).
        rewards: per-sample rewards ``model, steps, sample, reward`` (models ``base``, ``A``, ``B``...).
        table: the Table 3 shaped summary (see :func:`compare_runs`).
        paired: paired differences against the baseline (see :func:`compare_runs`).
        settings: :func:`varying_settings` of the runs; layout: ``"curve"`` (one setting differs),
            ``"grid"`` (two) or ``None``.
        images: ``{model: {steps: array (G, 3, H, W) in [0, 1]}}``.
        prompts: the prompts of the samples (sample ``i`` uses ``prompts[i % len]``).
    """

    runs: list
    steps: list
    reward: str
    history: pd.DataFrame
    per_step: pd.DataFrame
    rewards: pd.DataFrame
    table: pd.DataFrame
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: pd.DataFrame = field(default_factory=pd.DataFrame)
    baseline: str = "base"
    images: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list)
    num_samples: int = 0
    seed: int = 0
    confidence: float = 0.95
    quality: pd.DataFrame = field(default_factory=pd.DataFrame)
    inflations: dict = field(default_factory=dict)

    def inflation_of(self, label: str, steps: int):
        """The :class:`~ngdiag.stats.InflationSummary` of run ``label`` at ``steps`` sampling steps."""
        try:
            return self.inflations[(label, int(steps))]
        except KeyError:
            raise ConfigError(f"no audit of run {label!r} at {steps} steps in this comparison") from None

    @property
    def layout(self) -> Optional[str]:
        """``"curve"`` when three or more runs differ in one setting, ``"grid"`` when in two, else ``None``."""
        keys = [c for c in self.settings.columns if c != "label"]
        return {1: "curve", 2: "grid"}.get(len(keys)) if len(self.runs) >= 3 else None

    def summary(self) -> dict:
        """A JSON-safe summary: runs, settings and the tables."""
        return {
            "runs": [r.describe() for r in self.runs],
            "steps": list(self.steps),
            "reward": self.reward,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "prompts": list(self.prompts),
            "baseline": self.baseline,
            "layout": self.layout,
            "settings": _records(self.settings),
            "table": _records(self.table),
            "paired": _records(self.paired),
        }

    def table_wide(self) -> pd.DataFrame:
        """The table in the paper's Table 3 layout: one row per model (base, A, B...), and for each step
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

    def layout_frame(self, steps: Optional[int] = None) -> pd.DataFrame:
        """The runs' settings joined with their inflation (fractions, with interval) and their reward
        difference against the base, at ``steps`` (default: the first step count): what the curve or
        grid plots."""
        k = self.steps[0] if steps is None else steps
        t = self.table[(self.table["steps"] == k) & (self.table["model"] != "base")]
        frame = self.settings.merge(t, left_on="label", right_on="model")
        frame["inflation"] = frame["inflation_pct"] / 100
        frame["ci_low"] = frame["ci_low_pct"] / 100
        frame["ci_high"] = frame["ci_high_pct"] / 100
        from ngdiag.stats import mean_interval

        def of(model):
            sub = self.rewards[(self.rewards["model"] == model) & (self.rewards["steps"] == k)].sort_values("sample")
            return sub["reward"].to_numpy(float)

        first = {p: j for j, p in reversed(list(enumerate(self.prompts)))}
        clusters = np.asarray([first[self.prompts[i % len(self.prompts)]] for i in range(self.num_samples)])
        deltas = [mean_interval(of(label) - of("base"), clusters=clusters, confidence=self.confidence, seed=self.seed)
                  for label in frame["label"]]
        frame["reward_delta"], frame["reward_delta_low"], frame["reward_delta_high"] = (
            [d[i] for d in deltas] for i in range(3))
        return frame

    def report_context(self) -> dict:
        """The context of ``ngdiag.report.html.render_compare_report``.

        ``runs``: ``[{"name", "metrics"}]``; ``table``: one row per model and step count (reward with its
        spread, inflation with its interval and verdict; :meth:`table_wide` has the same numbers in the
        paper's Table 3 layout); ``paired``: the paired differences against the baseline; ``layout``:
        the curve or grid (``{"kind", "keys", "frame"}``) when the runs differ in one or two settings;
        ``ratio_curves``: per-step ratio curves at the first step count; ``images``: one grid row per
        model and step count; ``inflation``: each run's inflation per step count (fractions with their
        interval), from which the report writes its conclusion; ``title``, ``notes``, ``config`` and
        ``versions``.
        """
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
                "t-weighted %": rec.get("t_weighted_pct"),
                **({"Fréchet distance to base": rec.get("frechet")} if "frechet" in self.table.columns else {}),
                "verdict": rec["verdict"],
            }
            for rec in sorted(_records(self.table), key=lambda r: (-int(r["steps"]), r["model"] != "base", str(r["model"])))
        ]
        inflation = [
            {"name": names[rec["model"]], "steps": rec["steps"], "value": rec["inflation_pct"] / 100,
             "ci_low": rec["ci_low_pct"] / 100, "ci_high": rec["ci_high_pct"] / 100, "confidence": self.confidence}
            for rec in _records(self.table) if rec["model"] != "base" and rec.get("inflation_pct") is not None
        ]
        paired = [_paired_row(rec, names) for rec in _records(self.paired)]
        layout = None
        keys = [c for c in self.settings.columns if c != "label"]
        if self.layout is not None:
            layout = {"kind": self.layout, "keys": keys, "frame": self.layout_frame(), "steps": first}
        settings = {r["label"]: ", ".join(f"{k} = {r[k]}" for k in keys) or "same settings" for r in _records(self.settings)}
        level = f"{self.confidence:.0%}"
        notes = [
            f"Reward {self.reward}; {self.num_samples} samples per model and step count, prompt i mod "
            f"{len(self.prompts)} and seed {self.seed} + i for every model. The base was sampled once per step count.",
            "Inflation of a checkpoint: exp(mean over samples of mean over steps of log ||v_theta|| / "
            "||v_ref||) - 1, guided velocity on the checkpoint's own trajectory, with a bootstrap interval; "
            "the base is the reference (0 % by definition).",
            f"Paired differences against {names.get(self.baseline, self.baseline)}: per sample (same prompt and "
            f"seed), means with {level} percentile bootstrap intervals"
            + (" over prompts (samples share prompts)." if self.num_samples > len(self.prompts) else " over samples.")
            + " Against the base the paired norm ratio is the inflation itself; its interval there is a percentile "
              "one, the summary table's is the audit's (BCa over samples), so their bounds can differ slightly.",
            "Training curves: inflation at the training points of each iteration (conditional velocity, "
            "forward-process states built from the rollouts), from each run's metrics log.",
            f"Ratio curves: the compared checkpoints at {first} steps.",
        ]
        return {
            "title": "ngdiag compare: " + " vs ".join(r.name for r in self.runs),
            "runs": _one_curve_per_log(self.runs),
            "table": table,
            "paired": paired,
            "layout": layout,
            "inflation": inflation,
            "ratio_curves": curves,
            "images": images,
            "notes": notes,
            "config": {
                "compare": {"steps": list(self.steps), "reward": self.reward, "num_samples": self.num_samples,
                            "seed": self.seed, "baseline": self.baseline},
                "runs": {r.label: {"path": str(r.path), "checkpoint": str(r.checkpoint), "settings": settings[r.label]}
                         for r in self.runs},
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


def _one_curve_per_log(runs: Sequence[RunInfo]) -> list:
    """One training curve per run folder: checkpoints of one run share its metrics log (their labels joined)."""
    by_path: Dict[str, list] = {}
    for r in runs:
        by_path.setdefault(str(r.path), []).append(r)
    return [{"name": " / ".join(r.display for r in group), "metrics": group[0].metrics} for group in by_path.values()]


def _paired_row(rec: dict, names: dict) -> dict:
    def iv(m, lo, hi, digits=4):
        if m is None:
            return ""
        bounds = "" if lo is None or hi is None else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
        return f"{m:+.{digits}f}{bounds}"

    row = {"model": names.get(rec["model"], rec["model"]), "steps": rec["steps"],
           "norm ratio vs baseline − 1 (%)": iv(*(None if rec.get(k) is None else 100 * rec[k]
                                                   for k in ("ratio_delta", "ratio_delta_low", "ratio_delta_high")), digits=2)}
    if rec.get("reward_delta") is not None:
        row["reward Δ"] = iv(rec["reward_delta"], rec.get("reward_delta_low"), rec.get("reward_delta_high"))
    for key in rec:
        if key.endswith("_delta") and key not in ("reward_delta", "ratio_delta"):
            row[f"{key[:-6]} Δ"] = iv(rec[key], rec.get(f"{key}_low"), rec.get(f"{key}_high"))
    return row


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
    """The rows of ``frame`` as JSON-safe dicts (numpy scalars as Python numbers, non-finite as ``None``)."""
    from ngdiag.core.io import json_safe

    return [json_safe(row) for row in frame.to_dict(orient="records")]


def _history(runs: Sequence[RunInfo]) -> pd.DataFrame:
    frames = []
    for run in runs:
        cols = [c for c in HISTORY_COLUMNS if c in run.metrics.columns]
        long = run.metrics[["iteration", *cols]].melt(id_vars="iteration", var_name="metric", value_name="value")
        long.insert(0, "run", run.label)
        frames.append(long)
    return pd.concat(frames, ignore_index=True).dropna(subset=["value"])


def load_runs(paths: Sequence) -> list:
    """:func:`load_run` of each path, labelled A, B, C... (at least two, all trained from one base)."""
    if len(paths) < 2:
        raise ConfigError(f"compare needs at least two runs or checkpoints, got {len(paths)}")
    runs = [load_run(p, label) for p, label in zip(paths, _labels(len(paths)))]
    bases = {str(Path(r.config.model.base)) for r in runs}
    if len(bases) != 1:
        raise ConfigError(f"the runs were trained from different bases ({', '.join(sorted(bases))}); compare runs of one base")
    return runs


def compare_runs(
    *runs,
    steps: Sequence[int] = (28, 10, 4),
    reward: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    num_samples: int = 8,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 4,
    grid_size: int = 4,
    baseline: str = "base",
    fd_encoder: Optional[str] = None,
    device="cpu",
    progress: Optional[Callable[[int, int], None]] = None,
) -> CompareResult:
    """Compare run folders or checkpoints (see the module docstring).

    Args:
        runs: two or more training run folders (``config.yaml``, ``metrics.jsonl``, ``checkpoint-N``) or
            ``checkpoint-N`` folders inside them, labelled A, B, C... in this order (one list also works).
        steps: sampling step counts of the few-step ablation.
        reward: reward spec; default: run A's training reward.
        prompts: the prompts (e.g. held out from training); default: run A's training prompts.
        num_samples: samples per model and step count (the bootstrap unit of the inflation).
        guidance_scale: default: run A's sampling guidance.
        seed: sample ``i`` uses seed ``seed + i`` and prompt ``i mod len(prompts)``.
        batch_size, grid_size: audit batch size and number of images per grid.
        baseline: ``"base"`` or a run's label (``"A"``): what the paired differences are taken against.
        fd_encoder: an image-encoder spec (``world:DIR``, ``clip:DIR``...): each run's Fréchet distance to
            the base's images at each step count (``frechet`` in the table).
        device: where the models run.
        progress: ``f(done, total)`` after each audit (``len(runs) * len(steps)`` audits).

    Returns:
        A :class:`CompareResult`. Its ``table`` has one row per model (``base``, ``A``, ``B``...) and step
        count with ``reward_mean``, ``reward_std``, ``inflation_pct`` (``100 x inflation``, 0 for the
        base by definition), ``ci_low_pct``, ``ci_high_pct`` and ``verdict``. Its ``paired`` table has
        one row per model other than the baseline and step count: ``ratio_delta`` (``exp(mean_i (l_i -
        l_i^baseline)) - 1``, the norm ratio against the baseline's, per-sample log-ratios ``l_i``),
        ``reward_delta`` and ``M_delta`` for every quality measure ``M``, each with ``_low`` / ``_high``.

    Raises:
        ConfigError: a folder that is not a run, runs trained from different bases, bad settings.
    """
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.quality import MEASURES
    from ngdiag.train.config import check_reward_spec
    from ngdiag.workflows.audit import AuditConfig, prompt_clusters, run_audit
    from ngdiag.stats import mean_interval

    if len(runs) == 1 and isinstance(runs[0], (list, tuple)):
        runs = tuple(runs[0])
    steps = [int(s) for s in steps]
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"steps must be positive step counts, got {steps}")
    if int(num_samples) < 2:
        raise ConfigError(f"compare needs at least 2 samples per model for an interval, got {num_samples}")
    infos = runs if runs and all(isinstance(r, RunInfo) for r in runs) else load_runs(runs)
    labels = [r.label for r in infos]
    if baseline != "base" and baseline not in labels:
        raise ConfigError(f"the baseline must be 'base' or one of the runs' labels ({', '.join(labels)}), got {baseline!r}")
    base = str(Path(infos[0].config.model.base))
    spec = reward or infos[0].config.reward
    check_reward_spec(spec)
    cfg = infos[0].config
    prompts = list(prompts) if prompts else cfg.rollouts.load_prompts()
    if not prompts:
        raise ConfigError("compare needs at least one prompt")
    guidance = cfg.sampling.guidance_scale if guidance_scale is None else float(guidance_scale)

    per_step, rewards, rows, quality = [], [], [], []
    log_ratios: Dict[tuple, np.ndarray] = {}
    inflations: Dict[tuple, object] = {}
    features: Dict[tuple, np.ndarray] = {}
    images: Dict[str, dict] = {}
    total, done = len(infos) * len(steps), 0
    base_rows: Dict[int, dict] = {}
    for index, run in enumerate(infos):
        ckpt = load_checkpoint(run.checkpoint, base, device=device)
        for k in steps:
            sampling = dataclasses.replace(cfg.sampling, num_steps=k, guidance_scale=guidance)
            audit = AuditConfig(prompts=prompts, num_samples=int(num_samples), sampling=sampling, seed=int(seed),
                                batch_size=int(batch_size), reward=spec, grid_size=int(grid_size), sample_base=index == 0,
                                fd_encoder=fd_encoder)
            result = run_audit(ckpt, audit, report=False)
            guided = result.per_step[result.per_step["call"] == "guided"]
            frame = guided[["step", "t", "mean_ratio", "ci_low", "ci_high"]].copy()
            frame.insert(0, "steps", k)
            frame.insert(0, "model", run.label)
            per_step.append(frame)
            inflations[(run.label, k)] = result.inflation
            log_ratios[(run.label, k)] = result.per_sample.sort_values("sample")["log_ratio"].to_numpy(float)
            for model_key, name in (("rl", run.label), ("base", "base")):  # the base only in the first run's audit
                if model_key in result.images:
                    images.setdefault(name, {})[k] = result.images[model_key]
                if model_key in result.features:
                    features[(name, k)] = result.features[model_key]
                sub = result.rewards[result.rewards["model"] == model_key]
                if sub.empty:
                    continue
                rewards.append(pd.DataFrame({"model": name, "steps": k, "sample": sub["sample"].to_numpy(),
                                             "reward": sub["reward"].to_numpy()}))
                q = result.quality[result.quality["model"] == model_key].copy()
                q["model"], q["steps"] = name, k
                quality.append(q)
                values = sub["reward"].to_numpy(dtype=float)
                row = {"model": name, "steps": k, "reward_mean": float(values.mean()),
                       "reward_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
                if name == "base":
                    row.update({"inflation_pct": 0.0, "ci_low_pct": 0.0, "ci_high_pct": 0.0, "verdict": "reference"})
                    base_rows[k] = row
                else:
                    inf = result.inflation
                    row.update({"inflation_pct": 100 * inf.value, "ci_low_pct": 100 * inf.ci_low,
                                "ci_high_pct": 100 * inf.ci_high, "verdict": inf.verdict,
                                "t_weighted_pct": 100 * inf.t_weighted_value})
                    rows.append(row)
            done += 1
            if progress is not None:
                progress(done, total)
        del ckpt
    if features:
        from ngdiag.quality import frechet_of_features

        for row in rows:
            mine, base_f = features.get((row["model"], row["steps"])), features.get(("base", row["steps"]))
            if mine is not None and base_f is not None:
                row["frechet"] = frechet_of_features(mine, base_f, encoder=str(fd_encoder)).value
    order = {"base": -1, **{label: i for i, label in enumerate(labels)}}
    table = pd.DataFrame(list(base_rows.values()) + rows)
    table = table.sort_values(by=["steps", "model"], key=lambda c: c.map(order) if c.name == "model" else -c,
                              ignore_index=True)
    rewards = pd.concat(rewards, ignore_index=True)
    quality = pd.concat(quality, ignore_index=True)
    clusters = prompt_clusters(audit, np.arange(int(num_samples)))  # one cluster per distinct prompt

    def per_sample(frame: pd.DataFrame, model: str, k: int, column: str) -> np.ndarray:
        sub = frame[(frame["model"] == model) & (frame["steps"] == k)].sort_values("sample")
        return sub[column].to_numpy(float)

    paired = []
    for k in steps:
        for model in ("base", *labels):
            if model == baseline:
                continue
            row = {"model": model, "steps": k, "baseline": baseline}
            mine = log_ratios.get((model, k), np.zeros(int(num_samples)))
            theirs = log_ratios.get((baseline, k), np.zeros(int(num_samples)))
            m, lo, hi = mean_interval(mine - theirs, clusters=clusters, confidence=audit.confidence, seed=int(seed))
            row.update({"ratio_delta": math.expm1(m), "ratio_delta_low": math.expm1(lo), "ratio_delta_high": math.expm1(hi)})
            for column, frame, key in (("reward", rewards, "reward"), *((c, quality, c) for c in MEASURES)):
                m, lo, hi = mean_interval(per_sample(frame, model, k, column) - per_sample(frame, baseline, k, column),
                                            clusters=clusters, confidence=audit.confidence, seed=int(seed))
                row.update({f"{key}_delta": m, f"{key}_delta_low": lo, f"{key}_delta_high": hi})
            paired.append(row)
    return CompareResult(
        runs=list(infos), steps=steps, reward=spec, history=_history(infos), per_step=pd.concat(per_step, ignore_index=True),
        rewards=rewards, table=table, paired=pd.DataFrame(paired), settings=varying_settings(infos), baseline=baseline,
        images=images, prompts=prompts, num_samples=int(num_samples), seed=int(seed), confidence=float(audit.confidence),
        quality=quality, inflations=inflations,
    )
