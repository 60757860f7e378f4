"""Online rollouts: which prompt and seed each sample has, sampling and scoring them, advantages.

Sample ``i`` of iteration ``n`` always has the same prompt and noise seed (:func:`rollout_plan`),
whatever the number of processes: each process samples a contiguous slice of the plan with
ngdiag's Euler sampler (:func:`ngdiag.core.sampling.sample`, the family's own schedule and CFG), decodes
and scores it, and the final latents and rewards are gathered from every process in sample order
(:class:`RolloutSampler`). Advantages are normalized per prompt group
(:func:`ngdiag.train.advantages.group_advantages`).

Every seed of a run is derived from the config's ``seed`` and a name (:func:`derive_seed`): the
rollouts' noise, the prompt order, the training noise and times, the LoRA initialization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ngdiag.core.seeds import derive_seed, seeded_generator
from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.models.generation import SamplingConfig, prepare_batch
from ngdiag.core.sampling import sample
from ngdiag.train.advantages import group_advantages

if TYPE_CHECKING:
    from ngdiag.train.config import TrainConfig
    from ngdiag.train.distributed import Processes
    from ngdiag.train.policy import Policy

__all__ = ["rollout_plan", "Rollouts", "RolloutSampler"]


def rollout_plan(config: "TrainConfig", iteration: int, prompts: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
    """The ``(prompt, seed)`` of every rollout of ``iteration``, in sample order.

    Samples ``g * G .. g * G + G - 1`` form prompt group ``g``. Prompts are visited in a seeded
    random order per pass over the prompt list (``rollouts.shuffle``), in file order otherwise.
    Use it to re-sample exactly the rollouts of an iteration with another checkpoint.
    """
    prompts = list(prompts) if prompts is not None else config.rollouts.load_prompts()
    if not prompts:
        raise ConfigError("no prompts to sample")
    g_size = int(config.rollouts.group_size)
    per_iter = int(config.rollouts.prompts_per_iteration)
    plan = []
    perms: Dict[int, List[int]] = {}
    for g in range(per_iter):
        q = iteration * per_iter + g
        epoch, pos = divmod(q, len(prompts))
        if config.rollouts.shuffle:
            if epoch not in perms:
                perms[epoch] = torch.randperm(len(prompts), generator=seeded_generator(config.seed, "prompts", epoch)).tolist()
            prompt = prompts[perms[epoch][pos]]
        else:
            prompt = prompts[pos]
        for k in range(g_size):
            plan.append((prompt, derive_seed(config.seed, "rollout", iteration, g * g_size + k)))
    return plan


@dataclass
class Rollouts:
    """One iteration's rollouts, gathered from every process, in sample order.

    Attributes:
        x0: final latents, ``(N, ...)`` float32 on the device.
        rewards: ``(N,)`` float64 on the CPU.
        prompts: the ``N`` prompts.
        sigmas: the sampling schedule (the stratified training times are drawn from it).
        advantages: ``(N,)`` float32 on the CPU, normalized per prompt group.
    """

    x0: torch.Tensor
    rewards: torch.Tensor
    prompts: List[str]
    sigmas: torch.Tensor
    advantages: torch.Tensor


class RolloutSampler:
    """Samples, decodes and scores this process's share of an iteration's rollouts; gathers all.

    Args:
        config: the run's config (rollouts, advantages, seed).
        policy: the model being trained; rollouts are sampled with its current weights.
        reward: ``reward(images, prompts) -> (B,)`` scores.
        sampling: the rollouts' sampling settings.
        processes: the process group.
        prompts: the run's prompts.
    """

    def __init__(self, config: "TrainConfig", policy: "Policy", reward: Callable, sampling: SamplingConfig,
                 processes: "Processes", prompts: Sequence[str]):
        self.config = config
        self.policy = policy
        self.reward = reward
        self.sampling = sampling
        self.proc = processes
        self.prompts = list(prompts)

    def __call__(self, iteration: int) -> Rollouts:
        policy, cfg = self.policy, self.config
        plan = rollout_plan(cfg, iteration, self.prompts)
        ids = list(self.proc.local_slice(len(plan)))
        bs = int(cfg.rollouts.batch_size)
        xs, rs, sigmas = [], [], None
        for start in range(0, len(ids), bs):
            chunk = ids[start : start + bs]
            prompts = [plan[i][0] for i in chunk]
            seeds = [plan[i][1] for i in chunk]
            batch = prepare_batch(policy.checkpoint, prompts, seeds, self.sampling, sample_ids=chunk)
            with policy.autocast():
                result = sample(batch.conditioning.guided(policy.theta), batch.x_init, batch.sigmas)
            x = result.x_final.float()
            if not torch.isfinite(x).all():
                raise NumericalError(f"a rollout of iteration {iteration} is not finite (samples {chunk})")
            with torch.no_grad(), policy.autocast():
                images = policy.adapter.decode(x.to(policy.adapter.dtype), batch.config.height, batch.config.width)
                scores = self.reward(images.float(), prompts)
            xs.append(x)
            rs.append(scores.detach().to(torch.float64))
            sigmas = batch.sigmas
            policy.counters["rollout"] += len(chunk)
        local_x = torch.cat(xs)
        local_r = torch.cat(rs).to(local_x.device)
        rewards = self.proc.all_gather_cat(local_r).cpu()
        if not torch.isfinite(rewards).all():
            raise NumericalError(f"the reward of iteration {iteration} is not finite")
        advantages = group_advantages(
            rewards, cfg.rollouts.group_size, normalize=cfg.advantages.normalize, eps=cfg.advantages.eps
        ).to(torch.float32)
        return Rollouts(self.proc.all_gather_cat(local_x), rewards, [p for p, _ in plan], sigmas, advantages)
