"""Differentiable image rewards: ``reward(images, prompts) -> (B,)``.

The contract, shared by every reward here:

* ``images`` is a float tensor ``(B, 3, H, W)`` with values in ``[0, 1]``: the decoded VAE
  output mapped from ``[-1, 1]`` by ``(x + 1) / 2``. Values are not clamped, so gradients reach
  every pixel; clamp before calling if you want the usual post-processing.
* ``prompts`` is a sequence of ``B`` strings (a single string is repeated), or ``None`` for
  rewards with ``requires_prompts == False``.
* The result is a float32 tensor (float64 for a float64 reward model) ``(B,)`` on ``images.device``, differentiable with respect to
  ``images``. Reward-model parameters are frozen (``requires_grad_(False)``, ``eval()``).

Formulas, preprocessing and sources are in ``docs/rewards.md``.

Example:
    >>> import torch
    >>> reward = load_reward("brightness")
    >>> images = torch.full((2, 3, 8, 8), 0.25, requires_grad=True)
    >>> reward(images).tolist()
    [0.25, 0.25]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.rewards.preprocess import ImagePreprocess, check_images, clip_preprocess, hpsv2_preprocess
from ngdiag.rewards.specs import (
    REWARD_KINDS,
    REWARD_RAW_SCALES,
    REWARD_SCALES,
    RewardScale,
    existing_path,
    parse_reward_spec,
    split_reward_spec,
)

__all__ = [
    "REWARD_KINDS",
    "BaseReward",
    "BrightnessReward",
    "ClipScoreReward",
    "ContrastReward",
    "HPSv2Reward",
    "OpenClipScoreReward",
    "PickScoreReward",
    "Reward",
    "RewardScale",
    "SaturationReward",
    "WorldReward",
    "load_reward",
    "luma",
]

Prompts = Sequence[str] | str | None
PathLike = str | os.PathLike[str]
Device = torch.device | str | None

#: ITU-R BT.601 luma weights (what PIL's ``convert("L")`` uses).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

#: Floor of the HPSv2-style saturation denominator, bounding its gradient by ``1 / floor``.
SATURATION_FLOOR: float = 0.01

_OPEN_CLIP_MISSING = "HPSv2 needs open_clip_torch: pip install 'ngdiag[hps]'"


@runtime_checkable
class Reward(Protocol):
    """An image reward: any object with this shape (the classes below, or your own).

    ``reward(images, prompts)`` maps ``(B, 3, H, W)`` images in ``[0, 1]`` and ``B`` prompts to a
    differentiable float32 ``(B,)`` tensor. ``name`` labels results; ``requires_prompts`` says
    whether ``prompts`` may be ``None``.
    """

    name: str
    requires_prompts: bool

    def __call__(self, images: torch.Tensor, prompts: Prompts = None) -> torch.Tensor: ...


class BaseReward(torch.nn.Module):
    """Base class of ngdiag's rewards: checks inputs, then calls :meth:`score`.

    Subclasses set ``name`` and ``requires_prompts`` and implement
    ``score(images, prompts) -> (B,)``; ``prompts`` arrives as a list of ``B`` strings, or
    ``None`` when the reward needs none.

    ``scales`` maps the name of each published alternative scale of the reward to its
    :class:`RewardScale` (``published = factor * raw``; empty when there is none) and ``raw_scale``
    says what the raw number is (``docs/rewards.md``, "Scales").
    """

    name: str = "reward"
    requires_prompts: bool = False
    scales: Mapping[str, RewardScale] = MappingProxyType({})
    raw_scale: str | None = None

    @classmethod
    def rescaled(cls, scores: Any, scale: str) -> Any:
        """``scores`` (raw) on the published scale named ``scale``: ``factor * scores``.

        Raises :class:`ConfigError` for a scale this reward does not have.
        """
        if scale not in cls.scales:
            known = ", ".join(cls.scales) or "none"
            raise ConfigError(f"reward {cls.name} has no scale {scale!r}; its scales: {known}.")
        return cls.scales[scale].apply(scores)

    def forward(self, images: torch.Tensor, prompts: Prompts = None) -> torch.Tensor:
        """Score ``images`` ``(B, 3, H, W)`` in [0, 1] against ``prompts``; returns float32 ``(B,)``."""
        check_images(images)
        batch = images.shape[0]
        prompt_list = _prompt_list(prompts, batch) if self.requires_prompts else None
        scores = self.score(images, prompt_list)
        if scores.shape != (batch,):
            raise ConfigError(f"reward {self.name} returned shape {tuple(scores.shape)}, expected ({batch},).")
        return scores.to(device=images.device, dtype=torch.promote_types(scores.dtype, torch.float32))

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """The reward itself, on checked inputs; ``(B,)``."""
        raise NotImplementedError


def _prompt_list(prompts: Prompts, batch: int) -> list[str]:
    if prompts is None:
        raise ConfigError("this reward needs one prompt per image, got prompts=None.")
    if isinstance(prompts, str):
        return [prompts] * batch
    prompt_list = list(prompts)
    if len(prompt_list) != batch or not all(isinstance(p, str) for p in prompt_list):
        raise ConfigError(f"expected {batch} prompt strings, one per image, got {len(prompt_list)} items.")
    return prompt_list


# --------------------------------------------------------------------------------------------
# Built-in image statistics: no weights, no prompts.


def luma(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``(B, 3, H, W)`` images: ``(B, H, W)``."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1)


class BrightnessReward(BaseReward):
    """Mean luma: ``mean_{h,w} (0.299 R + 0.587 G + 0.114 B)``, in [0, 1]."""

    name = "brightness"

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return luma(images).mean(dim=(1, 2))


class ContrastReward(BaseReward):
    """RMS contrast: the population standard deviation of luma over the pixels, in [0, 0.5]."""

    name = "contrast"

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return luma(images).flatten(1).std(dim=1, correction=0)


class SaturationReward(BaseReward):
    """Mean HSV saturation ``(max - min) / max(max, 0.01)`` over the pixels, in [0, 1].

    ``max`` and ``min`` are over R, G, B. The floor of 0.01 on the denominator only changes
    near-black pixels (value below 0.01) and bounds the gradient by 100 there.
    """

    name = "saturation"

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        cmax = images.amax(dim=1)
        cmin = images.amin(dim=1)
        return ((cmax - cmin) / cmax.clamp_min(SATURATION_FLOOR)).mean(dim=(1, 2))


# --------------------------------------------------------------------------------------------
# CLIP-family rewards.


def _pooled(output: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features``: a tensor in transformers 4.x, an output object in 5.x."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise CheckpointError(f"unexpected CLIP feature output of type {type(output).__name__}.")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1)


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _param_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def _load_clip_image_processor(path: Path) -> Any:
    import transformers

    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise ConfigError(f"no CLIP image processor config in {path}.")

    # transformers 5 has a PIL-backed class that needs no torchvision; 4.x has only CLIPImageProcessor.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    try:
        return cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"no CLIP image processor config in {path}.") from exc


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    # Checked first: transformers 5 would build a 3-token placeholder CLIP tokenizer from config.json alone.
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ConfigError(f"no CLIP tokenizer in {path}.")

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"no CLIP tokenizer in {path}.") from exc


class _TransformersClipReward(BaseReward):
    """A transformers ``CLIPModel`` scoring ``scale * cos(image_embeds, text_embeds)``."""

    requires_prompts = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        preprocess: ImagePreprocess,
        *,
        max_length: int = 77,
    ) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        config = getattr(model, "config", None)
        vision = getattr(config, "vision_config", None)
        image_size = getattr(vision, "image_size", None)
        if isinstance(image_size, int) and preprocess.output_size != (image_size, image_size):
            raise ConfigError(
                f"preprocessing makes {preprocess.output_size} images but the model expects {image_size}x{image_size}."
            )
        text = getattr(config, "text_config", None)
        positions = getattr(text, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if isinstance(positions, int) else max_length

    def scale(self) -> torch.Tensor | float:
        """The multiplier of the cosine similarity."""
        raise NotImplementedError

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``(B, D)`` of ``[0, 1]`` images, differentiable."""
        device, dtype = _param_device_dtype(self.model)
        pixel_values = self.preprocess(images.to(device=device, dtype=torch.promote_types(images.dtype, torch.float32))).to(dtype)
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``(B, D)``; prompts are truncated to ``max_length`` tokens."""
        device, _ = _param_device_dtype(self.model)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {key: value.to(device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return _pooled(self.model.get_text_features(**tokens))

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        assert prompts is not None
        image, text = self.image_embeds(images), self.text_embeds(prompts)
        work = torch.promote_types(image.dtype, torch.float32)
        cos = _cosine(image.to(work), text.to(work))
        return self.scale() * cos

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        processor_path: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Load a local transformers CLIP folder (``config.json`` + weights, ``local_files_only``).

        The tokenizer and image processor are read from ``processor_path`` when given, else from
        ``path``. For PickScore the reference pairs ``yuvalkirstain/PickScore_v1`` with the processor
        of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. ``dtype`` defaults to float32.
        """
        return cls(*cls._load(path, processor_path, device, dtype))

    @classmethod
    def _load(
        cls,
        path: str | os.PathLike[str],
        processor_path: str | os.PathLike[str] | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> tuple[torch.nn.Module, Any, ImagePreprocess]:
        from transformers import CLIPModel

        model_dir = existing_path(path)
        processor_dir = model_dir if processor_path is None else existing_path(processor_path)
        tokenizer = _load_tokenizer(processor_dir)
        preprocess = clip_preprocess(_load_clip_image_processor(processor_dir))
        try:
            model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"cannot load a transformers CLIPModel from {path}.") from exc
        # dtype after loading: transformers 4.x calls the argument torch_dtype, 5.x dtype.
        return model.to(device=device, dtype=dtype or torch.float32), tokenizer, preprocess


class PickScoreReward(_TransformersClipReward):
    """PickScore (Kirstain et al., 2023): ``exp(logit_scale) * cos(image_embeds, text_embeds)``.

    A CLIP-H model fine-tuned on Pick-a-Pic preferences; ``exp(logit_scale)`` is the learned
    temperature (about 100). Images go through :func:`clip_preprocess` (shortest side to 224,
    centre crop 224, the processor's mean / std); prompts are truncated to 77 tokens.

    Scores are on PickScore's own scale; ``scales["flow_grpo"]`` (factor 1/26) gives the scale
    flow_grpo (``flow_grpo/pickscore_scorer.py``) and Flow-Factory
    (``src/flow_factory/rewards/pick_score.py``) train on and log.
    """

    name = "pickscore"
    scales = MappingProxyType({s.name: s for s in REWARD_SCALES["pickscore"]})
    raw_scale = REWARD_RAW_SCALES["pickscore"]

    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().to(torch.promote_types(self.model.logit_scale.dtype, torch.float32))


class ClipScoreReward(_TransformersClipReward):
    """CLIP score ``100 * cos(image_embeds, text_embeds)`` for any transformers CLIP folder.

    Unlike torchmetrics' CLIPScore (``max(100 cos, 0)``) and Hessel et al.'s CLIP-S
    (``2.5 max(cos, 0)``) the cosine is not clamped at 0, so the gradient never vanishes;
    for positive cosines the value equals torchmetrics'.
    """

    name = "clip"

    def scale(self) -> float:
        return 100.0


# --------------------------------------------------------------------------------------------
# open_clip rewards (optional dependency).


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError(_OPEN_CLIP_MISSING) from exc
    return open_clip


def _open_clip_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for corrupt or foreign files
        raise CheckpointError(f"cannot read reward weights from {path}.") from exc
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{path} holds neither a state dict nor a {{'state_dict': ...}} checkpoint.")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module.") :]: value for key, value in checkpoint.items()}
    return checkpoint


def _load_open_clip(
    path: str | os.PathLike[str],
    clip_arch: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[torch.nn.Module, Any]:
    checkpoint_path = existing_path(path)
    open_clip = _import_open_clip()
    try:
        model = open_clip.create_model(clip_arch, pretrained=None)
    except RuntimeError as exc:  # open_clip's error for an unknown architecture
        raise ConfigError(f"unknown open_clip architecture {clip_arch!r}.") from exc
    state_dict = _open_clip_state_dict(checkpoint_path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the open_clip architecture {clip_arch}.") from exc
    model = model.to(device=device, dtype=dtype or torch.float32)
    return model, open_clip.get_tokenizer(clip_arch)


def _open_clip_image_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"only square open_clip image sizes are supported, got {tuple(size)}.")
        size = size[0]
    return int(size)


class _OpenClipReward(BaseReward):
    """An open_clip model scoring ``scale * cos(encode_image, encode_text)``."""

    requires_prompts = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ImagePreprocess) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def scale(self) -> float:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        assert prompts is not None
        device, dtype = _param_device_dtype(self.model)
        pixel_values = self.preprocess(images.to(device=device, dtype=torch.promote_types(images.dtype, torch.float32))).to(dtype)
        image_features = self.model.encode_image(pixel_values)
        with torch.no_grad():
            text_features = self.model.encode_text(self.tokenizer(prompts).to(device))
        work = torch.promote_types(image_features.dtype, torch.float32)
        return self.scale() * _cosine(image_features.to(work), text_features.to(work))


class OpenClipScoreReward(_OpenClipReward):
    """:class:`ClipScoreReward`'s formula, ``100 * cos``, on an open_clip model."""

    name = "clip"

    def scale(self) -> float:
        return 100.0

    @classmethod
    def from_checkpoint(cls, path: PathLike, *, clip_arch: str, device: Device = None, dtype: torch.dtype | None = None) -> OpenClipScoreReward:
        """Load an open_clip checkpoint file for architecture ``clip_arch`` (needs open_clip_torch).

        Preprocessing is CLIP's (shortest side, centre crop, OpenAI mean / std) at the model's
        image size; ``dtype`` defaults to float32.
        """
        model, tokenizer = _load_open_clip(path, clip_arch, device, dtype)
        size = _open_clip_image_size(model)
        # open_clip's evaluation transform crops with torchvision's CenterCrop (rounded offset).
        preprocess = ImagePreprocess(layout="crop", size=size, crop_size=(size, size), crop_offset="round")
        return cls(model, tokenizer, preprocess)


class HPSv2Reward(_OpenClipReward):
    """HPSv2 / HPSv2.1 (Wu et al., 2023): ``cos(image_features, text_features)``, no temperature.

    An open_clip ViT-H-14 fine-tuned on human preferences. The reference scorer
    (``hpsv2/img_score.py``) takes the diagonal of ``image_features @ text_features.T`` with both
    features L2-normalised, so scores are cosines (typically 0.2 to 0.35). Images go through
    :func:`hpsv2_preprocess` (longest side to 224, black padding to a square, OpenAI mean / std).

    ``scales["flow_grpo"]`` (factor 1: flow_grpo's ``flow_grpo/hpsv2_scorer.py`` returns the cosine) and
    ``scales["hpsv2_benchmark"]`` (factor 100: HPSv2's ``hpsv2/evaluation.py`` prints the mean cosine
    times 100 in its benchmark tables).
    """

    name = "hpsv2"
    scales = MappingProxyType({s.name: s for s in REWARD_SCALES["hpsv2"]})
    raw_scale = REWARD_RAW_SCALES["hpsv2"]

    def scale(self) -> float:
        return 1.0

    @classmethod
    def from_checkpoint(
        cls, path: PathLike, *, clip_arch: str = "ViT-H-14", device: Device = None, dtype: torch.dtype | None = None
    ) -> HPSv2Reward:
        """Load ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (needs open_clip_torch).

        The file holds ``{"state_dict": ...}`` (a plain state dict is accepted too) for open_clip's
        ``clip_arch`` built with ``pretrained=None``; nothing is downloaded. ``dtype`` defaults
        to float32.
        """
        model, tokenizer = _load_open_clip(path, clip_arch, device, dtype)
        return cls(model, tokenizer, hpsv2_preprocess(_open_clip_image_size(model)))


# --------------------------------------------------------------------------------------------
# The miniature world's reward.


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler-Süsstrunk colourfulness ``sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2)`` of ``(B, 3, H, W)``
    images in [0, 1] (``rg = R - G``, ``yb = (R + G) / 2 - B``; means and population standard deviations
    over the pixels): ``(B,)``, 0 for a gray image, about 0.1-0.4 for natural ones on this scale."""
    r, g, b = images.unbind(dim=1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    spread = (rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0) + 1e-12).sqrt()
    mean = (rg.mean(dim=1).pow(2) + yb.mean(dim=1).pow(2) + 1e-12).sqrt()
    return spread + 0.3 * mean


class WorldReward(BaseReward):
    """The miniature world's reward: prompt alignment judged by the world's classifier plus vividness.

    ``R = (log p(shape | x) + log p(colour | x)) / 2 + vivid * (colourfulness(x) + contrast(x))``, with the
    shape and colour the prompt names (``ngdiag.world.scene.parse_caption``), ``p`` the judge's softmax and
    ``contrast`` the RMS contrast of luma. Like PickScore or HPSv2 it rewards following the prompt and,
    beyond that, a preference (vivid colour and contrast) that a policy can over-optimise. Images are clamped to [0, 1] inside (with a straight-through gradient)
    so that out-of-range pixels are judged as they would be shown.
    """

    name = "world"
    requires_prompts = True

    def __init__(self, judge: torch.nn.Module, vivid: float = 1.0) -> None:
        super().__init__()
        self.judge = _freeze(judge)
        self.vivid = float(vivid)

    @classmethod
    def from_folder(cls, path: PathLike, *, vivid: float | None = None, device: Device = None,
                    dtype: torch.dtype | None = None) -> WorldReward:
        """From a judge folder, or a world folder holding ``judge/``; ``vivid`` defaults to 1."""
        from ngdiag.world.judge import load_judge

        folder = existing_path(path)
        if (folder / "judge").is_dir():
            folder = folder / "judge"
        reward = cls(load_judge(folder), vivid=1.0 if vivid is None else vivid)
        return reward.to(device=device, dtype=dtype or torch.float32)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        from ngdiag.world.scene import parse_caption

        labels = [parse_caption(p) for p in prompts or []]
        dtype = next(self.judge.parameters()).dtype
        shown = images + (images.clamp(0, 1) - images).detach()
        logits = self.judge(shown.to(dtype))
        rows = torch.arange(len(labels), device=images.device)
        align = 0.0
        for factor in ("shape", "colour"):
            target = torch.tensor([lab[factor] for lab in labels], device=images.device)
            align = align + logits[factor].log_softmax(dim=1)[rows, target] / 2
        vividness = colourfulness(shown) + luma(shown).flatten(1).std(dim=1, correction=0)
        return align.float() + self.vivid * vividness.float()


# --------------------------------------------------------------------------------------------
# Spec strings (the grammar and the registry of kinds live in ngdiag.rewards.specs).

_BUILTINS: dict[str, type[BaseReward]] = {
    "brightness": BrightnessReward,
    "contrast": ContrastReward,
    "saturation": SaturationReward,
}

def load_reward(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> BaseReward:
    """Build a reward from a spec string ``KIND[:PATH[,key=value...]]``.

    Kinds:
        ``brightness``, ``saturation``, ``contrast``: built-in image statistics, no path.
        ``pickscore:DIR[,processor=DIR]``: :meth:`PickScoreReward.from_pretrained`.
        ``hpsv2:FILE[,arch=ViT-H-14]``: :meth:`HPSv2Reward.from_checkpoint` (needs open_clip_torch).
        ``clip:DIR[,processor=DIR]``: :meth:`ClipScoreReward.from_pretrained` on a transformers folder;
        ``clip:FILE,arch=ARCH``: :meth:`OpenClipScoreReward.from_checkpoint` (needs open_clip_torch).
        ``world:DIR[,vivid=W]``: :class:`WorldReward`, the miniature world's judge (``ngdiag.world``).

    ``device`` and ``dtype`` (default float32) apply to reward models; everything loads from
    local paths. Raises :class:`ConfigError` for an unknown kind or option, or a missing path,
    and :class:`CheckpointError` for weights that do not load.

    Example:
        >>> load_reward("contrast").name
        'contrast'
    """
    kind, path, options = split_reward_spec(spec)
    if path is None:
        return _BUILTINS[kind]()
    if kind == "pickscore":
        return PickScoreReward.from_pretrained(
            path, processor_path=options.get("processor"), device=device, dtype=dtype
        )
    if kind == "world":
        vivid = options.get("vivid")
        if vivid is not None:
            try:
                vivid = float(vivid)
            except ValueError:
                raise ConfigError(f"vivid= takes a number, got {vivid!r}.") from None
            if not math.isfinite(vivid) or vivid < 0:
                raise ConfigError(f"vivid= takes a finite number >= 0, got {vivid}.")
        return WorldReward.from_folder(path, vivid=vivid, device=device, dtype=dtype)
    if kind == "hpsv2":
        return HPSv2Reward.from_checkpoint(path, clip_arch=options.get("arch", "ViT-H-14"), device=device, dtype=dtype)
    # kind == "clip"
    if existing_path(path).is_dir():
        if "arch" in options:
            raise ConfigError("arch= applies to open_clip checkpoint files, not transformers folders.")
        return ClipScoreReward.from_pretrained(path, processor_path=options.get("processor"), device=device, dtype=dtype)
    if "arch" not in options:
        raise ConfigError(f"an open_clip checkpoint needs its architecture: clip:{path},arch=ViT-B-32.")
    if "processor" in options:
        raise ConfigError("processor= applies to transformers folders, not open_clip checkpoint files.")
    return OpenClipScoreReward.from_checkpoint(path, clip_arch=options["arch"], device=device, dtype=dtype)
