"""Norm-scaling sensitivity of a loaded checkpoint: prompts and a reward spec in, S(t) out.

For every batch of samples (prompt ``i mod len(prompts)``, seed ``seed + i``, as in the audit)
this binds the checkpoint's guided velocity (with CFG where the family uses it) and the reward
of the decoded image, ``R(x_K) = reward(decode(x_K), prompts)``, and calls
:func:`ngdiag.sensitivity.norm_sensitivity`. Runs are durable like the audit, on the same engine
(:mod:`ngdiag.runs`, through :class:`SensitivityWorkflow`): one part per batch, resumable,
shardable with ``shard=(i, n)`` and joined by :func:`merge_sensitivity`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from ngdiag.core.io import json_safe
from ngdiag.core.seeds import sample_seeds
from ngdiag.core.errors import ConfigError
from ngdiag.models.generation import SampleSet, prepare_batch
from ngdiag.models.loading import Checkpoint
from ngdiag.runs import RunFolder, Workflow, lock_output, merge_workflow, run_workflow, versions
from ngdiag.sensitivity.adjoint import norm_sensitivity
from ngdiag.sensitivity.result import SensitivityResult

__all__ = ["SensitivityConfig", "SensitivityRun", "SensitivityWorkflow", "run_sensitivity", "merge_sensitivity",
           "checkpoint_velocity"]

KIND = "sensitivity"
SCHEMA_VERSION = 1


@dataclass
class SensitivityConfig(SampleSet):
    """What to analyse (sample ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``).

    Attributes:
        prompts, num_samples, sampling, seed, batch_size: see :class:`ngdiag.models.generation.SampleSet`.
        reward: the reward spec (required), e.g. ``pickscore:/models/pickscore``.
        method: ``"discrete"`` (exact adjoint of the sampler) or ``"continuous"`` (torchdiffeq).
        solver, continuous_substeps: the continuous method's torchdiffeq solver.
        model: whose velocity is analysed: ``"theta"`` (default) or ``"ref"``.
        gradient_checkpointing: enable diffusers' gradient checkpointing on the transformer and VAE.
    """

    batch_size: int = 2
    reward: Optional[str] = None
    method: str = "discrete"
    solver: str = "rk4"
    continuous_substeps: int = 4
    model: str = "theta"
    gradient_checkpointing: bool = True

    _needs_two = "the analysis needs at least 2 samples for a spread"

    def __post_init__(self):
        super().__post_init__()
        if not self.reward:
            raise ConfigError("the sensitivity analysis needs a reward spec, e.g. pickscore:/models/pickscore")
        if self.method not in ("discrete", "continuous"):
            raise ConfigError(f"method must be 'discrete' or 'continuous', got {self.method!r}")
        if self.model not in ("theta", "ref"):
            raise ConfigError(f"model must be 'theta' or 'ref', got {self.model!r}")


def checkpoint_velocity(checkpoint: Checkpoint, conditioning, which: str = "theta") -> Callable:
    """The velocity the sampler applies, ``v(x, t)``, with the batch's conditioning and CFG bound."""
    model = checkpoint.theta if which == "theta" else checkpoint.require_ref()
    guided = conditioning.guided(model)
    return lambda x, t: guided(x, t).guided


@contextlib.contextmanager
def _gradient_checkpointing(modules, enabled: bool):
    """Enable diffusers' gradient checkpointing on modules that support it, restored afterwards."""
    switched = []
    try:
        if enabled:
            for m in modules:
                if getattr(m, "_supports_gradient_checkpointing", False) and not getattr(m, "is_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
                    switched.append(m)
        yield
    finally:
        for m in switched:
            m.disable_gradient_checkpointing()


@dataclass
class SensitivityRun:
    """All samples of a sensitivity analysis.

    Attributes:
        result: the joined :class:`SensitivityResult` (``S`` of shape ``(K, N)``).
        sample_ids: ``(N,)`` global sample ids; config: the run's config; checkpoint: what ran.
    """

    result: SensitivityResult
    sample_ids: np.ndarray
    config: SensitivityConfig
    checkpoint: dict

    def per_step(self) -> pd.DataFrame:
        return self.result.summary_frame()

    def to_frame(self) -> pd.DataFrame:
        frame = self.result.to_frame()
        frame["sample"] = self.sample_ids[frame["sample"].to_numpy()]
        return frame

    def summary(self) -> dict:
        per_step = self.per_step()
        nsr = per_step["nsr"].to_numpy()
        dr = self.result.directional_derivative.numpy()
        return {
            "schema_version": SCHEMA_VERSION,
            "method": self.result.method,
            "reward": self.config.reward,
            "model": self.config.model,
            "num_samples": int(self.result.batch_size),
            "num_steps": int(self.result.num_steps),
            "per_step": json_safe(per_step.to_dict("records")),
            "nsr_median": float(np.nanmedian(nsr)),
            "nsr_min": float(np.nanmin(nsr)),
            "nsr_max": float(np.nanmax(nsr)),
            "fraction_of_steps_with_nsr_above_3": float(np.mean(nsr > 3)),
            "directional_derivative": {"mean": float(dr.mean()), "std": float(dr.std(ddof=1)),
                                       "description": "dR/d(eps) when every step's velocity is scaled by (1 + eps)"},
            "reward_mean": float(self.result.reward.mean()),
            "checkpoint": self.checkpoint.get("path"),
            "base": self.checkpoint.get("base"),
            "family": self.checkpoint.get("family"),
            **{k: self.checkpoint[k] for k in ("lora", "notes") if k in self.checkpoint},
            "config": self.config.to_dict(),
            "versions": versions(),
        }

    def save(self, out_dir, *, report: bool = True) -> dict:
        """Write ``sensitivity.json``, ``records.parquet`` and ``report.html`` into a folder path or an
        open :class:`~ngdiag.runs.RunFolder`; rendered first, ``sensitivity.json`` written last."""
        if not isinstance(out_dir, RunFolder):
            with lock_output(out_dir) as folder:
                return self.save(folder, report=report)
        summary = self.summary()
        frame = self.to_frame()
        html = None
        if report:
            from ngdiag.report.html import render_sensitivity_report

            html = render_sensitivity_report(summary, self.per_step(), frame)
        out_dir.write("records.parquet", lambda p: frame.to_parquet(p, index=False))
        if html is not None:
            out_dir.write_text("report.html", html)
        out_dir.write_text("sensitivity.json", json.dumps(summary, indent=2))
        return summary


def _run_batch(checkpoint: Checkpoint, config: SensitivityConfig, reward, b: int) -> dict:
    ids = config.batch_ids(b)
    prompts = [config.prompt_of(i) for i in ids]
    seeds = sample_seeds(config.seed, ids)
    batch = prepare_batch(checkpoint, prompts, seeds, config.sampling, sample_ids=ids)
    velocity = checkpoint_velocity(checkpoint, batch.conditioning, config.model)
    adapter, h, w = checkpoint.adapter, batch.config.height, batch.config.width

    def reward_of_latents(x):
        return reward(adapter.decode(x, h, w), prompts)

    modules = [checkpoint.pipeline.transformer, checkpoint.pipeline.vae]
    with _gradient_checkpointing(modules, config.gradient_checkpointing):
        res = norm_sensitivity(velocity, batch.x_init, batch.sigmas, reward_of_latents, method=config.method,
                               solver=config.solver, continuous_substeps=config.continuous_substeps)
    return {"ids": ids, "result": res}


def _as_part(part: dict) -> dict:
    r = part["result"]
    return {"ids": part["ids"], "S": r.S.numpy(), "times": r.times.numpy(), "reward": r.reward.numpy()}


def _join(parts: list, config: SensitivityConfig, checkpoint: dict, method: str) -> SensitivityRun:
    ids = np.concatenate([np.asarray(p["ids"]) for p in parts])
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(config.num_samples)):
        raise ConfigError("the sensitivity run is incomplete: some samples are missing")
    S = np.concatenate([p["S"] for p in parts], axis=1)[:, order]
    reward = np.concatenate([p["reward"] for p in parts])[order]
    times = parts[0]["times"]
    result = SensitivityResult(S=torch.from_numpy(S), times=torch.from_numpy(np.asarray(times)),
                               reward=torch.from_numpy(reward), x_final=torch.empty(0), method=method)
    return SensitivityRun(result, ids[order], config, checkpoint)


class SensitivityWorkflow(Workflow):
    """The sensitivity analysis on the run engine (:mod:`ngdiag.runs`): a batch's part holds its
    sample ids, ``S`` per step and sample, the times and the rewards."""

    kind = KIND
    title = "a sensitivity run"
    merge_command = "ngdiag merge-sensitivity"
    config_type = SensitivityConfig
    part_files = ("sensitivity.npz",)

    def write_part(self, folder: RunFolder, b: int, part: dict) -> None:
        def write(path: str) -> None:
            with open(path, "wb") as fh:  # a file object: np.savez would append .npz to the temporary file's name
                np.savez(fh, ids=np.asarray(part["ids"]), S=part["S"], times=part["times"], reward=part["reward"])

        folder.write(self.part_paths(b)["sensitivity"], write)

    def read_part(self, path: Path, b: int) -> dict:
        with np.load(path / self.part_paths(b)["sensitivity"]) as data:
            return {"ids": data["ids"], "S": data["S"], "times": data["times"], "reward": data["reward"]}

    def finalize(self, parts: list) -> SensitivityRun:
        return _join(parts, self.config, self.checkpoint, self.config.method)


def run_sensitivity(checkpoint: Checkpoint, config: SensitivityConfig, *, out_dir=None, shard: tuple = (0, 1),
                    overwrite: bool = False, progress=None, report: bool = True) -> Optional[SensitivityRun]:
    """Compute S(t) per sample and step for ``checkpoint`` (see module docstring).

    ``out_dir``, ``shard``, ``overwrite``, ``progress`` and ``report`` work as for
    :func:`ngdiag.workflows.audit.run_audit`; returns ``None`` for a shard of several.
    """
    from ngdiag.rewards.scorers import load_reward

    if config.model == "ref":
        checkpoint.require_ref()
    config.check_against(checkpoint)  # image size and the like: before anything is written
    reward = load_reward(config.reward, device=checkpoint.adapter.device)
    workflow = SensitivityWorkflow(config, checkpoint.describe())
    return run_workflow(workflow, lambda b: _as_part(_run_batch(checkpoint, config, reward, b)), out_dir=out_dir,
                        shard=shard, overwrite=overwrite, progress=progress, report=report)


def merge_sensitivity(shard_dirs, out_dir, *, overwrite: bool = False, report: bool = True) -> SensitivityRun:
    """Join the shards of one sensitivity run into the result of a single run (the same files, byte for byte).

    Every shard must be a finished sensitivity run of the same arguments and split; ``out_dir`` (a
    path or an open :class:`~ngdiag.runs.RunFolder`) must not be, contain or lie inside a shard.
    """
    return merge_workflow(SensitivityWorkflow, shard_dirs, out_dir, overwrite=overwrite, report=report)

