"""Checkpoints written the way other tools write them (test side only).

Each saver goes through the other tool's own calls, so a test can load the result with ngdiag and
compare against diffusers and peft alone:

- :func:`save_peft_folder`: PEFT ``get_peft_model(transformer, LoraConfig(...)).save_pretrained(folder)``,
  with ``modules_to_save``, rsLoRA or DoRA when asked. Flow-Factory saves its LoRA checkpoints this way
  into ``checkpoint-N/`` (``layout="flow-factory"``); flow_grpo into ``checkpoints/checkpoint-N/lora/``
  (``layout="flow_grpo"``).
- :func:`save_peft_prefixed_file`: what flow_grpo-style scripts write beside the PEFT folder:
  ``Pipeline.save_lora_weights(dir, transformer_lora_layers=get_peft_model_state_dict(peft_model))``,
  whose keys keep PEFT's ``base_model.model.`` prefix.
- :func:`save_diffusers_script_lora`: the diffusers training scripts (``train_dreambooth_lora_sd3.py``
  and the FLUX ones): ``transformer.add_adapter(LoraConfig(...))``, ``get_peft_model_state_dict``,
  ``Pipeline.save_lora_weights`` with or without ``transformer_lora_adapter_metadata``.

The LoRA matrices are filled with seeded random values (a trained adapter is not zero); the saved
files are exactly what those tools produce for such weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ngdiag.testing import fill_lora_weights

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def fresh_pipeline(base):
    """The base pipeline as diffusers loads it (float32, CPU, offline)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scale_saved_copies(model, names: Sequence[str], factor: float) -> None:
    """Multiply the trained copy of each top-level module in ``names`` by ``factor`` (the wrapped base
    module stays as it was; deeper modules that ``modules_to_save`` also matches keep an exact copy)."""
    from peft.utils.other import ModulesToSaveWrapper

    with torch.no_grad():
        for name in names:
            wrapper = getattr(model.get_base_model(), name)
            assert isinstance(wrapper, ModulesToSaveWrapper)
            for copy in wrapper.modules_to_save.values():
                for param in copy.parameters():
                    param.mul_(factor)


def peft_model(
    base,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: Sequence[str] = ATTENTION,
    modules_to_save: Optional[Sequence[str]] = None,
    saved_scale: float = 1.0,  # factor on the trained copies of the top-level modules_to_save
    use_rslora: bool = False,
    use_dora: bool = False,
    zero_lora: bool = False,
    init_scale: float = 0.05,
    seed: int = 0,
):
    """``(pipeline, peft_model, config)``: a PEFT model on a fresh base transformer, weights filled in."""
    from peft import LoraConfig, get_peft_model

    pipe = fresh_pipeline(base)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True,
                        modules_to_save=list(modules_to_save) if modules_to_save else None,
                        use_rslora=use_rslora, use_dora=use_dora)
    model = get_peft_model(pipe.transformer, config)
    fill_lora_weights(model, seed=seed, init_scale=init_scale, zero=zero_lora)
    if saved_scale != 1.0:
        _scale_saved_copies(model, modules_to_save, saved_scale)
    return pipe, model, config


def save_peft_folder(base, out, *, layout: str = "peft", step: int = 100, **kwargs) -> Path:
    """Save a PEFT adapter with ``PeftModel.save_pretrained``; returns the path to hand to a loader.

    ``layout``: ``"peft"`` (the folder itself), ``"flow-factory"`` (``out/checkpoint-N/``, returns
    ``out/checkpoint-N``) or ``"flow_grpo"`` (``out/checkpoints/checkpoint-N/lora/``, returns
    ``out/checkpoints/checkpoint-N``). ``kwargs`` go to :func:`peft_model`.
    """
    _, model, _ = peft_model(base, **kwargs)
    out = Path(out)
    if layout == "peft":
        folder = handle = out
    elif layout == "flow-factory":
        folder = handle = out / f"checkpoint-{step}"
    elif layout == "flow_grpo":
        handle = out / "checkpoints" / f"checkpoint-{step}"
        folder = handle / "lora"
    else:
        raise ValueError(f"unknown layout {layout!r}")
    model.save_pretrained(str(folder), safe_serialization=True)
    return handle


def save_peft_prefixed_file(base, out, *, with_metadata: bool = False, **kwargs) -> tuple[Path, Path]:
    """flow_grpo style: a PEFT folder ``out/lora`` and beside it ``out/pytorch_lora_weights.safetensors``
    written by ``save_lora_weights(transformer_lora_layers=get_peft_model_state_dict(peft_model))``
    (keys ``transformer.base_model.model.*``). Returns ``(peft_folder, lora_file)``."""
    from peft import get_peft_model_state_dict

    pipe, model, config = peft_model(base, **kwargs)
    out = Path(out)
    model.save_pretrained(str(out / "lora"), safe_serialization=True)
    extra = {"transformer_lora_adapter_metadata": config.to_dict()} if with_metadata else {}
    type(pipe).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model), safe_serialization=True,
                                 **extra)
    return out / "lora", out / "pytorch_lora_weights.safetensors"


def save_diffusers_script_lora(
    base,
    out,
    *,
    rank: int = 4,
    alpha: float = 16.0,
    target_modules: Sequence[str] = ATTENTION,
    with_metadata: bool = True,
    init_scale: float = 0.05,
    seed: int = 0,
) -> Path:
    """The diffusers training scripts: ``add_adapter`` + ``get_peft_model_state_dict`` + ``save_lora_weights``.

    With ``with_metadata`` the adapter config is stored the way the current scripts do
    (``training_utils._collate_lora_metadata``); without it, as older scripts did (no alpha in the
    file). Returns the weights file.
    """
    from diffusers.training_utils import _collate_lora_metadata
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = fresh_pipeline(base)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=list(target_modules)))
    fill_lora_weights(transformer, seed=seed, init_scale=init_scale)
    metadata = _collate_lora_metadata({"transformer": transformer}) if with_metadata else {}
    type(pipe).save_lora_weights(Path(out), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                 safe_serialization=True, **metadata)
    return Path(out) / "pytorch_lora_weights.safetensors"
