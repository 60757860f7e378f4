"""The norm-inflation audit: does this checkpoint's velocity norm exceed the reference's?

``run_audit(checkpoint, config)`` samples ``num_samples`` trajectories with theta (sample ``i``:
prompt ``i mod len(prompts)``, seed ``seed + i``), evaluates the reference at every
``(x_t, t, c)`` on the way, and summarises the per-sample log-ratio ``l_i = mean_k log r_ik`` of
the guided velocity into an inflation ``exp(mean_i l_i) - 1`` with a seeded bootstrap interval
(over prompts when samples share prompts: :func:`prompt_clusters`), a verdict (CONVENTIONS
"Inflation summary and verdict") and the t-weighted inflation (each step's log-ratio weighted by
its step size ``|t_k - t_{k+1}|``).

With an output folder the audit is durable (:mod:`ngdiag.runs`, through :class:`AuditWorkflow`):
each batch's records are written atomically to ``parts/`` as soon as the batch is done, a rerun
with the same arguments skips finished batches, and ``shard=(i, n)`` runs only batches ``b`` with
``b % n == i`` so that shards can run in separate processes or GPUs and be joined by
:func:`merge_audits` into exactly the result of a single run (batches have fixed boundaries, so
every batched forward is identical).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ngdiag.core.io import json_safe
from ngdiag.core.seeds import sample_seeds
from ngdiag.core.tensors import check_finite
from ngdiag.core.errors import ConfigError
from ngdiag.models.generation import SampleSet, prepare_batch
from ngdiag.models.loading import ADAPTER_NAME, Checkpoint
from ngdiag.models.pair import FusedLoraPair
from ngdiag.probes.paired import TRAJECTORIES, PairedVelocity, PairRecorder
from ngdiag.probes.records import NormRecord
from ngdiag.probes.renorm import RENORM_TARGETS, rl_renorm_intervention
from ngdiag.probes.spatial import SpatialMaps, SpatialRecorder
from ngdiag.runs import RunFolder, Workflow, lock_output, merge_workflow, parse_shard, run_workflow, versions
from ngdiag.core.sampling import sample
from ngdiag.quality import MEASURES, paired_differences, quality_table, radial_power_spectrum
from ngdiag.stats import InflationSummary, inflation_summary, per_step_summary

__all__ = ["AuditConfig", "AuditResult", "AuditWorkflow", "run_audit", "merge_audits", "parse_shard", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
KIND = "audit"


@dataclass
class AuditConfig(SampleSet):
    """What to audit and how (sample ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``).

    Attributes:
        prompts, num_samples, sampling, seed, batch_size: see :class:`ngdiag.models.generation.SampleSet`;
            ``num_samples`` is the bootstrap unit when each sample has its own prompt, the prompts
            are when samples share prompts (``num_samples > len(prompts)``); ``seed`` also seeds the bootstrap.
        trajectory: ``"theta"`` (default) or ``"ref"``: whose trajectory the norms are taken on.
        renorm: also sample theta with RL renormalization (eq. 3) and the reference's own
            trajectory, and compare them.
        renorm_on: ``"guided"`` or ``"cond"``.
        reward: a reward spec (``ngdiag.rewards.scorers.load_reward``) scoring base, RL and
            RL+renorm images (the paper's Table 1 row).
        tolerance, confidence, bootstrap, n_resamples: the verdict's statistics (``bootstrap`` is
            ``"BCa"`` or ``"percentile"``; the cluster bootstrap over prompts is always percentile).
        grid_size: how many samples appear in the report's image grid.
        fuse_lora: for LoRA checkpoints, evaluate theta and ref in one mixed-adapter forward
            (``True``; refused for adapters peft cannot mix, such as DoRA). ``None`` (the default)
            and ``False`` run two passes: the fused pair stays off until a GPU measurement
            (``benchmarks/gpu/run.py``, docs/performance.md) shows it faster.
        fd_encoder: an image encoder (:func:`ngdiag.quality.image_encoder` spec: ``clip:DIR``,
            ``pickscore:DIR``, ``world:DIR``, ``hpsv2:FILE``...) whose features of every decoded image give a
            Fréchet distance of each model to the base (needs ``reward``: all images are decoded then).
        sample_base: with a reward, also sample the base on its own trajectory and score it (the
            default). ``ngdiag sweep`` and ``ngdiag compare`` sample the base once for many
            checkpoints and turn it off for the others; it needs ``trajectory="theta"`` and no
            ``renorm`` (which compares against the base's samples).
        spatial_maps: keep every sample's own spatial ratio map (:mod:`ngdiag.probes.spatial`) in the
            result and in ``spatial.npz``; by default only the image grid's samples keep theirs. The
            mean map over samples and the per-step maps are always kept.
    """

    trajectory: str = "theta"
    renorm: bool = False
    renorm_on: str = "guided"
    reward: Optional[str] = None
    tolerance: float = 0.01
    confidence: float = 0.95
    bootstrap: str = "BCa"
    n_resamples: int = 2000
    grid_size: int = 4
    fuse_lora: Optional[bool] = None
    sample_base: bool = True
    fd_encoder: Optional[str] = None
    spatial_maps: bool = False

    _needs_two = "an audit needs at least 2 samples for a confidence interval"
    _added_fields = {"sample_base": True, "fd_encoder": None, "spatial_maps": False}  # since 0.1.0

    def __post_init__(self):
        super().__post_init__()
        if self.trajectory not in TRAJECTORIES:
            raise ConfigError(f"trajectory must be 'theta' or 'ref', got {self.trajectory!r}")
        if self.renorm_on not in RENORM_TARGETS:
            raise ConfigError(f"renorm_on must be 'guided' or 'cond', got {self.renorm_on!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must lie in (0, 1), got {self.confidence}")
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be non-negative, got {self.tolerance}")
        if self.fd_encoder is not None and self.reward is None:
            raise ConfigError("a Fréchet distance (fd_encoder) needs a reward: images are decoded only with one")
        if not self.sample_base and (self.trajectory != "theta" or self.renorm):
            raise ConfigError("sample_base=False needs trajectory='theta' and no renorm (both use the base's samples)")


@dataclass
class AuditResult:
    """The outcome of an audit.

    Attributes:
        record: per-step, per-call, per-sample norms (:class:`NormRecord`).
        inflation: the guided-velocity inflation summary and verdict.
        per_step: per-step curves for both calls (column ``call``).
        per_sample: one row per sample: prompt, seed, mean ratio, log-ratio.
        rewards: per-sample rewards by model (``base``, ``rl``, ``rl+renorm``) or ``None``.
        renorm: renormalization comparison (final-latent distances) or ``None``.
        images: decoded images for the grid by model name, arrays ``(G, 3, H, W)`` in [0, 1].
        quality: per-sample image-quality measures (:mod:`ngdiag.quality`) of every decoded model
            (``sample``, ``model`` and one column per measure; clipping counted before the final clamp),
            when all images are decoded (a reward is given), else ``None``.
        spectrum: the mean radial power spectrum of luma per model (``frequency`` in cycles per pixel,
            ``model``, ``power``: the mean over samples), with ``quality``, else ``None``.
        features: ``{model: (N, D) array}`` of the ``fd_encoder``'s features of every image, in sample order.
        frechet: ``{model: FrechetResult}`` of every model other than the base against the base's images.
        spatial: where the ratio sits on the latent grid (:class:`~ngdiag.probes.spatial.SpatialMaps`:
            the mean map ``(h, w)``, the per-step maps ``(steps, h, w)``, per-sample maps
            ``(samples, h, w)`` of the grid's samples or of all with ``spatial_maps``), or ``None`` for
            audits written before spatial maps existed.
        config: the audit config; checkpoint: what was audited.
    """

    record: NormRecord
    inflation: InflationSummary
    per_step: pd.DataFrame
    per_sample: pd.DataFrame
    config: AuditConfig
    checkpoint: dict
    rewards: Optional[pd.DataFrame] = None
    renorm: Optional[dict] = None
    images: dict = field(default_factory=dict)
    quality: Optional[pd.DataFrame] = None
    spectrum: Optional[pd.DataFrame] = None
    features: dict = field(default_factory=dict)
    frechet: dict = field(default_factory=dict)
    spatial: Optional[SpatialMaps] = None

    @property
    def verdict(self) -> str:
        return self.inflation.verdict

    def to_frame(self) -> pd.DataFrame:
        """The long records table (step, t, call, sample, metric, value, t_next)."""
        return self.record.to_frame()

    def summary(self) -> dict:
        """The versioned ``summary.json`` document."""
        guided = self.per_step[self.per_step["call"] == "guided"]
        per_step = [
            {k: json_safe(row[k]) for k in ("step", "t", "mean_ratio", "ci_low", "ci_high", "mean_cos", "radial_share")}
            for _, row in guided.iterrows()
        ]
        out = {
            "schema_version": SCHEMA_VERSION,
            "verdict": self.inflation.verdict,
            "inflation": {
                "value": self.inflation.value,
                "ci_low": self.inflation.ci_low,
                "ci_high": self.inflation.ci_high,
                "confidence": self.inflation.confidence,
                "tolerance": self.inflation.tolerance,
                "method": self.inflation.method,
                "interval_unit": self.inflation.interval_unit,
                "num_clusters": self.inflation.num_clusters,
                "differs_from_zero": self.inflation.differs_from_zero,
                "t_weighted": {
                    "value": self.inflation.t_weighted_value,
                    "ci_low": self.inflation.t_weighted_ci_low,
                    "ci_high": self.inflation.t_weighted_ci_high,
                    "method": self.inflation.t_weighted_method,
                },
            },
            "per_step": per_step,
            "num_samples": int(self.record.num_samples),
            "num_steps": int(self.record.num_steps),
            "checkpoint": self.checkpoint.get("path"),
            "base": self.checkpoint.get("base"),
            "family": self.checkpoint.get("family"),
            "checkpoint_kind": self.checkpoint.get("kind"),
            **{k: self.checkpoint[k] for k in ("lora", "notes") if k in self.checkpoint},
            "config": self.config.to_dict(),
            "versions": versions(),
        }
        if self.renorm is not None:
            out["renorm"] = self.renorm
        if self.rewards is not None:
            out["reward"] = reward_block(self.rewards, self.config.reward)
        if self.quality is not None:
            samples = np.sort(self.quality["sample"].unique())
            out["quality"] = quality_block(self.quality, confidence=self.config.confidence, method=self.config.bootstrap,
                                           n_resamples=self.config.n_resamples, seed=self.config.seed,
                                           clusters=prompt_clusters(self.config, samples))
            if self.frechet:
                out["quality"]["frechet"] = {"encoder": self.config.fd_encoder,
                                             **{m: asdict(r) for m, r in self.frechet.items()}}
        if self.spatial is not None:
            out["spatial"] = self.spatial.summary()
        return out

    def save(self, out_dir, *, report: bool = True) -> dict:
        """Write ``summary.json``, ``steps.csv``, ``records.parquet`` and ``report.html`` atomically.

        ``out_dir`` is a folder path or an open :class:`~ngdiag.runs.RunFolder`. Everything is
        rendered before the first file is written, and ``summary.json`` is written last; a file in
        the folder that ngdiag did not write is never replaced.
        """
        if not isinstance(out_dir, RunFolder):
            with lock_output(out_dir) as folder:
                return self.save(folder, report=report)
        summary = self.summary()
        html = None
        if report:
            from ngdiag.report.html import render_audit_report

            html = render_audit_report(summary, self.per_step, self.per_sample, images=self.images or None,
                                       prompts=self.config.prompts, spectrum=self.spectrum, spatial=self.spatial)
        out_dir.write("steps.csv", lambda p: self.per_step.to_csv(p, index=False))
        out_dir.write("records.parquet", lambda p: self.to_frame().to_parquet(p, index=False))
        if self.quality is not None:
            out_dir.write("quality.csv", lambda p: self.quality.to_csv(p, index=False))
        if self.spectrum is not None:
            out_dir.write("spectrum.csv", lambda p: self.spectrum.to_csv(p, index=False))
        if self.spatial is not None:
            out_dir.write("spatial.npz", lambda p: _savez(p, **self.spatial.arrays()))
        if html is not None:
            out_dir.write_text("report.html", html)
        out_dir.write_text("summary.json", json.dumps(summary, indent=2))
        return summary


def reward_block(rewards: pd.DataFrame, spec: Optional[str]) -> dict:
    """The paper's Table 1 row: reward of base, RL and RL+renorm with their spread over samples.

    The deltas come with the standard deviation of the paired per-sample differences (same prompt
    and seed), ``delta_*_std``. For rewards with published alternative scales (PickScore, HPSv2:
    :func:`ngdiag.rewards.specs.reward_scales`) ``raw_scale`` says what the raw numbers are and
    ``scales`` holds, per scale name, its ``factor``, ``description``, ``source`` and the same rows
    and deltas on that scale (``factor`` times the raw values, spreads times ``|factor|``).
    """
    from ngdiag.rewards.specs import reward_scales

    rows = []
    means = {}
    for model in ("base", "rl", "rl+renorm"):
        values = rewards.loc[rewards["model"] == model, "reward"].to_numpy(dtype=float)
        if len(values) == 0:
            continue
        means[model] = float(values.mean())
        rows.append({"model": model, "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "n": int(len(values))})
    block = {"name": spec, "rows": rows}
    wide = rewards.pivot_table(index="sample", columns="model", values="reward", aggfunc="first")
    deltas = ("delta_rl_minus_base", "delta_renorm_minus_rl")
    for key, (a, b) in zip(deltas, (("rl", "base"), ("rl+renorm", "rl"))):
        if a in means and b in means:
            diff = (wide[a] - wide[b]).to_numpy(dtype=float)  # paired: same prompt and seed
            block[key] = means[a] - means[b]
            block[f"{key}_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    raw_scale, scales = reward_scales(spec)
    if scales:
        block["raw_scale"] = raw_scale
        block["scales"] = {}
        for scale in scales:
            f = scale.factor
            entry = {"factor": f, "description": scale.description, "source": scale.source,
                     "rows": [{**r, "mean": f * r["mean"], "std": abs(f) * r["std"]} for r in rows]}
            for key in deltas:
                if key in block:
                    entry[key] = f * block[key]
                    entry[f"{key}_std"] = abs(f) * block[f"{key}_std"]
            block["scales"][scale.name] = entry
    return block


def quality_block(quality: pd.DataFrame, *, confidence: float = 0.95, method: str = "BCa", n_resamples: int = 2000,
                  seed: int = 0, clusters=None) -> dict:
    """Mean and spread of every quality measure per model, and the paired differences (same prompt and
    seed) of ``rl`` and ``rl+renorm`` against ``base`` with their standard deviation and a seeded
    bootstrap interval (``ci_low``, ``ci_high``: :func:`ngdiag.quality.paired_differences`, settings
    under ``interval``): over samples, or over prompts when ``clusters`` (each sample's prompt, in sample
    order: :func:`prompt_clusters`) repeats, as the inflation's interval."""
    from ngdiag.stats import bootstrap_unit

    unit = "samples (paired: same prompt and seed)"
    if clusters is not None:
        kind, count = bootstrap_unit(clusters, len(clusters))
        if kind == "prompts":
            unit = f"prompts ({count} prompts; paired: same prompt and seed)"
    block: dict = {"measures": list(MEASURES), "models": {}}
    models = [m for m in ("base", "rl", "rl+renorm") if m in set(quality["model"])]
    for model in models:
        sub = quality[quality["model"] == model]
        block["models"][model] = {
            k: {"mean": float(sub[k].mean()), "std": float(sub[k].std(ddof=1)) if len(sub) > 1 else 0.0} for k in MEASURES
        }
    if "base" in models:
        for model in models[1:]:
            panel = (paired_differences(quality, model, "base", measures=list(MEASURES), confidence=confidence,
                                        method=method, n_resamples=n_resamples, seed=seed, clusters=clusters)
                     if quality["sample"].nunique() > 1 else None)
            diffs = {}
            for j, k in enumerate(MEASURES):
                wide = quality.pivot_table(index="sample", columns="model", values=k, aggfunc="first")
                d = (wide[model] - wide["base"]).to_numpy(dtype=float)
                diffs[k] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                            "ci_low": float(panel.ci_low[j]) if panel is not None else None,
                            "ci_high": float(panel.ci_high[j]) if panel is not None else None}
            block[f"delta_{model.replace('+', '_')}_minus_base"] = diffs
            if panel is not None:
                block["interval"] = {"confidence": panel.confidence, "method": panel.method,
                                     "n_resamples": panel.n_resamples, "seed": panel.seed,
                                     "unit": unit}
    return block


# ----------------------------------------------------------------------------- the run
class _BatchRunner:
    """Runs one batch: the paired trajectory, plus base / renorm trajectories and rewards when asked."""

    def __init__(self, checkpoint: Checkpoint, config: AuditConfig, reward=None, encoder=None):
        self.ckpt = checkpoint
        self.config = config
        self.reward = reward
        self.encoder = encoder
        self.ref = checkpoint.require_ref()

    def run(self, b: int) -> dict:
        cfg = self.config
        ids = cfg.batch_ids(b)
        prompts = [cfg.prompt_of(i) for i in ids]
        seeds = sample_seeds(cfg.seed, ids)
        batch = prepare_batch(self.ckpt, prompts, seeds, cfg.sampling, sample_ids=ids)
        theta_g = batch.conditioning.guided(self.ckpt.theta)
        ref_g = batch.conditioning.guided(self.ref)
        fused = None
        if self.ckpt.is_lora and cfg.fuse_lora:  # None (the default) is off: docs/performance.md
            fused = FusedLoraPair(batch.conditioning, self.ckpt.theta, ADAPTER_NAME)
        recorder = PairRecorder(ids)
        h, w = batch.config.height, batch.config.width
        spatial = SpatialRecorder(ids, lambda v: self.ckpt.adapter.latent_grid(v, h, w))

        def record(step):
            recorder(step)
            spatial(step)

        main = sample(PairedVelocity(theta_g, ref_g, trajectory=cfg.trajectory, fused=fused), batch.x_init, batch.sigmas,
                      callback=record)
        grid = [j for j, i in enumerate(ids) if i < cfg.grid_size]
        out = {"record": recorder.record(), "ids": ids, "images": {}, "rewards": [], "distances": [], "quality": [],
               "spectrum": None, "features": {},
               "spatial": spatial.part(keep=None if cfg.spatial_maps else [ids[j] for j in grid])}
        needs_extra = cfg.renorm or cfg.reward is not None
        finals = {"rl" if cfg.trajectory == "theta" else "base": main.x_final}
        if needs_extra:
            if cfg.trajectory == "theta":
                if cfg.sample_base:
                    finals["base"] = sample(ref_g, batch.x_init, batch.sigmas).x_final
            else:
                finals["rl"] = sample(theta_g, batch.x_init, batch.sigmas).x_final
            if cfg.renorm:
                renorm = rl_renorm_intervention(cfg.renorm_on, guidance=theta_g, sample_ids=ids)
                finals["rl+renorm"] = sample(PairedVelocity(theta_g, ref_g, fused=fused), batch.x_init, batch.sigmas,
                                             intervention=renorm).x_final
        for name, x in finals.items():
            check_finite(x, f"the {name} samples are not finite (NaN or inf) after the last step", sample_ids=ids)
        if cfg.renorm:
            base = finals["base"].reshape(len(ids), -1).double()
            for name in ("rl", "rl+renorm"):
                dist = (finals[name].reshape(len(ids), -1).double() - base).norm(dim=1) / base.norm(dim=1)
                out["distances"] += [{"sample": i, "model": name, "relative_distance_to_base": float(d)} for i, d in zip(ids, dist)]
        decode_all = self.reward is not None
        for name, x in finals.items():
            if not decode_all and not grid:
                continue
            decoded_ids = ids if decode_all else [ids[j] for j in grid]
            with torch.no_grad():
                raw = self.ckpt.adapter.decode(x if decode_all else x[grid], h, w, clamp=False).float().cpu()
            check_finite(raw, f"the decoded {name} images are not finite (NaN or inf)", sample_ids=decoded_ids,
                         hint="(the latents are finite: check the VAE)")
            images = raw.clamp(0, 1)
            if decode_all:
                table = quality_table(raw)
                out["quality"] += [{"sample": i, "model": name, **row} for i, row in zip(ids, table.to_dict("records"))]
                frequency, power = radial_power_spectrum(raw)  # summed here, averaged over all samples at the end
                spectrum = out["spectrum"] or {"frequency": frequency.tolist(), "count": len(ids), "power_sum": {}}
                spectrum["power_sum"][name] = power.sum(dim=0).tolist()
                out["spectrum"] = spectrum
                with torch.no_grad():
                    scores = self.reward(images.to(self.ckpt.adapter.device), prompts).float().cpu()
                check_finite(scores, f"the reward of the {name} images are not finite (NaN or inf)", sample_ids=ids,
                             hint=f"({cfg.reward})")
                out["rewards"] += [{"sample": i, "model": name, "reward": float(s)} for i, s in zip(ids, scores)]
                if self.encoder is not None:
                    out["features"][name] = self.encoder.encode(images).numpy()
                images = images[grid]
            if grid:
                out["images"][name] = images.numpy()
        out["grid_ids"] = [ids[j] for j in grid]
        return out




def prompt_clusters(config: AuditConfig, sample_ids) -> np.ndarray:
    """Each sample's prompt as a cluster label for the bootstrap: the index of the first occurrence of
    its prompt text in ``config.prompts`` (sample ``i`` uses prompt ``i mod len(prompts)``; a prompt
    listed twice is one cluster)."""
    first = {}
    for j, p in enumerate(config.prompts):
        first.setdefault(p, j)
    return np.asarray([first[config.prompt_of(int(i))] for i in sample_ids], dtype=np.int64)


def _grid_images(parts: list, grid_size: int) -> dict:
    """The image grid in sample order, whatever order the parts come in (shards, resumes)."""
    if not parts:
        return {}
    ids = np.concatenate([np.asarray(i) for i, _ in parts])
    order = np.argsort(ids, kind="stable")
    models = list(parts[0][1])
    return {k: np.concatenate([arrays[k] for _, arrays in parts])[order][:grid_size] for k in models}


def _finalize(parts: dict, config: AuditConfig, checkpoint: dict) -> AuditResult:
    record = NormRecord.concat(parts["records"])
    expected = np.arange(config.num_samples)
    if not np.array_equal(record.sample_ids, expected):
        raise ConfigError(f"the audit is incomplete: {config.num_samples - record.num_samples} samples are missing")
    ratios = record.metric("ratio", "guided")
    inflation = inflation_summary(ratios, confidence=config.confidence, tolerance=config.tolerance,
                                  method=config.bootstrap, n_resamples=config.n_resamples, seed=config.seed,
                                  clusters=prompt_clusters(config, record.sample_ids),
                                  times=np.append(record.times, record.t_next[-1:]))
    frames = []
    for call in record.calls:
        frame = per_step_summary(record.metric("ratio", call), record.times, cos=record.metric("cos", call),
                                 radial_share=record.metric("radial_share", call), confidence=config.confidence,
                                 seed=config.seed)
        frame["mean_norm_theta"] = record.metric("norm_theta", call).mean(axis=1)
        frame["mean_norm_ref"] = record.metric("norm_ref", call).mean(axis=1)
        frame.insert(0, "call", call)
        frames.append(frame)
    per_step = pd.concat(frames, ignore_index=True)
    log_ratio = np.log(ratios).mean(axis=0)
    per_sample = pd.DataFrame({
        "sample": record.sample_ids,
        "prompt": [config.prompt_of(int(i)) for i in record.sample_ids],
        "seed": sample_seeds(config.seed, record.sample_ids),
        "mean_ratio": ratios.mean(axis=0),
        "log_ratio": log_ratio,
    })
    rewards = pd.DataFrame(parts["rewards"]).sort_values(["model", "sample"], ignore_index=True) if parts["rewards"] else None
    renorm = None
    if parts["distances"]:
        # sample order, whatever order the parts come in: merged shards sum in the single run's order
        d = pd.DataFrame(parts["distances"]).sort_values(["model", "sample"], kind="stable", ignore_index=True)
        renorm = {"velocity": config.renorm_on, "equation": "v' = v_theta * ||v_ref|| / ||v_theta|| (paper eq. 3)"}
        for model, sub in d.groupby("model"):
            key = model.replace("+", "_")
            renorm[f"{key}_relative_distance_to_base_mean"] = float(sub["relative_distance_to_base"].mean())
            renorm[f"{key}_relative_distance_to_base_std"] = float(sub["relative_distance_to_base"].std(ddof=1)) if len(sub) > 1 else 0.0
    images = _grid_images(parts["images"], config.grid_size)
    quality = (pd.DataFrame(parts["quality"]).sort_values(["model", "sample"], kind="stable", ignore_index=True)
               if parts.get("quality") else None)
    spectrum = _mean_spectrum(parts.get("spectra") or []) if quality is not None else None
    features, frechet = _features(parts.get("features") or [], config)
    spatial_parts = parts.get("spatial") or []
    # audits written before spatial maps existed have none; a partial set (a resumed old run) gives none either
    spatial = SpatialMaps.join(spatial_parts) if spatial_parts and all(p is not None for p in spatial_parts) else None
    return AuditResult(record, inflation, per_step, per_sample, config, checkpoint, rewards, renorm, images, quality,
                       spectrum, features, frechet, spatial)


def _features(parts: list, config: AuditConfig) -> tuple:
    """The encoder's features per model in sample order, and each model's Fréchet distance to the base."""
    from ngdiag.quality import frechet_of_features

    if not parts or any(not f for _, f in parts):
        return {}, {}
    ids = np.concatenate([np.asarray(i) for i, _ in parts])
    order = np.argsort(ids, kind="stable")
    features = {m: np.concatenate([f[m] for _, f in parts])[order] for m in parts[0][1]}
    frechet = {}
    if "base" in features and config.num_samples >= 2:
        for model in (m for m in ("rl", "rl+renorm") if m in features):
            frechet[model] = frechet_of_features(features[model], features["base"], encoder=str(config.fd_encoder))
    return features, frechet


def _mean_spectrum(spectra: list) -> Optional[pd.DataFrame]:
    """The per-model mean radial power spectrum from the batches' sums (in batch order, so that merged
    shards sum exactly as a single run does); ``None`` when a batch has none (written by an earlier ngdiag)."""
    if not spectra or any(s is None for s in spectra):
        return None
    frequency = np.asarray(spectra[0]["frequency"], dtype=float)
    count = sum(int(s["count"]) for s in spectra)
    rows = []
    models = list(spectra[0]["power_sum"])
    order = ("base", "rl", "rl+renorm")
    for model in [m for m in order if m in models] + [m for m in models if m not in order]:
        total = np.zeros_like(frequency)
        for s in spectra:
            total = total + np.asarray(s["power_sum"][model], dtype=float)
        rows.append(pd.DataFrame({"frequency": frequency, "model": model, "power": total / count}))
    return pd.concat(rows, ignore_index=True)


class AuditWorkflow(Workflow):
    """The audit on the run engine (:mod:`ngdiag.runs`): a batch's part holds its norm records, its
    rewards and renorm distances (``extras``) and its image-grid samples."""

    kind = KIND
    title = "an audit"
    merge_command = "ngdiag merge"
    config_type = AuditConfig
    part_files = ("images.npz", "features.npz", "extras.json", "spatial.npz", "records.parquet")  # the records last: they mark the batch done

    def write_part(self, folder: RunFolder, b: int, part: dict) -> None:
        names = self.part_paths(b)
        if part["images"]:
            arrays = {k.replace("+", "_plus_"): v for k, v in part["images"].items()}
            folder.write(names["images"], lambda p: _savez(p, ids=np.asarray(part["grid_ids"]), **arrays))
        if part.get("features"):
            arrays = {k.replace("+", "_plus_"): v for k, v in part["features"].items()}
            folder.write(names["features"], lambda p: _savez(p, ids=np.asarray(part["ids"]), **arrays))
        folder.write_text(names["extras"], json.dumps({"rewards": part["rewards"], "distances": part["distances"],
                                                       "quality": part["quality"], "spectrum": part.get("spectrum")}))
        if part.get("spatial") is not None:
            folder.write(names["spatial"], lambda p: _savez(p, **{k: np.asarray(v) for k, v in part["spatial"].items()}))
        folder.write(names["records"], lambda p: part["record"].to_frame().to_parquet(p, index=False))

    def read_part(self, path: Path, b: int) -> dict:
        names = {k: path / v for k, v in self.part_paths(b).items()}
        extras = json.loads(names["extras"].read_text(encoding="utf-8"))
        part = {"record": NormRecord.from_frame(pd.read_parquet(names["records"])), "rewards": extras["rewards"],
                "distances": extras["distances"], "quality": extras.get("quality", []),
                "spectrum": extras.get("spectrum"), "images": {}, "grid_ids": []}
        part["spatial"] = None
        if names["spatial"].is_file():  # absent in parts written before spatial maps existed
            with np.load(names["spatial"]) as data:
                part["spatial"] = {k: data[k] for k in data.files}
        if names["images"].is_file():
            with np.load(names["images"]) as data:
                part["grid_ids"] = data["ids"]
                part["images"] = {key.replace("_plus_", "+"): data[key] for key in data.files if key != "ids"}
        part["features"], part["ids"] = {}, part["record"].sample_ids
        if names["features"].is_file():
            with np.load(names["features"]) as data:
                part["ids"] = data["ids"]
                part["features"] = {key.replace("_plus_", "+"): data[key] for key in data.files if key != "ids"}
        return part

    def finalize(self, parts: list) -> AuditResult:
        joined = {"records": [p["record"] for p in parts], "rewards": [r for p in parts for r in p["rewards"]],
                  "distances": [d for p in parts for d in p["distances"]],
                  "quality": [q for p in parts for q in p.get("quality", [])],
                  "spectra": [p.get("spectrum") for p in parts],
                  "features": [(p["ids"], p.get("features") or {}) for p in parts] if self.config.fd_encoder else [],
                  "images": [(p["grid_ids"], p["images"]) for p in parts if p["images"]],
                  "spatial": [p.get("spatial") for p in parts]}
        return _finalize(joined, self.config, self.checkpoint)


def _savez(path: str, **arrays) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append .npz to the temporary file's name
        np.savez_compressed(fh, **arrays)


def run_audit(checkpoint: Checkpoint, config: AuditConfig, *, out_dir=None, shard: tuple = (0, 1), overwrite: bool = False,
              progress=None, report: bool = True) -> Optional[AuditResult]:
    """Audit ``checkpoint`` for norm inflation.

    Args:
        checkpoint: a loaded checkpoint with a reference (``load_checkpoint(path, base)``).
        config: :class:`AuditConfig`.
        out_dir: folder for durable, resumable output (a path, or a :class:`~ngdiag.runs.RunFolder`
            from ``open_output(..., kind="audit")``); ``None`` keeps everything in memory. The
            folder is locked for the run; it must not be, contain or lie inside the checkpoint or base.
        shard: ``(i, n)``: run only batches ``b`` with ``b % n == i``. With ``n > 1`` the shard's
            parts are written and ``None`` is returned: join shards with :func:`merge_audits`.
        overwrite: replace ngdiag's own output in a non-resumable ``out_dir`` (files ngdiag did not
            write are never touched).
        progress: a :class:`~ngdiag.runs.RunProgress` (``start(total, reused)``, ``advance()``,
            ``finish()``), or a function ``f(done_batches, total_batches)`` called after each batch.
        report: also render ``report.html`` when saving.

    Returns:
        The :class:`AuditResult` (``None`` for a shard of several).
    """
    checkpoint.require_ref()  # fail before any work when there is no reference
    config.check_against(checkpoint)  # image size and the like: before anything is written
    reward = None
    if config.reward is not None:
        from ngdiag.rewards.scorers import load_reward

        reward = load_reward(config.reward, device=checkpoint.adapter.device)
    encoder = None
    if config.fd_encoder is not None:
        from ngdiag.quality import image_encoder

        encoder = image_encoder(config.fd_encoder, device=checkpoint.adapter.device)
    workflow = AuditWorkflow(config, checkpoint.describe())
    runner = _BatchRunner(checkpoint, config, reward, encoder)
    return run_workflow(workflow, runner.run, out_dir=out_dir, shard=shard, overwrite=overwrite, progress=progress,
                        report=report)


def merge_audits(shard_dirs: Sequence, out_dir, *, overwrite: bool = False, report: bool = True) -> AuditResult:
    """Join the shards of one audit (``--shard i/n`` runs) into the result of a single run.

    The merged ``summary.json`` and ``report.html`` are byte for byte those of the single run.
    Every shard folder is checked first (a finished audit, the same arguments and split, each shard
    once, every part present). ``out_dir`` is a folder path or an open :class:`~ngdiag.runs.RunFolder`;
    it must not be, contain or lie inside a shard folder.
    """
    return merge_workflow(AuditWorkflow, shard_dirs, out_dir, overwrite=overwrite, report=report)
