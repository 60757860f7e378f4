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
   ``alpha_pattern``, rsLoRA, DoRA and ``modules_to_save`` are honoured because the adapter is
   built from its own config.
4. ``diffusers-lora``: a diffusers LoRA weights file (``pytorch_lora_weights.safetensors``, or a
   folder holding one) as the diffusers training scripts write it, also with PEFT's
   ``base_model.model.`` key prefix (flow_grpo); other trainers' formats are converted by the
   pipeline's ``lora_state_dict``. The config comes from the file's ``lora_adapter_metadata``, else
   from the tensors and their ``.alpha`` entries; a file without any alpha gets ``lora_alpha`` or
   ``alpha = r`` with a note in :attr:`Checkpoint.notes`.

Both LoRA formats are injected with peft under the adapter name ``ngdiag_theta``, strictly: a tensor
that finds no module, or an adapter weight that finds no tensor, is a :class:`CheckpointError`.

For LoRA checkpoints ref is the same transformer with its adapter switched off (no second copy in
memory; LoRA layers run their base layer, ``modules_to_save`` wrappers their original module); for full fine-tunes ref is a separate module. Only safetensors are loaded unless
``allow_pickle=True``. A hub id is accepted only when it is already in the local Hugging Face
cache: ngdiag never downloads.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.models.families import FamilyAdapter, adapter_for, family_of_pipeline, family_of_transformer, supported_pipelines, SUPPORTED_FAMILIES
from ngdiag.models.pair import AdapterDisabled

__all__ = ["Checkpoint", "load_checkpoint", "load_pipeline", "detect_format", "ADAPTER_NAME"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_NAME = "ngdiag_theta"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        lora: for LoRA checkpoints, what was loaded: ``r``, ``alpha``, ``alpha_source`` (where alpha
            came from: ``adapter_config.json``, ``file metadata``, ``.alpha tensors``, ``--lora-alpha``,
            ``folded into the weights`` (formats diffusers converts) or ``assumed equal to r``), ``use_rslora``, ``use_dora``, ``modules_to_save`` (and
            ``rank_pattern`` / ``alpha_pattern`` when the layers differ).
        notes: warnings about the checkpoint for the user (the CLI prints each as one line on
            stderr), e.g. an alpha that had to be assumed.
    """

    pipeline: object
    adapter: FamilyAdapter
    theta: torch.nn.Module
    ref: Optional[torch.nn.Module]
    kind: str
    path: str
    base_path: Optional[str] = None
    call_defaults: dict = field(default_factory=dict)
    lora: Optional[dict] = None
    notes: list = field(default_factory=list)

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
        info = {"path": self.path, "base": self.base_path, "kind": self.kind, "family": self.family}
        if self.lora is not None:
            info["lora"] = dict(self.lora)
        if self.notes:
            info["notes"] = list(self.notes)
        return info


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
            return "pickle-file", path  # a diffusers LoRA file in pickle form; loaded only with allow_pickle
        raise CheckpointError(f"unknown checkpoint file {path.name}: expected a .safetensors LoRA weights file")
    if (path / "model_index.json").is_file():
        return "pipeline", path
    if (path / "adapter_config.json").is_file():
        return "peft-lora", path
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return "diffusers-lora", path / "pytorch_lora_weights.safetensors"
    if (path / "pytorch_lora_weights.bin").is_file():
        return "pickle-file", path / "pytorch_lora_weights.bin"
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
    """Silence diffusers/transformers/peft while loading: progress bars, log lines and warnings
    (library code does not print; whatever matters becomes a :class:`CheckpointError` or a note)."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_was, t_was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL + 1)
    tlog.set_verbosity(tlog.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
            f"model; ngdiag audits rectified-flow pipelines ({', '.join(SUPPORTED_FAMILIES.values())})"
        )
    if family_of_pipeline(cls) is None:
        raise CheckpointError(f"{folder} is a {cls}, which ngdiag does not support yet; supported: {supported_pipelines()}")


def _check_pipeline_folder(folder: Path) -> None:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    _check_flow_pipeline(folder)


def _pipeline_class(folder: Path):
    import diffusers

    return getattr(diffusers, _read_json(folder / "model_index.json").get("_class_name", ""), None)


def _absent_components(folder: Path) -> dict:
    """Components that ``model_index.json`` records as ``[null, null]``: a pipeline saved without them
    (SD3 built with ``text_encoder_3=None``, as diffusers' docs suggest to drop T5). diffusers only
    loads such a folder when each one is passed as ``None``, which is what this returns."""
    index = _read_json(folder / "model_index.json")
    return {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v == [None, None]}


def load_pipeline(path, *, device="cpu", dtype=torch.float32, allow_pickle=False):
    """Load a local diffusers flow-matching pipeline folder (offline, safetensors by default)."""
    from diffusers import DiffusionPipeline

    folder = _resolve_path(path, "pipeline")
    _check_pipeline_folder(folder)
    _check_weights(folder, allow_pickle)
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(
                folder, dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=True,
                **_absent_components(folder),
            )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load pipeline {folder}: {_reason(exc)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe, folder


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _reason(exc: Exception) -> str:
    """One line on why loading failed; a pickle that torch's ``weights_only`` refused is named as such."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        return (f"it holds more than tensors{' (' + detail + ')' if detail else ''}; ngdiag unpickles only with "
                "torch's weights_only=True and never runs code from a pickle")
    return _first_line(exc)


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
        raise CheckpointError(f"cannot load transformer {folder}: {_reason(exc)}") from None
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- LoRA adapters
_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "unet")
_PEFT_PREFIX = "base_model.model."
# The tensor names PEFT's get_peft_model_state_dict writes for LoRA (and DoRA) layers.
_LORA_KEY = re.compile(r"\.(lora_A|lora_B)\.weight$|\.lora_B\.bias$|\.lora_magnitude_vector$|\.lora_embedding_[AB]$")
_ALPHA_KEY = re.compile(r"\.alpha$")
_OTHER_ADAPTERS = re.compile(r"\.(lokr_|hada_|oft_|boft_)")


@dataclass
class _LoraSource:
    """A LoRA read from disk and checked, before any model is loaded."""

    what: str  # "the adapter in FOLDER" / "the LoRA file FILE", for messages
    config: object  # peft LoraConfig
    state: dict  # tensor name (no prefix, no adapter name) -> tensor
    alpha_source: str
    notes: list

    def summary(self) -> dict:
        c = self.config
        info = {"r": int(c.r), "alpha": float(c.lora_alpha), "alpha_source": self.alpha_source,
                "use_rslora": bool(c.use_rslora), "use_dora": bool(c.use_dora),
                "modules_to_save": sorted(c.modules_to_save or [])}
        if c.rank_pattern:
            info["rank_pattern"] = dict(c.rank_pattern)
        if c.alpha_pattern:
            info["alpha_pattern"] = dict(c.alpha_pattern)
        return info


def _pickle_refused(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle weights file; pass --allow-pickle (allow_pickle=True) to load it, only if you trust its source"
    )


def _read_tensors(file: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """``(tensors, header metadata)`` of a safetensors file, or of a pickle with ``allow_pickle``
    (through torch's ``weights_only`` unpickler, which refuses anything but tensors)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        _check_safetensors([file])
        with safe_open(str(file), framework="pt") as handle:
            header = dict(handle.metadata() or {})
        return load_file(str(file)), header
    if not allow_pickle:
        raise _pickle_refused(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {file}: {_reason(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a dict of tensors (a LoRA weights file)")
    return state, {}


def _check_given_alpha(lora_alpha, config, recorded: str, what: str) -> None:
    """An explicit alpha is for files that record none; a different recorded one is a conflict."""
    if lora_alpha is None:
        return
    if float(config.lora_alpha) != float(lora_alpha) or config.alpha_pattern:
        raise CheckpointError(
            f"{what} records lora_alpha={config.lora_alpha:g} ({recorded}); --lora-alpha {lora_alpha:g} applies only to "
            "LoRA files that record no alpha"
        )


def _read_peft_folder(folder: Path, allow_pickle: bool, lora_alpha) -> _LoraSource:
    """A PEFT adapter folder: ``LoraConfig`` from ``adapter_config.json``, tensors without PEFT's prefix."""
    from peft import LoraConfig

    what = f"the adapter in {folder}"
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        weights = folder / "adapter_model.bin"
        if not weights.is_file():
            raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    state, _ = _read_tensors(weights, allow_pickle)
    peft_type = _read_json(folder / "adapter_config.json").get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise CheckpointError(f"{folder} holds a {peft_type} adapter; ngdiag loads LoRA adapters (with rsLoRA, DoRA)")
    try:
        with _quiet_loading():
            config = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"cannot read the LoRA config in {folder}: {_first_line(exc)}") from None
    _check_given_alpha(lora_alpha, config, "adapter_config.json", what)
    state = {_strip_prefixes(k): v for k, v in state.items()}
    return _LoraSource(what, config, state, "adapter_config.json", [])


def _strip_prefixes(key: str) -> str:
    for prefix in (_PEFT_PREFIX, "transformer.", "unet."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _is_saved_module(key: str, saved: set) -> bool:
    """Whether ``key`` is a weight of a module that ``modules_to_save`` names (peft matches name suffixes)."""
    module = key.rsplit(".", 1)[0]
    return any(module == name or module.endswith("." + name) for name in saved)


def _split_components(state: dict, what: str) -> tuple[dict, dict]:
    """``(transformer tensors, tensors of other components)``; unprefixed files are the transformer's."""
    prefixed = [k for k in state if k.split(".", 1)[0] in _COMPONENTS]
    if not prefixed:
        return dict(state), {}
    if len(prefixed) != len(state):
        stray = next(k for k in state if k.split(".", 1)[0] not in _COMPONENTS)
        raise CheckpointError(f"{what} mixes component-prefixed tensor names with unprefixed ones ({stray})")
    ours = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("transformer.")}
    others = {k: v for k, v in state.items() if not k.startswith("transformer.")}
    return ours, others


def _file_metadata(header: dict, what: str) -> Optional[dict]:
    """The transformer's adapter config that ``save_lora_weights(transformer_lora_adapter_metadata=...)`` stored."""
    text = header.get("lora_adapter_metadata")
    if not text:
        return None
    try:
        packed = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{what} has unreadable lora_adapter_metadata (not JSON)") from None
    config = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    return config or None


def _convert_with_diffusers(pipeline_cls, state: dict, what: str) -> tuple[dict, dict]:
    """Other trainers' LoRA formats (kohya, xlabs, BFL...) converted by the pipeline's own
    ``lora_state_dict``: ``(tensors, network alphas)``, names still component-prefixed."""
    import inspect

    reader = getattr(pipeline_cls, "lora_state_dict", None)
    if reader is None:
        raise CheckpointError(f"{what} is not in diffusers' LoRA format and {pipeline_cls} cannot convert it")
    kwargs = {"return_lora_metadata": True}
    with_alphas = "return_alphas" in inspect.signature(reader).parameters
    if with_alphas:
        kwargs["return_alphas"] = True
    try:
        with _quiet_loading():
            out = reader(dict(state), **kwargs)
    except Exception as exc:
        reason = f"its converter looked for a tensor {exc.args[0]!r} the file does not have" if isinstance(exc, KeyError) \
            else _first_line(exc)
        raise CheckpointError(f"{what} is in no LoRA format diffusers can read for {pipeline_cls.__name__}: {reason}") from None
    return out[0], (out[1] or {}) if with_alphas else {}


def _read_diffusers_lora(file: Path, pipeline_cls, allow_pickle: bool, lora_alpha) -> _LoraSource:
    """A diffusers LoRA weights file, with keys as the training scripts write them (also with PEFT's
    ``base_model.model.`` prefix, as flow_grpo does) or in another trainer's format diffusers converts.

    The config comes from the file's ``lora_adapter_metadata``, else from the tensors (ranks) and
    ``.alpha`` tensors with diffusers' ``get_peft_kwargs``; without any alpha, ``lora_alpha`` or
    ``alpha = r`` (with a note).
    """
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    what = f"the LoRA file {file}"
    raw, header = _read_tensors(file, allow_pickle)
    if not raw:
        raise CheckpointError(f"{file} holds no tensors")
    state = {}
    for key, value in raw.items():
        head, _, rest = key.partition(".")
        if head in _COMPONENTS and rest.startswith(_PEFT_PREFIX):
            key = f"{head}.{rest[len(_PEFT_PREFIX):]}"
        elif key.startswith(_PEFT_PREFIX):
            key = key[len(_PEFT_PREFIX):]
        state[key] = value
    if any(_OTHER_ADAPTERS.search(k) for k in state):
        raise CheckpointError(f"{what} is not a LoRA (LoKr/LoHa/OFT tensors); ngdiag loads LoRA adapters")
    metadata = _file_metadata(header, what)
    saved = set((metadata or {}).get("modules_to_save") or [])

    def known(key):
        name = key.split(".", 1)[1] if key.split(".", 1)[0] in _COMPONENTS else key
        return _LORA_KEY.search(name) or _ALPHA_KEY.search(name) or _is_saved_module(name, saved)

    alphas, converted = {}, not all(known(k) for k in state)
    if converted:
        state, alphas = _convert_with_diffusers(pipeline_cls, state, what)
    state, others = _split_components(state, what)
    if others:
        names = sorted({k.split(".", 1)[0] for k in others})
        raise CheckpointError(f"{what} also holds LoRA weights for {', '.join(names)} ({len(others)} tensors); ngdiag "
                              "audits the transformer alone and would drop them")
    alphas = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in alphas.items()}
    alphas.update({k: state.pop(k) for k in [k for k in state if _ALPHA_KEY.search(k)]})
    alphas = {k: float(v) for k, v in alphas.items()}
    for key in state:
        if not _LORA_KEY.search(key) and not _is_saved_module(key, saved):
            if "lora" in key.lower():
                name = getattr(pipeline_cls, "__name__", "this pipeline")
                raise CheckpointError(f"{what}: {key} is in a LoRA format that diffusers does not convert for {name}")
            raise CheckpointError(
                f"{what}: {key} is not a LoRA matrix (a modules_to_save copy?) and the file has no adapter metadata "
                "that says what it is; load the PEFT adapter folder saved with it instead"
            )
    if metadata is not None:
        try:
            config = LoraConfig(**metadata)
        except Exception as exc:
            raise CheckpointError(f"{what} has lora_adapter_metadata that is not a LoraConfig: {_first_line(exc)}") from None
        _check_given_alpha(lora_alpha, config, "file metadata", what)
        return _LoraSource(what, config, state, "file metadata", [])
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    if not ranks:
        raise CheckpointError(f"{what} holds no LoRA matrices (lora_A / lora_B)")
    config = LoraConfig(**get_peft_kwargs(ranks, network_alpha_dict=alphas or None, peft_state_dict=state))
    if alphas:
        _check_given_alpha(lora_alpha, config, ".alpha tensors", what)
        return _LoraSource(what, config, state, ".alpha tensors", [])
    if converted:  # diffusers' converters of other formats fold alpha / r into the weights
        _check_given_alpha(lora_alpha, config, "folded into the weights by diffusers' converter", what)
        return _LoraSource(what, config, state, "folded into the weights", [])
    if lora_alpha is not None:
        config.lora_alpha, config.alpha_pattern = float(lora_alpha), {}
        return _LoraSource(what, config, state, "--lora-alpha", [])
    r = f"r = {config.r}" if not config.rank_pattern else "r of each layer"
    note = (f"{file.name} records no LoRA alpha (no lora_adapter_metadata, no .alpha tensors): alpha = {r} is "
            "assumed (scale 1), as diffusers does; if it was trained with another alpha, pass --lora-alpha")
    return _LoraSource(what, config, state, "assumed equal to r", [note])


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _shape_reason(exc: Exception) -> str:
    """torch's ``load_state_dict`` error, cut to the first tensor whose shape does not fit."""
    found = _SIZE_MISMATCH.findall(str(exc))
    if not found:
        return " ".join(str(exc).split()) or exc.__class__.__name__
    key, saved, needed = found[0]
    more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
    return (f"{key.replace('.' + ADAPTER_NAME, '')} has shape {saved} in the checkpoint but the base model with "
            f"this adapter config needs {needed}{more}")


def _inject_lora(transformer: torch.nn.Module, source: _LoraSource) -> None:
    """Add ``source`` to ``transformer`` as adapter ``ngdiag_theta``; every tensor must land in a module
    and every adapter weight must come from the checkpoint."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config = source.config
    config.inference_mode = True
    try:
        with _quiet_loading():
            inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    except Exception as exc:
        text = _first_line(exc)
        if "not found in the base model" in text:
            targets = sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) else [config.target_modules]
            text = (f"none of its target modules ({', '.join(map(str, targets[:3]))}{', ...' if len(targets) > 3 else ''}) "
                    f"is in the base {type(transformer).__name__}; is it a LoRA of another model family?")
        raise CheckpointError(f"{source.what} does not fit the base model: {text}") from None
    try:
        with _quiet_loading():
            result = set_peft_model_state_dict(transformer, source.state, adapter_name=ADAPTER_NAME)
    except Exception as exc:
        raise CheckpointError(f"{source.what} does not fit the base model: {_shape_reason(exc)}") from None
    unexpected = [k.replace("." + ADAPTER_NAME, "") for k in getattr(result, "unexpected_keys", [])]
    if unexpected:
        raise CheckpointError(
            f"{source.what} does not fit the base model: {len(unexpected)} of its {len(source.state)} tensors have no "
            f"module in the base model (first: {unexpected[0]}); is it a LoRA of another model family?"
        )
    missing = [k for k in getattr(result, "missing_keys", []) if ADAPTER_NAME in k]
    if missing:
        raise CheckpointError(
            f"{source.what} does not fit the base model: its config adds {missing[0].replace('.' + ADAPTER_NAME, '')}, "
            f"for which it holds no weights ({len(missing)} such tensors)"
        )
    if not any(ADAPTER_NAME in n for n, _ in transformer.named_parameters()):
        raise CheckpointError(f"{source.what} matched no module of the base model")


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
    lora_alpha: Optional[float] = None,
) -> Checkpoint:
    """Load ``path`` (and ``base``) as a :class:`Checkpoint` with theta and ref velocity models.

    Args:
        path: local checkpoint path or cached hub id (formats: see module docstring).
        base: the pretrained pipeline folder (or cached hub id); required for transformer folders
            and LoRA files, optional for pipelines (then ``ref`` is ``None``).
        device, dtype: where and in which precision to load (float32 on CPU by default).
        allow_pickle: also accept ``.bin``/``.pt`` pickle weights (read with torch's
            ``weights_only`` unpickler; still only for files you trust).
        lora_alpha: the alpha a diffusers LoRA file was trained with, for files that record none
            (no ``lora_adapter_metadata``, no ``.alpha`` tensors); otherwise ``alpha = r`` is assumed
            and said in :attr:`Checkpoint.notes`. A different alpha than the checkpoint records is
            an error.

    Raises:
        CheckpointError: missing path, unknown format, corrupted file, incompatible adapter (any
            tensor without a module, any adapter weight without a tensor), non-flow pipeline,
            pickle weights without ``allow_pickle``, hub id not cached.
        ConfigError: ``lora_alpha`` not a positive finite number.
    """
    if lora_alpha is not None and not (isinstance(lora_alpha, numbers.Real) and not isinstance(lora_alpha, bool)
                                       and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ConfigError(f"--lora-alpha (lora_alpha) must be a positive finite number, got {lora_alpha!r}")
    resolved = _resolve_path(path, "checkpoint")
    kind, located = detect_format(resolved)
    if kind == "pickle-file":
        if not allow_pickle:
            raise _pickle_refused(located)
        kind = "diffusers-lora"
    if lora_alpha is not None and kind not in ("peft-lora", "diffusers-lora"):
        raise CheckpointError(f"--lora-alpha applies to LoRA checkpoints; {located} is a {kind} checkpoint")
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

    lora = None
    if kind in ("peft-lora", "diffusers-lora"):  # read and check the adapter before loading any model
        _check_pipeline_folder(base_folder)
        if kind == "peft-lora":
            lora = _read_peft_folder(located, allow_pickle, lora_alpha)
        else:
            lora = _read_diffusers_lora(located, _pipeline_class(base_folder), allow_pickle, lora_alpha)
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

    _inject_lora(pipe.transformer, lora)
    pipe.transformer.eval().requires_grad_(False)
    theta = adapter.velocity_model(pipe.transformer)
    ref = AdapterDisabled(theta)
    return Checkpoint(pipe, adapter, theta, ref, kind, str(located), _str(base_folder), _call_defaults(folder),
                      lora=lora.summary(), notes=list(lora.notes))


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

