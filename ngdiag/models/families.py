"""Family adapters: what differs between SD3, FLUX.1, FLUX.2-klein and Qwen-Image pipelines.

:data:`FAMILIES` is the one registry of supported families (key -> adapter class; each adapter names
its title and diffusers pipeline and transformer classes). An adapter wraps a loaded diffusers
pipeline and gives ngdiag one interface to it:

- :meth:`FamilyAdapter.velocity_model` turns a transformer into a :class:`FamilyVelocity`
  that follows the velocity contract ``v = model(x, t, **cond)`` with ``t`` in ``[0, 1]``
  (the adapter's :meth:`FamilyAdapter.call_transformer` is the family's own transformer call);
- :meth:`FamilyAdapter.encode` encodes prompts with the pipeline's own ``encode_prompt``;
- :meth:`FamilyAdapter.prepare_latents` draws the initial noise with the pipeline's own
  ``prepare_latents`` (same generators, same shapes, packed where the family packs);
- :meth:`FamilyAdapter.schedule` computes the sigma schedule exactly as the pipeline does
  (SD3 static shift, FLUX.1 dynamic ``mu``, klein's empirical ``mu``);
- :meth:`FamilyAdapter.output_latents` / :meth:`FamilyAdapter.decode` map the final state to what
  ``pipe(..., output_type="latent")`` returns, and to images in ``[0, 1]``.

The state ``x`` lives in the transformer's latent layout (packed tokens for FLUX); packing is a
permutation, so per-sample norms are layout independent.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.core.sampling import GuidedVelocity

__all__ = [
    "Conditioning",
    "FamilyVelocity",
    "FamilyAdapter",
    "SD3Adapter",
    "FluxAdapter",
    "Flux2KleinAdapter",
    "QwenImageAdapter",
    "adapter_for",
    "family_of_pipeline",
    "family_of_transformer",
    "supported_pipelines",
    "FAMILIES",
    "SUPPORTED_FAMILIES",
]


@dataclass
class Conditioning:
    """Encoded prompts for a batch.

    Attributes:
        cond: keyword arguments of the conditional velocity call.
        uncond: keyword arguments of the unconditional call, or ``None`` without CFG.
        guidance_scale: CFG scale ``w`` (``1.0`` when no CFG is applied).
        batched: evaluate ``[uncond; cond]`` in one forward (SD3) or separately (FLUX).
        prompts: the prompts, for reports.
    """

    cond: dict
    uncond: Optional[dict]
    guidance_scale: float
    batched: bool
    prompts: list = field(default_factory=list)
    shared_keys: tuple = ()
    rescale: Optional[str] = None

    def guided(self, model) -> GuidedVelocity:
        """Bind this conditioning to a velocity model."""
        return GuidedVelocity(model, self.cond, self.uncond, self.guidance_scale, self.batched, self.rescale)

    def with_inputs(self, inputs: dict) -> "Conditioning":
        """Add per-call inputs that come with the latents (position ids) to cond and uncond."""
        cond = {**self.cond, **inputs}
        uncond = None if self.uncond is None else {**self.uncond, **inputs}
        return Conditioning(cond, uncond, self.guidance_scale, self.batched, self.prompts, self.shared_keys, self.rescale)

    def repeat(self, n: int) -> "Conditioning":
        """The conditioning of the batch repeated ``n`` times along samples (``[c; c; ...]``)."""

        def rep_value(k, v):
            if k in self.shared_keys:
                return v
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return torch.cat([v] * n)
            return v * n if isinstance(v, list) else v

        def rep(d):
            return None if d is None else {k: rep_value(k, v) for k, v in d.items()}

        return Conditioning(rep(self.cond), rep(self.uncond), self.guidance_scale, self.batched, self.prompts * n,
                            self.shared_keys, self.rescale)

    def select(self, index: slice) -> "Conditioning":
        """The conditioning of the samples ``index`` (a slice) of the batch."""

        def pick_value(k, v):
            if k in self.shared_keys:
                return v
            if (isinstance(v, torch.Tensor) and v.dim() > 0) or isinstance(v, list):
                return v[index]
            return v

        def pick(d):
            return None if d is None else {k: pick_value(k, v) for k, v in d.items()}

        return Conditioning(pick(self.cond), pick(self.uncond), self.guidance_scale, self.batched, self.prompts[index],
                            self.shared_keys, self.rescale)


class FamilyVelocity(torch.nn.Module):
    """A transformer under the velocity contract ``v = model(x, t, **cond)``.

    ``t`` is the flow time in ``[0, 1]`` of shape ``(B,)``; the family adapter's
    :meth:`FamilyAdapter.call_transformer` turns it into the family's timestep with the same float
    operations as the pipeline (``t * 1000`` for SD3, ``(t * 1000) / 1000`` for FLUX), and a
    negated output (Z-Image, Lumina2, HiDream style) is flipped by ``sign``.
    """

    def __init__(self, transformer: torch.nn.Module, family: str, num_train_timesteps: int = 1000, sign: float = 1.0):
        super().__init__()
        if family not in FAMILIES:
            raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        self.transformer = transformer
        self.family = family
        self.num_train_timesteps = num_train_timesteps
        self.sign = sign

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = FAMILIES[self.family].call_transformer(self.transformer, x, t * self.num_train_timesteps, cond)
        return out if self.sign == 1.0 else self.sign * out


def _module_function(pipe, name):
    """A helper function defined in the pipeline's own module (e.g. ``calculate_shift``)."""
    module = importlib.import_module(type(pipe).__module__)
    return getattr(module, name)


def _calculate_shift_mu(pipe, image_seq_len: int, default_max_shift: float) -> float:
    """``mu`` from the pipeline module's ``calculate_shift`` and the scheduler config (pipeline defaults)."""
    cfg = pipe.scheduler.config
    calculate_shift = _module_function(pipe, "calculate_shift")
    return calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", default_max_shift),
    )


class FamilyAdapter:
    """Base adapter; subclasses fill in the family's differences."""

    #: the family's key in :data:`FAMILIES` (``--family``, ``summary.json``)
    name: str = ""
    #: how people call the family
    title: str = ""
    #: the diffusers class names this adapter serves
    pipeline_class: str = ""
    transformer_class: str = ""
    cfg_batched: bool = False

    def __init__(self, pipe):
        self.pipe = pipe

    # ----- model -----
    def velocity_model(self, transformer: torch.nn.Module) -> FamilyVelocity:
        ntt = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        return FamilyVelocity(transformer, self.name, ntt)

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor times the 2 x 2 latent packing."""
        return int(self.pipe.vae_scale_factor) * 2

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`ConfigError` for an image size the pipeline would refuse or silently round down."""
        multiple = self.size_multiple()
        if height % multiple or width % multiple:
            raise ConfigError(
                f"height and width must be multiples of {multiple} for this {self.title} pipeline, got {height}x{width} "
                f"(e.g. {max(multiple, height // multiple * multiple)}x{max(multiple, width // multiple * multiple)})"
            )

    #: the longest ``max_sequence_length`` the pipeline accepts (its ``check_inputs``)
    max_sequence_length_limit: Optional[int] = 512

    def check_call_kwargs(self, **call_kwargs) -> None:
        """Raise :class:`ConfigError` for call arguments of :meth:`encode` that do not fit this pipeline."""
        length = call_kwargs.get("max_sequence_length")
        limit = self.max_sequence_length_limit
        if length is not None and limit is not None and int(length) > limit:
            raise ConfigError(f"max_sequence_length must be at most {limit} for {self.title} pipelines, got {length}")

    # ----- transformer call -----
    #: the conditioning entries the transformer takes as keyword arguments
    transformer_inputs: tuple[str, ...] = ()
    #: the transformer takes ``t`` in ``[0, 1]`` (``timestep / 1000`` in the state's dtype) and a
    #: ``guidance`` input (FLUX.1, FLUX.2, Qwen-Image); otherwise ``timestep = t * 1000`` (SD3)
    unit_timestep: bool = False
    #: the state is packed tokens cast to the transformer's dtype, and the output is cut to the
    #: image tokens (FLUX.1, FLUX.2)
    packed_tokens: bool = False

    @classmethod
    def call_transformer(cls, transformer: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's output at ``x`` with the pipeline's own call (``timestep = t * 1000``)."""
        kwargs = {key: cond[key] for key in cls.transformer_inputs}
        if cls.unit_timestep:
            timestep = timestep.to(x.dtype) / 1000
            kwargs["guidance"] = cond.get("guidance")
        hidden = x.to(transformer.dtype) if cls.packed_tokens else x
        out = transformer(hidden_states=hidden, timestep=timestep, return_dict=False, **kwargs)[0]
        return out[:, : x.shape[1]] if cls.packed_tokens else out

    # ----- schedule -----
    def _mu(self, image_seq_len: int, num_steps: int) -> Optional[float]:
        return None

    #: the pipeline passes ``sigmas = linspace(1, 1/K, K)`` to the scheduler (FLUX, klein, Qwen-Image)
    linear_sigmas: bool = False

    def _default_sigmas(self, num_steps: int):
        return np.linspace(1.0, 1 / num_steps, num_steps) if self.linear_sigmas else None

    def schedule(self, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        """The ``K + 1`` sigmas the pipeline would use for ``latents`` (terminal 0 included)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        retrieve = _module_function(self.pipe, "retrieve_timesteps")
        kwargs = {}
        mu = self._mu(self._image_seq_len(latents), num_steps)
        if mu is not None:
            kwargs["mu"] = mu
        sigmas = self._default_sigmas(num_steps)
        if sigmas is not None and scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        retrieve(scheduler, num_steps, "cpu", sigmas=sigmas, **kwargs)
        return scheduler.sigmas.to(torch.float32).clone()

    def _image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[1]

    # ----- prompts / latents / decoding -----
    def encode(self, prompts, guidance_scale: float, *, negative_prompt: Optional[str] = None, **call_kwargs) -> Conditioning:
        raise NotImplementedError

    def _encode_with_separate_calls(self, prompts, guidance_scale: float, negative_prompt: str, keys: tuple[str, ...], **kw):
        """``(cond, uncond, do_cfg)`` from two ``encode_prompt`` calls: the prompts, and the negative prompt
        when CFG is on (families that run CFG as separate transformer calls)."""

        def encode(texts: list[str]) -> dict:
            return dict(zip(keys, self.pipe.encode_prompt(prompt=texts, device=self.device, **kw)))

        cond = encode(list(prompts))
        do_cfg = self.uses_cfg(guidance_scale)
        return cond, encode([negative_prompt] * len(prompts)) if do_cfg else None, do_cfg

    def prepare_latents(self, batch_size: int, height: int, width: int, generator, **kw) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def output_latents(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return x

    # ----- spatial layout -----
    def latent_grid(self, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A state or velocity in the transformer's layout as the latent grid ``(B, C, h, w)``.

        Only a permutation of the elements (no scaling, no normalisation): the norm over channels at
        latent position ``(y, x)`` is the norm of exactly the elements that belong to that position.
        SD3 works on the grid already; the packed families (FLUX.1, FLUX.2-klein, Qwen-Image) pack
        each 2 x 2 patch of latent positions into one token and are unpacked with the pipeline's own
        functions. ``height`` and ``width`` are the image size in pixels.
        """
        if v.dim() != 4:
            raise ConfigError(f"expected a latent grid (B, C, h, w) for {self.title}, got shape {tuple(v.shape)}")
        return v

    def image_size_of_call(self, inputs: dict) -> Optional[tuple[int, int]]:
        """The image size ``(height, width)`` in pixels of a transformer call with keyword arguments
        ``inputs`` (the live probe's view), or ``None`` when the output already is the latent grid."""
        return None

    def decode(self, x: torch.Tensor, height: int, width: int, *, clamp: bool = True) -> torch.Tensor:
        """Images in ``[0, 1]``, shape ``(B, 3, H, W)``, differentiable up to the final clamp;
        ``clamp=False`` returns ``decoded / 2 + 0.5`` before the clamp (values may leave [0, 1])."""
        raise NotImplementedError

    def _vae_decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        image = image / 2 + 0.5
        return image.clamp(0, 1) if clamp else image


class SD3Adapter(FamilyAdapter):
    """StableDiffusion3Pipeline (SD3 / SD3.5): CLIP-L + CLIP-G + T5, batched CFG, static shift."""

    name = "sd3"
    title = "SD3 / SD3.5"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    transformer_inputs = ("encoder_hidden_states", "pooled_projections")
    cfg_batched = True

    def size_multiple(self):
        return int(self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size)

    def default_size(self):
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def _image_seq_len(self, latents):
        p = self.pipe.transformer.config.patch_size
        return (latents.shape[2] // p) * (latents.shape[3] // p)

    def _mu(self, image_seq_len, num_steps):
        if not self.pipe.scheduler.config.get("use_dynamic_shifting", False):
            return None
        return _calculate_shift_mu(self.pipe, image_seq_len, default_max_shift=1.16)

    def encode(self, prompts, guidance_scale, *, negative_prompt=None, max_sequence_length=256, **_):
        pipe = self.pipe
        do_cfg = self.uses_cfg(guidance_scale)
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
            do_classifier_free_guidance=do_cfg,
            device=self.device,
            max_sequence_length=max_sequence_length,
        )
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled} if do_cfg else None
        return Conditioning(cond, uncond, guidance_scale if do_cfg else 1.0, True, list(prompts))

    def prepare_latents(self, batch_size, height, width, generator, dtype=None, **_):
        pipe = self.pipe
        x = pipe.prepare_latents(
            batch_size, pipe.transformer.config.in_channels, height, width, dtype or self.dtype, self.device, generator
        )
        return x, {}

    def decode(self, x, height, width, *, clamp=True):
        vae = self.pipe.vae
        latents = (x / vae.config.scaling_factor) + vae.config.shift_factor
        return self._vae_decode(latents, clamp)


class FluxAdapter(FamilyAdapter):
    """FluxPipeline (FLUX.1-dev / schnell): CLIP + T5, packed 2x2 latents, dynamic shift ``mu``.

    ``guidance_scale`` is the embedded (distilled) guidance of FLUX.1-dev; no CFG is applied,
    as in the pipeline's default call (``true_cfg_scale`` is not used).
    """

    name = "flux"
    title = "FLUX.1"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    transformer_inputs = ("encoder_hidden_states", "txt_ids", "img_ids", "pooled_projections")
    unit_timestep = packed_tokens = True
    linear_sigmas = True

    def uses_cfg(self, guidance_scale):
        return False

    def _mu(self, image_seq_len, num_steps):
        return _calculate_shift_mu(self.pipe, image_seq_len, default_max_shift=1.15)

    def encode(self, prompts, guidance_scale, *, negative_prompt=None, max_sequence_length=512, **_):
        pipe = self.pipe
        pe, pooled, text_ids = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled, "txt_ids": text_ids}
        if pipe.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full([len(prompts)], float(guidance_scale), device=self.device, dtype=torch.float32)
        return Conditioning(cond, None, 1.0, False, list(prompts), shared_keys=("txt_ids", "img_ids"))

    def prepare_latents(self, batch_size, height, width, generator, dtype=None, **_):
        pipe = self.pipe
        x, ids = pipe.prepare_latents(
            batch_size, pipe.transformer.config.in_channels // 4, height, width, dtype or self.dtype, self.device, generator
        )
        return x, {"img_ids": ids}

    def latent_grid(self, v, height, width):
        return self.pipe._unpack_latents(v, height, width, self.pipe.vae_scale_factor)

    def image_size_of_call(self, inputs):
        return _size_from_ids(inputs.get("img_ids"), self.pipe.vae_scale_factor)

    def decode(self, x, height, width, *, clamp=True):
        pipe = self.pipe
        vae = pipe.vae
        latents = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        return self._vae_decode(latents, clamp)


class Flux2KleinAdapter(FamilyAdapter):
    """Flux2KleinPipeline (FLUX.2-klein): Qwen3 text encoder, CFG with separate calls, empirical ``mu``."""

    name = "flux2-klein"
    title = "FLUX.2-klein"
    pipeline_class = "Flux2KleinPipeline"
    transformer_class = "Flux2Transformer2DModel"
    transformer_inputs = ("encoder_hidden_states", "txt_ids", "img_ids")
    unit_timestep = packed_tokens = True
    linear_sigmas = True

    def uses_cfg(self, guidance_scale):
        return guidance_scale > 1.0 and not self.pipe.config.get("is_distilled", False)

    def _mu(self, image_seq_len, num_steps):
        compute_empirical_mu = _module_function(self.pipe, "compute_empirical_mu")
        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)

    max_sequence_length_limit = None

    def check_call_kwargs(self, **call_kwargs):
        super().check_call_kwargs(**call_kwargs)
        layers = call_kwargs.get("text_encoder_out_layers")
        if layers is None:
            return
        n = int(self.pipe.text_encoder.config.num_hidden_layers)
        bad = [k for k in layers if not -(n + 1) <= int(k) <= n]
        if bad:
            example = ",".join(str(k) for k in sorted({max(1, n // 3), max(1, 2 * n // 3), n}))
            raise ConfigError(
                f"text_encoder_out_layers {tuple(layers)} does not fit this FLUX.2-klein pipeline: its text encoder has "
                f"{n} layers, so the hidden-state indices lie in [{-(n + 1)}, {n}]; pass --text-encoder-out-layers "
                f"(text_encoder_out_layers=...), e.g. {example}"
            )

    def encode(self, prompts, guidance_scale, *, negative_prompt=None, max_sequence_length=512, text_encoder_out_layers=(9, 18, 27), **_):
        cond, uncond, do_cfg = self._encode_with_separate_calls(
            prompts, guidance_scale, "" if negative_prompt is None else negative_prompt, ("encoder_hidden_states", "txt_ids"),
            max_sequence_length=max_sequence_length, text_encoder_out_layers=tuple(text_encoder_out_layers),
        )
        return Conditioning(cond, uncond, guidance_scale if do_cfg else 1.0, False, list(prompts))

    def prepare_latents(self, batch_size, height, width, generator, dtype=None, **_):
        pipe = self.pipe
        x, ids = pipe.prepare_latents(
            batch_size=batch_size,
            num_latents_channels=pipe.transformer.config.in_channels // 4,
            height=height,
            width=width,
            dtype=dtype or self.dtype,
            device=self.device,
            generator=generator,
        )
        return x, {"img_ids": ids}

    def latent_grid(self, v, height, width):
        pipe = self.pipe
        vsf = pipe.vae_scale_factor
        lh, lw = 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))
        ids = pipe._prepare_latent_ids(torch.zeros(v.shape[0], 1, lh // 2, lw // 2)).to(v.device)
        return pipe._unpatchify_latents(pipe._unpack_latents_with_ids(v, ids, lh // 2, lw // 2))

    def image_size_of_call(self, inputs):
        return _size_from_ids(inputs.get("img_ids"), self.pipe.vae_scale_factor)

    def output_latents(self, x, height, width):
        pipe = self.pipe
        vsf = pipe.vae_scale_factor
        lh, lw = 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))
        ids = pipe._prepare_latent_ids(torch.zeros(x.shape[0], 1, lh // 2, lw // 2)).to(x.device)
        latents = pipe._unpack_latents_with_ids(x, ids, lh // 2, lw // 2)
        bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = latents * bn_std + bn_mean
        return pipe._unpatchify_latents(latents)

    def decode(self, x, height, width, *, clamp=True):
        return self._vae_decode(self.output_latents(x, height, width), clamp)


class QwenImageAdapter(FamilyAdapter):
    """QwenImagePipeline: Qwen2.5-VL text encoder, packed latents, dynamic shift ``mu``, true CFG.

    ``guidance_scale`` is the pipeline's ``true_cfg_scale`` (CFG with separate calls against the
    negative prompt, default ``" "``), including the pipeline's per-token rescale of the guided
    velocity to the conditional norm; guidance-distilled checkpoints get it as embedded guidance.
    """

    name = "qwenimage"
    title = "Qwen-Image"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    transformer_inputs = ("encoder_hidden_states_mask", "encoder_hidden_states", "img_shapes")
    unit_timestep = True
    linear_sigmas = True
    max_sequence_length_limit = 1024

    def uses_cfg(self, guidance_scale):
        return guidance_scale > 1.0 and not self.pipe.transformer.config.guidance_embeds

    def _mu(self, image_seq_len, num_steps):
        return _calculate_shift_mu(self.pipe, image_seq_len, default_max_shift=1.15)

    def encode(self, prompts, guidance_scale, *, negative_prompt=None, max_sequence_length=512, **_):
        cond, uncond, do_cfg = self._encode_with_separate_calls(
            prompts, guidance_scale, " " if negative_prompt is None else negative_prompt,
            ("encoder_hidden_states", "encoder_hidden_states_mask"), max_sequence_length=max_sequence_length,
        )
        if self.pipe.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full([len(prompts)], float(guidance_scale), device=self.device, dtype=torch.float32)
        return Conditioning(cond, uncond, guidance_scale if do_cfg else 1.0, False, list(prompts),
                            rescale="token_norm" if do_cfg else None)

    def prepare_latents(self, batch_size, height, width, generator, dtype=None, **_):
        pipe = self.pipe
        x = pipe.prepare_latents(
            batch_size, pipe.transformer.config.in_channels // 4, height, width, dtype or self.dtype, self.device, generator
        )
        vsf = pipe.vae_scale_factor
        img_shapes = [[(1, height // vsf // 2, width // vsf // 2)]] * batch_size
        return x, {"img_shapes": img_shapes}

    def latent_grid(self, v, height, width):
        return self.pipe._unpack_latents(v, height, width, self.pipe.vae_scale_factor)[:, :, 0]

    def image_size_of_call(self, inputs):
        shapes = inputs.get("img_shapes")
        if not shapes:
            return None
        _, h2, w2 = shapes[0][0]
        vsf = int(self.pipe.vae_scale_factor)
        return int(h2) * 2 * vsf, int(w2) * 2 * vsf

    def decode(self, x, height, width, *, clamp=True):
        pipe = self.pipe
        vae = pipe.vae
        latents = pipe._unpack_latents(x, height, width, pipe.vae_scale_factor).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0] / 2 + 0.5
        return image.clamp(0, 1) if clamp else image


def _size_from_ids(ids, vae_scale_factor) -> Optional[tuple[int, int]]:
    """The image size of packed tokens from their position ids (FLUX.1 ``(seq, 3)``, FLUX.2 ``(B, seq, 4)``:
    the row and the column are columns 1 and 2)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3):
        return None
    pos = ids[0] if ids.dim() == 3 else ids
    rows, cols = int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1
    return rows * 2 * int(vae_scale_factor), cols * 2 * int(vae_scale_factor)


#: The one registry of supported families: loading, the CLI, the demo and ``ngdiag.testing`` read it.
FAMILIES: dict[str, type[FamilyAdapter]] = {
    adapter.name: adapter for adapter in (SD3Adapter, FluxAdapter, Flux2KleinAdapter, QwenImageAdapter)
}
#: family key -> how people call it
SUPPORTED_FAMILIES = {name: adapter.title for name, adapter in FAMILIES.items()}


def family_of_pipeline(class_name: str) -> Optional[str]:
    """The family key of a diffusers pipeline class name, or None when ngdiag does not support it."""
    return next((name for name, a in FAMILIES.items() if a.pipeline_class == class_name), None)


def family_of_transformer(class_name: str) -> Optional[str]:
    """The family key of a diffusers transformer class name, or None when ngdiag does not support it."""
    return next((name for name, a in FAMILIES.items() if a.transformer_class == class_name), None)


def supported_pipelines() -> str:
    """The supported pipeline class names, for messages."""
    return ", ".join(a.pipeline_class for a in FAMILIES.values())


def adapter_for(pipe) -> FamilyAdapter:
    """The adapter of a loaded pipeline, or :class:`CheckpointError` for an unsupported family."""
    family = family_of_pipeline(type(pipe).__name__)
    if family is None:
        raise CheckpointError(f"unsupported pipeline {type(pipe).__name__}; ngdiag supports {supported_pipelines()}")
    return FAMILIES[family](pipe)


def call_kwargs_for(adapter: FamilyAdapter, **given) -> dict:
    """Keep only the keyword arguments ``adapter.encode`` accepts (``max_sequence_length``...)."""
    params = inspect.signature(adapter.encode).parameters
    return {k: v for k, v in given.items() if k in params and v is not None}
