"""The online trainer: NFT, AWM, DPO or flow matching on LoRA, with the NormGuard penalty.

One iteration ``n`` of :func:`train`:

1. **Rollouts** (no gradient, :mod:`ngdiag.train.rollouts`): ``prompts_per_iteration`` prompts x
   ``group_size`` seeds are sampled with the current policy by ngdiag's Euler sampler, decoded and
   scored by the reward; rewards and final latents are gathered from every process and advantages
   normalized per prompt group.
2. **Training**: ``optimizer.steps_per_iteration`` AdamW steps on the LoRA weights. Each step takes
   an equal chunk of the method's training units (rollouts, or winner / loser pairs for DPO), draws
   ``timesteps.num`` times ``t`` and, for every unit, noise ``eps`` (both from seeds fixed by the
   iteration and the unit), and asks the method (:mod:`ngdiag.train.methods`) for its loss: the
   method builds ``x_t = (1 - t) x0 + t eps`` from the rollouts' final latents ``x0``, gets the
   velocities it needs from the policy (:mod:`ngdiag.train.policy`: ``v_theta`` with gradient;
   ``v_ref``, the adapter switched off, when NormGuard ``lam > 0``, a KL to the reference, DPO or
   the ``monitor.ratio`` diagnostic needs it; ``v_old``, the EMA of the LoRA weights, for NFT and
   AWM) and returns its base loss (:mod:`ngdiag.train.losses`) plus the NormGuard penalty
   (:func:`ngdiag.train.losses.with_normguard`, reusing ``v_ref``). Gradients are accumulated over
   micro batches and timesteps, averaged over processes, clipped, and applied.
3. The old policy is updated (``old <- d old + (1 - d) theta``), rank 0 appends the iteration's
   metrics to ``metrics.jsonl`` and, every ``checkpoint_every`` iterations and at the end, writes
   ``checkpoint-N/`` (:mod:`ngdiag.train.run_folder`).

Multi-process (:mod:`ngdiag.train.distributed`): launch the same command with ``torchrun`` or
``accelerate launch``. Rollouts are split into contiguous slices, training chunks into equal
per-process parts, so the global batch, and therefore the result, does not depend on the number of
processes (up to floating-point summation order). Only rank 0 writes files.

Resume: rerunning the same config with the same ``output_dir`` continues from the last complete
checkpoint (LoRA weights, old policy, optimizer state, iteration); a different config is refused
(except ``iterations`` and ``checkpoint_every``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.train import run_folder
from ngdiag.train.config import TrainConfig
from ngdiag.train.distributed import Processes, resolve_device
from ngdiag.train.methods import MicroBatch
from ngdiag.train.policy import Policy
from ngdiag.core.seeds import seeded_generator
from ngdiag.train.rollouts import RolloutSampler, Rollouts, rollout_plan
from ngdiag.train.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    check_output_dir,
    latest_checkpoint,
    lock_output_dir,
    read_metrics,
)
from ngdiag.train.timesteps import sample_timesteps

__all__ = [
    "train",
    "Trainer",
    "TrainResult",
    "rollout_plan",
    "latest_checkpoint",
    "read_metrics",
    "resolve_device",
    "CONFIG_FILE",
    "METRICS_FILE",
    "STATE_FILE",
]

#: loss terms renamed in the metrics log
_RENAMES = {
    "normguard": "penalty",
    "normguard_active_fraction": "hinge_active_fraction",
    "normguard_mean_ratio": "norm_ratio_mean",
}


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        output_dir: the run folder.
        iterations_done: completed iterations (the run's ``iterations`` when it finished).
        last_checkpoint: the newest ``checkpoint-N`` folder, or ``None``.
        resumed_from: the iteration the run resumed from (``None`` for a fresh start).
        metrics: the metrics log as a list of dicts (one per iteration; rank 0).
        counters: forward counts of this process (``theta``, ``ref``, ``old``) for this call.
    """

    output_dir: Path
    iterations_done: int
    last_checkpoint: Optional[Path]
    resumed_from: Optional[int] = None
    metrics: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.metrics)


class Trainer:
    """One training run. Usually used through :func:`train`; exposed for notebooks and tests.

    Attributes:
        config: the validated :class:`TrainConfig`.
        method: the :class:`~ngdiag.train.methods.base.Method` of ``config.method``.
        policy: the :class:`~ngdiag.train.policy.Policy`: the LoRA'd pipeline and its velocities.
        checkpoint, peft_model, params, counters: the policy's (see :class:`~ngdiag.train.policy.Policy`).
    """

    def __init__(self, config: TrainConfig, processes: Optional[Processes] = None):
        self.config = config
        self.device = resolve_device(config.model.device)
        self.proc = processes or Processes(self.device)
        self.method = config.make_method()
        n_units = self.method.units_per_iteration(config.rollouts) // int(config.optimizer.steps_per_iteration)
        if n_units % self.proc.world or config.rollouts.samples_per_iteration % self.proc.world:
            raise ConfigError(
                f"{config.rollouts.samples_per_iteration} rollouts and {n_units} {self.method.unit} per optimizer step "
                f"must divide evenly over {self.proc.world} processes"
            )
        self.prompts = config.rollouts.load_prompts()
        self.policy = Policy(config, self.device, old_policy=self.method.uses_old_policy)
        from ngdiag.rewards.scorers import load_reward

        self.reward = load_reward(config.reward, device=self.device)
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
        )
        self.iteration = 0
        self.sampler = RolloutSampler(config, self.policy, self.reward, config.sampling, self.proc, self.prompts)
        self.output_dir = Path(config.output_dir)
        self.output_lock = None  # rank 0's lock on output_dir (a RunFolder), taken by train() or run()

    checkpoint = property(lambda self: self.policy.checkpoint)
    peft_model = property(lambda self: self.policy.peft_model)
    params = property(lambda self: self.policy.params)
    counters = property(lambda self: self.policy.counters)

    # ------------------------------------------------------------------ one iteration
    def rollouts(self, iteration: int) -> Rollouts:
        """Sample, decode and score this process's share of the iteration's rollouts; gather all."""
        return self.sampler(iteration)

    def _noise(self, iteration: int, position: int, j: int, like: torch.Tensor) -> torch.Tensor:
        g = seeded_generator(self.config.seed, "eps", iteration, position, j)
        return torch.randn(like.shape, generator=g, dtype=torch.float32).to(like.device)

    def train_iteration(self, iteration: int, rollouts: Rollouts) -> dict:
        """The optimizer steps of one iteration on gathered rollouts; returns the averaged loss terms."""
        cfg, method, policy = self.config, self.method, self.policy
        units = method.units(rollouts, int(cfg.rollouts.group_size))
        velocities = functools.partial(
            policy.velocities, need_ref=method.needs_reference or cfg.monitor.ratio, need_old=method.uses_old_policy
        )
        steps = int(cfg.optimizer.steps_per_iteration)
        chunk = len(units) // steps
        per_rank = chunk // self.proc.world
        micro = int(cfg.optimizer.micro_batch_size)
        n_t = int(cfg.timesteps.num)
        sums: Dict[str, float] = {}
        log_ratio_sum, log_ratio_count = 0.0, 0
        grad_norms = []
        for s in range(steps):
            mine_idx = list(range(s * chunk + self.proc.rank * per_rank, s * chunk + (self.proc.rank + 1) * per_rank))
            ts = sample_timesteps(
                cfg.timesteps.kind, n_t, seeded_generator(cfg.seed, "t", iteration, s),
                shift=cfg.timesteps.shift, t_min=cfg.timesteps.t_min, t_max=cfg.timesteps.t_max,
                logit_mean=cfg.timesteps.logit_mean, logit_std=cfg.timesteps.logit_std, schedule=rollouts.sigmas,
            ).tolist()
            self.optimizer.zero_grad(set_to_none=True)
            for m0 in range(0, per_rank, micro):
                idx = mine_idx[m0 : m0 + micro]
                mb_units = [units[k] for k in idx]
                cond = policy.conditioning([rollouts.prompts[i] for i in method.prompt_rollouts(mb_units)])
                weight = len(idx) / (per_rank * n_t)
                for j, t in enumerate(ts):
                    noise_of = functools.partial(self._noise, iteration, j=j, like=rollouts.x0[0])
                    terms, logr = method.loss(MicroBatch(mb_units, idx, t, rollouts, cond, noise_of), velocities)
                    if not math.isfinite(terms.terms.get("loss", 0.0)):
                        raise NumericalError(f"the loss is not finite at iteration {iteration} (t={t:.4f})")
                    (terms.total * weight).backward()
                    for key, value in terms.terms.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * weight / steps
                    log_ratio_sum += float(sum(logr))
                    log_ratio_count += len(logr)
            self.proc.mean_gradients(self.params)
            max_norm = cfg.optimizer.max_grad_norm
            norm = torch.nn.utils.clip_grad_norm_(
                self.params, float(max_norm) if max_norm else float("inf"), error_if_nonfinite=False
            )
            if not torch.isfinite(norm):
                raise NumericalError(f"the gradient is not finite at iteration {iteration}, optimizer step {s}")
            grad_norms.append(float(norm))
            self.optimizer.step()
            policy.old_is_current = False
        policy.update_old(method.old_decay)
        keys = sorted(sums)
        packed = torch.tensor([sums[k] for k in keys] + [log_ratio_sum, float(log_ratio_count)], dtype=torch.float64)
        packed = self.proc.mean(packed)
        out = dict(zip(keys, packed[: len(keys)].tolist()))
        lr_sum, lr_count = packed[-2].item(), packed[-1].item()
        if lr_count > 0:
            out["inflation"] = math.exp(lr_sum / lr_count) - 1.0
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict:
        """Everything to resume, as named tensors (saved as safetensors)."""
        return run_folder.state_tensors(self.params, self.policy.old_state, self.optimizer, self.device)

    def state_json(self) -> dict:
        return run_folder.state_meta(self.iteration, self.policy.param_names, self.optimizer,
                                     self.policy.old_is_current, self.proc.world)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-N`` (PEFT adapter + trainer state) atomically; rank 0 only."""
        def save_adapter(folder: str) -> None:
            self.peft_model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)

        return run_folder.write_checkpoint(self.output_dir, self.iteration, save_adapter, self.state_tensors(),
                                           self.state_json())

    def load_state(self, folder: Path) -> None:
        """Restore LoRA weights, old policy, optimizer state, iteration and RNG from ``checkpoint-N``."""
        self.iteration, self.policy.old_is_current = run_folder.restore_state(
            folder, self.params, self.policy.param_names, self.policy.old_state, self.optimizer, self.device
        )

    # ------------------------------------------------------------------ the run
    def _run_info(self) -> dict:
        return {
            "base": self.policy.base_path,
            "family": self.checkpoint.family,
            "prompts_sha256": run_folder.prompts_hash(self.prompts),
            "num_prompts": len(self.prompts),
            "lora_parameters": int(sum(p.numel() for p in self.params)),
        }

    def run(self, progress: Optional[Callable[[int, int, Optional[dict]], None]] = None) -> TrainResult:
        """Train until ``config.iterations`` (resuming from the output folder's last checkpoint).

        Rank 0 holds the output folder's lock for the whole run (:func:`train` takes it before the
        model is loaded; a :class:`Trainer` used on its own takes it here).
        """
        with contextlib.ExitStack() as stack:
            def prepare() -> Optional[str]:
                if self.output_lock is None:
                    self.output_lock = stack.enter_context(lock_output_dir(self.config))
                found = check_output_dir(self.config, self.prompts)
                return None if found is None else str(found)

            return self._run(self.proc.on_main(prepare), progress)

    def _run(self, resume: Optional[str], progress) -> TrainResult:
        cfg = self.config
        resumed_from = None
        if resume is not None:
            self.load_state(Path(resume))
            resumed_from = self.iteration
        self.proc.barrier()
        if self.proc.is_main:
            run_folder.start_run(self.output_dir, cfg, self._run_info(), resumed_from)
        self.proc.barrier()
        total = int(cfg.iterations)
        if progress and self.proc.is_main:
            progress(min(self.iteration, total), total, None)
        last = Path(resume) if resume is not None else None
        while self.iteration < total:
            n = self.iteration
            start = time.perf_counter()
            rollouts = self.rollouts(n)
            terms = self.train_iteration(n, rollouts)
            self.iteration = n + 1
            rewards = rollouts.rewards
            row = {
                "iteration": n,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std(correction=0)),
                "reward_min": float(rewards.min()),
                "reward_max": float(rewards.max()),
            }
            row.update({_RENAMES.get(k, k): v for k, v in terms.items()})
            row.update({"lr": float(self.optimizer.param_groups[0]["lr"]), "samples": int(rewards.numel()),
                        "world_size": self.proc.world, "time_s": time.perf_counter() - start})
            checkpoint_due = self.iteration % int(cfg.checkpoint_every) == 0 or self.iteration == total
            if self.proc.is_main:
                run_folder.append_metrics(self.output_dir, row)
                if checkpoint_due:
                    last = self.save_checkpoint()
            elif checkpoint_due:
                last = self.output_dir / f"checkpoint-{self.iteration}"
            if progress and self.proc.is_main:
                progress(self.iteration, total, row)
        self.proc.barrier()
        if last is None:
            last = latest_checkpoint(self.output_dir)
        if self.proc.is_main and resumed_from is not None and resumed_from >= total:
            run_folder.write_metrics_csv(self.output_dir)
        metrics = read_metrics(self.output_dir) if self.proc.is_main else []
        return TrainResult(self.output_dir, self.iteration, last, resumed_from, metrics, dict(self.counters))


def train(config: TrainConfig, *, progress: Optional[Callable[[int, int, Optional[dict]], None]] = None) -> TrainResult:
    """Run (or resume) a training run described by ``config``.

    Args:
        config: a validated :class:`TrainConfig` (``load_config`` validates; ``TrainConfig`` built in
            code should call ``.validate()``).
        progress: ``f(done, total, metrics_row)`` called on rank 0 at the start (row ``None``) and
            after every iteration.

    Under ``torchrun`` / ``accelerate launch`` every process calls this; the process group is
    created here when it does not exist yet and destroyed at the end.
    """
    config.validate()
    device = resolve_device(config.model.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    processes = Processes(device)
    try:
        with contextlib.ExitStack() as stack:
            lock = None

            def claim() -> None:  # the output folder is checked and locked (rank 0) before the model is loaded
                nonlocal lock
                lock = stack.enter_context(lock_output_dir(config))
                check_output_dir(config, config.rollouts.load_prompts())

            processes.on_main(claim)
            trainer = Trainer(config, processes)
            trainer.output_lock = lock
            return trainer.run(progress)
    finally:
        processes.close()
