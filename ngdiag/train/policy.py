"""The model being trained: LoRA on the base pipeline's transformer, and its three velocities.

- ``v_theta``: the LoRA'd transformer (conditional velocity, with gradient);
- ``v_ref``: the same transformer with the adapter switched off (no second copy), without gradient;
- ``v_old`` (NFT, AWM): the old policy, an EMA of the LoRA weights kept as a copy of those weights
  only and swapped in for a no-grad forward (when it equals the current weights,
  ``v_old = sg(v_theta)`` and no forward is spent).

:meth:`Policy.velocities` evaluates the ones a loss needs and counts the forwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import torch

from ngdiag.core.errors import ConfigError
from ngdiag.models.generation import prepare_batch
from ngdiag.models.loading import Checkpoint, load_checkpoint
from ngdiag.models.pair import AdapterDisabled
from ngdiag.train.methods.base import Velocities
from ngdiag.core.seeds import derive_seed

if TYPE_CHECKING:
    from ngdiag.train.config import TrainConfig

__all__ = ["Policy"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Policy:
    """The LoRA'd pipeline of a run, its old-policy EMA and its forward counters.

    Args:
        config: the run's config (model, LoRA, seed, sampling guidance).
        device: where the model runs.
        old_policy: keep the EMA of the LoRA weights (NFT, AWM).

    Attributes:
        checkpoint: the :class:`~ngdiag.models.loading.Checkpoint` being trained: its ``theta`` is
            the LoRA'd velocity model, its ``ref`` the same model with the adapter off.
        peft_model: the PEFT wrapper around the pipeline's transformer (used to save adapters).
        params, param_names: the trainable LoRA parameters, in a fixed order.
        old_state: the old policy's copy of ``params`` (``None`` without an old policy);
            ``old_is_current``: whether it equals ``params``.
        counters: forward passes of this process: ``theta`` (training, with gradient), ``ref``
            and ``old`` (no gradient), ``rollout`` (sampled images).
    """

    def __init__(self, config: "TrainConfig", device: torch.device, *, old_policy: bool):
        self.config = config
        self.device = device
        self.autocast_dtype = self._resolve_mixed_precision()
        self.checkpoint: Checkpoint = load_checkpoint(config.model.base, device=device, dtype=_DTYPES[config.model.dtype])
        if self.checkpoint.kind != "pipeline":
            raise ConfigError(f"model.base must be a diffusers pipeline folder, got a {self.checkpoint.kind} checkpoint")
        self.base_path = str(Path(self.checkpoint.path).resolve())
        self.adapter = self.checkpoint.adapter
        self.transformer = self.checkpoint.pipeline.transformer
        self.peft_model = self._add_lora()
        named = [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        self.theta = self.checkpoint.theta
        self.ref = AdapterDisabled(self.theta)
        self.checkpoint.ref = self.ref
        self.checkpoint.kind = "peft-lora"
        if config.model.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.old_state: Optional[List[torch.Tensor]] = [p.detach().clone() for p in self.params] if old_policy else None
        self.old_is_current = True
        self.counters = {"rollout": 0, "theta": 0, "ref": 0, "old": 0}
        g = float(config.sampling.guidance_scale)
        train_guidance = 1.0 if self.adapter.uses_cfg(g) else g  # FLUX.1 embeds guidance in cond
        self.train_sampling = dataclasses.replace(config.sampling, num_steps=1, guidance_scale=train_guidance)

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
            torch.manual_seed(derive_seed(self.config.seed, "lora-init") % (2**31))
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

    def autocast(self):
        """The mixed-precision context of every forward (a no-op without mixed precision)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ forwards
    def conditioning(self, prompts: List[str]):
        """The :class:`~ngdiag.models.families.Conditioning` of the training forwards (no CFG)."""
        batch = prepare_batch(self.checkpoint, prompts, [0] * len(prompts), self.train_sampling)
        return batch.conditioning

    def _forward(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, *, grad: bool) -> torch.Tensor:
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self.autocast():
            v = model(x.to(self.adapter.dtype) if self.autocast_dtype is None else x, t, **cond)
        return v.float()

    def velocities(self, x_t: torch.Tensor, t_vec: torch.Tensor, cond: dict, *, need_ref: bool,
                   need_old: bool) -> Velocities:
        """``v_theta`` at ``(x_t, t)``, and ``v_ref`` / ``v_old`` when asked; the no-grad ones first."""
        dropout = float(self.config.lora.dropout)
        v_ref = v_old = None
        if need_ref:
            v_ref = self._forward(self.ref, x_t, t_vec, cond, grad=False)
            self.counters["ref"] += x_t.shape[0]
        exact_old = self.old_is_current and dropout == 0.0
        if need_old and not exact_old:
            with self._old_weights():
                v_old = self._forward(self.theta, x_t, t_vec, cond, grad=False)
            self.counters["old"] += x_t.shape[0]
        self.transformer.train(dropout > 0)
        try:
            v_theta = self._forward(self.theta, x_t, t_vec, cond, grad=True)
        finally:
            self.transformer.eval()
        self.counters["theta"] += x_t.shape[0]
        if need_old and exact_old:
            v_old = v_theta.detach()
        return Velocities(v_theta, v_ref, v_old)

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

    def update_old(self, decay: float) -> None:
        """``old <- d old + (1 - d) theta`` after an iteration (nothing without an old policy)."""
        if self.old_state is None:
            return
        d = float(decay)
        with torch.no_grad():
            for o, p in zip(self.old_state, self.params):
                o.mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.old_is_current = d == 0.0
