"""Norm-scaling sensitivity of a loaded checkpoint: prompts and a reward spec in, S(t) out.

For every batch of samples (prompt ``i mod len(prompts)``, seed ``seed + i``, as in the audit)
this binds the checkpoint's guided velocity (with CFG where the family uses it) and the reward
of the decoded image, ``R(x_K) = reward(decode(x_K), prompts)``, and calls
:func:`ngdiag.sensitivity.norm_sensitivity`. Runs are durable like the audit: one part per batch,
resumable, shardable with ``shard=(i, n)`` and joined by :func:`merge_sensitivity`.
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

from ngdiag.durable import STATE_FILE, RunFolder, load_shards, lock_output, shard_batches, use_output
from ngdiag.errors import ConfigError
from ngdiag.generation import SampleSet, prepare_batch
from ngdiag.models.loading import Checkpoint
from ngdiag.sensitivity.adjoint import norm_sensitivity
from ngdiag.sensitivity.result import SensitivityResult

__all__ = ["SensitivityConfig", "SensitivityRun", "run_sensitivity", "merge_sensitivity", "checkpoint_velocity"]

KIND = "sensitivity"
SCHEMA_VERSION = 1


@dataclass
class SensitivityConfig(SampleSet):
    """What to analyse (sample ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``).

    Attributes:
        prompts, num_samples, sampling, seed, batch_size: see :class:`ngdiag.generation.SampleSet`.
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
        from ngdiag.audit import versions

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
            "per_step": [{k: (None if isinstance(v, float) and not np.isfinite(v) else (int(v) if k == "step" else float(v)))
                          for k, v in row.items()} for row in per_step.to_dict("records")],
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
        open :class:`~ngdiag.durable.RunFolder`; rendered first, ``sensitivity.json`` written last."""
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
    seeds = [config.seed + i for i in ids]
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


def part_name(b: int) -> str:
    return f"parts/sensitivity-b{b:05d}.npz"


def _write_part(folder: RunFolder, b: int, part: dict) -> None:
    r = part["result"]
    folder.write(part_name(b), lambda p: np.savez(open(p, "wb"), ids=np.asarray(part["ids"]), S=r.S.numpy(), times=r.times.numpy(),
                                                   reward=r.reward.numpy()))


def _read_part(out: Path, b: int) -> dict:
    path = Path(out) / part_name(b)
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run in {out} is incomplete; rerun it with the same arguments")
    try:
        with np.load(path) as data:
            return {"ids": data["ids"], "S": data["S"], "times": data["times"], "reward": data["reward"]}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read {path} ({type(exc).__name__}); delete it and rerun to redo the batch") from None


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


def _as_part(part: dict) -> dict:
    r = part["result"]
    return {"ids": part["ids"], "S": r.S.numpy(), "times": r.times.numpy(), "reward": r.reward.numpy()}


def run_sensitivity(
    checkpoint: Checkpoint,
    config: SensitivityConfig,
    *,
    out_dir=None,
    shard: tuple = (0, 1),
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    report: bool = True,
) -> Optional[SensitivityRun]:
    """Compute S(t) per sample and step for ``checkpoint`` (see module docstring)."""
    from ngdiag.sensitivity.rewards import load_reward

    if config.model == "ref":
        checkpoint.require_ref()
    config.check_against(checkpoint)  # image size and the like: before anything is written
    reward = load_reward(config.reward, device=checkpoint.adapter.device)
    info = checkpoint.describe()
    batches = shard_batches(config.num_batches, shard)
    if out_dir is None:
        if shard[1] > 1:
            raise ConfigError("a sharded run needs an output folder")
        parts = []
        for done, b in enumerate(batches, 1):
            parts.append(_as_part(_run_batch(checkpoint, config, reward, b)))
            if progress:
                progress(done, len(batches))
        return _join(parts, config, info, config.method)
    fingerprint = config.fingerprint(info)
    state = {"kind": KIND, "fingerprint": fingerprint, "shard": list(shard), "complete": False,
             "config": config.to_dict(), "checkpoint": info}
    inputs = [("checkpoint", info.get("path")), ("base", info.get("base"))]
    with use_output(out_dir, kind=KIND, inputs=inputs, overwrite=overwrite, config=config.to_dict(), shard=list(shard)) as folder:
        folder.begin(state)
        for done, b in enumerate(batches, 1):
            if not folder.exists(part_name(b)):
                _write_part(folder, b, _run_batch(checkpoint, config, reward, b))
            if progress:
                progress(done, len(batches))
        state["complete"] = True
        if shard[1] > 1:
            folder.write_text(STATE_FILE, json.dumps(state, indent=2))
            return None
        run = _join([_read_part(folder.path, b) for b in batches], config, info, config.method)
        run.save(folder, report=report)
        folder.write_text(STATE_FILE, json.dumps(state, indent=2))
    return run


def merge_sensitivity(shard_dirs, out_dir, *, overwrite: bool = False, report: bool = True) -> SensitivityRun:
    """Join the shards of one sensitivity run into the result of a single run (the same files, byte for byte).

    Every shard must be a finished sensitivity run of the same arguments and split; ``out_dir`` (a
    path or an open :class:`~ngdiag.durable.RunFolder`) must not be, contain or lie inside a shard.
    """
    states, n = load_shards(shard_dirs, KIND)
    first = states[0][1]
    try:
        config = SensitivityConfig(**first["config"])
    except TypeError as exc:
        raise ConfigError(f"{states[0][0] / STATE_FILE} is corrupt (its config does not fit this ngdiag: {exc})") from None
    inputs = [("shard folder", d) for d, _ in states]
    with use_output(out_dir, kind=KIND, inputs=inputs, overwrite=overwrite) as folder:
        parts = [_read_part(d, b) for d, s in states for b in shard_batches(config.num_batches, (s["shard"][0], n))]
        run = _join(parts, config, first["checkpoint"], config.method)
        state = {**first, "shard": [0, 1], "complete": False, "merged_from": [str(d) for d, _ in states]}
        folder.begin({**state, "fingerprint": "merge-" + first["fingerprint"]})
        run.save(folder, report=report)
        folder.write_text(STATE_FILE, json.dumps({**state, "complete": True}, indent=2))
    return run
