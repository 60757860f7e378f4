"""Differentiable image preprocessing for reward models.

Reward models were trained on images that went through a PIL pipeline (resize,
crop or pad, normalise). To differentiate a reward with respect to a generated
image, the same geometry has to be computed with torch operations. This module
does that on batches of float images ``(B, 3, H, W)`` with values in ``[0, 1]``.

Two layouts are provided:

* ``"crop"`` -- CLIP / PickScore, as ``transformers.CLIPImageProcessor``: resize
  the shortest side to ``size`` (the other side becomes
  ``int(size * long / short)``), then centre crop ``crop_size``.
* ``"pad"`` -- HPSv2, as ``ResizeMaxSize`` in HPSv2's bundled open_clip
  ``image_transform(..., resize_longest_max=True)``: resize the longest side to
  ``size`` (the other side becomes ``round(short * size / long)``), then pad to a
  square with ``fill`` (black), the extra column or row going right / bottom.

Resizing is ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``,
whose antialiased bicubic kernel (``a = -0.5``) is PIL's ``BICUBIC`` filter; the
remaining differences from the PIL pipelines are PIL's 8-bit rounding and
clamping of the resized image (see ``docs/rewards.md`` for measured values).
Values are not clamped here, so that gradients reach every input pixel.

Example:
    >>> import torch
    >>> pre = hpsv2_preprocess()
    >>> pre(torch.rand(2, 3, 64, 32)).shape
    torch.Size([2, 3, 224, 224])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ngdiag.core.errors import ConfigError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImagePreprocess",
    "center_crop",
    "check_images",
    "clip_preprocess",
    "hpsv2_preprocess",
    "normalize",
    "pad_to_square",
    "resize",
    "resize_longest_side",
    "resize_shortest_side",
]

#: Per-channel mean and std of OpenAI CLIP's training images (also HPSv2's and PickScore's).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def check_images(images: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``images`` is a float tensor of shape ``(B, 3, H, W)``."""
    if not isinstance(images, torch.Tensor):
        raise ConfigError(f"images must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise ConfigError(f"images must be a float tensor with values in [0, 1], got {images.dtype}.")


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of ``(B, C, H, W)`` to ``(B, C, height, width)``, PIL ``BICUBIC`` style.

    Computed in float32 (or float64 when given float64) and returned in the input dtype;
    the identity when the size does not change.
    """
    if (images.shape[-2], images.shape[-1]) == (height, width):
        return images
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    out = F.interpolate(work, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.to(images.dtype)


def resize_shortest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shortest side is ``size``; the longest becomes ``int(size * long / short)``.

    This is ``transformers``' ``get_resize_output_image_size(..., default_to_square=False)``.
    """
    height, width = images.shape[-2:]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if width <= height else (size, new_long)
    return resize(images, new_h, new_w)


def resize_longest_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the longest side is ``size``; the shortest becomes ``round(short * size / long)``.

    This is HPSv2's ``ResizeMaxSize`` (Python's ``round``, so halves go to the even integer).
    """
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    return resize(images, round(height * scale), round(width * scale))


def center_crop(images: torch.Tensor, height: int, width: int, *, offset: str = "floor") -> torch.Tensor:
    """Centre crop to ``(height, width)``.

    The offset is ``(old - new) // 2`` with ``offset="floor"`` (``transformers``' CLIP processor) or
    ``int(round((old - new) / 2))`` with ``offset="round"`` (torchvision's ``CenterCrop``, used by
    open_clip); they differ by one pixel when the margin is odd.

    An image smaller than the crop is first zero-padded, ``ceil(missing / 2)`` on the top / left,
    which is what ``transformers.image_transforms.center_crop`` does.
    """
    old_h, old_w = images.shape[-2:]
    if old_h < height or old_w < width:
        new_h, new_w = max(old_h, height), max(old_w, width)
        top_pad, left_pad = math.ceil((new_h - old_h) / 2), math.ceil((new_w - old_w) / 2)
        images = F.pad(images, (left_pad, new_w - old_w - left_pad, top_pad, new_h - old_h - top_pad))
        old_h, old_w = new_h, new_w
    if offset == "round":
        top, left = int(round((old_h - height) / 2.0)), int(round((old_w - width) / 2.0))
    elif offset == "floor":
        top, left = (old_h - height) // 2, (old_w - width) // 2
    else:
        raise ConfigError(f"unknown crop offset rule {offset!r}; use 'floor' or 'round'.")
    return images[..., top : top + height, left : left + width]


def pad_to_square(images: torch.Tensor, size: int | None = None, fill: float = 0.0) -> torch.Tensor:
    """Pad to ``size x size`` (default: the longest side) with the constant ``fill``.

    The image is centred with ``missing // 2`` on the left / top and the rest on the right / bottom,
    as HPSv2's ``ResizeMaxSize``.
    """
    height, width = images.shape[-2:]
    size = max(height, width) if size is None else size
    if height > size or width > size:
        raise ConfigError(f"cannot pad a {height}x{width} image to a {size}x{size} square.")
    pad_h, pad_w = size - height, size - width
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class ImagePreprocess:
    """A reward model's image preprocessing, differentiable, on ``(B, 3, H, W)`` images in ``[0, 1]``.

    Attributes:
        layout: ``"crop"`` (shortest side to ``size``, centre crop ``crop_size``) or ``"pad"``
            (longest side to ``size``, pad to a ``size`` square with ``fill``).
        size: the target side length of the resize.
        crop_size: ``(height, width)`` of the centre crop (``"crop"`` only); ``None`` means
            ``(size, size)``.
        mean, std: per-channel normalisation applied after the geometry.
        fill: the padding value in ``[0, 1]`` pixel space (``"pad"`` only; HPSv2 uses 0, black).
        crop_offset: ``"floor"`` (transformers) or ``"round"`` (torchvision / open_clip), see
            :func:`center_crop`.
    """

    layout: Literal["crop", "pad"]
    size: int
    crop_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    fill: float = 0.0
    crop_offset: str = "floor"

    def __post_init__(self) -> None:
        if self.layout not in ("crop", "pad"):
            raise ConfigError(f"unknown preprocessing layout {self.layout!r}; use 'crop' or 'pad'.")
        if self.size < 1:
            raise ConfigError(f"preprocessing size must be positive, got {self.size}.")

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the preprocessed images."""
        if self.layout == "pad":
            return (self.size, self.size)
        return self.crop_size or (self.size, self.size)

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and crop / pad, before normalisation: ``(B, 3, H, W) -> (B, 3, h, w)``, still in [0, 1]."""
        check_images(images)
        if self.layout == "pad":
            return pad_to_square(resize_longest_side(images, self.size), self.size, self.fill)
        height, width = self.output_size
        return center_crop(resize_shortest_side(images, self.size), height, width, offset=self.crop_offset)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The model input: :meth:`geometry` followed by ``(x - mean) / std``."""
        return normalize(self.geometry(images), self.mean, self.std)


def hpsv2_preprocess(size: int = 224, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImagePreprocess:
    """HPSv2's evaluation transform: longest side to ``size``, black padding, OpenAI CLIP mean / std."""
    return ImagePreprocess(
        layout="pad",
        size=size,
        mean=tuple(mean or OPENAI_CLIP_MEAN),
        std=tuple(std or OPENAI_CLIP_STD),
        fill=0.0,
    )


def _get(processor: Any, key: str, default: Any = None) -> Any:
    if isinstance(processor, Mapping):
        return processor.get(key, default)
    return getattr(processor, key, default)


def _size_value(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    return _get(size, key)


def clip_preprocess(image_processor: Any = None) -> ImagePreprocess:
    """CLIP / PickScore preprocessing, from a ``CLIPImageProcessor`` (or its config dict) when given.

    Reads ``size`` (``{"shortest_edge": n}``), ``crop_size`` (``{"height", "width"}``),
    ``image_mean`` and ``image_std``; without a processor, OpenAI CLIP's defaults (shortest
    side 224, crop 224, OpenAI mean / std). Processors that resize to a fixed
    ``{"height", "width"}`` or skip resizing, cropping or normalising are refused with
    :class:`ConfigError`.
    """
    if image_processor is None:
        return ImagePreprocess(layout="crop", size=224, crop_size=(224, 224))
    if not all(_get(image_processor, key, True) for key in ("do_resize", "do_center_crop", "do_normalize")):
        raise ConfigError("only CLIP image processors that resize, centre crop and normalise are supported.")
    size = _get(image_processor, "size")
    shortest = _size_value(size, "shortest_edge")
    if not isinstance(shortest, int):
        raise ConfigError(f"CLIP image processor size must be {{'shortest_edge': n}}, got {size!r}.")
    crop = _get(image_processor, "crop_size")
    height, width = _size_value(crop, "height"), _size_value(crop, "width")
    if not isinstance(height, int) or not isinstance(width, int):
        raise ConfigError(f"CLIP image processor crop_size must be {{'height', 'width'}}, got {crop!r}.")
    mean = _get(image_processor, "image_mean") or OPENAI_CLIP_MEAN
    std = _get(image_processor, "image_std") or OPENAI_CLIP_STD
    return ImagePreprocess(layout="crop", size=shortest, crop_size=(height, width), mean=tuple(mean), std=tuple(std))
