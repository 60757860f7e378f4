"""The (theta, ref) pair of a LoRA checkpoint: one module, the adapter switched on and off.

For a LoRA checkpoint the reference is theta's own transformer with its adapter switched off (no
second copy in memory): LoRA layers run their base layer and ``modules_to_save`` wrappers their
original module (:func:`adapters_disabled`, :class:`AdapterDisabled`). Both can also run in one
forward on a doubled batch, the first half with the adapter and the second without, with peft's
mixed-adapter batches (:func:`mixed_adapter_batch`, :class:`FusedLoraPair`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.core.sampling import VelocityEval

__all__ = [
    "adapter_layers",
    "adapters_disabled",
    "layers_disabled",
    "mixed_batch_problem",
    "mixed_adapter_batch",
    "AdapterDisabled",
    "FusedLoraPair",
]

_MIXED_BATCH_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _auxiliary_wrapper_types() -> tuple:
    """peft's wrappers around fully trained module copies (``modules_to_save``, trainable tokens)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper

        return (AuxiliaryTrainingWrapper,)
    except ImportError:  # peft < 0.15 has only ModulesToSaveWrapper
        from peft.utils.other import ModulesToSaveWrapper

        return (ModulesToSaveWrapper,)


def adapter_layers(module: torch.nn.Module) -> list:
    """Every PEFT layer in ``module`` that an adapter changes: LoRA (and other tuner) layers, and the
    wrappers of ``modules_to_save`` copies, which are not tuner layers but replace a whole module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds = (BaseTunerLayer,) + _auxiliary_wrapper_types()
    return [m for m in module.modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module, layers: Optional[list] = None):
    """Switch every adapter in ``module`` off inside the block: LoRA layers run their base layer and
    ``modules_to_save`` wrappers their original module. State and ``requires_grad`` flags are restored
    in ``finally`` (peft's own switch turns gradients of the adapter weights on when re-enabling).

    ``layers``: ``adapter_layers(module)`` when the caller already has it (a walk over every submodule,
    which callers that switch at every step do once)."""
    with layers_disabled(adapter_layers(module) if layers is None else layers):
        yield


@contextlib.contextmanager
def layers_disabled(layers):
    """Switch the adapters of the given PEFT ``layers`` (from :func:`adapter_layers`) off inside the block,
    the others stay as they are; state and ``requires_grad`` flags are restored in ``finally``."""
    layers = list(layers)
    previous = [m.disable_adapters for m in layers]
    params = [p for m in layers for p in m.parameters()]
    grads = [p.requires_grad for p in params]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled in zip(layers, previous):
            m.enable_adapters(not was_disabled)
        for p, flag in zip(params, grads):
            p.requires_grad_(flag)


def mixed_batch_problem(module: torch.nn.Module) -> Optional[str]:
    """Why peft cannot run ``module``'s adapters in a mixed-adapter batch, or ``None`` when it can.

    peft refuses ``adapter_names`` for DoRA layers, and its ``modules_to_save`` wrappers split only
    modules whose one input is the batch (linear, embedding, convolution layers).
    """
    from peft.tuners.lora import LoraLayer

    wrappers = _auxiliary_wrapper_types()
    for name, m in module.named_modules():
        if isinstance(m, LoraLayer):
            if any(getattr(m, "use_dora", {}).get(a, False) for a in m.active_adapters):
                return f"{name} is a DoRA layer, which peft cannot run in a mixed-adapter batch"
        elif isinstance(m, wrappers) and not isinstance(m.original_module, _MIXED_BATCH_MODULES):
            return (f"{name} is a modules_to_save copy of a {type(m.original_module).__name__}, which peft cannot "
                    "run in a mixed-adapter batch")
    return None


@contextlib.contextmanager
def mixed_adapter_batch(module: torch.nn.Module, pattern: list):
    """Evaluate different adapters on different samples of one batch (peft's mixed-batch forward).

    ``pattern`` gives an adapter name per sample (``"__base__"`` for the adapter switched off); a
    layer that sees ``m * len(pattern)`` samples (CFG batches) uses the pattern tiled ``m`` times.
    LoRA layers and ``modules_to_save`` wrappers both follow the pattern; check
    :func:`mixed_batch_problem` first.
    """
    from peft.tuners.lora import LoraLayer

    def pre_hook(layer, args, kwargs):
        n = args[0].shape[0] if args else kwargs["x"].shape[0]
        reps, rest = divmod(n, len(pattern))
        if rest:
            raise CheckpointError(f"mixed adapter batch of {n} samples does not fit a pattern of {len(pattern)}")
        return args, {**kwargs, "adapter_names": list(pattern) * reps}

    kinds = (LoraLayer,) + _auxiliary_wrapper_types()
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in module.modules() if isinstance(m, kinds)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class AdapterDisabled(torch.nn.Module):
    """The reference of a LoRA pair: the same velocity model, evaluated with its adapters off.

    The adapter layers are found on the first call and kept (finding them walks every submodule,
    about 3 % of an audit of the world's base when done at every step: docs/performance.md); an
    adapter added to the model later is not switched off.
    """

    def __init__(self, velocity: torch.nn.Module):
        super().__init__()
        self.velocity = velocity
        self._layers: Optional[list] = None

    def forward(self, x, t, **cond):
        if self._layers is None:
            self._layers = adapter_layers(self.velocity)
        with adapters_disabled(self.velocity, self._layers):
            return self.velocity(x, t, **cond)


class FusedLoraPair:
    """Theta and ref of a LoRA checkpoint in one forward on the doubled batch ``[x; x]``.

    The first half of the batch runs with the adapter, the second with it switched off
    (peft's mixed-adapter batches: LoRA layers and ``modules_to_save`` copies alike); the guided
    velocities are then split. Numerically this equals two separate passes up to float rounding of
    the larger batched matmuls.

    Args:
        conditioning: the batch's :class:`~ngdiag.models.families.Conditioning`.
        velocity_module: theta's velocity model (the module that carries the adapter).
        adapter_name: the adapter's name in peft.

    Raises:
        ConfigError: a checkpoint peft cannot mix (DoRA layers, ``modules_to_save`` copies of modules
            other than linear, embedding or convolution layers).
    """

    def __init__(self, conditioning, velocity_module: torch.nn.Module, adapter_name: str):
        problem = mixed_batch_problem(velocity_module)
        if problem is not None:
            raise ConfigError(f"theta and ref cannot share one mixed-adapter forward: {problem}; use fuse_lora=False")
        self.module = velocity_module
        self.guided = conditioning.repeat(2).guided(velocity_module)
        self.adapter_name = adapter_name

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[VelocityEval, VelocityEval]:
        """Theta's and ref's :class:`~ngdiag.core.sampling.VelocityEval` at ``(x, t)``."""
        n = x.shape[0]
        pattern = [self.adapter_name] * n + ["__base__"] * n
        with mixed_adapter_batch(self.module, pattern):
            ev = self.guided(torch.cat([x, x]), torch.cat([t, t]))
        split = lambda v: (None, None) if v is None else v.chunk(2)  # noqa: E731
        (tc, rc), (tg, rg), (tu, ru) = split(ev.cond), split(ev.guided), split(ev.uncond)
        return VelocityEval(cond=tc, guided=tg, uncond=tu), VelocityEval(cond=rc, guided=rg, uncond=ru)
