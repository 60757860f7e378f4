"""Tiny, offline flow-matching pipelines and planted checkpoints.

Everything here is built from constructors under a fixed seed, with tokenizers built in
memory, so tests, notebooks and users can exercise ngdiag without downloading anything.
The models are random: their images are noise, but every code path (prompt encoding,
packing, guidance, schedules, VAE decoding, LoRA, full fine-tunes) is the real diffusers one.

Families: ``"sd3"`` (StableDiffusion3Pipeline), ``"flux"`` (FluxPipeline, FLUX.1-dev-like
with guidance embedding), ``"flux-schnell"`` (FLUX.1 without guidance embedding),
``"flux2-klein"`` (Flux2KleinPipeline) and ``"qwenimage"`` (QwenImagePipeline).

Planted checkpoints have an effect of known size: :func:`save_scaled_finetune` multiplies the
transformer's final output projection by ``scale`` (bias zeroed), so ``v_theta = scale * v_ref``
at every input and the inflation is exactly ``scale - 1``. :func:`save_rotated_finetune` rotates
every token's output channels by ``angle`` (optionally also scaled), so ``||v_theta|| = scale ||v_ref||``
and ``cos(v_theta, v_ref) = cos(angle)`` at every input: a drift that is purely directional when
``scale = 1``, with a radial share known in closed form otherwise.

Example:
    >>> from ngdiag.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sd3")
    >>> type(pipe).__name__
    'StableDiffusion3Pipeline'
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ngdiag.core.errors import ConfigError

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_chars() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE maps bytes to."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with a character vocabulary and no merges (built in memory)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_t5_tokenizer():
    """A unigram T5 tokenizer over printable ASCII characters (built in memory)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("▁" + chr(c), -2.5) for c in range(97, 123)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


#: The words of QwenImagePipeline's prompt template (``prompt_template_encode``) that Qwen2's BPE keeps
#: whole: with them the template's system part is exactly ``prompt_template_encode_start_idx`` (34)
#: tokens, as with the real tokenizer, so the pipeline's cut drops the template and keeps the prompt.
QWEN_IMAGE_TEMPLATE_WORDS = (
    "system", "user", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture",
    " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
)


def tiny_qwen_tokenizer(words=()):
    """A byte-level Qwen2 tokenizer with a character vocabulary and a chat template.

    ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` are single special tokens, as in Qwen's
    tokenizers. ``words`` are extra whole-word tokens (the real tokenizer's BPE merges them); the
    Qwen-Image pipeline gets :data:`QWEN_IMAGE_TEMPLATE_WORDS`.
    """
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = {}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    if words:
        tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def _clip_text_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
    )


def _tiny_t5_encoder():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=160,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _tiny_vae(cls, **extra):
    """A two-block VAE with 4 latent channels (8x8 latents for 32x32 images, scale factor 2)."""
    return cls(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **extra,
    )


def _dynamic_shift_scheduler():
    """The FLUX-style scheduler (resolution-dependent ``mu``), as FLUX, klein and Qwen-Image ship it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15
    )


def tiny_pipeline(family: str = "sd3", *, seed: int = 0):
    """Build a tiny random-weight diffusers pipeline of ``family`` on CPU, float32, in eval mode.

    Args:
        family: one of :data:`FAMILIES`.
        seed: seed for every component's initialisation.
    """
    build = _TINY_BUILDERS.get(family)
    if build is None:
        raise ConfigError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    pipe = build(seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _seeded(seed: int, build, *args, **kwargs):
    """``build(*args, **kwargs)`` right after ``torch.manual_seed(seed)``: each component's own seed."""
    torch.manual_seed(seed)
    return build(*args, **kwargs)


#: the FLUX.1 / FLUX.2 transformer size shared by the tiny FLUX pipelines
_TINY_PACKED_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32,
)


def _tiny_sd3(seed: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = _seeded(
        seed, SD3Transformer2DModel, sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_seeded(seed, CLIPTextModelWithProjection, _clip_text_config(True)),
        text_encoder_2=_seeded(seed + 1, CLIPTextModelWithProjection, _clip_text_config(True)),
        text_encoder_3=_seeded(seed, _tiny_t5_encoder),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer(),
        transformer=transformer,
        vae=_seeded(seed, _tiny_vae, AutoencoderKL, shift_factor=0.0609, scaling_factor=1.5035),
    )


def _tiny_flux(seed: int, *, guidance_embeds: bool = True):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = _seeded(
        seed, FluxTransformer2DModel, **_TINY_PACKED_TRANSFORMER, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    return FluxPipeline(
        scheduler=_dynamic_shift_scheduler(),
        text_encoder=_seeded(seed, CLIPTextModel, _clip_text_config(False)),
        text_encoder_2=_seeded(seed, _tiny_t5_encoder),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
        vae=_seeded(seed, _tiny_vae, AutoencoderKL, shift_factor=0.0609, scaling_factor=1.5035),
    )


def _tiny_flux2_klein(seed: int):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    transformer = _seeded(
        seed, Flux2Transformer2DModel, **_TINY_PACKED_TRANSFORMER, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )
    config = Qwen3Config(
        intermediate_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=300, max_position_embeddings=512,
    )
    return Flux2KleinPipeline(
        scheduler=_dynamic_shift_scheduler(),
        text_encoder=_seeded(seed, Qwen3ForCausalLM, config),
        vae=_seeded(seed, _tiny_vae, AutoencoderKLFlux2),
        tokenizer=tiny_qwen_tokenizer(),
        transformer=transformer,
    )


def _tiny_qwenimage(seed: int):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = _seeded(
        seed, QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = _seeded(
        seed, AutoencoderKLQwenImage, base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    tokenizer = tiny_qwen_tokenizer(QWEN_IMAGE_TEMPLATE_WORDS)
    text_config = {
        "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": 300,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=300, vision_end_token_id=297, vision_start_token_id=298, vision_token_id=299,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=_dynamic_shift_scheduler(),
        text_encoder=_seeded(seed, Qwen2_5_VLForConditionalGeneration, config), tokenizer=tokenizer,
    )


#: A tiny builder for every family of :data:`ngdiag.models.families.FAMILIES`, plus ``"flux-schnell"``
#: (FLUX.1 without guidance embedding).
_TINY_BUILDERS = {
    "sd3": _tiny_sd3,
    "flux": _tiny_flux,
    "flux-schnell": lambda seed: _tiny_flux(seed, guidance_embeds=False),
    "flux2-klein": _tiny_flux2_klein,
    "qwenimage": _tiny_qwenimage,
}
FAMILIES = tuple(_TINY_BUILDERS)


#: Call arguments that make the tiny pipelines fast and valid (image size, sequence length).
TINY_CALL_KWARGS = {
    "sd3": {"height": 32, "width": 32, "max_sequence_length": 16},
    "flux": {"height": 32, "width": 32, "max_sequence_length": 16},
    "flux-schnell": {"height": 32, "width": 32, "max_sequence_length": 16},
    "flux2-klein": {"height": 32, "width": 32, "max_sequence_length": 32, "text_encoder_out_layers": (1, 2)},
    "qwenimage": {"height": 32, "width": 32, "max_sequence_length": 32},
}


def save_tiny_pipeline(path, family: str = "sd3", *, seed: int = 0) -> Path:
    """Build :func:`tiny_pipeline` and save it as a diffusers pipeline folder (safetensors)."""
    path = Path(path)
    pipe = tiny_pipeline(family, seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    _write_ngdiag_hints(path, family)
    return path


def _write_ngdiag_hints(path: Path, family: str) -> None:
    """Record the tiny pipeline's call defaults so loaders and the CLI use valid sizes."""
    hints = dict(TINY_CALL_KWARGS[family])
    if "text_encoder_out_layers" in hints:
        hints["text_encoder_out_layers"] = list(hints["text_encoder_out_layers"])
    (path / "ngdiag_defaults.json").write_text(json.dumps({"family": family, "call_kwargs": hints}, indent=2))


def _output_projection(transformer) -> torch.nn.Linear:
    """The transformer's final linear layer that produces the velocity."""
    for name in ("proj_out",):
        layer = getattr(transformer, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer
    raise ConfigError(f"{type(transformer).__name__} has no linear output projection 'proj_out'")


def scale_output(transformer, scale: float) -> None:
    """Multiply the transformer's output projection by ``scale`` and zero its bias (in place).

    Afterwards ``v_theta(x, t, c) = scale * v_ref(x, t, c)`` exactly for every input, a planted
    norm inflation of ``scale - 1``.
    """
    layer = _output_projection(transformer)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.zero_()
        layer.weight.mul_(scale)


def rotate_output(transformer, angle: float, scale: float = 1.0) -> None:
    """Rotate (and scale) the output projection's channels by ``angle`` radians, bias zeroed (in place).

    The output channels are paired ``(0, 1), (2, 3), ...`` and each pair is rotated by ``angle``:
    the new weight is ``scale * Q W`` with ``Q`` orthogonal and block diagonal. Every token's output
    vector ``o`` becomes ``scale * Q o``, so for every input (and every layout, guidance and
    per-token rescale, since they act linearly or through per-token norms):

    - ratio ``||v_theta|| / ||v_ref|| = scale``,
    - cosine ``cos(v_theta, v_ref) = cos(angle)`` (``<Q o, o> = cos(angle) ||o||^2``),
    - radial share ``(scale - 1)^2 / ((scale - 1)^2 + 2 scale (1 - cos(angle)))`` (CONVENTIONS drift identity).

    Raises:
        ConfigError: the projection has an odd number of output channels, or ``angle``/``scale`` are
            not finite (``scale`` must be positive).
    """
    layer = _output_projection(transformer)
    n = layer.out_features
    if n % 2:
        raise ConfigError(f"cannot rotate {n} output channels: the pairwise rotation needs an even number")
    if not (math.isfinite(angle) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"angle must be finite and scale positive, got angle={angle}, scale={scale}")
    c, s = math.cos(angle), math.sin(angle)
    q = torch.zeros(n, n, dtype=torch.float64)
    for i in range(0, n, 2):
        q[i, i], q[i, i + 1], q[i + 1, i], q[i + 1, i + 1] = c, -s, s, c
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.zero_()
        layer.weight.copy_((scale * q @ layer.weight.double()).to(layer.weight.dtype))


def zero_output_bias(transformer) -> None:
    """Zero the output projection's bias, so that a planted scale acts multiplicatively."""
    layer = _output_projection(transformer)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.zero_()


def save_planted_base(path, family: str = "sd3", *, seed: int = 0) -> Path:
    """Save a tiny pipeline whose output projection has zero bias (the base for planted effects)."""
    path = Path(path)
    pipe = tiny_pipeline(family, seed=seed)
    zero_output_bias(pipe.transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    _write_ngdiag_hints(path, family)
    return path


def save_scaled_finetune(base_path, out_path, scale: float) -> Path:
    """Save a full fine-tune (transformer folder) of ``base_path`` with its output scaled by ``scale``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_path, use_safetensors=True, local_files_only=True)
    scale_output(pipe.transformer, scale)
    out_path = Path(out_path)
    pipe.transformer.save_pretrained(out_path, safe_serialization=True)
    return out_path


def save_rotated_finetune(base_path, out_path, angle: float, *, scale: float = 1.0) -> Path:
    """Save a full fine-tune (transformer folder) of ``base_path`` with :func:`rotate_output` applied.

    ``scale = 1`` gives a norm-preserving fine-tune: ratio 1, radial share 0, cosine ``cos(angle)``.
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_path, use_safetensors=True, local_files_only=True)
    rotate_output(pipe.transformer, angle, scale)
    out_path = Path(out_path)
    pipe.transformer.save_pretrained(out_path, safe_serialization=True)
    return out_path


def fill_lora_weights(model: torch.nn.Module, *, seed: int, init_scale: float, zero: bool = False) -> None:
    """Seeded random LoRA matrices of a PEFT model (``B = 0`` when ``zero``: no effect at all), in
    parameter order; DoRA magnitudes, where there are any, are moved by up to 10 % from their init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * init_scale)
            elif ".lora_B." in name:
                param.copy_(torch.zeros_like(param) if zero else torch.randn(param.shape, generator=gen) * init_scale)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.rand(param.shape, generator=gen))


def save_lora_adapter(
    base_path,
    out_path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules=("to_q", "to_k", "to_v", "to_out.0"),
    init_scale: float = 0.05,
    zero: bool = False,
    seed: int = 0,
    layout: str = "peft",
    nonzero_modules=None,
) -> Path:
    """Save a LoRA adapter on the base pipeline's transformer, as trainers save them.

    Args:
        base_path: a diffusers pipeline folder.
        out_path: the adapter folder to write.
        rank, alpha: LoRA rank ``r`` and ``lora_alpha`` (``alpha != rank`` exercises the scaling).
        init_scale: standard deviation of the random A and B matrices (B is usually zero at init;
            here it is random so the adapter has an effect).
        zero: save an adapter whose B matrices are zero (no effect at all).
        nonzero_modules: module names (or their dotted suffixes, e.g. ``"transformer_blocks.1.attn.to_out.0"``)
            whose B matrices stay random; every other module's B is zero, so only these modules
            change the output (a planted effect for per-layer attribution).
        layout: ``"peft"`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT,
            Flow-Factory, DiffusionNFT style); ``"diffusers"`` writes a single
            ``pytorch_lora_weights.safetensors`` with diffusers' key names and alpha metadata.
    """
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(base_path, use_safetensors=True, local_files_only=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    model = get_peft_model(pipe.transformer, config)
    fill_lora_weights(model, seed=seed, init_scale=init_scale, zero=zero)
    if nonzero_modules is not None:
        keep = [str(m) for m in nonzero_modules]
        found = set()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." not in name:
                    continue
                module = name.split(".lora_B.")[0].removeprefix("base_model.model.")
                hits = [m for m in keep if module == m or module.endswith("." + m)]
                found.update(hits)
                if not hits:
                    param.zero_()
        if set(keep) - found:
            raise ConfigError(f"nonzero_modules names no adapted module: {sorted(set(keep) - found)}")
    out_path = Path(out_path)
    if layout == "peft":
        config.base_model_name_or_path = str(Path(base_path).resolve())
        model.save_pretrained(out_path, safe_serialization=True)
        return out_path
    if layout == "diffusers":
        prefix = "base_model.model."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in get_peft_model_state_dict(model).items()}
        pipe_cls = type(pipe)
        pipe_cls.save_lora_weights(
            out_path,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=config.to_dict(),
            safe_serialization=True,
        )
        return out_path
    raise ConfigError(f"unknown adapter layout {layout!r}; choose 'peft' or 'diffusers'")
