"""Audit every checkpoint of a training run on the same prompts and seeds (the paper's Table 5 question).

:func:`run_sweep` finds the ``checkpoint-N`` folders of a run (:func:`find_checkpoints`: ngdiag's and
Flow-Factory's ``RUN/checkpoint-N``, flow_grpo's and DiffusionNFT's ``RUN/checkpoints/checkpoint-N``) and
audits each against the base with one :class:`~ngdiag.workflows.audit.AuditConfig`: the same prompts,
seeds and sampling settings for every checkpoint. With a reward, the base is sampled and scored once
(with the first checkpoint) and every checkpoint's reward and image-quality measures are paired with
it, sample by sample.

Each audit is a durable run folder ``OUT/checkpoint-N/`` (resumable, as ``ngdiag audit`` is); a sweep
rerun with the same arguments reads the finished ones instead of redoing them. The sweep writes
``OUT/sweep.csv`` (one row per checkpoint), ``OUT/summary.json`` and ``OUT/report.html``.

The early-stopping question: the first checkpoint whose inflation interval lies wholly above a
``threshold`` (``ci_low > threshold``) is marked (``first_above``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ngdiag.core.errors import ConfigError

__all__ = ["find_checkpoints", "run_sweep", "SweepResult", "check_sweep_output", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
KIND = "sweep"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LAYOUTS = ("", "checkpoints")  # RUN/checkpoint-N (ngdiag, Flow-Factory), RUN/checkpoints/checkpoint-N (flow_grpo)


def find_checkpoints(run_dir, *, skipped: Optional[list] = None) -> list:
    """``[(N, path)]`` of the complete ``checkpoint-N`` folders of a training run, in order of ``N``.

    Looks in ``run_dir`` and ``run_dir/checkpoints``. A ``checkpoint-N`` folder in which no checkpoint
    format is found (one still being written by a running trainer, or an empty one) is left out and,
    when ``skipped`` is a list, appended to it as ``(N, path, reason)``. Raises :class:`ConfigError` when
    ``run_dir`` is not a folder, holds no complete checkpoint, or holds the same ``N`` in both places.
    """
    from ngdiag.core.errors import CheckpointError
    from ngdiag.models.loading import detect_format

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder (a training run folder with checkpoint-N folders)")
    found: dict = {}
    for sub in _LAYOUTS:
        parent = run / sub if sub else run
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            m = _CHECKPOINT.match(path.name)
            if m is None or not path.is_dir():
                continue
            n = int(m.group(1))
            if n in found:
                raise ConfigError(f"{run} holds checkpoint-{n} twice ({found[n]} and {path}); sweep one layout at a time")
            try:
                detect_format(path)
            except CheckpointError as exc:
                if skipped is not None:
                    skipped.append((n, path, str(exc).split(":", 1)[0]))
                continue
            found[n] = path
    if not found:
        raise ConfigError(f"{run} holds no complete checkpoint-N folder (looked in {run} and {run / 'checkpoints'})")
    return sorted(found.items())


@dataclass
class SweepResult:
    """Every checkpoint of a run audited on the same samples.

    Attributes:
        run: the run folder; base: the base the checkpoints were audited against.
        table: one row per checkpoint (see :func:`run_sweep`).
        per_step: per-step ratio curves ``iteration, step, t, mean_ratio, ci_low, ci_high`` (guided velocity).
        threshold: the inflation threshold (fraction); first_above: the iteration of the first checkpoint
            whose interval lies above it, or ``None``.
        audits: ``{iteration: AuditResult}``; config: the audit config shared by every checkpoint.
        reused: the iterations whose finished audit was read instead of redone.
        skipped: ``(iteration, path, reason)`` of incomplete ``checkpoint-N`` folders left out.
    """

    run: Path
    base: Optional[str]
    table: pd.DataFrame
    per_step: pd.DataFrame
    threshold: float
    first_above: Optional[int]
    config: object
    audits: dict = field(default_factory=dict)
    reused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def summary(self) -> dict:
        from ngdiag.runs import versions

        return {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "run": str(self.run),
            "base": self.base,
            "threshold": self.threshold,
            "first_above": self.first_above,
            "num_checkpoints": int(len(self.table)),
            "num_samples": int(self.config.num_samples),
            "reward": self.config.reward,
            "config": self.config.to_dict(),
            "checkpoints": _records(self.table),
            "skipped": [{"iteration": n, "path": p, "reason": why} for n, p, why in self.skipped],
            "versions": versions(),
        }

    def render_html(self) -> str:
        return _render_report(self)

    def save(self, folder) -> dict:
        """Write ``sweep.csv``, ``report.html`` and ``summary.json`` (last) into an open run folder."""
        summary = self.summary()
        html = self.render_html()
        folder.write("sweep.csv", lambda p: self.table.to_csv(p, index=False))
        folder.write("steps.csv", lambda p: self.per_step.to_csv(p, index=False))
        folder.write_text("report.html", html)
        folder.write_text("summary.json", json.dumps(summary, indent=2))
        return summary


def _records(frame: pd.DataFrame) -> list:
    """The rows of ``frame`` as JSON-safe dicts (numpy scalars as Python numbers, non-finite as ``None``)."""
    from ngdiag.core.io import json_safe

    return [json_safe(row) for row in frame.to_dict(orient="records")]


#: The files a sweep writes at its top level (besides ngdiag's manifest and lock); sweep.json is written first.
SWEEP_FILES = ("sweep.json", "sweep.csv", "steps.csv", "report.html", "summary.json")


def _is_sweep(out: Path) -> bool:
    try:
        return json.loads((out / "sweep.json").read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_sweep_output(out, inputs) -> Path:
    """The sweep folder may be new, empty, or an earlier sweep's (finished or interrupted: it is resumed);
    a folder holding anything else (another command's output, your files) is refused. Writes nothing."""
    from ngdiag.runs import LOCK_FILE, MANIFEST_FILE, check_not_input

    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"sweep folder {out} is a symbolic link; ngdiag does not write through links")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep folder {out} exists and is not a folder")
    check_not_input(out, list(inputs), what="sweep folder")
    entries = sorted(c.name for c in out.iterdir() if c.name not in (MANIFEST_FILE, LOCK_FILE)) if out.is_dir() else []
    if entries:
        owned = (out / MANIFEST_FILE).is_file() and not (out / MANIFEST_FILE).is_symlink()
        foreign = [e for e in entries if e not in SWEEP_FILES and not _CHECKPOINT.match(e)]
        if not (owned and _is_sweep(out)) or foreign:
            shown = ", ".join((foreign or entries)[:3])
            raise ConfigError(f"sweep folder {out} holds files an ngdiag sweep did not write ({shown}); "
                              "choose another folder")
    return out


def run_sweep(
    run_dir,
    config,
    *,
    out_dir,
    base: Optional[str] = None,
    threshold: float = 0.0,
    device="cpu",
    dtype=None,
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    load_kwargs: Optional[dict] = None,
) -> SweepResult:
    """Audit every checkpoint of ``run_dir`` with ``config`` and write the sweep into ``out_dir``.

    Args:
        run_dir: a training run folder (:func:`find_checkpoints`).
        config: an :class:`~ngdiag.workflows.audit.AuditConfig` (prompts, samples, seeds, sampling, reward)
            used for every checkpoint; its ``renorm`` must be off.
        out_dir: the sweep folder: new, empty, or an earlier sweep (finished audits are read, not redone).
        base: the base pipeline; default: the run's ``config.yaml`` (``model.base``) for ngdiag runs, else
            what the checkpoint records (a PEFT adapter's ``base_model_name_or_path``).
        threshold: inflation threshold as a fraction (0.05 = 5 %) for ``first_above``.
        overwrite: redo a checkpoint's audit whose folder holds a finished audit with other arguments.
        progress: ``f(message)`` before each checkpoint.
        load_kwargs: extra arguments of :func:`~ngdiag.models.loading.load_checkpoint` (``allow_pickle``...).

    Returns:
        A :class:`SweepResult`. Its ``table`` has one row per checkpoint: ``iteration``, ``checkpoint``,
        ``inflation``, ``ci_low``, ``ci_high``, ``verdict``, ``differs_from_zero``, ``above_threshold``,
        ``interval_unit`` and, with a reward, ``reward``, ``reward_delta`` with ``reward_delta_low`` /
        ``reward_delta_high`` (paired against the base), and for each quality measure ``M``: ``M`` (mean)
        and ``M_delta`` with ``M_delta_low`` / ``M_delta_high``. All intervals at ``config.confidence``.
    """
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.runs import lock_output, load_finished
    from ngdiag.workflows.audit import AuditWorkflow, run_audit

    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= -1:
        raise ConfigError(f"the threshold must be a finite inflation above -100 %, got {threshold}")
    if config.renorm:
        raise ConfigError("a sweep audits without --renorm (audit one checkpoint with --renorm instead)")
    if config.trajectory != "theta":
        raise ConfigError("a sweep audits on theta's trajectory")
    run = Path(run_dir).resolve()
    skipped: list = []
    checkpoints = find_checkpoints(run, skipped=skipped)
    if base is None:
        base = _base_of_run(run)
    inputs = [("run", run), *([("base", base)] if base is not None else [])]
    out = check_sweep_output(out_dir, inputs)
    load_kwargs = dict(load_kwargs or {})
    if dtype is not None:
        load_kwargs["dtype"] = dtype

    audits, reused = {}, []
    with lock_output(out, inputs=inputs, what="sweep folder") as folder:
        check_sweep_output(out, inputs)  # again under the lock
        marker = {"kind": KIND, "run": str(run), "base": None if base is None else str(base), "status": "running"}
        folder.write_text("sweep.json", json.dumps(marker, indent=2))  # first: an interrupted sweep is resumable
        for index, (n, path) in enumerate(checkpoints):
            ckpt = load_checkpoint(path, base, device=device, **load_kwargs)
            ckpt.require_ref()
            cfg = dataclasses.replace(config, sample_base=(index == 0) or config.reward is None).resolved(ckpt)
            sub = folder.path / f"checkpoint-{n}"
            result = None if overwrite else load_finished(AuditWorkflow(cfg, ckpt.describe()), sub)
            where = f"checkpoint-{n} ({index + 1} of {len(checkpoints)})"
            if result is None:
                if progress is not None:
                    progress(f"audit of {where}")
                result = run_audit(ckpt, cfg, out_dir=sub, overwrite=overwrite)
            else:
                if progress is not None:
                    progress(f"read the finished audit of {where}")
                reused.append(n)
            audits[n] = result
            if base is None:
                base = result.checkpoint.get("base")
            del ckpt
        first_cfg = audits[checkpoints[0][0]].config
        table, per_step = _tables(audits, checkpoints, threshold)
        above = table.loc[table["above_threshold"], "iteration"]
        result = SweepResult(run=run, base=None if base is None else str(base), table=table, per_step=per_step,
                             threshold=threshold, first_above=int(above.iloc[0]) if len(above) else None,
                             config=first_cfg, audits=audits, reused=reused,
                             skipped=[(n, str(p), why) for n, p, why in skipped])
        result.save(folder)
        folder.write_text("sweep.json", json.dumps({**marker, "base": result.base, "status": "done"}, indent=2))
    return result


def _base_of_run(run: Path) -> Optional[str]:
    """``model.base`` of an ngdiag run's ``config.yaml`` as written there (a relative path is taken from the
    current folder, as ``ngdiag compare`` does), or ``None``."""
    import yaml

    cfg = run / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{cfg} is not readable YAML") from None
    model = data.get("model") if isinstance(data, dict) else None
    value = model.get("base") if isinstance(model, dict) else None
    return str(value) if isinstance(value, str) and value else None


def _tables(audits: dict, checkpoints: list, threshold: float) -> tuple:
    from ngdiag.quality import MEASURES
    from ngdiag.stats import mean_interval
    from ngdiag.workflows.audit import prompt_clusters

    first = audits[checkpoints[0][0]]
    conf = first.config.confidence
    base_rewards = base_quality = None
    if first.rewards is not None:
        base_rewards = first.rewards[first.rewards["model"] == "base"].sort_values("sample")
    if first.quality is not None:
        base_quality = first.quality[first.quality["model"] == "base"].sort_values("sample")
    base_features = first.features.get("base")
    rows, curves = [], []
    for n, path in checkpoints:
        a = audits[n]
        inf = a.inflation
        row = {
            "iteration": n,
            "checkpoint": str(path),
            "inflation": inf.value,
            "ci_low": inf.ci_low,
            "ci_high": inf.ci_high,
            "verdict": inf.verdict,
            "differs_from_zero": bool(inf.differs_from_zero),
            "above_threshold": bool(inf.ci_low > threshold),
            "interval_unit": inf.interval_unit,
            "inflation_t_weighted": inf.t_weighted_value,
            "t_weighted_ci_low": inf.t_weighted_ci_low,
            "t_weighted_ci_high": inf.t_weighted_ci_high,
        }
        seed = int(a.config.seed)
        clusters = prompt_clusters(a.config, np.arange(a.config.num_samples))  # one cluster per distinct prompt
        if base_rewards is not None and a.rewards is not None:
            rl = a.rewards[a.rewards["model"] == "rl"].sort_values("sample")
            row["reward"] = float(rl["reward"].mean())
            mean, lo, hi = mean_interval(rl["reward"].to_numpy(float) - base_rewards["reward"].to_numpy(float),
                                           clusters=clusters, confidence=conf, seed=seed)
            row.update({"reward_delta": mean, "reward_delta_low": lo, "reward_delta_high": hi})
        if base_quality is not None and a.quality is not None:
            rl = a.quality[a.quality["model"] == "rl"].sort_values("sample")
            for k in MEASURES:
                row[k] = float(rl[k].mean())
                mean, lo, hi = mean_interval(rl[k].to_numpy(float) - base_quality[k].to_numpy(float),
                                               clusters=clusters, confidence=conf, seed=seed)
                row.update({f"{k}_delta": mean, f"{k}_delta_low": lo, f"{k}_delta_high": hi})
        if base_features is not None and "rl" in a.features:
            from ngdiag.quality import frechet_of_features

            fd = frechet_of_features(a.features["rl"], base_features, encoder=str(a.config.fd_encoder))
            row.update({"frechet": fd.value, "frechet_images": fd.num_images})
        rows.append(row)
        guided = a.per_step[a.per_step["call"] == "guided"][["step", "t", "mean_ratio", "ci_low", "ci_high"]].copy()
        guided.insert(0, "iteration", n)
        curves.append(guided)
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


def _render_report(result: SweepResult) -> str:
    from ngdiag.report import figures as F
    from ngdiag.report.html import figure_block, render_demo_page, table_of
    from ngdiag.runs import versions

    t = result.table
    cfg = result.config
    conf = f"{cfg.confidence:.0%}"
    pct = lambda v: "" if v is None or not math.isfinite(v) else f"{100 * v:+.2f} %"  # noqa: E731
    inflation_rows = pd.DataFrame({
        "checkpoint": [f"checkpoint-{n}" for n in t["iteration"]],
        "inflation": [pct(v) for v in t["inflation"]],
        f"{conf} interval": [f"[{pct(lo)}, {pct(hi)}]" for lo, hi in zip(t["ci_low"], t["ci_high"])],
        "verdict": t["verdict"],
        "differs from 0": ["yes" if d else "no" for d in t["differs_from_zero"]],
        f"above {100 * result.threshold:g} %": ["yes" if a else "no" for a in t["above_threshold"]],
    })
    if "inflation_t_weighted" in t:
        inflation_rows["t-weighted"] = [pct(v) for v in t["inflation_t_weighted"]]
    if result.first_above is None:
        verdict = (f"No checkpoint's {conf} inflation interval lies above {100 * result.threshold:g} %.")
    else:
        verdict = (f"First checkpoint whose {conf} inflation interval lies above {100 * result.threshold:g} %: "
                   f"checkpoint-{result.first_above}.")
    frame = t.assign(run=result.run.name)
    sections = [{
        "id": "inflation",
        "title": "Inflation against training iteration",
        "verdict": verdict,
        "paragraphs": [
            f"{len(t)} checkpoints of {result.run}, each audited against the base {result.base} on the same "
            f"{cfg.num_samples} samples (prompt i mod {len(cfg.prompts)}, seed {cfg.seed} + i), "
            f"{cfg.sampling.num_steps} steps, guidance {cfg.sampling.guidance_scale:g}.",
            "Inflation: exp(mean over samples of mean over steps of log ||v_θ|| / ||v_ref||) − 1, guided velocity "
            f"on the checkpoint's own trajectory, with a bootstrap interval ({t['interval_unit'].iloc[0]} resampled).",
        ],
        "tables": [table_of(inflation_rows)],
        "figures": [figure_block(F.inflation_by_iteration(frame), alt="Inflation against training iteration")],
    }]
    if "reward_delta" in t:
        from ngdiag.quality import MEASURES

        cols = {"checkpoint": [f"checkpoint-{n}" for n in t["iteration"]], "reward": [f"{v:.4f}" for v in t["reward"]],
                "reward − base": [f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in
                                  zip(t["reward_delta"], t["reward_delta_low"], t["reward_delta_high"])]}
        if "frechet" in t:
            cols[f"Fréchet distance to the base ({t['frechet_images'].iloc[0]:.0f} images each)"] = [
                f"{v:.4g}" for v in t["frechet"]]
        for k in MEASURES:
            if f"{k}_delta" in t:
                cols[f"{k} − base"] = [f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in
                                       zip(t[f"{k}_delta"], t[f"{k}_delta_low"], t[f"{k}_delta_high"])]
        sections.append({
            "id": "quality",
            "title": "Reward and image quality against the base",
            "paragraphs": [f"Reward {cfg.reward}. Differences are paired (same prompt and seed as the base's "
                           f"sample), means with {conf} percentile bootstrap intervals over samples. The base was "
                           "sampled once, with the first checkpoint."],
            "tables": [table_of(pd.DataFrame(cols))],
        })
    return render_demo_page(f"ngdiag sweep: {result.run.name}", sections, kicker="ngdiag sweep",
                            lead=f"Every checkpoint of {result.run}, audited on the same samples.",
                            versions=versions())
