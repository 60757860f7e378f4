"""Image-quality measures the reward does not see: per-sample statistics and a Fréchet distance.

Every per-sample measure takes decoded images ``(N, 3, H, W)`` on the ``[0, 1]`` scale
(``(decoded + 1) / 2``) and returns a float64 ``(N,)`` tensor:

- :func:`clipping_rate`: share of pixel channels outside ``[0, 1]`` *before* the final clamp
  (pass the unclamped images): out-of-gamut colour that the clamp hides;
- :func:`saturation`: mean HSV saturation of the clamped image;
- :func:`colourfulness`: Hasler-Süsstrunk colourfulness of the clamped image;
- :func:`high_frequency_energy`: share of the luma's spectral power (DC excluded) above half the
  Nyquist frequency: over-sharpening and grain raise it; :func:`radial_power_spectrum` gives the curve;
- :func:`sharpness`: mean absolute Laplacian of luma;
- :func:`luminance` and :func:`contrast`: mean and RMS of luma.

:func:`quality_table` computes them all as a pandas DataFrame (one row per sample);
:func:`frechet_distance` is torchmetrics' Fréchet distance over any feature module
(``module(images) -> (N, F)``, with a ``num_features`` attribute), such as the miniature world's judge.

Example:
    >>> import torch
    >>> gray = torch.full((1, 3, 8, 8), 0.5)
    >>> float(saturation(gray)), float(colourfulness(gray)), float(clipping_rate(gray * 3))
    (0.0, 0.0, 1.0)
"""

from __future__ import annotations

import torch

from ngdiag.core.errors import ConfigError
from ngdiag.rewards.scorers import colourfulness as _colourfulness
from ngdiag.rewards.scorers import luma

__all__ = [
    "MEASURES", "clipping_rate", "saturation", "colourfulness", "high_frequency_energy", "radial_power_spectrum",
    "sharpness", "luminance", "contrast", "quality_table", "frechet_distance",
]


def _check(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"quality measures take images (N, 3, H, W), got {shape}")
    return images.detach().double()


def clipping_rate(images: torch.Tensor) -> torch.Tensor:
    """Share of pixel channels outside [0, 1] (pass images before the final clamp)."""
    x = _check(images)
    return ((x < 0) | (x > 1)).double().flatten(1).mean(dim=1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation ``(max - min) / max`` over pixels (0 where ``max`` is 0)."""
    x = _check(images).clamp(0, 1)
    cmax, cmin = x.amax(dim=1), x.amin(dim=1)
    return torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-12), torch.zeros_like(cmax)).flatten(1).mean(dim=1)


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler-Süsstrunk colourfulness of the clamped image (the world reward's vividness term)."""
    return _colourfulness(_check(images).clamp(0, 1))


def _luma_power(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(power, radius)``: the power spectrum of the clamped image's mean-free luma ``(N, H, W)`` (per
    pixel, ``|FFT|^2 / (H W)``) and each frequency's radius in cycles per pixel ``(H, W)``."""
    x = luma(_check(images).clamp(0, 1))
    h, w = x.shape[-2:]
    power = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().pow(2) / (h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).view(1, -1)
    return power, (fx**2 + fy**2).sqrt()


def radial_power_spectrum(images: torch.Tensor, bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(frequencies, power)``: luma power spectrum averaged over rings of radius ``f`` (cycles per
    pixel, 0 .. 0.5), ``power`` of shape ``(N, bins)``; the DC term is left out."""
    spectrum, radius = _luma_power(images)
    bins = bins or min(radius.shape) // 2
    edges = torch.linspace(0, 0.5, bins + 1, dtype=torch.float64)
    ring = torch.bucketize(radius, edges[1:-1], right=True)
    keep = (radius > 0) & (radius <= 0.5)
    power = torch.zeros(spectrum.shape[0], bins, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.float64)
    power.index_add_(1, ring[keep], spectrum[:, keep])
    count.index_add_(0, ring[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    centers = (edges[:-1] + edges[1:]) / 2
    return centers, power / count.clamp_min(1)


def high_frequency_energy(images: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Share of the luma's spectral power (DC excluded) at radial frequency above ``cutoff`` cycles per
    pixel (0.25 = half the Nyquist frequency)."""
    spectrum, radius = _luma_power(images)
    total = spectrum.sum(dim=(-2, -1))
    high = (spectrum * (radius > cutoff).to(spectrum.dtype)).sum(dim=(-2, -1))
    return torch.where(total > 0, high / total.clamp_min(1e-30), torch.zeros_like(total))


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute 4-neighbour Laplacian of luma (interior pixels)."""
    x = luma(_check(images).clamp(0, 1))
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return lap.abs().flatten(1).mean(dim=1)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Mean BT.601 luma of the clamped image."""
    return luma(_check(images).clamp(0, 1)).flatten(1).mean(dim=1)


def contrast(images: torch.Tensor) -> torch.Tensor:
    """RMS contrast: population standard deviation of the clamped image's luma."""
    return luma(_check(images).clamp(0, 1)).flatten(1).std(dim=1, correction=0)


#: name -> measure, in the order reports show them
MEASURES = {
    "clipping_rate": clipping_rate,
    "saturation": saturation,
    "colourfulness": colourfulness,
    "high_frequency_energy": high_frequency_energy,
    "sharpness": sharpness,
    "luminance": luminance,
    "contrast": contrast,
}


def quality_table(images: torch.Tensor):
    """Every measure of :data:`MEASURES` per sample, as a DataFrame (one row per image). Pass the
    images before the final clamp, so that ``clipping_rate`` sees what the clamp hides."""
    import pandas as pd

    return pd.DataFrame({name: measure(images).numpy() for name, measure in MEASURES.items()})


def frechet_distance(features: torch.nn.Module, images: torch.Tensor, reference: torch.Tensor, *,
                     batch: int = 256) -> float:
    """Fréchet distance between the feature distributions of ``images`` and ``reference`` (both
    ``(N, 3, H, W)`` in [0, 1], clamped here), with torchmetrics' ``FrechetInceptionDistance`` over the
    feature module ``features`` (it needs a ``num_features`` attribute). Needs at least 2 images each."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not hasattr(features, "num_features"):
        raise ConfigError("the feature module needs a num_features attribute (the width of its output)")
    if len(images) < 2 or len(reference) < 2:
        raise ConfigError("a Fréchet distance needs at least 2 images on each side")
    metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=True)
    with torch.no_grad():
        for real, batch_images in ((True, reference), (False, images)):
            for i in range(0, len(batch_images), batch):
                metric.update(batch_images[i : i + batch].float().clamp(0, 1), real=real)
    return float(metric.compute())
