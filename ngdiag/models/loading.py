"""Load a checkpoint from a local path as a (theta, ref) pair of velocity models.

Accepted formats, detected automatically (:func:`detect_format`):

1. ``pipeline``: a diffusers pipeline folder (``model_index.json``); theta is its transformer,
   ref the transformer of ``base`` when given.
2. ``transformer``: a transformer folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``),
   a full fine-tune of ``base`` (a pipeline folder).
3. ``peft-lora``: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
   as saved by PEFT, Flow-Factory, DiffusionNFT, flow_grpo and AWM, also nested one or two levels
   down (``checkpoint-N/lora/``). The base is ``base`` or the adapter config's
   ``base_model_name_or_path`` when that is a local folder. ``lora_alpha``, ``rank_pattern``,
   ``alpha_pattern`` and rsLoRA are honoured because the adapter is built from its own config.
4. ``diffusers-lora``: a diffusers LoRA weights file (``pytorch_lora_weights.safetensors``, or a
   folder holding one), loaded with the pipeline's ``load_lora_weights`` (alpha from the file's
   metadata).

For LoRA checkpoints ref is the same transformer with its adapter switched off (no second copy in
memory); for full fine-tunes ref is a separate module. Only safetensors are loaded unless
``allow_pickle=True``. A hub id is accepted only when it is already in the local Hugging Face
cache: ngdiag never downloads.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ngdiag.errors import CheckpointError
from ngdiag.models.families import FamilyAdapter, adapter_for, family_of_transformer

__all__ = [
    "Checkpoint", "load_checkpoint", "load_pipeline", "detect_format", "adapters_disabled", "mixed_adapter_batch",
    "AdapterDisabled", "ADAPTER_NAME",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_NAME = "ngdiag_theta"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- pair helpers
@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Switch every PEFT adapter layer in ``module`` off inside the block (restored in ``finally``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled in zip(layers, previous):
            m.enable_adapters(not was_disabled)


@contextlib.contextmanager
def mixed_adapter_batch(module: torch.nn.Module, pattern: list):
    """Evaluate different adapters on different samples of one batch (peft's mixed-batch forward).

    ``pattern`` gives an adapter name per sample (``"__base__"`` for the adapter switched off); a
    layer that sees ``m * len(pattern)`` samples (CFG batches) uses the pattern tiled ``m`` times.
    """
    from peft.tuners.lora import LoraLayer

    def pre_hook(layer, args, kwargs):
        n = args[0].shape[0] if args else kwargs["x"].shape[0]
        reps, rest = divmod(n, len(pattern))
        if rest:
            raise CheckpointError(f"mixed adapter batch of {n} samples does not fit a pattern of {len(pattern)}")
        return args, {**kwargs, "adapter_names": list(pattern) * reps}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in module.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class AdapterDisabled(torch.nn.Module):
    """The reference of a LoRA pair: the same velocity model, evaluated with its adapters off."""

    def __init__(self, velocity: torch.nn.Module):
        super().__init__()
        self.velocity = velocity

    def forward(self, x, t, **cond):
        with adapters_disabled(self.velocity):
            return self.velocity(x, t, **cond)


# --------------------------------------------------------------------------- result type
@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        pipeline: the diffusers pipeline supplying text encoders, VAE and scheduler; its
            ``transformer`` is theta's transformer.
        adapter: the family adapter (:mod:`ngdiag.models.families`).
        theta: the velocity model under audit, ``v = theta(x, t, **cond)``.
        ref: the reference velocity model, or ``None`` when no base was given.
        kind: ``"pipeline"``, ``"transformer"``, ``"peft-lora"`` or ``"diffusers-lora"``.
        path: the checkpoint path as resolved; ``base_path``: the base pipeline path or ``None``.
        call_defaults: default call arguments recorded with the pipeline (tiny test pipelines
            record their image size and sequence length in ``ngdiag_defaults.json``).
    """

    pipeline: object
    adapter: FamilyAdapter
    theta: torch.nn.Module
    ref: Optional[torch.nn.Module]
    kind: str
    path: str
    base_path: Optional[str] = None
    call_defaults: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.name

    @property
    def is_lora(self) -> bool:
        return self.kind in ("peft-lora", "diffusers-lora")

    def require_ref(self) -> torch.nn.Module:
        if self.ref is None:
            raise CheckpointError(f"{self.path} has no reference model: pass --base with the pretrained pipeline")
        return self.ref

    def describe(self) -> dict:
        return {"path": self.path, "base": self.base_path, "kind": self.kind, "family": self.family}


# --------------------------------------------------------------------------- detection
def _resolve_path(path: Union[str, Path], what: str) -> Path:
    """A local path, or a hub id that is already in the local cache."""
    p = Path(path).expanduser()
    if p.exists():
        return p.resolve()
    text = str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"{what} {text!r} is not a local path and not in the local Hugging Face cache (ngdiag never downloads)"
            ) from None
    raise CheckpointError(f"{what} not found: {text}")


def _weight_files(folder: Path, recursive: bool = True):
    pattern = "**/*" if recursive else "*"
    files = [f for f in folder.glob(pattern) if f.is_file()]
    safes = [f for f in files if f.suffix == ".safetensors"]
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    return safes, pickles


def _find_adapter_folder(folder: Path) -> Optional[Path]:
    """An ``adapter_config.json`` at most two levels below ``folder`` (``checkpoint-N/lora/``)."""
    candidates = sorted({p.parent for p in list(folder.glob("*/adapter_config.json")) + list(folder.glob("*/*/adapter_config.json"))})
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(folder)) for c in candidates[:6])
        raise CheckpointError(f"{folder} holds several adapters ({names}); pass one of them")
    return None


def detect_format(path: Path) -> tuple[str, Path]:
    """``(kind, path)`` of a checkpoint; :class:`CheckpointError` when no format fits."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return "diffusers-lora", path
        if path.suffix in PICKLE_SUFFIXES:
            return "pickle-file", path
        raise CheckpointError(f"unknown checkpoint file {path.name}: expected a .safetensors LoRA weights file")
    if (path / "model_index.json").is_file():
        return "pipeline", path
    if (path / "adapter_config.json").is_file():
        return "peft-lora", path
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return "diffusers-lora", path / "pytorch_lora_weights.safetensors"
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "_class_name" in config or "_diffusers_version" in config:
            return "transformer", path
    nested = _find_adapter_folder(path)
    if nested is not None:
        return "peft-lora", nested
    if (path / "transformer" / "config.json").is_file():
        return "transformer", path / "transformer"
    raise CheckpointError(
        f"unknown checkpoint format at {path}: expected model_index.json (pipeline), config.json + "
        "diffusion_pytorch_model.safetensors (transformer), adapter_config.json (PEFT LoRA) "
        "or pytorch_lora_weights.safetensors (diffusers LoRA)"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc.__class__.__name__}") from None


def _check_safetensors(files) -> None:
    """Open every safetensors header so that a corrupted file fails here with its name."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise CheckpointError(f"corrupted safetensors file {f}: {reason}") from None


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    safes, pickles = _weight_files(folder)
    _check_safetensors(safes)
    if pickles and not allow_pickle:
        safe_stems = {f.with_suffix("").name for f in safes} | {f.parent for f in safes}
        unsafe_only = [p for p in pickles if p.parent not in safe_stems and p.with_suffix("").name not in safe_stems]
        if unsafe_only:
            raise CheckpointError(
                f"{unsafe_only[0]} is a pickle weights file and has no safetensors copy; "
                "pass --allow-pickle (allow_pickle=True) to load it, only if you trust its source"
            )


@contextlib.contextmanager
def _quiet_loading():
    """Silence diffusers/transformers progress bars while loading (library code does not print)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_was, t_was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        if d_was:
            dlog.enable_progress_bar()
        if t_was:
            tlog.enable_progress_bar()
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)


# --------------------------------------------------------------------------- pipelines
def _check_flow_pipeline(folder: Path) -> None:
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name", "?")
    scheduler = index.get("scheduler", [None, None])
    sched_cls = scheduler[1] if isinstance(scheduler, (list, tuple)) and len(scheduler) == 2 else None
    if sched_cls and "FlowMatch" not in sched_cls:
        raise CheckpointError(
            f"{folder} is a {cls} with a {sched_cls}: a noise-prediction diffusion model, not a flow-matching "
            "model; ngdiag audits rectified-flow pipelines (SD3/SD3.5, FLUX.1, FLUX.2-klein, Qwen-Image)"
        )
    from ngdiag.models.families import family_of_pipeline

    if family_of_pipeline(cls) is None:
        raise CheckpointError(
            f"{folder} is a {cls}, which ngdiag does not support yet; supported: "
            "StableDiffusion3Pipeline, FluxPipeline, Flux2KleinPipeline, QwenImagePipeline"
        )


def load_pipeline(path, *, device="cpu", dtype=torch.float32, allow_pickle=False):
    """Load a local diffusers flow-matching pipeline folder (offline, safetensors by default)."""
    from diffusers import DiffusionPipeline

    folder = _resolve_path(path, "pipeline")
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    _check_flow_pipeline(folder)
    _check_weights(folder, allow_pickle)
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(
                folder, dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=True
            )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load pipeline {folder}: {_first_line(exc)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe, folder


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _call_defaults(folder: Optional[Path]) -> dict:
    if folder is None or not (folder / "ngdiag_defaults.json").is_file():
        return {}
    return dict(_read_json(folder / "ngdiag_defaults.json").get("call_kwargs", {}))


# --------------------------------------------------------------------------- components
def _load_transformer(folder: Path, *, device, dtype, allow_pickle):
    import diffusers

    config = _read_json(folder / "config.json")
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if cls_name else None
    if cls is None or family_of_transformer(cls_name) is None:
        raise CheckpointError(f"{folder} holds a {cls_name or 'model without _class_name'}, not a supported flow transformer")
    _check_weights(folder, allow_pickle)
    safes, _ = _weight_files(folder, recursive=False)
    if not safes and not allow_pickle:
        raise CheckpointError(f"{folder} has no diffusion_pytorch_model*.safetensors weights")
    try:
        with _quiet_loading():
            model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load transformer {folder}: {_first_line(exc)}") from None
    return model.to(device).eval().requires_grad_(False)


def _strip_peft_prefix(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("base_model.model.", "transformer.", "unet."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _inject_peft_adapter(transformer: torch.nn.Module, folder: Path, allow_pickle: bool) -> None:
    """Add the PEFT adapter in ``folder`` to ``transformer`` as adapter ``ngdiag_theta``."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        if pickled.is_file() and not allow_pickle:
            raise CheckpointError(
                f"{pickled} is a pickle weights file; pass --allow-pickle (allow_pickle=True) to load it, only if you trust its source"
            )
        if not pickled.is_file():
            raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    else:
        _check_safetensors([weights])
        state = load_file(str(weights))
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"cannot read the LoRA config in {folder}: {_first_line(exc)}") from None
    config.inference_mode = True
    state = _strip_peft_prefix(state)
    try:
        inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
        result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    except Exception as exc:
        raise CheckpointError(f"the adapter in {folder} does not fit the base model: {_first_line(exc)}") from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise CheckpointError(f"the adapter in {folder} does not fit the base model: no module for {unexpected[0]}")
    n_lora = sum(1 for n, _ in transformer.named_parameters() if ADAPTER_NAME in n)
    if n_lora == 0:
        raise CheckpointError(f"the adapter in {folder} matched no module of the base model")
    missing = [k for k in getattr(result, "missing_keys", []) if ADAPTER_NAME in k]
    if missing:
        raise CheckpointError(f"the adapter in {folder} does not fit the base model: no weights for {missing[0]}")


def _load_diffusers_lora(pipe, file: Path) -> None:
    _check_safetensors([file])
    try:
        with _quiet_loading():
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER_NAME)
    except Exception as exc:
        raise CheckpointError(f"the LoRA weights {file} do not fit the base model: {_first_line(exc)}") from None
    n_lora = sum(1 for n, _ in pipe.transformer.named_parameters() if ADAPTER_NAME in n)
    if n_lora == 0:
        raise CheckpointError(f"the LoRA weights {file} matched no module of the base transformer")


def _base_from_adapter(folder: Path) -> Optional[str]:
    config = _read_json(folder / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if base and Path(base).expanduser().is_dir():
        return base
    return None


# --------------------------------------------------------------------------- entry point
def load_checkpoint(
    path,
    base=None,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> Checkpoint:
    """Load ``path`` (and ``base``) as a :class:`Checkpoint` with theta and ref velocity models.

    Args:
        path: local checkpoint path or cached hub id (formats: see module docstring).
        base: the pretrained pipeline folder (or cached hub id); required for transformer folders
            and LoRA files, optional for pipelines (then ``ref`` is ``None``).
        device, dtype: where and in which precision to load (float32 on CPU by default).
        allow_pickle: also accept ``.bin``/``.pt`` pickle weights (unsafe for untrusted files).

    Raises:
        CheckpointError: missing path, unknown format, corrupted file, incompatible adapter,
            non-flow pipeline, pickle weights without ``allow_pickle``, hub id not cached.
    """
    resolved = _resolve_path(path, "checkpoint")
    kind, located = detect_format(resolved)
    if kind == "pickle-file":
        raise CheckpointError(
            f"{located} is a pickle weights file; pass --allow-pickle (allow_pickle=True) to load it, only if you trust its source"
        )
    base_folder = None
    if base is not None:
        base_folder = _resolve_path(base, "base")
    elif kind == "peft-lora":
        hint = _base_from_adapter(located)
        base_folder = Path(hint).resolve() if hint else None
    if kind in ("transformer", "peft-lora", "diffusers-lora") and base_folder is None:
        raise CheckpointError(f"{located} is a {kind} checkpoint: pass --base with the pretrained pipeline folder")

    if kind == "pipeline":
        pipe, folder = load_pipeline(located, device=device, dtype=dtype, allow_pickle=allow_pickle)
        adapter = adapter_for(pipe)
        theta = adapter.velocity_model(pipe.transformer)
        ref = None
        if base_folder is not None:
            base_pipe, _ = load_pipeline(base_folder, device=device, dtype=dtype, allow_pickle=allow_pickle)
            _check_same_family(pipe, base_pipe, located)
            ref = adapter.velocity_model(base_pipe.transformer)
        return Checkpoint(pipe, adapter, theta, ref, kind, str(located), _str(base_folder), _call_defaults(folder))

    pipe, folder = load_pipeline(base_folder, device=device, dtype=dtype, allow_pickle=allow_pickle)
    adapter = adapter_for(pipe)
    if kind == "transformer":
        transformer = _load_transformer(located, device=device, dtype=dtype, allow_pickle=allow_pickle)
        if type(transformer) is not type(pipe.transformer):
            raise CheckpointError(
                f"{located} is a {type(transformer).__name__} but the base uses {type(pipe.transformer).__name__}"
            )
        _check_same_config(transformer, pipe.transformer, located)
        ref = adapter.velocity_model(pipe.transformer)
        pipe.transformer = transformer
        theta = adapter.velocity_model(transformer)
        return Checkpoint(pipe, adapter, theta, ref, kind, str(located), _str(base_folder), _call_defaults(folder))

    if kind == "peft-lora":
        _inject_peft_adapter(pipe.transformer, located, allow_pickle)
    else:
        _load_diffusers_lora(pipe, located)
    pipe.transformer.eval().requires_grad_(False)
    theta = adapter.velocity_model(pipe.transformer)
    ref = AdapterDisabled(theta)
    return Checkpoint(pipe, adapter, theta, ref, kind, str(located), _str(base_folder), _call_defaults(folder))


def _str(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p)


def _check_same_family(pipe, base_pipe, where) -> None:
    if type(pipe.transformer) is not type(base_pipe.transformer):
        raise CheckpointError(
            f"{where} uses {type(pipe.transformer).__name__} but the base uses {type(base_pipe.transformer).__name__}"
        )
    _check_same_config(pipe.transformer, base_pipe.transformer, where)


def _check_same_config(a, b, where) -> None:
    keys = ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "patch_size")
    for key in keys:
        va, vb = a.config.get(key), b.config.get(key)
        if va != vb:
            raise CheckpointError(f"{where} does not fit the base: {key} is {va} there and {vb} in the base")

