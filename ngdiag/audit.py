"""The norm-inflation audit: does this checkpoint's velocity norm exceed the reference's?

``run_audit(checkpoint, config)`` samples ``num_samples`` trajectories with theta (sample ``i``:
prompt ``i mod len(prompts)``, seed ``seed + i``), evaluates the reference at every
``(x_t, t, c)`` on the way, and summarises the per-sample log-ratio ``l_i = mean_k log r_ik`` of
the guided velocity into an inflation ``exp(mean_i l_i) - 1`` with a seeded bootstrap interval
and a verdict (CONVENTIONS "Inflation summary and verdict").

With an output folder the audit is durable: each batch's records are written atomically to
``parts/`` as soon as the batch is done, a rerun with the same arguments skips finished batches,
and ``shard=(i, n)`` runs only batches ``b`` with ``b % n == i`` so that shards can run in
separate processes or GPUs and be joined by :func:`merge_audits` into exactly the result of a
single run (batches have fixed boundaries, so every batched forward is identical).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

import ngdiag
from ngdiag.durable import (
    atomic_write as _atomic_write,
    atomic_write_text as _atomic_write_text,
    parse_shard,
    prepare_output,
    read_state,
    shard_batches,
    STATE_FILE,
)
from ngdiag.errors import ConfigError
from ngdiag.generation import SampleSet, prepare_batch
from ngdiag.models.loading import Checkpoint
from ngdiag.probes.paired import PairedVelocity, check_velocity_finite
from ngdiag.probes.records import NormRecord
from ngdiag.sampling import sample
from ngdiag.stats import InflationSummary, inflation_summary, per_step_summary

__all__ = ["AuditConfig", "AuditResult", "run_audit", "merge_audits", "parse_shard", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
KIND = "audit"


@dataclass
class AuditConfig(SampleSet):
    """What to audit and how (sample ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``).

    Attributes:
        prompts, num_samples, sampling, seed, batch_size: see :class:`ngdiag.generation.SampleSet`;
            ``num_samples`` is the bootstrap unit, ``seed`` also seeds the bootstrap.
        trajectory: ``"theta"`` (default) or ``"ref"``: whose trajectory the norms are taken on.
        renorm: also sample theta with RL renormalization (eq. 3) and the reference's own
            trajectory, and compare them.
        renorm_on: ``"guided"`` or ``"cond"``.
        reward: a reward spec (``ngdiag.sensitivity.rewards.load_reward``) scoring base, RL and
            RL+renorm images (the paper's Table 1 row).
        tolerance, confidence, bootstrap, n_resamples: the verdict's statistics.
        grid_size: how many samples appear in the report's image grid.
        fuse_lora: for LoRA checkpoints, evaluate theta and ref in one mixed-adapter forward
            (``None``: on CUDA only, where ``benchmarks/bench_lora_pair.py`` measures it faster, and
            only for adapters peft can mix: not DoRA).
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

    _needs_two = "an audit needs at least 2 samples for a confidence interval"

    def __post_init__(self):
        super().__post_init__()
        if self.trajectory not in ("theta", "ref"):
            raise ConfigError(f"trajectory must be 'theta' or 'ref', got {self.trajectory!r}")
        if self.renorm_on not in ("guided", "cond"):
            raise ConfigError(f"renorm_on must be 'guided' or 'cond', got {self.renorm_on!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must lie in (0, 1), got {self.confidence}")
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be non-negative, got {self.tolerance}")


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
            {k: _py(row[k]) for k in ("step", "t", "mean_ratio", "ci_low", "ci_high", "mean_cos", "radial_share")}
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
        return out

    def save(self, out_dir, *, report: bool = True) -> dict:
        """Write ``summary.json``, ``steps.csv``, ``records.parquet`` and ``report.html`` atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        _atomic_write(out / "steps.csv", lambda p: self.per_step.to_csv(p, index=False))
        _atomic_write(out / "records.parquet", lambda p: self.to_frame().to_parquet(p, index=False))
        if report:
            from ngdiag.report.html import render_audit_report, write_html

            html = render_audit_report(summary, self.per_step, self.per_sample, images=self.images or None,
                                       prompts=self.config.prompts)
            write_html(html, out / "report.html")
        return summary


def _py(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    return v


def versions() -> dict:
    import diffusers
    import peft
    import scipy
    import transformers

    return {
        "ngdiag": ngdiag.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def reward_block(rewards: pd.DataFrame, spec: Optional[str]) -> dict:
    """The paper's Table 1 row: reward of base, RL and RL+renorm with their spread over samples.

    The deltas come with the standard deviation of the paired per-sample differences (same prompt
    and seed), ``delta_*_std``.
    """
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
    for key, (a, b) in {"delta_rl_minus_base": ("rl", "base"), "delta_renorm_minus_rl": ("rl+renorm", "rl")}.items():
        if a in means and b in means:
            diff = (wide[a] - wide[b]).to_numpy(dtype=float)  # paired: same prompt and seed
            block[key] = means[a] - means[b]
            block[f"{key}_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    return block


# ----------------------------------------------------------------------------- the run
class _BatchRunner:
    """Runs one batch: the paired trajectory, plus base / renorm trajectories and rewards when asked."""

    def __init__(self, checkpoint: Checkpoint, config: AuditConfig, reward=None):
        self.ckpt = checkpoint
        self.config = config
        self.reward = reward
        self.ref = checkpoint.require_ref()

    def _fusable(self) -> bool:
        """The default for LoRA pairs: fused on CUDA, when peft can mix the adapter in one batch."""
        from ngdiag.models.loading import mixed_batch_problem

        return self.ckpt.adapter.device.type == "cuda" and mixed_batch_problem(self.ckpt.theta) is None

    def run(self, b: int) -> dict:
        cfg = self.config
        ids = cfg.batch_ids(b)
        prompts = [cfg.prompt_of(i) for i in ids]
        seeds = [cfg.seed + i for i in ids]
        batch = prepare_batch(self.ckpt, prompts, seeds, cfg.sampling, sample_ids=ids)
        theta_g = batch.conditioning.guided(self.ckpt.theta)
        ref_g = batch.conditioning.guided(self.ref)
        fused = None
        if self.ckpt.is_lora and (cfg.fuse_lora or (cfg.fuse_lora is None and self._fusable())):
            from ngdiag.models.loading import ADAPTER_NAME
            from ngdiag.probes.paired import FusedLoraPair

            fused = FusedLoraPair(batch.conditioning, self.ckpt.theta, ADAPTER_NAME)
        paired = PairedVelocity(theta_g, ref_g, batch.sigmas, ids, trajectory=cfg.trajectory, fused=fused)
        main = sample(paired, batch.x_init, batch.sigmas)
        out = {"record": paired.recorder.record(), "ids": ids, "images": {}, "rewards": [], "distances": []}
        needs_extra = cfg.renorm or cfg.reward is not None
        grid = [j for j, i in enumerate(ids) if i < cfg.grid_size]
        finals = {"rl" if cfg.trajectory == "theta" else "base": main.x_final}
        if needs_extra:
            if cfg.trajectory == "theta":
                finals["base"] = sample(ref_g, batch.x_init, batch.sigmas).x_final
            else:
                finals["rl"] = sample(theta_g, batch.x_init, batch.sigmas).x_final
            if cfg.renorm:
                renormed = PairedVelocity(theta_g, ref_g, batch.sigmas, ids, renorm="rl", renorm_on=cfg.renorm_on, record=False)
                finals["rl+renorm"] = sample(renormed, batch.x_init, batch.sigmas).x_final
        for name, x in finals.items():
            check_velocity_finite(x, who=f"the {name} sample", step=cfg.sampling.num_steps, t=0.0, sample_ids=ids)
        if cfg.renorm:
            base = finals["base"].reshape(len(ids), -1).double()
            for name in ("rl", "rl+renorm"):
                dist = (finals[name].reshape(len(ids), -1).double() - base).norm(dim=1) / base.norm(dim=1)
                out["distances"] += [{"sample": i, "model": name, "relative_distance_to_base": float(d)} for i, d in zip(ids, dist)]
        decode_all = self.reward is not None
        h, w = batch.config.height, batch.config.width
        for name, x in finals.items():
            if not decode_all and not grid:
                continue
            with torch.no_grad():
                images = self.ckpt.adapter.decode(x if decode_all else x[grid], h, w).float().cpu()
            if decode_all:
                with torch.no_grad():
                    scores = self.reward(images.to(self.ckpt.adapter.device), prompts).float().cpu()
                out["rewards"] += [{"sample": i, "model": name, "reward": float(s)} for i, s in zip(ids, scores)]
                images = images[grid]
            if grid:
                out["images"][name] = images.numpy()
        out["grid_ids"] = [ids[j] for j in grid]
        return out


def _part_paths(out: Path, b: int) -> dict:
    parts = out / "parts"
    return {
        "records": parts / f"records-b{b:05d}.parquet",
        "extras": parts / f"extras-b{b:05d}.json",
        "images": parts / f"images-b{b:05d}.npz",
    }


def _write_part(out: Path, b: int, result: dict) -> None:
    paths = _part_paths(out, b)
    paths["records"].parent.mkdir(parents=True, exist_ok=True)
    if result["images"]:
        _atomic_write(paths["images"], lambda p: np.savez_compressed(open(p, "wb"), ids=np.asarray(result["grid_ids"]), **{
            k.replace("+", "_plus_"): v for k, v in result["images"].items()}))
    extras = {"rewards": result["rewards"], "distances": result["distances"]}
    _atomic_write_text(paths["extras"], json.dumps(extras))
    # The records file is written last: its presence marks the batch as done.
    _atomic_write(paths["records"], lambda p: result["record"].to_frame().to_parquet(p, index=False))


def _read_parts(out: Path, batches: Sequence[int]) -> dict:
    records, rewards, distances, images = [], [], [], {}
    for b in batches:
        paths = _part_paths(out, b)
        records.append(NormRecord.from_frame(pd.read_parquet(paths["records"])))
        extras = json.loads(paths["extras"].read_text())
        rewards += extras["rewards"]
        distances += extras["distances"]
        if paths["images"].is_file():
            with np.load(paths["images"]) as data:
                for key in data.files:
                    if key == "ids":
                        continue
                    images.setdefault(key.replace("_plus_", "+"), []).append(data[key])
    return {"records": records, "rewards": rewards, "distances": distances, "images": images}


def _finalize(parts: dict, config: AuditConfig, checkpoint: dict) -> AuditResult:
    record = NormRecord.concat(parts["records"])
    expected = np.arange(config.num_samples)
    if not np.array_equal(record.sample_ids, expected):
        raise ConfigError(f"the audit is incomplete: {config.num_samples - record.num_samples} samples are missing")
    ratios = record.metric("ratio", "guided")
    inflation = inflation_summary(ratios, confidence=config.confidence, tolerance=config.tolerance,
                                  method=config.bootstrap, n_resamples=config.n_resamples, seed=config.seed)
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
        "seed": [config.seed + int(i) for i in record.sample_ids],
        "mean_ratio": ratios.mean(axis=0),
        "log_ratio": log_ratio,
    })
    rewards = pd.DataFrame(parts["rewards"]).sort_values(["model", "sample"], ignore_index=True) if parts["rewards"] else None
    renorm = None
    if parts["distances"]:
        d = pd.DataFrame(parts["distances"])
        renorm = {"velocity": config.renorm_on, "equation": "v' = v_theta * ||v_ref|| / ||v_theta|| (paper eq. 3)"}
        for model, sub in d.groupby("model"):
            key = model.replace("+", "_")
            renorm[f"{key}_relative_distance_to_base_mean"] = float(sub["relative_distance_to_base"].mean())
            renorm[f"{key}_relative_distance_to_base_std"] = float(sub["relative_distance_to_base"].std(ddof=1)) if len(sub) > 1 else 0.0
    images = {k: np.concatenate(v)[: config.grid_size] for k, v in parts["images"].items()}
    return AuditResult(record, inflation, per_step, per_sample, config, checkpoint, rewards, renorm, images)


def run_audit(
    checkpoint: Checkpoint,
    config: AuditConfig,
    *,
    out_dir=None,
    shard: tuple = (0, 1),
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    report: bool = True,
) -> Optional[AuditResult]:
    """Audit ``checkpoint`` for norm inflation.

    Args:
        checkpoint: a loaded checkpoint with a reference (``load_checkpoint(path, base)``).
        config: :class:`AuditConfig`.
        out_dir: folder for durable, resumable output; ``None`` keeps everything in memory.
        shard: ``(i, n)``: run only batches ``b`` with ``b % n == i``. With ``n > 1`` the shard's
            parts are written and ``None`` is returned: join shards with :func:`merge_audits`.
        overwrite: replace a non-resumable ``out_dir``.
        progress: ``f(done_batches, total_batches)`` called after each batch.
        report: also render ``report.html`` when saving.

    Returns:
        The :class:`AuditResult` (``None`` for a shard of several).
    """
    i, n = shard
    checkpoint.require_ref()  # fail before any work when there is no reference
    reward = None
    if config.reward is not None:
        from ngdiag.sensitivity.rewards import load_reward

        reward = load_reward(config.reward, device=checkpoint.adapter.device)
    info = checkpoint.describe()
    batches = shard_batches(config.num_batches, shard)
    if out_dir is None:
        if n > 1:
            raise ConfigError("a sharded audit needs an output folder")
        runner = _BatchRunner(checkpoint, config, reward)
        parts = {"records": [], "rewards": [], "distances": [], "images": {}}
        for done, b in enumerate(batches, 1):
            res = runner.run(b)
            parts["records"].append(res["record"])
            parts["rewards"] += res["rewards"]
            parts["distances"] += res["distances"]
            for k, v in res["images"].items():
                parts["images"].setdefault(k, []).append(v)
            if progress:
                progress(done, len(batches))
        return _finalize(parts, config, info)

    out = Path(out_dir)
    fingerprint = config.fingerprint(info)
    prepare_output(out, fingerprint, [i, n], overwrite=overwrite, kind=KIND)
    state = {"kind": KIND, "fingerprint": fingerprint, "shard": [i, n], "complete": False, "config": config.to_dict(), "checkpoint": info,
             "num_batches": config.num_batches}
    _atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2))
    runner = _BatchRunner(checkpoint, config, reward)
    for done, b in enumerate(batches, 1):
        if not _part_paths(out, b)["records"].is_file():
            _write_part(out, b, runner.run(b))
        if progress:
            progress(done, len(batches))
    state["complete"] = True
    if n > 1:
        _atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2))
        return None
    result = _finalize(_read_parts(out, batches), config, info)
    result.save(out, report=report)
    _atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2))
    return result


def merge_audits(shard_dirs: Sequence, out_dir, *, overwrite: bool = False, report: bool = True) -> AuditResult:
    """Join the shards of one audit (``--shard i/n`` runs) into the result of a single run."""
    states = []
    for d in shard_dirs:
        state = read_state(Path(d))
        if state is None:
            raise ConfigError(f"{d} is not an ngdiag audit folder (no {STATE_FILE})")
        if not state.get("complete"):
            raise ConfigError(f"the audit in {d} is not finished; rerun it with the same arguments to resume")
        states.append((Path(d), state))
    fingerprints = {s["fingerprint"] for _, s in states}
    if len(fingerprints) != 1:
        raise ConfigError("these folders hold audits with different arguments; merge shards of one audit only")
    n_values = {s["shard"][1] for _, s in states}
    shards = sorted(s["shard"][0] for _, s in states)
    n = n_values.pop() if len(n_values) == 1 else None
    if n is None or shards != list(range(n)):
        raise ConfigError(f"incomplete or repeated shards {shards}; merge all of 0..n-1 exactly once")
    first = states[0][1]
    config = AuditConfig(**first["config"])
    parts = {"records": [], "rewards": [], "distances": [], "images": {}}
    for d, state in states:
        i = state["shard"][0]
        p = _read_parts(d, shard_batches(config.num_batches, (i, n)))
        parts["records"] += p["records"]
        parts["rewards"] += p["rewards"]
        parts["distances"] += p["distances"]
        for k, v in p["images"].items():
            parts["images"].setdefault(k, []).append((i, v))
    # images: keep batch order (shard 0 holds batch 0, which holds the first grid samples)
    parts["images"] = {k: [a for _, arrs in sorted(v, key=lambda x: x[0]) for a in arrs] for k, v in parts["images"].items()}
    result = _finalize(parts, config, first["checkpoint"])
    out = Path(out_dir)
    prepare_output(out, "merge-" + first["fingerprint"], [0, 1], overwrite=overwrite, kind=KIND)
    result.save(out, report=report)
    _atomic_write_text(out / STATE_FILE, json.dumps({"kind": KIND, "fingerprint": first["fingerprint"], "shard": [0, 1], "complete": True,
                                                     "merged_from": [str(d) for d, _ in states], "config": first["config"],
                                                     "checkpoint": first["checkpoint"], "num_batches": config.num_batches}, indent=2))
    return result
