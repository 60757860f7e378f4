"""Per-layer attribution: which adapted modules or blocks make the velocity norm inflate?

``run_attribution(checkpoint, config)`` samples theta's trajectories (sample ``i``: prompt
``i mod len(prompts)``, seed ``seed + i``, as in the audit) and at every state ``(x_k, t_k)`` evaluates,
besides theta and ref, theta with each group ``g`` reverted to the base, and (``single``) the base
with only group ``g`` of theta (:mod:`ngdiag.models.groups`: LoRA layers switched off, or a full
fine-tune's parameters swapped for the base's). All variants see exactly the same states.

Per sample ``i``, with the guided velocity's norms and ``L(model) = mean_k log(||v_model|| / ||v_ref||)``:

- total ``T_i = L_i(theta)`` (the audit's per-sample log-ratio; inflation ``exp(mean_i T_i) - 1``);
- leave-one-out effect ``D_gi = T_i - L_i(theta without g)``: what the inflation loses without ``g``;
- single-group effect ``S_gi = L_i(base with only g)``: what ``g`` does alone.

Each effect is summarised by its mean over samples with a seeded bootstrap interval (over prompts when
samples share prompts, as the audit does) and its share of the mean total, ``mean D_g / mean T``. For
an additive model both sums equal the total; ``interaction = total - sum of effects`` shows how far
the groups are from additive (LoRA layers feed each other, so they rarely are exactly).

Cost: with ``G`` groups every step evaluates ``2 + G`` velocities (``2 + 2G`` with ``single``),
against the audit's 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ngdiag.core.errors import ConfigError
from ngdiag.core.seeds import sample_seeds
from ngdiag.core.tensors import check_finite_norms, velocity_norm
from ngdiag.core.sampling import sample
from ngdiag.models.generation import SampleSet, prepare_batch
from ngdiag.models.groups import GROUPINGS, groups_of
from ngdiag.models.loading import Checkpoint
from ngdiag.runs import RunFolder, Workflow, lock_output, merge_workflow, run_workflow, versions
from ngdiag.stats import bootstrap_mean_interval
from ngdiag.workflows.audit import prompt_clusters

__all__ = ["AttributionConfig", "AttributionResult", "AttributionWorkflow", "run_attribution", "merge_attributions",
           "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
KIND = "attribution"


@dataclass
class AttributionConfig(SampleSet):
    """What to attribute and how.

    Attributes:
        prompts, num_samples, sampling, seed, batch_size: see :class:`ngdiag.models.generation.SampleSet`.
        group: ``"block"`` (the modules of one numbered transformer block together) or ``"module"``.
        single: also measure each group alone (the base with only that group), one more
            evaluation per group and step.
        confidence, bootstrap, n_resamples: the intervals over samples.
    """

    group: str = "block"
    single: bool = True
    confidence: float = 0.95
    bootstrap: str = "BCa"
    n_resamples: int = 2000

    _needs_two = "an attribution needs at least 2 samples for an interval"

    def __post_init__(self):
        super().__post_init__()
        if self.group not in GROUPINGS:
            raise ConfigError(f"--group must be one of {', '.join(GROUPINGS)}, got {self.group!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must lie in (0, 1), got {self.confidence}")
        if str(self.bootstrap).lower() not in ("bca", "percentile"):
            raise ConfigError(f"bootstrap must be 'BCa' or 'percentile', got {self.bootstrap!r}")


class _GroupVelocity:
    """The step velocity: theta's guided velocity (the trajectory), recording the guided norms of
    theta, ref and every group variant at the same state."""

    def __init__(self, theta_g, ref_g, groups, single: bool):
        self.models = {"theta": theta_g, "ref": ref_g}
        self.groups = groups
        self.single = single
        self.rows = {"theta": [], "ref": [], "without": [], "only": []}

    def _norm(self, v: torch.Tensor, what: str) -> np.ndarray:
        n = velocity_norm(v.detach())
        check_finite_norms(n, what=what, step=len(self.rows["theta"]))
        return n.double().cpu().numpy()

    def _variant(self, make, group: str, x, t) -> np.ndarray:
        context, who = make(group)
        with context:
            v = self.models[who](x, t).guided
        return self._norm(v, f"the velocity {'without' if make == self.groups.without else 'with only'} {group}")

    def __call__(self, x, t):
        ev = self.models["theta"](x, t)
        ref = self.models["ref"](x, t).guided
        without = [self._variant(self.groups.without, g, x, t) for g in self.groups.names]
        only = [self._variant(self.groups.only, g, x, t) for g in self.groups.names] if self.single else []
        self.rows["without"].append(without)
        self.rows["only"].append(only)
        self.rows["ref"].append(self._norm(ref, "v_ref"))
        self.rows["theta"].append(self._norm(ev.guided, "v_theta"))
        return ev

    def part(self, ids, times) -> dict:
        """Per-sample log-ratios ``L`` (mean over steps): ``total (B,)``, ``without (G, B)``, ``only (G, B)``."""
        ref = np.log(np.stack(self.rows["ref"]))  # (S, B)
        log = lambda a: np.log(np.asarray(a)) - ref[:, None, :]  # noqa: E731  (S, G, B)
        total = (np.log(np.stack(self.rows["theta"])) - ref).mean(axis=0)
        without = log(self.rows["without"]).mean(axis=0)
        only = log(self.rows["only"]).mean(axis=0) if self.single else np.zeros((0, len(ids)))
        return {"ids": np.asarray(ids, dtype=np.int64), "times": np.asarray(times, dtype=np.float64),
                "groups": np.asarray(self.groups.names), "total": total, "without": without, "only": only}


@dataclass
class AttributionResult:
    """The outcome of an attribution.

    Attributes:
        table: one row per group, ranked by the leave-one-out share of the total (largest first; by the
            size of the effect when the total is 0): ``rank, group,
            modules, loo_effect, loo_ci_low, loo_ci_high, loo_share`` and, with ``single``,
            ``single_effect, single_ci_low, single_ci_high, single_share`` (effects on the mean
            log-ratio; shares of the mean total).
        per_sample: long table ``sample, group, loo_effect, single_effect, total``.
        total: per-sample total log-ratio ``T_i``, ``(N,)``.
        modules: group -> the modules it holds.
        kind: ``"lora"`` (adapter layers switched) or ``"weights"`` (parameters swapped).
        config, checkpoint: what was run.
    """

    table: pd.DataFrame
    per_sample: pd.DataFrame
    total: np.ndarray
    modules: dict
    kind: str
    config: AttributionConfig
    checkpoint: dict
    total_interval: tuple = field(default=(None, None, None))

    def summary(self) -> dict:
        """The versioned ``summary.json`` document."""
        total = float(self.total.mean())
        rows = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                for row in self.table.drop(columns=["modules"]).to_dict("records")]
        for row, group in zip(rows, self.table["group"]):
            row["num_modules"] = len(self.modules[group])
        out = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "group_by": self.config.group,
            "switch": self.kind,
            "num_groups": len(self.table),
            "num_samples": int(len(self.total)),
            # the interval of the inflation (a fraction, as the audit's), and of the mean log-ratio it comes from
            "total": {"log_ratio": total, "inflation": float(np.expm1(total)),
                      "ci_low": float(np.expm1(self.total_interval[0])), "ci_high": float(np.expm1(self.total_interval[1])),
                      "log_ratio_ci_low": float(self.total_interval[0]), "log_ratio_ci_high": float(self.total_interval[1]),
                      "method": self.total_interval[2]},
            "sum_loo_effects": float(self.table["loo_effect"].sum()),
            "interaction_loo": total - float(self.table["loo_effect"].sum()),
            "groups": rows,
            "definitions": {
                "total": "T_i = mean_k log(||v_theta|| / ||v_ref||), guided velocity, theta's trajectory",
                "loo_effect": "mean_i (T_i - L_i(theta with the group reverted to the base))",
                "single_effect": "mean_i L_i(base with only the group of theta)",
                "share": "effect / mean_i T_i",
            },
            "confidence": self.config.confidence,
            "checkpoint": self.checkpoint.get("path"),
            "base": self.checkpoint.get("base"),
            "family": self.checkpoint.get("family"),
            "checkpoint_kind": self.checkpoint.get("kind"),
            "config": self.config.to_dict(),
            "versions": versions(),
        }
        if "single_effect" in self.table.columns:
            out["sum_single_effects"] = float(self.table["single_effect"].sum())
            out["interaction_single"] = total - out["sum_single_effects"]
        top = rows[0] if rows else None
        out["top_group"] = None if top is None else {"group": top["group"], "loo_share": top["loo_share"]}
        return out

    def save(self, out_dir, *, report: bool = True) -> dict:
        """Write ``attribution.csv``, ``samples.csv``, ``report.html`` and ``summary.json`` (last), atomically.

        ``out_dir`` is a folder path or an open :class:`~ngdiag.runs.RunFolder`; a file there that ngdiag
        did not write is never replaced.
        """
        if not isinstance(out_dir, RunFolder):
            with lock_output(out_dir) as folder:
                return self.save(folder, report=report)
        summary = self.summary()
        html = None
        if report:
            from ngdiag.report.html import render_attribution_report

            html = render_attribution_report(summary, self.table)
        table = self.table.assign(modules=[";".join(m) for m in self.table["modules"]])
        out_dir.write("attribution.csv", lambda p: table.to_csv(p, index=False))
        out_dir.write("samples.csv", lambda p: self.per_sample.to_csv(p, index=False))
        if html is not None:
            out_dir.write_text("report.html", html)
        out_dir.write_text("summary.json", json.dumps(summary, indent=2))
        return summary


def _interval(values, config: AttributionConfig, clusters) -> tuple:
    low, high, method = bootstrap_mean_interval(values, clusters=clusters, confidence=config.confidence,
                                                method=config.bootstrap, n_resamples=config.n_resamples, seed=config.seed)
    return float(low), float(high), method


def _finalize(parts: list, config: AttributionConfig, checkpoint: dict) -> AttributionResult:
    groups = [str(g) for g in parts[0]["groups"]]
    modules = json.loads(str(parts[0]["modules"]))
    kind = str(parts[0]["switch"])
    for p in parts[1:]:
        if [str(g) for g in p["groups"]] != groups:
            raise ConfigError("the batches of this attribution name different groups: rerun it with --overwrite")
    ids = np.concatenate([p["ids"] for p in parts])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if not np.array_equal(ids, np.arange(config.num_samples)):
        raise ConfigError(f"the attribution is incomplete: {config.num_samples - len(ids)} samples are missing")
    total = np.concatenate([p["total"] for p in parts])[order]
    without = np.concatenate([p["without"] for p in parts], axis=1)[:, order]
    loo = total[None, :] - without
    single = np.concatenate([p["only"] for p in parts], axis=1)[:, order] if config.single else None
    clusters = prompt_clusters(config, ids)
    mean_total = float(total.mean())

    def share(effect):
        return float(effect / mean_total) + 0.0 if mean_total != 0 else float("nan")  # + 0.0: no -0.0

    rows = []
    for j, g in enumerate(groups):
        row = {"group": g, "modules": list(modules.get(g, [g])), "loo_effect": float(loo[j].mean())}
        row["loo_ci_low"], row["loo_ci_high"], _ = _interval(loo[j], config, clusters)
        row["loo_share"] = share(row["loo_effect"])
        if single is not None:
            row["single_effect"] = float(single[j].mean())
            row["single_ci_low"], row["single_ci_high"], _ = _interval(single[j], config, clusters)
            row["single_share"] = share(row["single_effect"])
        rows.append(row)
    # ranked by the share of the total (the effect in the total's direction first: also for a deflation),
    # by the size of the effect when the total is zero
    table = pd.DataFrame(rows)
    key = table["loo_share"] if mean_total != 0 else table["loo_effect"].abs()
    table = table.iloc[np.argsort(-key.to_numpy(), kind="stable")].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.attrs["total"] = mean_total
    long = pd.DataFrame({
        "sample": np.repeat(ids, len(groups)),
        "prompt": [config.prompt_of(int(i)) for i in np.repeat(ids, len(groups))],
        "seed": np.repeat(sample_seeds(config.seed, ids), len(groups)),
        "group": np.tile(groups, len(ids)),
        "loo_effect": loo.T.reshape(-1),
        "total": np.repeat(total, len(groups)),
    })
    if single is not None:
        long.insert(5, "single_effect", single.T.reshape(-1))
    return AttributionResult(table, long, total, modules, kind, config, checkpoint,
                             total_interval=_interval(total, config, clusters))


class AttributionWorkflow(Workflow):
    """The attribution on the run engine (:mod:`ngdiag.runs`): a batch's part holds its per-sample
    log-ratios of theta, and of every group variant."""

    kind = KIND
    title = "an attribution"
    merge_command = "ngdiag merge-attribution"
    config_type = AttributionConfig
    part_files = ("attribution.npz",)

    def write_part(self, folder: RunFolder, b: int, part: dict) -> None:
        def write(path: str) -> None:
            with open(path, "wb") as fh:  # a file object: np.savez would append .npz to the temporary file's name
                np.savez(fh, **part)

        folder.write(self.part_paths(b)["attribution"], write)

    def read_part(self, path: Path, b: int) -> dict:
        with np.load(path / self.part_paths(b)["attribution"]) as data:
            return {k: data[k] for k in data.files}

    def finalize(self, parts: list) -> AttributionResult:
        return _finalize(parts, self.config, self.checkpoint)


def run_attribution(checkpoint: Checkpoint, config: AttributionConfig, *, out_dir=None, shard: tuple = (0, 1),
                    overwrite: bool = False, progress=None, report: bool = True) -> Optional[AttributionResult]:
    """Attribute ``checkpoint``'s norm inflation to its modules or blocks (see the module docstring).

    Args:
        checkpoint: a LoRA checkpoint, or a full fine-tune loaded with its base.
        config: :class:`AttributionConfig`.
        out_dir, shard, overwrite, progress, report: as for :func:`ngdiag.workflows.audit.run_audit`
            (``None`` is returned for a shard of several).

    Raises:
        CheckpointError: no reference, no LoRA adapter, or a fine-tune equal to its base.
    """
    groups = groups_of(checkpoint, config.group)  # fails before anything is written
    config.check_against(checkpoint)
    workflow = AttributionWorkflow(config, checkpoint.describe())
    modules = json.dumps({g: groups.modules(g) for g in groups.names})
    ref = checkpoint.require_ref()

    def compute(b: int) -> dict:
        ids = config.batch_ids(b)
        batch = prepare_batch(checkpoint, [config.prompt_of(i) for i in ids], sample_seeds(config.seed, ids),
                              config.sampling, sample_ids=ids)
        velocity = _GroupVelocity(batch.conditioning.guided(checkpoint.theta), batch.conditioning.guided(ref), groups,
                                  config.single)
        sample(velocity, batch.x_init, batch.sigmas)
        part = velocity.part(ids, batch.sigmas[:-1].double().cpu().numpy())
        return {**part, "modules": np.asarray(modules), "switch": np.asarray(groups.kind)}

    return run_workflow(workflow, compute, out_dir=out_dir, shard=shard, overwrite=overwrite, progress=progress,
                        report=report)


def merge_attributions(shard_dirs: Sequence, out_dir, *, overwrite: bool = False, report: bool = True) -> AttributionResult:
    """Join the shards of one attribution (``--shard i/n`` runs) into the result of a single run."""
    return merge_workflow(AttributionWorkflow, shard_dirs, out_dir, overwrite=overwrite, report=report)
