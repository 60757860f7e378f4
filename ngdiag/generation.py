"""Generate with a loaded checkpoint: prompts and seeds in, trajectories out.

This is the bridge between :mod:`ngdiag.models` (what a checkpoint is) and
:mod:`ngdiag.sampling` (how to step it). Sample ``i`` of a run always uses prompt ``i`` and
seed ``seed + i`` with its own ``torch.Generator``, so any subset of samples (a batch, a shard, a
resumed run) reproduces exactly the same trajectories: that is what makes resume and shard
merges identical to a single run, and it matches a diffusers pipeline called with a list of
generators.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ngdiag.errors import ConfigError
from ngdiag.models.families import Conditioning, call_kwargs_for
from ngdiag.models.loading import Checkpoint
from ngdiag.sampling import SampleResult, sample

__all__ = ["SamplingConfig", "SampleSet", "PreparedBatch", "prepare_batch", "generate", "sample_seeds"]


@dataclass
class SamplingConfig:
    """How to sample: the knobs of a diffusers pipeline call.

    ``height``/``width``/``max_sequence_length`` default to the checkpoint's recorded defaults
    (tiny test pipelines) or the pipeline's own defaults. ``guidance_scale`` is CFG for SD3 and
    klein, the embedded guidance for FLUX.1-dev.
    """

    num_steps: int = 28
    guidance_scale: float = 4.5
    height: Optional[int] = None
    width: Optional[int] = None
    max_sequence_length: Optional[int] = None
    negative_prompt: Optional[str] = None
    text_encoder_out_layers: Optional[Sequence[int]] = None

    def __post_init__(self):
        if int(self.num_steps) < 1:
            raise ConfigError(f"the number of steps must be at least 1, got {self.num_steps}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance scale must be non-negative, got {self.guidance_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")

    def resolved(self, checkpoint: Checkpoint) -> "SamplingConfig":
        """Fill unset sizes from the checkpoint's defaults."""
        d = dict(checkpoint.call_defaults)
        h_default, w_default = checkpoint.adapter.default_size()
        out = SamplingConfig(**asdict(self))
        out.height = int(self.height or d.get("height") or h_default)
        out.width = int(self.width or d.get("width") or w_default)
        if out.max_sequence_length is None and "max_sequence_length" in d:
            out.max_sequence_length = int(d["max_sequence_length"])
        if out.text_encoder_out_layers is None and "text_encoder_out_layers" in d:
            out.text_encoder_out_layers = tuple(d["text_encoder_out_layers"])
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["text_encoder_out_layers"] is not None:
            d["text_encoder_out_layers"] = list(d["text_encoder_out_layers"])
        return d


@dataclass
class SampleSet:
    """Which samples a run covers, in fixed batches (the base of the audit and sensitivity configs).

    Sample ``i`` uses prompt ``prompts[i % len(prompts)]`` and seed ``seed + i``; batch ``b`` holds
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

    def __post_init__(self):
        self.prompts = [str(p) for p in self.prompts]
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ConfigError("at least one non-empty prompt is needed")
        if self.num_samples is None:
            self.num_samples = len(self.prompts)
        if int(self.num_samples) < 2:
            raise ConfigError(f"{self._needs_two}, got {self.num_samples}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
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

    def check_against(self, checkpoint: Checkpoint) -> None:
        """Check what depends on the checkpoint (the image size) before a run writes anything."""
        resolved = self.sampling.resolved(checkpoint)
        checkpoint.adapter.check_size(resolved.height, resolved.width)

    def fingerprint(self, checkpoint: dict) -> str:
        """Hash of everything that determines the results (a run with another hash is not resumed)."""
        import hashlib
        import json

        payload = json.dumps({"config": self.to_dict(), "checkpoint": checkpoint}, sort_keys=True, default=str)
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


def sample_seeds(seed: int, sample_ids: Sequence[int]) -> list[int]:
    """Seed of each sample: ``seed + i``."""
    return [int(seed) + int(i) for i in sample_ids]


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
