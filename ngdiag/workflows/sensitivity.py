"""Norm-scaling sensitivity of a loaded checkpoint: prompts and a reward spec in, S(t) out.

For every batch of samples (prompt ``i mod len(prompts)``, seed ``seed + i``, as in the audit)
this binds the checkpoint's guided velocity (with CFG where the family uses it) and the reward
of the decoded image, ``R(x_K) = reward(decode(x_K), prompts)``, and calls
:func:`ngdiag.sensitivity.norm_sensitivity`. Runs are durable like the audit, on the same engine
(:mod:`ngdiag.runs`, through :class:`SensitivityWorkflow`): one part per batch, resumable,
shardable with ``shard=(i, n)`` and joined by :func:`merge_sensitivity`.

The summary carries percentile-bootstrap intervals over samples (``CONFIDENCE``, seeded) of every
``mu_k`` and of the mean ``dR/d(eps)``. Given an inflation ``I`` (``SensitivityConfig.inflation``, or
read from an audit folder by :func:`audit_reference`), it adds the first-order reward change of
removing it, ``eps * dR/d(eps)`` with ``eps = 1 / (1 + I) - 1``, next to the audit's measured reward
change under RL renormalization when the audit has one.
"""

from __future__ import annotations

import contextlib
import json
import math
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
from ngdiag.sensitivity.result import BOOTSTRAP_RESAMPLES, SensitivityResult, removal_eps

__all__ = ["SensitivityConfig", "SensitivityRun", "SensitivityWorkflow", "run_sensitivity", "merge_sensitivity",
           "checkpoint_velocity", "audit_reference"]

KIND = "sensitivity"
SCHEMA_VERSION = 1
#: The level, resamples and seed of every interval in the summary (a percentile bootstrap over samples).
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
FIRST_ORDER_FORMULA = "eps * dR/d(eps), eps = 1 / (1 + inflation) - 1 (every step's velocity scaled by 1 / (1 + inflation))"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def audit_reference(path) -> dict:
    """What a finished audit's ``summary.json`` says about the inflation, and about the reward change
    under RL renormalization (paper eq. 3) when the audit measured rewards with ``--renorm``.

    Returns ``{"path", "checkpoint", "inflation", "inflation_ci_low", "inflation_ci_high", "reward",
    "renorm_reward_change"}``; ``renorm_reward_change`` is ``{"mean", "std", "stderr", "num_samples"}``
    (``rl+renorm`` minus ``rl``, paired per sample: the audit's ``reward.delta_renorm_minus_rl``) or ``None``.

    Raises:
        ConfigError: no such folder, no readable ``summary.json`` in it, or no usable inflation value.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"audit folder {folder} does not exist" if not folder.exists() else f"audit folder {folder} is not a folder")
    file = folder / "summary.json"
    if not file.is_file():
        raise ConfigError(f"{folder} holds no summary.json: not a finished ngdiag audit")
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{file} is not readable JSON") from None
    inflation = doc.get("inflation") if isinstance(doc, dict) else None
    value = inflation.get("value") if isinstance(inflation, dict) else None
    if not _number(value):
        raise ConfigError(f"{file} records no inflation value: not an ngdiag audit summary")
    try:
        removal_eps(value)
    except ConfigError:
        raise ConfigError(f"{file} records an inflation of {value!r}; it must be a fraction above -1") from None
    ref = {"path": str(folder), "checkpoint": doc.get("checkpoint"), "inflation": float(value),
           "inflation_ci_low": inflation.get("ci_low") if _number(inflation.get("ci_low")) else None,
           "inflation_ci_high": inflation.get("ci_high") if _number(inflation.get("ci_high")) else None,
           "reward": None, "renorm_reward_change": None}
    reward = doc.get("reward")
    if isinstance(reward, dict):
        ref["reward"] = reward.get("name") if isinstance(reward.get("name"), str) else None
        delta, std = reward.get("delta_renorm_minus_rl"), reward.get("delta_renorm_minus_rl_std")
        rows = reward.get("rows") if isinstance(reward.get("rows"), list) else []
        n = next((row.get("n") for row in rows if isinstance(row, dict) and row.get("model") == "rl"), None)
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
        if _number(delta):
            std = float(std) if _number(std) else None
            ref["renorm_reward_change"] = {
                "mean": float(delta), "std": std, "num_samples": n,
                "stderr": std / math.sqrt(n) if std is not None and n is not None else None}
    return ref


@dataclass
class SensitivityConfig(SampleSet):
    """What to analyse (sample ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``).

    Attributes:
        prompts, num_samples, sampling, seed, batch_size: see :class:`ngdiag.models.generation.SampleSet`.
        reward: the reward spec (required), e.g. ``pickscore:/models/pickscore``.
        method: ``"discrete"`` (exact adjoint of the sampler) or ``"continuous"`` (torchdiffeq).
        solver, continuous_substeps: the continuous method's torchdiffeq solver.
        model: whose velocity is analysed: ``"theta"`` (default) or ``"ref"``.
        gradient_checkpointing: enable diffusers' gradient checkpointing on the transformer and VAE. Off by
            default: the discrete adjoint already keeps one step's activations only, and checkpointing inside
            that step recomputes every forward a second time (3.2x sampling without, 4.6x with on the world's
            base: docs/performance.md); turn it on when one step's activations do not fit. It changes memory
            and time only, not the results, so it does not enter the fingerprint (a rerun with the other value
            resumes).
        inflation: an inflation ``I`` (a fraction, ``> -1``) whose removal's first-order reward change the
            summary reports; taken from ``audit`` when that is given. Changes the summary only.
        audit: what :func:`audit_reference` read from an audit folder (its inflation and measured
            renorm reward change), or ``None``. Changes the summary only.
    """

    batch_size: int = 2
    reward: Optional[str] = None
    method: str = "discrete"
    solver: str = "rk4"
    continuous_substeps: int = 4
    model: str = "theta"
    gradient_checkpointing: bool = False
    inflation: Optional[float] = None
    audit: Optional[dict] = None

    _needs_two = "the analysis needs at least 2 samples for a spread"
    _not_in_fingerprint = ("inflation", "audit")  # a rerun with another --inflation resumes the same parts
    # changes memory and time, not results: hashed as True, the default until it was turned off (issue 15),
    # so that runs started before then still resume
    _hashed_as = {"gradient_checkpointing": True}

    def check_against(self, checkpoint: Checkpoint) -> None:
        """Also: an ``audit`` must be of this checkpoint (its inflation is another model's otherwise)."""
        super().check_against(checkpoint)
        audited = (self.audit or {}).get("checkpoint")
        here = checkpoint.describe().get("path")
        if audited is not None and here is not None and str(audited) != str(here):
            raise ConfigError(f"the audit {self.audit.get('path')} audited {audited}, not this checkpoint ({here}): "
                              "its inflation is another model's")

    def __post_init__(self):
        super().__post_init__()
        if not self.reward:
            raise ConfigError("the sensitivity analysis needs a reward spec, e.g. pickscore:/models/pickscore")
        if self.method not in ("discrete", "continuous"):
            raise ConfigError(f"method must be 'discrete' or 'continuous', got {self.method!r}")
        if self.model not in ("theta", "ref"):
            raise ConfigError(f"model must be 'theta' or 'ref', got {self.model!r}")
        if self.audit is not None:
            if not isinstance(self.audit, dict) or not _number(self.audit.get("inflation")):
                raise ConfigError("audit must be what audit_reference() returns (with its inflation)")
            if self.inflation is None:
                self.inflation = self.audit["inflation"]
            elif float(self.inflation) != float(self.audit["inflation"]):
                raise ConfigError(f"give an inflation or an audit, not both (inflation {self.inflation!r}, "
                                  f"the audit's {self.audit['inflation']!r})")
        if self.inflation is not None:
            removal_eps(self.inflation)  # a finite fraction above -1
            self.inflation = float(self.inflation)


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
        """One row per step (:meth:`SensitivityResult.summary_frame`, intervals at :data:`CONFIDENCE`)."""
        return self.result.summary_frame(CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)

    def to_frame(self) -> pd.DataFrame:
        frame = self.result.to_frame()
        frame["sample"] = self.sample_ids[frame["sample"].to_numpy()]
        return frame

    def summary(self) -> dict:
        per_step = self.per_step()
        nsr = per_step["nsr"].to_numpy()
        dr = self.result.directional_derivative.numpy()
        dr_low, dr_high = self.result.directional_derivative_interval(CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                                                                      seed=BOOTSTRAP_SEED)
        out = {
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
                                       "ci_low": json_safe(dr_low), "ci_high": json_safe(dr_high),
                                       "description": "dR/d(eps) when every step's velocity is scaled by (1 + eps)"},
            "intervals": {"method": "percentile bootstrap over samples", "confidence": CONFIDENCE,
                          "n_resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
            "reward_mean": float(self.result.reward.mean()),
            "checkpoint": self.checkpoint.get("path"),
            "base": self.checkpoint.get("base"),
            "family": self.checkpoint.get("family"),
            **{k: self.checkpoint[k] for k in ("lora", "notes") if k in self.checkpoint},
            "config": self.config.to_dict(),
            "versions": versions(),
        }
        if self.config.inflation is not None:
            out["first_order_reward_change"] = self.first_order_block()
        return out

    def first_order_block(self) -> dict:
        """The summary's ``first_order_reward_change``: the predicted reward change of removing
        ``config.inflation`` and, from the audit when there is one, the measured one under RL renorm."""
        change = self.result.first_order_reward_change(self.config.inflation, CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                                                       seed=BOOTSTRAP_SEED)
        block = {**json_safe(change.to_dict()), "formula": FIRST_ORDER_FORMULA, "model": self.config.model,
                 "audit": None, "measured_renorm_reward_change": None}
        audit = self.config.audit
        if audit is not None:
            block["audit"] = audit.get("path")
            block["audit_reward"] = audit.get("reward")
            block["same_reward"] = audit.get("reward") == self.config.reward
            block["measured_renorm_reward_change"] = audit.get("renorm_reward_change")
        return block

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

