"""Generate with a loaded checkpoint: prompts and seeds in, trajectories out.

This is the bridge between :mod:`ngdiag.models` (what a checkpoint is) and
:mod:`ngdiag.core.sampling` (how to step it). Sample ``i`` of a run always uses prompt ``i`` and
seed ``seed + i`` with its own ``torch.Generator``, so any subset of samples (a batch, a shard, a
resumed run) reproduces exactly the same trajectories: that is what makes resume and shard
merges identical to a single run, and it matches a diffusers pipeline called with a list of
generators.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ngdiag.core.configs import read_yaml_mapping
from ngdiag.core.errors import ConfigError
from ngdiag.models.families import SUPPORTED_FAMILIES, Conditioning, call_kwargs_for
from ngdiag.models.loading import Checkpoint
from ngdiag.core.sampling import SampleResult, sample

__all__ = [
    "SamplingConfig", "SampleSet", "PreparedBatch", "prepare_batch", "generate", "recorded_sampling",
    "sampling_settings_from_file", "TRAINING_SAMPLING_KEYS",
    "MAX_IMAGE_SIDE", "MAX_STEPS", "MAX_SAMPLES", "MAX_BATCH_SIZE", "MAX_BATCH_PIXELS", "MAX_SEED",
]


#: The largest image side ngdiag samples at, in pixels (a larger one would exhaust memory).
MAX_IMAGE_SIDE = 4096
#: The most sampling steps (the schedulers have 1000 training timesteps).
MAX_STEPS = 1000
#: The most samples in one run, and per batch.
MAX_SAMPLES = 1_000_000
MAX_BATCH_SIZE = 1024
#: The most pixels in one batch (batch size x height x width): 256 megapixels, e.g. 256 images of
#: 1024 x 1024 or 16 of 4096 x 4096; the transformer's activations for more would exhaust memory.
MAX_BATCH_PIXELS = 256 * 1024 * 1024
#: Seeds are 63-bit non-negative integers (sample ``i`` uses ``seed + i``).
MAX_SEED = 2**63 - 1


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ConfigError(f"{name} must lie in [{low}, {high}], got {value}")
    return int(value)


@dataclass
class SamplingConfig:
    """How to sample: the knobs of a diffusers pipeline call.

    ``height``/``width``/``max_sequence_length``/``text_encoder_out_layers`` default to the
    checkpoint's recorded defaults (tiny test pipelines) or the pipeline's own defaults;
    :meth:`resolved` fills them in and checks every value against the loaded pipeline.
    ``guidance_scale`` is CFG for SD3, klein and Qwen-Image (true CFG), the embedded guidance for
    FLUX.1-dev. ``negative_prompt`` is used only where CFG is applied.

    ``origin`` records where each value came from (``{"num_steps": "command line", ...}``); it is
    written to the run's summary and does not change the sampling.

    Raises :class:`ConfigError` for a value out of range: steps in ``[1, MAX_STEPS]``, a finite
    non-negative guidance scale, sizes in ``[1, MAX_IMAGE_SIDE]``.
    """

    num_steps: int = 28
    guidance_scale: float = 4.5
    height: Optional[int] = None
    width: Optional[int] = None
    max_sequence_length: Optional[int] = None
    negative_prompt: Optional[str] = None
    text_encoder_out_layers: Optional[Sequence[int]] = None
    origin: Optional[dict] = None

    def __post_init__(self):
        self.num_steps = _check_int("the number of steps", self.num_steps, 1, MAX_STEPS)
        try:
            guidance = float(self.guidance_scale)
        except (TypeError, ValueError):
            raise ConfigError(f"guidance scale must be a number, got {self.guidance_scale!r}") from None
        if not math.isfinite(guidance) or guidance < 0:
            raise ConfigError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _check_int(name, value, 1, MAX_IMAGE_SIDE))
        if self.max_sequence_length is not None:
            self.max_sequence_length = _check_int("max_sequence_length", self.max_sequence_length, 1, 1 << 20)
        if self.text_encoder_out_layers is not None:
            layers = self.text_encoder_out_layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
                raise ConfigError(f"text_encoder_out_layers must be a non-empty list of layer indices, got {layers!r}")
            self.text_encoder_out_layers = tuple(_check_int("a text encoder layer index", k, -(1 << 20), 1 << 20) for k in layers)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ConfigError(f"negative_prompt must be a string, got {self.negative_prompt!r}")

    def resolved(self, checkpoint: Checkpoint) -> "SamplingConfig":
        """The effective values for ``checkpoint``, checked against its pipeline.

        Unset sizes come from the checkpoint's recorded defaults or the pipeline's default size,
        unset call arguments (``max_sequence_length``, klein's ``text_encoder_out_layers``) from
        the recorded defaults or the family's defaults, so that the result records exactly what
        is used. Raises :class:`ConfigError` for a size, sequence length or layer list the
        pipeline cannot use, a call argument the family does not take, or a negative prompt where
        no CFG is applied.
        """
        adapter = checkpoint.adapter
        d = dict(checkpoint.call_defaults)
        family = SUPPORTED_FAMILIES.get(adapter.name, adapter.name)
        params = inspect.signature(adapter.encode).parameters
        origin = dict(self.origin or {})
        hints = "the pipeline folder's ngdiag_defaults.json"
        out = SamplingConfig(**{k: v for k, v in asdict(self).items() if k != "origin"})
        h_default, w_default = adapter.default_size()
        for name, fallback in (("height", h_default), ("width", w_default)):
            if getattr(out, name) is None:
                if d.get(name):
                    setattr(out, name, int(d[name]))
                    origin.setdefault(name, hints)
                else:
                    setattr(out, name, int(fallback))
                    origin.setdefault(name, "the pipeline's default size")
        for name in ("max_sequence_length", "text_encoder_out_layers"):
            if getattr(out, name) is not None:
                if name not in params:
                    raise ConfigError(f"{name} does not apply to {family} pipelines; leave it unset")
                continue
            if name not in params:
                continue
            if d.get(name) is not None:
                value, where = d[name], hints
            else:
                value, where = params[name].default, f"the {family} pipeline's default"
            setattr(out, name, tuple(value) if name == "text_encoder_out_layers" else int(value))
            origin.setdefault(name, where)
        if out.negative_prompt is not None and not adapter.uses_cfg(out.guidance_scale):
            why = "applies no CFG" if not adapter.uses_cfg(1e9) else f"applies no CFG at guidance scale {out.guidance_scale:g} (<= 1)"
            raise ConfigError(f"a negative prompt has no effect: this {family} pipeline {why}")
        out.__post_init__()
        adapter.check_size(out.height, out.width)
        try:
            adapter.check_call_kwargs(**call_kwargs_for(
                adapter, max_sequence_length=out.max_sequence_length, text_encoder_out_layers=out.text_encoder_out_layers))
        except ConfigError as exc:
            sources = sorted({origin[k] for k in ("max_sequence_length", "text_encoder_out_layers") if k in origin and k in str(exc)})
            raise ConfigError(f"{exc} (the value came from {' and '.join(sources)})" if sources else str(exc)) from None
        out.origin = origin or None
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["text_encoder_out_layers"] is not None:
            d["text_encoder_out_layers"] = list(d["text_encoder_out_layers"])
        return d

    def describe(self) -> str:
        """One line: ``10 steps, guidance 1, 32x32, max_sequence_length 16``."""
        parts = [f"{self.num_steps} steps", f"guidance {self.guidance_scale:g}"]
        if self.height is not None and self.width is not None:
            parts.append(f"{self.height}x{self.width}")
        if self.max_sequence_length is not None:
            parts.append(f"max_sequence_length {self.max_sequence_length}")
        if self.text_encoder_out_layers is not None:
            parts.append(f"text_encoder_out_layers {','.join(map(str, self.text_encoder_out_layers))}")
        if self.negative_prompt is not None:
            parts.append(f"negative prompt {self.negative_prompt!r}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- recorded settings
#: SamplingConfig fields and their keys in an ngdiag training config's ``sampling`` section (the one
#: place that maps them: the training config reads and writes its section with it).
TRAINING_SAMPLING_KEYS = {"num_steps": "steps", "guidance_scale": "guidance", "height": "height", "width": "width",
                          "max_sequence_length": "max_sequence_length", "negative_prompt": "negative_prompt"}


def sampling_settings_from_file(path) -> dict:
    """The sampling settings of a training config, as :class:`SamplingConfig` field values.

    Understands an ngdiag training config (its ``sampling`` section: ``steps``, ``guidance``,
    ``height``, ``width``, ``max_sequence_length``, ``negative_prompt``) and a Flow-Factory training
    YAML (``train.num_inference_steps``, ``train.guidance_scale``, ``train.resolution``: the rollout
    settings the model was trained with). Unset values are left out.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "sampling config")
    out = {}
    if isinstance(data.get("sampling"), dict):
        section = data["sampling"]
        for name, key in TRAINING_SAMPLING_KEYS.items():
            if section.get(key) is not None:
                out[name] = section[key]
    elif isinstance(data.get("train"), dict):
        section = data["train"]
        for name, key in (("num_steps", "num_inference_steps"), ("guidance_scale", "guidance_scale")):
            if section.get(key) is not None:
                out[name] = section[key]
        resolution = section.get("resolution")
        if isinstance(resolution, int) and not isinstance(resolution, bool):
            out["height"] = out["width"] = resolution
        elif isinstance(resolution, (list, tuple)) and len(resolution) == 2:
            out["height"], out["width"] = resolution
        elif resolution is not None:
            raise ConfigError(f"{path}: train.resolution must be an integer or [height, width], got {resolution!r}")
    else:
        raise ConfigError(f"{path} is neither an ngdiag training config (sampling:) nor a Flow-Factory one (train:)")
    try:
        SamplingConfig(**out)  # the values must be valid sampling settings
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return out


def recorded_sampling(checkpoint_path) -> Optional[tuple[dict, Path]]:
    """The sampling settings recorded by the ngdiag training run that wrote ``checkpoint_path``.

    An ngdiag run folder holds ``config.yaml`` and ``run.json`` next to its ``checkpoint-N/``
    folders; the checkpoint may be ``checkpoint-N``, a folder or file inside it. Returns
    ``(settings, config_path)`` (settings as for :func:`sampling_settings_from_file`) or ``None``.
    Flow-Factory writes no config next to its checkpoints; pass its training YAML explicitly.
    """
    start = Path(checkpoint_path).expanduser()
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        config, run = candidate / "config.yaml", candidate / "run.json"
        if not (config.is_file() and run.is_file()):
            continue
        try:
            import json

            info = json.loads(run.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or "ngdiag" not in info:
            continue
        return sampling_settings_from_file(config), config
    return None


@dataclass
class SampleSet:
    """Which samples a run covers, in fixed batches (the base of the audit and sensitivity configs).

    Sample ``i`` uses prompt ``prompts[i % len(prompts)]`` and seed ``seed + i``
    (:func:`ngdiag.core.seeds.sample_seeds`); batch ``b`` holds
    samples ``b * batch_size ... (b + 1) * batch_size - 1``. Fixed boundaries make resumed and
    sharded runs compute exactly what one run computes.
    """

    prompts: list
    num_samples: Optional[int] = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    batch_size: int = 4

    #: what the run is called in error messages, and why it needs 2 samples
    _needs_two = "a run needs at least 2 samples"
    #: config fields that change only the summary, not the parts: left out of :meth:`fingerprint`
    _not_in_fingerprint = ()
    #: fields added after a release, with their defaults: left out of :meth:`fingerprint` while at the
    #: default, so that unfinished runs started before the field existed still resume
    _added_fields = {}
    #: fields that change time or memory only, with the value earlier releases hashed: always hashed as it
    _hashed_as = {}

    def __post_init__(self):
        self.prompts = [str(p) for p in self.prompts]
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ConfigError("at least one non-empty prompt is needed")
        if self.num_samples is None:
            self.num_samples = len(self.prompts)
        if not isinstance(self.num_samples, bool) and isinstance(self.num_samples, (int, np.integer)) and self.num_samples < 2:
            raise ConfigError(f"{self._needs_two}, got {self.num_samples}")
        self.num_samples = _check_int("the number of samples", self.num_samples, 2, MAX_SAMPLES)
        self.batch_size = _check_int("the batch size", self.batch_size, 1, MAX_BATCH_SIZE)
        self.seed = _check_int("the seed", self.seed, 0, MAX_SEED)
        if self.seed + self.num_samples - 1 > MAX_SEED:
            raise ConfigError(
                f"the seeds seed + i of the {self.num_samples} samples exceed {MAX_SEED} (2**63 - 1); "
                f"choose a seed <= {MAX_SEED - self.num_samples + 1}"
            )
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)

    @property
    def num_batches(self) -> int:
        return -(-int(self.num_samples) // int(self.batch_size))

    def batch_ids(self, b: int) -> list:
        start = b * self.batch_size
        return list(range(start, min(start + self.batch_size, self.num_samples)))

    def prompt_of(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampling"] = self.sampling.to_dict()
        return d

    def resolved(self, checkpoint: Checkpoint):
        """A copy whose sampling settings are the effective ones for ``checkpoint`` (:meth:`SamplingConfig.resolved`).

        Also checks that one batch fits in memory: ``min(batch_size, num_samples) x height x width`` at most
        :data:`MAX_BATCH_PIXELS`. Runs record the resolved settings, so call this before running.
        """
        sampling = self.sampling.resolved(checkpoint)
        batch = min(int(self.batch_size), int(self.num_samples))
        if batch * sampling.height * sampling.width > MAX_BATCH_PIXELS:
            raise ConfigError(
                f"a batch of {batch} images of {sampling.height}x{sampling.width} would exhaust memory "
                f"(more than {MAX_BATCH_PIXELS // 2**20} megapixels per batch); lower the batch size or the image size"
            )
        return replace(self, sampling=sampling)

    def check_against(self, checkpoint: Checkpoint) -> None:
        """Check what depends on the checkpoint (image size, call arguments, batch memory) before a run writes anything."""
        self.resolved(checkpoint)

    def fingerprint(self, checkpoint: dict) -> str:
        """Hash of everything that determines the results (a run with another hash is not resumed).

        Where the sampling settings came from (``sampling.origin``) is not part of it, nor are the
        fields named in ``_not_in_fingerprint`` (they change only the summary), nor the fields of
        ``_added_fields`` at their default; the fields of ``_hashed_as`` enter at a fixed value.
        """
        import hashlib
        import json

        config = self.to_dict()
        config["sampling"].pop("origin", None)
        for key in self._not_in_fingerprint:
            config.pop(key, None)
        for key, default in self._added_fields.items():
            if key in config and config[key] == default:
                del config[key]
        config.update({k: v for k, v in self._hashed_as.items() if k in config})
        payload = json.dumps({"config": config, "checkpoint": checkpoint}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class PreparedBatch:
    """Everything needed to step one batch.

    Attributes:
        x_init: initial noise in the transformer's latent layout, ``(B, ...)``.
        conditioning: encoded prompts plus latent position ids.
        sigmas: the schedule, ``(K + 1,)`` float32.
        config: the resolved :class:`SamplingConfig`.
    """

    x_init: torch.Tensor
    conditioning: Conditioning
    sigmas: torch.Tensor
    config: SamplingConfig
    sample_ids: list = field(default_factory=list)


def prepare_batch(
    checkpoint: Checkpoint,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplingConfig,
    sample_ids: Optional[Sequence[int]] = None,
) -> PreparedBatch:
    """Encode prompts, draw per-sample noise and compute the pipeline's schedule."""
    if len(prompts) != len(seeds):
        raise ConfigError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if len(prompts) == 0:
        raise ConfigError("no prompts to sample")
    config = config.resolved(checkpoint)
    adapter = checkpoint.adapter
    adapter.check_size(config.height, config.width)
    kwargs = call_kwargs_for(
        adapter,
        max_sequence_length=config.max_sequence_length,
        text_encoder_out_layers=config.text_encoder_out_layers,
    )
    with torch.no_grad():
        cond = adapter.encode(list(prompts), config.guidance_scale, negative_prompt=config.negative_prompt, **kwargs)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        x_init, inputs = adapter.prepare_latents(len(prompts), config.height, config.width, generators)
    cond = cond.with_inputs(inputs)
    sigmas = adapter.schedule(config.num_steps, x_init)
    ids = list(sample_ids) if sample_ids is not None else list(range(len(prompts)))
    return PreparedBatch(x_init, cond, sigmas, config, ids)


def generate(
    checkpoint: Checkpoint,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplingConfig,
    *,
    which: str = "theta",
    callback: Optional[Callable] = None,
    intervention: Optional[Callable] = None,
    enable_grad: bool = False,
) -> tuple[SampleResult, PreparedBatch]:
    """Sample ``prompts`` with ``theta`` (default) or ``ref``; returns the sample and the batch."""
    if which not in ("theta", "ref"):
        raise ConfigError(f"which must be 'theta' or 'ref', got {which!r}")
    model = checkpoint.theta if which == "theta" else checkpoint.require_ref()
    batch = prepare_batch(checkpoint, prompts, seeds, config)
    result = sample(
        batch.conditioning.guided(model),
        batch.x_init,
        batch.sigmas,
        callback=callback,
        intervention=intervention,
        enable_grad=enable_grad,
    )
    return result, batch
