"""Switch parts of a fine-tune back to its base: the groups of per-layer attribution.

A *group* is a set of places where theta differs from the reference, named by the module it lives in:

- ``group_by="module"``: every adapted module on its own (``transformer_blocks.3.attn.to_out.0``);
- ``group_by="block"``: the modules of one transformer block together, named by the block's path up
  to its index (``transformer_blocks.3``, ``single_transformer_blocks.0``); a module outside any
  numbered block (``proj_out``, ``context_embedder``) is a group of its own.

Two kinds of checkpoints:

- LoRA (:class:`AdapterGroups`): a group's PEFT layers are switched off (peft's per-layer switch,
  :func:`ngdiag.models.pair.layers_disabled`: LoRA layers run their base layer, ``modules_to_save``
  wrappers their original module). Nothing is copied.
- Full fine-tunes (:class:`WeightGroups`): a group's parameters of theta are swapped for the base's
  (and back), found by comparing theta's and the reference's parameters; groups whose parameters are all
  equal to the base's are left out.

Both restore the exact previous state in ``finally``. ``without(g)`` gives the model with group ``g``
reverted to the base (theta otherwise), ``only(g)`` the base with only group ``g`` of theta; each returns
the context to enter and which velocity model to call inside it (``"theta"`` or ``"ref"``).
"""

from __future__ import annotations

import contextlib
import re
import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.models.pair import adapter_layers, layers_disabled

__all__ = ["GROUPINGS", "group_name", "AdapterGroups", "WeightGroups", "groups_of"]

GROUPINGS = ("block", "module")
_BLOCK = re.compile(r"^(.*?(?:blocks?|layers?)\.\d+)(?:\.|$)")


def group_name(module_name: str, group_by: str) -> str:
    """The group of a module: the module itself, or its numbered block (``transformer_blocks.3``)."""
    if group_by not in GROUPINGS:
        raise ConfigError(f"group must be one of {', '.join(GROUPINGS)}, got {group_by!r}")
    if group_by == "module":
        return module_name
    match = _BLOCK.match(module_name)
    return match.group(1) if match else module_name


class AdapterGroups:
    """The LoRA layers of a transformer in groups; ``without(g)`` / ``only(g)`` switch them.

    Args:
        transformer: the transformer carrying the adapter (the checkpoint's ``pipeline.transformer``).
        group_by: ``"block"`` or ``"module"``.
    """

    kind = "lora"

    def __init__(self, transformer: torch.nn.Module, group_by: str = "block"):
        layers = set(map(id, adapter_layers(transformer)))
        self.group_by = group_by
        self.members: dict = {}
        for name, module in transformer.named_modules():
            if id(module) in layers:
                self.members.setdefault(group_name(name, group_by), []).append((name, module))
        if not self.members:
            raise CheckpointError("the transformer carries no LoRA adapter: nothing to attribute")
        self.names = list(self.members)

    def modules(self, group: str) -> list:
        return [n for n, _ in self.members[group]]

    def _check(self, group: str) -> None:
        if group not in self.members:
            raise ConfigError(f"unknown group {group!r}")

    def without(self, group: str):
        """Theta with ``group``'s adapters off: ``(context, "theta")``."""
        self._check(group)
        return layers_disabled(m for _, m in self.members[group]), "theta"

    def only(self, group: str):
        """Only ``group``'s adapters on: ``(context, "theta")``."""
        self._check(group)
        return layers_disabled(m for g, pairs in self.members.items() if g != group for _, m in pairs), "theta"


class WeightGroups:
    """The parameters in which a full fine-tune differs from its base, in groups.

    Args:
        theta, ref: the fine-tuned and the base transformer (separate modules of the same architecture).
        group_by: ``"block"`` or ``"module"``.

    Raises:
        CheckpointError: the two transformers have different parameters (names or shapes), or theta
            equals its base everywhere (nothing to attribute).
    """

    kind = "weights"

    def __init__(self, theta: torch.nn.Module, ref: torch.nn.Module, group_by: str = "block"):
        mine, base = dict(theta.named_parameters()), dict(ref.named_parameters())
        if mine.keys() != base.keys():
            odd = sorted(set(mine) ^ set(base))[:3]
            raise CheckpointError(f"the fine-tune and its base have different parameters (e.g. {', '.join(odd)})")
        self.group_by = group_by
        self.members: dict = {}
        for name, p in mine.items():
            q = base[name]
            if p.shape != q.shape:
                raise CheckpointError(f"{name} has shape {tuple(p.shape)} in the fine-tune and {tuple(q.shape)} in the base")
            if torch.equal(p, q):
                continue
            module = name.rpartition(".")[0]
            self.members.setdefault(group_name(module, group_by), []).append((name, p, q))
        if not self.members:
            raise CheckpointError("the fine-tune's weights equal its base's: nothing to attribute")
        self.names = list(self.members)

    def modules(self, group: str) -> list:
        return list(dict.fromkeys(n.rpartition(".")[0] for n, _, _ in self.members[group]))

    def _check(self, group: str) -> None:
        if group not in self.members:
            raise ConfigError(f"unknown group {group!r}")

    @contextlib.contextmanager
    def _swapped(self, group: str, into_theta: bool):
        entries = self.members[group]
        saved = [(dst, dst.detach().clone()) for _, p, q in entries for dst in ([p] if into_theta else [q])]
        try:
            with torch.no_grad():
                for _, p, q in entries:
                    (p if into_theta else q).copy_(q if into_theta else p)
            yield
        finally:
            with torch.no_grad():
                for dst, old in saved:
                    dst.copy_(old)

    def without(self, group: str):
        """Theta with ``group``'s parameters set to the base's: ``(context, "theta")``."""
        self._check(group)
        return self._swapped(group, into_theta=True), "theta"

    def only(self, group: str):
        """The base with ``group``'s parameters set to theta's: ``(context, "ref")``."""
        self._check(group)
        return self._swapped(group, into_theta=False), "ref"


def groups_of(checkpoint, group_by: str = "block"):
    """The groups of a loaded :class:`~ngdiag.models.loading.Checkpoint`: LoRA layers for LoRA checkpoints,
    differing parameters for full fine-tunes (a pipeline or transformer folder with a base)."""
    if group_by not in GROUPINGS:
        raise ConfigError(f"group must be one of {', '.join(GROUPINGS)}, got {group_by!r}")
    ref = checkpoint.require_ref()
    if checkpoint.is_lora:
        return AdapterGroups(checkpoint.pipeline.transformer, group_by)
    theta_t = getattr(checkpoint.theta, "transformer", None)
    ref_t = getattr(ref, "transformer", None)
    if theta_t is None or ref_t is None or theta_t is ref_t:
        raise CheckpointError("per-layer attribution needs a LoRA checkpoint or a full fine-tune with its own base weights")
    return WeightGroups(theta_t, ref_t, group_by)
