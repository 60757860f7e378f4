"""The online trainer: NFT, AWM, DPO or flow matching on LoRA, with the NormGuard penalty.

One iteration ``n`` of :func:`train`:

1. **Rollouts** (no gradient): ``prompts_per_iteration`` prompts x ``group_size`` seeds are sampled
   with the current policy by ngdiag's Euler sampler (:func:`ngdiag.sampling.sample`, the family's
   own schedule and CFG), decoded and scored by the reward. Sample ``i`` of iteration ``n`` always
   has the same prompt and noise seed (:func:`rollout_plan`), whatever the number of processes.
2. **Advantages**: rewards and final latents are gathered from every process; advantages are
   normalized per prompt group (:func:`ngdiag.train.advantages.group_advantages`).
3. **Training**: ``optimizer.steps_per_iteration`` AdamW steps on the LoRA weights. Each step takes
   an equal chunk of the rollouts (of the winner / loser pairs for DPO), draws ``timesteps.num``
   times ``t`` and, for every rollout, noise ``eps`` (both from seeds fixed by the iteration and the
   sample id), builds ``x_t = (1 - t) x0 + t eps`` from the rollout's final latent ``x0`` and evaluates

   - ``v_theta``: the LoRA'd transformer (conditional velocity, with gradient);
   - ``v_ref``: the same transformer with the adapter switched off (no second copy), without
     gradient, only when needed: NormGuard ``lam > 0``, a KL to the reference, DPO, or the
     ``monitor.ratio`` diagnostic;
   - ``v_old`` (NFT, AWM): the old policy, an EMA of the LoRA weights kept as a copy of those
     weights only and swapped in for a no-grad forward (when it equals the current weights,
     ``v_old = sg(v_theta)`` and no forward is spent).

   The loss is the method's base loss (:mod:`ngdiag.train.losses`) plus the NormGuard penalty
   (:func:`ngdiag.train.losses.with_normguard`, reusing ``v_ref``). Gradients are accumulated over
   micro batches and timesteps, averaged over processes, clipped, and applied.
4. The old policy is updated (``old <- d old + (1 - d) theta``), rank 0 appends the iteration's
   metrics to ``metrics.jsonl`` and, every ``checkpoint_every`` iterations and at the end, writes
   ``checkpoint-N/`` (a PEFT adapter folder plus the trainer state).

Multi-process: launch the same command with ``torchrun`` or ``accelerate launch``; the trainer reads
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and uses ``torch.distributed`` (gloo on CPU, NCCL on
GPU). Rollouts are split into contiguous slices, training chunks into equal per-process parts, so
the global batch, and therefore the result, does not depend on the number of processes (up to
floating-point summation order). Only rank 0 writes files.

Resume: rerunning the same config with the same ``output_dir`` continues from the last complete
checkpoint (LoRA weights, old policy, optimizer state, iteration); a different config is refused
(except ``iterations`` and ``checkpoint_every``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ngdiag.errors import CheckpointError, ConfigError, NumericalError
from ngdiag.generation import SamplingConfig, prepare_batch
from ngdiag.models.loading import AdapterDisabled, Checkpoint, load_checkpoint
from ngdiag.sampling import sample
from ngdiag.train.advantages import dpo_pairs, group_advantages
from ngdiag.train.config import RESUMABLE_CHANGES, TrainConfig, config_diff
from ngdiag.train.losses import LossTerms, awm_loss, dpo_loss, flow_matching_loss, nft_loss, with_normguard
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

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
STATE_FILE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_VERSION = 1


# ============================================================================ seeds and plans
def _mix(*parts) -> int:
    """A 63-bit seed derived from the parts (stable across processes, platforms and runs)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(_mix(*parts))


def rollout_plan(config: TrainConfig, iteration: int, prompts: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
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
                perms[epoch] = torch.randperm(len(prompts), generator=_generator(config.seed, "prompts", epoch)).tolist()
            prompt = prompts[perms[epoch][pos]]
        else:
            prompt = prompts[pos]
        for k in range(g_size):
            plan.append((prompt, _mix(config.seed, "rollout", iteration, g * g_size + k)))
    return plan


# ============================================================================ processes
class _Processes:
    """The process group: one process, or ``torch.distributed`` under torchrun / accelerate launch."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available")
            if not dist.is_initialized():
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend)
                self.owns_group = True
            self.world = dist.get_world_size()
            self.rank = dist.get_rank()
        self.comm_device = device if (self.world > 1 and device.type == "cuda") else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from all ranks along dim 0, in rank order."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        local = tensor.contiguous().to(self.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (in place for one process: returned unchanged)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        buf = tensor.to(self.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return (buf / self.world).to(tensor.device)

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


# ============================================================================ result
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


# ============================================================================ files
def latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete ``checkpoint-N`` folder with the largest ``N`` in a run folder, or ``None``."""
    best, best_n = None, -1
    out = Path(output_dir)
    if not out.is_dir():
        return None
    for child in out.iterdir():
        if not child.is_dir() or not child.name.startswith("checkpoint-"):
            continue
        try:
            n = int(child.name.split("-", 1)[1])
        except ValueError:
            continue
        if (child / STATE_FILE).is_file() and (child / "adapter_model.safetensors").is_file() and n > best_n:
            best, best_n = child, n
    return best


def read_metrics(output_dir) -> list:
    """The metrics log of a run folder (``metrics.jsonl``) as a list of dicts."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: the log ends before it
    return rows


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ============================================================================ the trainer
class Trainer:
    """One training run. Usually used through :func:`train`; exposed for notebooks and tests.

    Attributes:
        config: the validated :class:`TrainConfig`.
        checkpoint: the :class:`~ngdiag.models.loading.Checkpoint` being trained: its ``theta`` is
            the LoRA'd velocity model, its ``ref`` the same model with the adapter off.
        peft_model: the PEFT wrapper around the pipeline's transformer (used to save adapters).
        params: the trainable LoRA parameters, in a fixed order.
        counters: forward passes of this process: ``theta`` (training, with gradient), ``ref``
            and ``old`` (no gradient), ``rollout`` (sampled images).
    """

    def __init__(self, config: TrainConfig, processes: Optional[_Processes] = None):
        self.config = config
        self.device = resolve_device(config.model.device)
        self.proc = processes or _Processes(self.device)
        n_units = config.training_units // int(config.optimizer.steps_per_iteration)
        if n_units % self.proc.world or config.rollouts.samples_per_iteration % self.proc.world:
            what = "pairs" if config.method == "dpo" else "rollouts"
            raise ConfigError(
                f"{config.rollouts.samples_per_iteration} rollouts and {n_units} {what} per optimizer step "
                f"must divide evenly over {self.proc.world} processes"
            )
        self.autocast_dtype = self._resolve_mixed_precision()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.model.dtype]
        self.prompts = config.rollouts.load_prompts()
        self.checkpoint: Checkpoint = load_checkpoint(config.model.base, device=self.device, dtype=dtype)
        if self.checkpoint.kind != "pipeline":
            raise ConfigError(f"model.base must be a diffusers pipeline folder, got a {self.checkpoint.kind} checkpoint")
        self.base_path = str(Path(self.checkpoint.path).resolve())
        self.adapter = self.checkpoint.adapter
        self.transformer = self.checkpoint.pipeline.transformer
        self.peft_model = self._add_lora()
        self.params = [p for _, p in self._named_params()]
        self.param_names = [n for n, _ in self._named_params()]
        self.theta = self.checkpoint.theta
        self.ref = AdapterDisabled(self.theta)
        self.checkpoint.ref = self.ref
        self.checkpoint.kind = "peft-lora"
        if config.model.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        from ngdiag.sensitivity.rewards import load_reward

        self.reward = load_reward(config.reward, device=self.device)
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
        )
        self.old_state: Optional[List[torch.Tensor]] = (
            [p.detach().clone() for p in self.params] if config.needs_old_policy else None
        )
        self.old_is_current = True
        self.iteration = 0
        self.counters = {"rollout": 0, "theta": 0, "ref": 0, "old": 0}
        self.sampling = SamplingConfig(
            num_steps=config.sampling.steps,
            guidance_scale=config.sampling.guidance,
            height=config.sampling.height,
            width=config.sampling.width,
            max_sequence_length=config.sampling.max_sequence_length,
            negative_prompt=config.sampling.negative_prompt,
        )
        g = float(config.sampling.guidance)
        train_guidance = 1.0 if self.adapter.uses_cfg(g) else g  # FLUX.1 embeds guidance in cond
        self.train_sampling = dataclasses.replace(self.sampling, num_steps=1, guidance_scale=train_guidance)
        self.output_dir = Path(config.output_dir)
        self.output_lock = None  # rank 0's lock on output_dir (a RunFolder), taken by train() or run()

    # ------------------------------------------------------------------ setup
    def _resolve_mixed_precision(self) -> Optional[torch.dtype]:
        mode = self.config.model.mixed_precision
        if mode == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        if mode == "bf16":
            if self.device.type != "cuda":
                raise ConfigError("model.mixed_precision bf16 needs a GPU; use 'no' (or 'auto') on CPU")
            return torch.bfloat16
        return None

    def _add_lora(self):
        from peft import LoraConfig, get_peft_model

        cfg = self.config.lora
        lora = LoraConfig(
            r=int(cfg.rank),
            lora_alpha=float(cfg.alpha),
            lora_dropout=float(cfg.dropout),
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.config.seed, "lora-init") % (2**31))
            try:
                model = get_peft_model(self.transformer, lora)
            except ValueError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no match"
                raise ConfigError(f"lora.target_modules {list(cfg.target_modules)} do not fit the transformer: {first}") from None
        model.peft_config["default"].base_model_name_or_path = self.base_path
        for name, p in self.transformer.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        return model

    def _named_params(self):
        return [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ old policy
    @contextlib.contextmanager
    def _old_weights(self):
        """Swap the old-policy LoRA weights in for the block (restored in ``finally``)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.old_state):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def _update_old(self) -> None:
        if self.old_state is None:
            return
        d = float(self.config.old_decay)
        with torch.no_grad():
            for o, p in zip(self.old_state, self.params):
                o.mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.old_is_current = d == 0.0

    # ------------------------------------------------------------------ rollouts
    def _local_slice(self, n: int) -> range:
        per = n // self.proc.world
        return range(self.proc.rank * per, (self.proc.rank + 1) * per)

    def rollouts(self, iteration: int) -> dict:
        """Sample, decode and score this process's share of the iteration's rollouts; gather all.

        Returns a dict with ``x0`` (all final latents, ``(N, ...)``, float32, on the device),
        ``rewards`` (``(N,)`` float64 CPU), ``prompts`` (``N`` strings) and ``sigmas``.
        """
        plan = rollout_plan(self.config, iteration, self.prompts)
        ids = list(self._local_slice(len(plan)))
        bs = int(self.config.rollouts.batch_size)
        xs, rs, sigmas = [], [], None
        for start in range(0, len(ids), bs):
            chunk = ids[start : start + bs]
            prompts = [plan[i][0] for i in chunk]
            seeds = [plan[i][1] for i in chunk]
            batch = prepare_batch(self.checkpoint, prompts, seeds, self.sampling, sample_ids=chunk)
            with self._autocast():
                result = sample(batch.conditioning.guided(self.theta), batch.x_init, batch.sigmas)
            x = result.x_final.float()
            if not torch.isfinite(x).all():
                raise NumericalError(f"a rollout of iteration {iteration} is not finite (samples {chunk})")
            with torch.no_grad(), self._autocast():
                images = self.adapter.decode(x.to(self.adapter.dtype), batch.config.height, batch.config.width)
                scores = self.reward(images.float(), prompts)
            xs.append(x)
            rs.append(scores.detach().to(torch.float64))
            sigmas = batch.sigmas
            self.counters["rollout"] += len(chunk)
        local_x = torch.cat(xs)
        local_r = torch.cat(rs).to(local_x.device)
        rewards = self.proc.all_gather_cat(local_r).cpu()
        if not torch.isfinite(rewards).all():
            raise NumericalError(f"the reward of iteration {iteration} is not finite")
        return {
            "x0": self.proc.all_gather_cat(local_x),
            "rewards": rewards,
            "prompts": [p for p, _ in plan],
            "sigmas": sigmas,
        }

    # ------------------------------------------------------------------ training
    def _conditioning(self, prompts: List[str]):
        """The :class:`~ngdiag.models.families.Conditioning` of the training forwards (no CFG)."""
        batch = prepare_batch(self.checkpoint, prompts, [0] * len(prompts), self.train_sampling)
        return batch.conditioning

    def _noise(self, iteration: int, unit: int, j: int, like: torch.Tensor) -> torch.Tensor:
        g = _generator(self.config.seed, "eps", iteration, unit, j)
        return torch.randn(like.shape, generator=g, dtype=torch.float32).to(like.device)

    def _forward(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, *, grad: bool) -> torch.Tensor:
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self._autocast():
            v = model(x.to(self.adapter.dtype) if self.autocast_dtype is None else x, t, **cond)
        return v.float()

    def _velocities(self, x_t: torch.Tensor, t_vec: torch.Tensor, cond: dict, *, need_old: bool):
        """``(v_theta, v_ref or None, v_old or None)`` at ``(x_t, t)``; the no-grad ones first."""
        cfg = self.config
        v_ref = v_old = None
        if cfg.needs_reference or cfg.monitor.ratio:
            v_ref = self._forward(self.ref, x_t, t_vec, cond, grad=False)
            self.counters["ref"] += x_t.shape[0]
        exact_old = self.old_is_current and float(cfg.lora.dropout) == 0.0
        if need_old and not exact_old:
            with self._old_weights():
                v_old = self._forward(self.theta, x_t, t_vec, cond, grad=False)
            self.counters["old"] += x_t.shape[0]
        self.transformer.train(float(cfg.lora.dropout) > 0)
        try:
            v_theta = self._forward(self.theta, x_t, t_vec, cond, grad=True)
        finally:
            self.transformer.eval()
        self.counters["theta"] += x_t.shape[0]
        if need_old and exact_old:
            v_old = v_theta.detach()
        return v_theta, v_ref, v_old

    def _loss(self, units: List, t: float, j: int, data: dict, cond, iteration: int) -> Tuple[LossTerms, list]:
        """The loss of one micro batch at one time ``t``; also the per-sample log-ratios (or ``[]``)."""
        cfg = self.config
        x0_all = data["x0"]
        lam = float(cfg.normguard.lam)
        if cfg.method == "dpo":
            w_ids = [w for w, _ in units]
            l_ids = [l for _, l in units]
            x0 = torch.cat([x0_all[w_ids], x0_all[l_ids]])
            eps_one = torch.stack([self._noise(iteration, u, j, x0_all[0]) for u in data["unit_ids"]])
            eps = torch.cat([eps_one, eps_one])
            t_vec = torch.full((x0.shape[0],), float(t), device=x0.device, dtype=torch.float32)
            x_t = (1.0 - t) * x0 + t * eps
            cond2 = _repeat_cond(cond.cond, 2, cond.shared_keys)
            v_theta, v_ref, _ = self._velocities(x_t, t_vec, cond2, need_old=False)
            b = len(units)
            v_w, v_l = v_theta[:b], v_theta[b:]
            r_w, r_l = v_ref[:b], v_ref[b:]
            base = dpo_loss(v_w, v_l, r_w, r_l, eps[:b] - x0[:b], eps[b:] - x0[b:], beta=cfg.dpo.beta)
            total = with_normguard(base, (v_w, v_l), (r_w, r_l), lam)
            return total, _log_ratios(v_theta, v_ref)

        ids = list(units)
        x0 = x0_all[ids]
        eps = torch.stack([self._noise(iteration, u, j, x0_all[0]) for u in ids])
        t_vec = torch.full((len(ids),), float(t), device=x0.device, dtype=torch.float32)
        x_t = (1.0 - t) * x0 + t * eps
        need_old = cfg.method in ("nft", "awm")
        v_theta, v_ref, v_old = self._velocities(x_t, t_vec, cond.cond, need_old=need_old)
        adv = data["advantages"][ids].to(x0.device)
        if cfg.method == "nft":
            base = nft_loss(
                v_theta, v_old, x_t, x0, t_vec, adv,
                beta=cfg.nft.beta, adv_clip_max=cfg.nft.adv_clip_max, kl_beta=cfg.nft.kl_beta, v_ref=v_ref,
            )
        elif cfg.method == "awm":
            base = awm_loss(
                v_theta, v_old, x0, eps, t_vec, adv,
                clip_range=cfg.awm.clip_range, adv_clip_max=cfg.awm.adv_clip_max, weighting=cfg.awm.weighting,
                ghuber_power=cfg.awm.ghuber_power, kl_beta=cfg.awm.kl_beta, v_ref=v_ref,
                ema_kl_beta=cfg.awm.ema_kl_beta, v_ema=v_old if cfg.awm.ema_kl_beta > 0 else None,
            )
        else:
            weight = data["fm_weights"][ids].to(device=x0.device, dtype=torch.float32)
            fm = flow_matching_loss(v_theta, x0, eps, weight=weight)
            value = float(fm.detach())
            base = LossTerms(total=fm, terms={"loss": value, "fm_loss": value})
        if v_ref is None:
            return base, []
        return with_normguard(base, v_theta, v_ref, lam), _log_ratios(v_theta, v_ref)

    def _fm_weights(self, advantages: torch.Tensor) -> torch.Tensor:
        mode = self.config.fm.weighting
        if mode == "uniform":
            return torch.ones_like(advantages)
        if mode == "positive":
            return (advantages > 0).to(advantages.dtype)
        w = torch.exp(advantages / float(self.config.fm.temperature))
        return w / w.mean()

    def _sync_gradients(self) -> None:
        if self.proc.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.proc.mean(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def train_iteration(self, iteration: int, data: dict) -> dict:
        """The optimizer steps of one iteration on gathered rollouts; returns the averaged loss terms."""
        cfg = self.config
        n_samples = data["x0"].shape[0]
        data["advantages"] = group_advantages(
            data["rewards"], cfg.rollouts.group_size, normalize=cfg.advantages.normalize, eps=cfg.advantages.eps
        ).to(torch.float32)
        if cfg.method == "dpo":
            units = dpo_pairs(data["rewards"], cfg.rollouts.group_size, cfg.dpo.pairs_per_group)
        else:
            units = list(range(n_samples))
            if cfg.method == "fm":
                data["fm_weights"] = self._fm_weights(data["advantages"])
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
                cfg.timesteps.kind, n_t, _generator(cfg.seed, "t", iteration, s),
                shift=cfg.timesteps.shift, t_min=cfg.timesteps.t_min, t_max=cfg.timesteps.t_max,
                logit_mean=cfg.timesteps.logit_mean, logit_std=cfg.timesteps.logit_std, schedule=data["sigmas"],
            ).tolist()
            self.optimizer.zero_grad(set_to_none=True)
            for m0 in range(0, per_rank, micro):
                idx = mine_idx[m0 : m0 + micro]
                mb_units = [units[k] for k in idx]
                first = [u[0] for u in mb_units] if cfg.method == "dpo" else mb_units
                cond = self._conditioning([data["prompts"][i] for i in first])
                weight = len(idx) / (per_rank * n_t)
                for j, t in enumerate(ts):
                    step_data = dict(data, unit_ids=idx)
                    terms, logr = self._loss(mb_units, t, j, step_data, cond, iteration)
                    if not math.isfinite(terms.terms.get("loss", 0.0)):
                        raise NumericalError(f"the loss is not finite at iteration {iteration} (t={t:.4f})")
                    (terms.total * weight).backward()
                    for key, value in terms.terms.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * weight / steps
                    log_ratio_sum += float(sum(logr))
                    log_ratio_count += len(logr)
            self._sync_gradients()
            max_norm = cfg.optimizer.max_grad_norm
            norm = torch.nn.utils.clip_grad_norm_(
                self.params, float(max_norm) if max_norm else float("inf"), error_if_nonfinite=False
            )
            if not torch.isfinite(norm):
                raise NumericalError(f"the gradient is not finite at iteration {iteration}, optimizer step {s}")
            grad_norms.append(float(norm))
            self.optimizer.step()
            self.old_is_current = False
        self._update_old()
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
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        if self.old_state is not None:
            tensors.update({f"old.{i}": o.detach().cpu().contiguous() for i, o in enumerate(self.old_state)})
        opt_state = self.optimizer.state_dict()
        for i, st in opt_state["state"].items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    tensors[f"optim.{i}.{key}"] = torch.tensor(float(value))
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors

    def state_json(self) -> dict:
        groups = self.optimizer.state_dict()["param_groups"]
        return {
            "version": STATE_VERSION,
            "iteration": self.iteration,
            "param_names": self.param_names,
            "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups],
            "old_is_current": self.old_is_current,
            "world_size": self.proc.world,
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-N`` (PEFT adapter + trainer state) atomically; rank 0 only."""
        from safetensors.torch import save_file

        final = self.output_dir / f"checkpoint-{self.iteration}"
        tmp = self.output_dir / f".checkpoint-{self.iteration}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        save_file(self.state_tensors(), str(tmp / STATE_TENSORS))
        (tmp / STATE_FILE).write_text(json.dumps(self.state_json(), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._write_csv()
        return final

    def load_state(self, folder: Path) -> None:
        """Restore LoRA weights, old policy, optimizer state, iteration and RNG from ``checkpoint-N``."""
        from safetensors.torch import load_file

        try:
            meta = json.loads((folder / STATE_FILE).read_text())
            tensors = load_file(str(folder / STATE_TENSORS))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the trainer state in {folder}: {exc.__class__.__name__}") from None
        if meta.get("param_names") != self.param_names:
            raise ConfigError(f"the LoRA parameters in {folder} do not match this config's LoRA")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
            if self.old_state is not None:
                for i, o in enumerate(self.old_state):
                    o.copy_(tensors[f"old.{i}"].to(o.device, o.dtype))
        state: Dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        groups = [dict(g) for g in meta["param_groups"]]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.iteration = int(meta["iteration"])
        self.old_is_current = bool(meta.get("old_is_current", False))

    def _write_csv(self) -> None:
        rows = read_metrics(self.output_dir)
        if not rows:
            return
        import pandas as pd

        tmp = self.output_dir / f".{METRICS_CSV}.tmp"
        pd.DataFrame(rows).to_csv(tmp, index=False)
        os.replace(tmp, self.output_dir / METRICS_CSV)

    # ------------------------------------------------------------------ run
    def _prepare_output(self) -> Optional[Path]:
        """Check the output folder; returns the checkpoint to resume from (or ``None``)."""
        return check_output_dir(self.config, self.prompts)

    def _start_files(self, resumed: Optional[int]) -> None:
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        # rewritten on resume too, to record the resumable changes (iterations, checkpoint_every)
        _write_text_atomic(out / CONFIG_FILE, self.config.to_yaml())
        import ngdiag

        info = {
            "ngdiag": ngdiag.__version__,
            "base": self.base_path,
            "family": self.checkpoint.family,
            "prompts_sha256": _prompts_hash(self.prompts),
            "num_prompts": len(self.prompts),
            "lora_parameters": int(sum(p.numel() for p in self.params)),
        }
        _write_text_atomic(out / RUN_FILE, json.dumps(info, indent=2))
        keep = [r for r in read_metrics(out) if int(r.get("iteration", -1)) < (resumed or 0)]
        _write_text_atomic(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in keep))

    def run(self, progress: Optional[Callable[[int, int, Optional[dict]], None]] = None) -> TrainResult:
        """Train until ``config.iterations`` (resuming from the output folder's last checkpoint).

        Rank 0 holds the output folder's lock for the whole run (:func:`train` takes it before the
        model is loaded; a :class:`Trainer` used on its own takes it here).
        """
        with contextlib.ExitStack() as stack:
            if self.output_lock is None and self.proc.is_main:
                try:
                    self.output_lock = stack.enter_context(lock_output_dir(self.config))
                except ConfigError as exc:
                    self.proc.broadcast_object(("error", str(exc)))
                    raise
            return self._run(progress)

    def _run(self, progress) -> TrainResult:
        cfg = self.config
        status = None
        if self.proc.is_main:
            try:
                found = self._prepare_output()
                status = ("ok", None if found is None else str(found))
            except ConfigError as exc:
                status = ("error", str(exc))
        status = self.proc.broadcast_object(status)
        if status[0] == "error":
            raise ConfigError(status[1])
        resume = status[1]
        resumed_from = None
        if resume is not None:
            self.load_state(Path(resume))
            resumed_from = self.iteration
        self.proc.barrier()
        if self.proc.is_main:
            self._start_files(resumed_from)
        self.proc.barrier()
        total = int(cfg.iterations)
        if progress and self.proc.is_main:
            progress(min(self.iteration, total), total, None)
        last = Path(resume) if resume is not None else None
        while self.iteration < total:
            n = self.iteration
            start = time.perf_counter()
            data = self.rollouts(n)
            terms = self.train_iteration(n, data)
            self.iteration = n + 1
            rewards = data["rewards"]
            row = {
                "iteration": n,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std(correction=0)),
                "reward_min": float(rewards.min()),
                "reward_max": float(rewards.max()),
            }
            row.update(_rename_terms(terms))
            row.update({"lr": float(self.optimizer.param_groups[0]["lr"]), "samples": int(rewards.numel()),
                        "world_size": self.proc.world, "time_s": time.perf_counter() - start})
            if self.proc.is_main:
                with open(self.output_dir / METRICS_FILE, "a") as fh:
                    fh.write(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n")
                if self.iteration % int(cfg.checkpoint_every) == 0 or self.iteration == total:
                    last = self.save_checkpoint()
            elif self.iteration % int(cfg.checkpoint_every) == 0 or self.iteration == total:
                last = self.output_dir / f"checkpoint-{self.iteration}"
            if progress and self.proc.is_main:
                progress(self.iteration, total, row)
        self.proc.barrier()
        if last is None:
            last = latest_checkpoint(self.output_dir)
        if self.proc.is_main and resumed_from is not None and resumed_from >= total:
            self._write_csv()
        metrics = read_metrics(self.output_dir) if self.proc.is_main else []
        return TrainResult(self.output_dir, self.iteration, last, resumed_from, metrics, dict(self.counters))


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


_RENAMES = {
    "normguard": "penalty",
    "normguard_active_fraction": "hinge_active_fraction",
    "normguard_mean_ratio": "norm_ratio_mean",
}


def _rename_terms(terms: dict) -> dict:
    return {_RENAMES.get(k, k): v for k, v in terms.items()}


def _log_ratios(v_theta: torch.Tensor, v_ref: torch.Tensor) -> list:
    """Per-sample ``log(||v_theta|| / ||v_ref||)`` (detached), as floats."""
    nt = v_theta.detach().reshape(v_theta.shape[0], -1).float().norm(dim=1)
    nr = v_ref.detach().reshape(v_ref.shape[0], -1).float().norm(dim=1)
    return torch.log(nt / nr).double().cpu().tolist()


def _repeat_cond(cond: dict, times: int, shared_keys=()) -> dict:
    """Conditioning of a batch repeated ``times`` (per-sample tensors concatenated, shared ones kept)."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and key not in shared_keys:
            out[key] = torch.cat([value] * times)
        else:
            out[key] = value
    return out


def _train_inputs(config: TrainConfig) -> list:
    inputs = [("model.base", config.model.base), ("rollouts.prompts_file", config.rollouts.prompts_file)]
    if config.reward:
        from ngdiag.sensitivity.rewards import parse_reward_spec

        inputs.append(("reward weights", parse_reward_spec(config.reward)[1]))
    return inputs


def lock_output_dir(config: TrainConfig):
    """Check ``output_dir`` (not a link or a file, writable, clear of the base, prompts file and reward
    weights), create and lock it: the returned :class:`~ngdiag.runs.RunFolder` closes the lock."""
    from ngdiag.runs import lock_output

    return lock_output(config.output_dir, inputs=_train_inputs(config), what="output_dir")


def check_output_dir(config: TrainConfig, prompts: Sequence[str]) -> Optional[Path]:
    """What ``output_dir`` holds: nothing, or a run of this config (returns its newest checkpoint to
    resume from, or ``None``). Anything else is a :class:`ConfigError`. Needs no model."""
    out = Path(config.output_dir)
    saved = out / CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    if not saved.is_file():
        if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise ConfigError(f"output_dir {out} is not empty and holds no ngdiag run ({CONFIG_FILE} missing)")
        return None
    import yaml

    try:
        previous = yaml.safe_load(saved.read_bytes().decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{saved} is not readable YAML; remove the folder or choose another output_dir") from None
    if not isinstance(previous, dict):
        raise ConfigError(f"{saved} is not a training config; remove the folder or choose another output_dir")
    diffs = config_diff(previous, config.to_dict(), skip=RESUMABLE_CHANGES)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(
            f"output_dir {out} holds a run with a different config ({diffs[0]}{more}); "
            "rerun with the same config to resume, or choose another output_dir"
        )
    run = out / RUN_FILE
    if run.is_file():
        try:
            info = json.loads(run.read_bytes().decode("utf-8"))
        except (ValueError, OSError):
            raise ConfigError(f"{run} is corrupt; remove the folder or choose another output_dir") from None
        if not isinstance(info, dict):
            raise ConfigError(f"{run} is corrupt; remove the folder or choose another output_dir")
        if info.get("prompts_sha256") not in (None, _prompts_hash(prompts)):
            raise ConfigError(f"the prompts changed since the run in {out} started; resume needs the same prompts")
    return latest_checkpoint(out)


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
    processes = _Processes(device)
    try:
        with contextlib.ExitStack() as stack:
            # The output folder is checked and locked (rank 0) before the model is loaded.
            status, lock = ("ok", None), None
            if processes.is_main:
                try:
                    lock = stack.enter_context(lock_output_dir(config))
                    check_output_dir(config, config.rollouts.load_prompts())
                except ConfigError as exc:
                    status = ("error", str(exc))
            status = processes.broadcast_object(status)
            if status[0] == "error":
                raise ConfigError(status[1])
            trainer = Trainer(config, processes)
            trainer.output_lock = lock
            return trainer.run(progress)
    finally:
        processes.close()
