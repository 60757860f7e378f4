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

:func:`quality_table` computes them all as a pandas DataFrame (one row per sample).

Comparing a model with a reference on the same prompts and seeds (``images[i]`` pairs with
``reference[i]``):

- :func:`quality_panel` (from images) and :func:`paired_differences` (from a long per-sample table such
  as an audit's ``quality.csv``) give, per measure, both means and the paired difference with a seeded
  bootstrap interval over pairs (or over clusters of pairs, e.g. prompts) as a :class:`QualityPanel`;
  from images the panel also holds both mean radial power spectra (:meth:`QualityPanel.spectrum_frame`).
- :func:`frechet` is the Fréchet distance between the feature distributions of two image sets, with
  features from any image encoder you have locally (:func:`image_encoder`: a CLIP or PickScore folder,
  an open_clip checkpoint, the world's judge, or any torch module or callable returning ``(N, D)``);
  the reference may be a held-out image folder (:func:`load_image_folder`). The result
  (:class:`FrechetResult`) states both sample sizes: the Fréchet distance is biased upwards with few
  images (its expected value falls roughly like ``1 / N``), so compare values only at equal sample
  sizes. :func:`frechet_distance` is the plain number over a feature module.

Example:
    >>> import torch
    >>> gray = torch.full((1, 3, 8, 8), 0.5)
    >>> float(saturation(gray)), round(float(colourfulness(gray)), 4), float(clipping_rate(gray * 3))
    (0.0, 0.0, 1.0)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ngdiag.core.errors import ConfigError
from ngdiag.rewards.scorers import colourfulness as _colourfulness
from ngdiag.rewards.scorers import luma

__all__ = [
    "MEASURES", "clipping_rate", "saturation", "colourfulness", "high_frequency_energy", "radial_power_spectrum",
    "radial_frequencies", "sharpness", "luminance", "contrast", "quality_table", "frechet_distance",
    "QualityPanel", "quality_panel", "paired_differences", "ImageEncoder", "image_encoder", "load_image_folder",
    "FrechetResult", "frechet",
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
    pixel, 0 .. 0.5), ``power`` of shape ``(N, bins)``; the DC term is left out. Ring ``k`` holds the
    radii in ``(k, k + 1] * 0.5 / bins`` (``bins`` defaults to half the shorter side, so that the lowest
    ring holds the lowest frequency ``1 / side``); ``frequencies`` are the ring centres."""
    spectrum, radius = _luma_power(images)
    bins = bins or max(1, min(radius.shape) // 2)
    # the ring of each radius, with a tolerance so that a radius on an edge (k / side) falls below it
    ring = (torch.ceil(radius * (2 * bins) - 1e-9) - 1).clamp(0, bins - 1).long()
    keep = (radius > 0) & (radius <= 0.5)
    power = torch.zeros(spectrum.shape[0], bins, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.float64)
    power.index_add_(1, ring[keep], spectrum[:, keep])
    count.index_add_(0, ring[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return radial_frequencies(bins), power / count.clamp_min(1)


def radial_frequencies(bins: int) -> torch.Tensor:
    """The ring centres of :func:`radial_power_spectrum` with ``bins`` rings, in cycles per pixel."""
    edges = torch.linspace(0, 0.5, bins + 1, dtype=torch.float64)
    return (edges[:-1] + edges[1:]) / 2


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


# ----------------------------------------------------------------------------- paired comparison
def _paired_interval(diffs: np.ndarray, *, clusters: Optional[np.ndarray], confidence: float, method: str,
                     n_resamples: int, seed: int,
                     scale: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, list]:
    """Bootstrap interval of the mean paired difference of every row of ``diffs`` ``(M, N)``:
    :func:`ngdiag.stats.bootstrap_mean_interval` of each row (the same seed, so the same resamples), over
    pairs, or over clusters (percentile) when ``clusters`` (one label per pair) repeats, as the audit's
    inflation. A row whose differences are all equal, or all within rounding (``1e-12`` of ``scale``, the
    size of the values), gets the interval ``[d, d]`` (method ``"constant"``).
    """
    from ngdiag.stats import bootstrap_mean_interval

    means = diffs.mean(axis=1)
    low, high = means.copy(), means.copy()
    used = ["constant"] * len(diffs)
    for j, row in enumerate(diffs):
        if np.ptp(row) == 0 or (scale is not None and np.abs(row).max() <= 1e-12 * max(float(scale[j]), 1e-300)):
            continue
        low[j], high[j], used[j] = bootstrap_mean_interval(row, clusters=clusters, confidence=confidence, method=method,
                                                           n_resamples=n_resamples, seed=seed)
    return low, high, used


_METHODS = {"bca": "BCa", "percentile": "percentile"}


@dataclass
class QualityPanel:
    """A model's image quality against a reference on the same prompts and seeds.

    Per measure (arrays of shape ``(M,)``, in the order of ``measures``): the means of both sides, the
    mean paired difference ``model - reference`` and its bootstrap interval over pairs (over clusters
    of pairs when ``num_clusters`` is set). ``interval_method`` says how each interval was made:
    ``method``, ``"percentile"`` where BCa was undefined, ``"constant"`` where every pair has the same
    difference. From images, also both mean radial power spectra of luma (``frequency`` in cycles
    per pixel, ``(B,)``; powers ``(B,)``), else ``None``.
    """

    model: str
    reference: str
    measures: list
    model_mean: np.ndarray
    reference_mean: np.ndarray
    difference: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    interval_method: list
    confidence: float
    method: str
    n_resamples: int
    seed: int
    num_pairs: int
    num_clusters: Optional[int] = None
    frequency: Optional[np.ndarray] = None
    model_spectrum: Optional[np.ndarray] = None
    reference_spectrum: Optional[np.ndarray] = None

    def to_frame(self):
        """One row per measure: ``measure, model_mean, reference_mean, difference, ci_low, ci_high,
        interval_method, num_pairs``."""
        import pandas as pd

        return pd.DataFrame({
            "measure": list(self.measures), "model_mean": self.model_mean, "reference_mean": self.reference_mean,
            "difference": self.difference, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "interval_method": list(self.interval_method), "num_pairs": self.num_pairs,
        })

    def spectrum_frame(self):
        """``frequency, model, reference, ratio`` (mean luma power per ring, ratio model / reference),
        or ``None`` for a panel made from per-sample tables."""
        import pandas as pd

        if self.frequency is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self.model_spectrum / self.reference_spectrum
        return pd.DataFrame({"frequency": self.frequency, "model": self.model_spectrum,
                             "reference": self.reference_spectrum, "ratio": ratio})

    def to_dict(self) -> dict:
        """JSON-ready: the settings and ``{measure: {model_mean, reference_mean, difference, ci_low,
        ci_high, interval_method}}``, and ``spectrum`` lists when present."""
        out = {
            "model": self.model, "reference": self.reference, "confidence": self.confidence, "method": self.method,
            "n_resamples": self.n_resamples, "seed": self.seed, "num_pairs": self.num_pairs,
            "num_clusters": self.num_clusters,
            "measures": {
                name: {"model_mean": float(self.model_mean[j]), "reference_mean": float(self.reference_mean[j]),
                       "difference": float(self.difference[j]), "ci_low": float(self.ci_low[j]),
                       "ci_high": float(self.ci_high[j]), "interval_method": self.interval_method[j]}
                for j, name in enumerate(self.measures)
            },
        }
        if self.frequency is not None:
            out["spectrum"] = {"frequency": self.frequency.tolist(), "model": self.model_spectrum.tolist(),
                               "reference": self.reference_spectrum.tolist()}
        return out


def _panel(model_values: np.ndarray, reference_values: np.ndarray, measures: Sequence[str], *, model: str,
           reference: str, confidence: float, n_resamples: int, seed: int, method: str, clusters) -> QualityPanel:
    """The panel of ``(N, M)`` per-pair values of both sides (row ``i`` of each is pair ``i``)."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples}")
    key = str(method).lower()
    if key not in _METHODS:
        raise ConfigError(f"method must be one of {list(_METHODS.values())}, got {method!r}")
    n = len(model_values)
    if n < 2:
        raise ConfigError(f"a paired interval needs at least 2 pairs, got {n}")
    if clusters is not None:
        clusters = np.asarray(clusters)
        if clusters.shape != (n,):
            raise ConfigError(f"clusters needs one label per pair ({n}), got shape {clusters.shape}")
    diffs = (model_values - reference_values).T
    if not np.isfinite(diffs).all():
        raise ConfigError("the quality values are not finite (NaN or inf)")
    scale = np.maximum(np.abs(model_values).max(axis=0), np.abs(reference_values).max(axis=0))
    low, high, used = _paired_interval(diffs, clusters=clusters, confidence=confidence, method=_METHODS[key],
                                       n_resamples=int(n_resamples), seed=seed, scale=scale)
    return QualityPanel(
        model=model, reference=reference, measures=list(measures), model_mean=model_values.mean(axis=0),
        reference_mean=reference_values.mean(axis=0), difference=diffs.mean(axis=1), ci_low=low, ci_high=high,
        interval_method=used, confidence=float(confidence), method=_METHODS[key], n_resamples=int(n_resamples),
        seed=int(seed), num_pairs=n, num_clusters=None if clusters is None else int(len(np.unique(clusters))),
    )


def quality_panel(images: torch.Tensor, reference: torch.Tensor, *, confidence: float = 0.95, n_resamples: int = 2000,
                  seed: int = 0, clusters=None, method: str = "BCa", model: str = "model",
                  reference_name: str = "reference") -> QualityPanel:
    """Every measure of :data:`MEASURES` of ``images`` against ``reference``, paired: ``images[i]`` and
    ``reference[i]`` were made from the same prompt and seed.

    Args:
        images, reference: ``(N, 3, H, W)`` on the ``[0, 1]`` scale, before the final clamp (so that
            ``clipping_rate`` sees what the clamp hides), the same ``N`` and size.
        confidence: of the intervals.
        n_resamples, seed: the bootstrap's resamples and seed (the same seed gives the same intervals).
        clusters: optional label per pair (e.g. the prompt index): resample whole clusters, for pairs
            that are not independent (several seeds of one prompt).
        method: ``"BCa"`` (default), ``"percentile"`` or ``"basic"`` (``scipy.stats.bootstrap``).
        model, reference_name: names the panel records.

    Returns:
        A :class:`QualityPanel` with the mean radial power spectra of both sides.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ref = torch.rand(8, 3, 16, 16, generator=g)
        >>> grey = 0.5 + 0.5 * (ref - 0.5)   # half-way to grey: less saturated
        >>> panel = quality_panel(grey, ref, n_resamples=200)
        >>> row = panel.to_frame().set_index("measure").loc["saturation"]
        >>> bool(row.ci_high < 0)
        True
    """
    x, r = _check(images), _check(reference)
    if x.shape != r.shape:
        raise ConfigError(f"paired images need the same shape, got {tuple(x.shape)} and {tuple(r.shape)}")
    measures = list(MEASURES)
    mv = np.stack([MEASURES[k](x).numpy() for k in measures], axis=1)
    rv = np.stack([MEASURES[k](r).numpy() for k in measures], axis=1)
    panel = _panel(mv, rv, measures, model=model, reference=reference_name, confidence=confidence,
                   n_resamples=n_resamples, seed=seed, method=method, clusters=clusters)
    freqs, power_x = radial_power_spectrum(x)
    _, power_r = radial_power_spectrum(r)
    panel.frequency = freqs.numpy()
    panel.model_spectrum = power_x.mean(dim=0).numpy()
    panel.reference_spectrum = power_r.mean(dim=0).numpy()
    return panel


def paired_differences(quality_frame, model: str, reference: str = "base", *, measures: Optional[Sequence[str]] = None,
                       confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0, method: str = "BCa",
                       clusters=None) -> QualityPanel:
    """The :class:`QualityPanel` of ``model`` against ``reference`` from a long per-sample table (an
    audit's ``AuditResult.quality`` or ``quality.csv``: columns ``sample``, ``model`` and one per
    measure), pairing rows by ``sample`` (same prompt and seed). No images are needed.

    ``measures`` defaults to those of :data:`MEASURES` in the table; ``clusters`` is a column name of
    the table (e.g. ``"prompt"``) or one label per pair in sample order. The other arguments are
    :func:`quality_panel`'s. Both models must have the same samples.
    """
    import pandas as pd

    if not isinstance(quality_frame, pd.DataFrame):
        raise ConfigError(f"the quality table must be a pandas DataFrame, got {type(quality_frame).__name__}")
    missing = [c for c in ("sample", "model") if c not in quality_frame.columns]
    if missing:
        raise ConfigError(f"the quality table lacks columns {missing}")
    measures = [k for k in MEASURES if k in quality_frame.columns] if measures is None else list(measures)
    absent = [k for k in measures if k not in quality_frame.columns]
    if absent or not measures:
        raise ConfigError(f"the quality table lacks the measures {absent or list(MEASURES)}")
    sides = {}
    for name in (model, reference):
        sub = quality_frame[quality_frame["model"] == name]
        if len(sub) == 0:
            known = sorted(set(quality_frame["model"]))
            raise ConfigError(f"the quality table has no rows of model {name!r}; it has {known}")
        if sub["sample"].duplicated().any():
            raise ConfigError(f"the quality table has several rows of one sample for model {name!r}")
        sides[name] = sub.sort_values("sample", kind="stable")
    a, b = sides[model], sides[reference]
    if not np.array_equal(a["sample"].to_numpy(), b["sample"].to_numpy()):
        raise ConfigError(f"models {model!r} and {reference!r} do not have the same samples: they cannot be paired")
    if isinstance(clusters, str):
        if clusters not in quality_frame.columns:
            raise ConfigError(f"the quality table has no column {clusters!r} for the clusters")
        clusters = b[clusters].to_numpy()
    return _panel(a[measures].to_numpy(dtype=float), b[measures].to_numpy(dtype=float), measures, model=model,
                  reference=reference, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method,
                  clusters=clusters)


# ----------------------------------------------------------------------------- image encoders and the FD
def _embeddings(output: Any) -> torch.Tensor:
    """Projected embeddings of ``get_image_features``: a tensor in transformers 4.x, an output object in 5.x."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise ConfigError(f"unexpected CLIP image-feature output of type {type(output).__name__}")


class ImageEncoder(torch.nn.Module):
    """Images ``(N, 3, H, W)`` in ``[0, 1]`` -> features ``(N, D)``: a named feature module.

    ``embed(pixels)`` gets the images after ``preprocess`` (``None``: as they are), on the device of
    ``module``'s parameters. :meth:`encode` runs it in batches without gradients and returns float64 on
    the CPU. ``num_features`` is ``D`` once known (``None`` for a callable not yet run).
    """

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], *, name: str,
                 module: Optional[torch.nn.Module] = None,
                 preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 num_features: Optional[int] = None) -> None:
        super().__init__()
        self.module = module
        self.embed = embed
        self.preprocess = preprocess
        self.name = name
        self.num_features = num_features

    def _device(self) -> Optional[torch.device]:
        if self.module is None:
            return None
        param = next(self.module.parameters(), None)
        return None if param is None else param.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        device = self._device()
        if device is not None:
            x = x.to(device)
        if self.preprocess is not None:
            x = self.preprocess(x)
        out = self.embed(x)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"the image encoder {self.name} returned {type(out).__name__}, not a tensor (N, D)")
        if out.dim() > 2 and all(s == 1 for s in out.shape[2:]):
            out = out.flatten(1)  # (N, D, 1, 1) of a pooled CNN
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ConfigError(f"the image encoder {self.name} must return (N, D) features, got {tuple(out.shape)}")
        if self.num_features is None:
            self.num_features = int(out.shape[1])
        return out

    def encode(self, images: torch.Tensor, *, batch: int = 64) -> torch.Tensor:
        """Features of ``images`` (clamped to [0, 1]) in batches of ``batch``, float64 on the CPU."""
        x = _check(images).clamp(0, 1)
        if len(x) == 0:
            raise ConfigError("no images to encode")
        with torch.no_grad():
            feats = torch.cat([self(x[i : i + batch]).double().cpu() for i in range(0, len(x), batch)])
        if not torch.isfinite(feats).all():
            raise ConfigError(f"the image encoder {self.name} gave non-finite features")
        return feats


def _clip_folder_encoder(path: Path, processor: Optional[Path], device, dtype) -> ImageEncoder:
    """A transformers ``CLIPModel`` folder (CLIP, PickScore): ``get_image_features`` of the images after
    CLIP's preprocessing (shortest side, centre crop, mean / std) from ``preprocessor_config.json`` in
    ``processor`` or the folder, else OpenAI's at the model's image size; done in torch, batched."""
    from transformers import CLIPModel

    from ngdiag.rewards.preprocess import ImagePreprocess, clip_preprocess

    _check_clip_folder(path)
    try:
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"cannot load a transformers CLIPModel from {path}: {str(exc).splitlines()[0]}") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:  # transformers would fill them with random weights: a distance of noise
        raise ConfigError(f"{path} lacks {len(missing)} weights of a CLIPModel (e.g. {missing[0]}); not a CLIP folder")
    model = model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    config_file = next((f for f in ((processor or path) / "preprocessor_config.json",) if f.is_file()), None)
    if config_file is not None:
        preprocess = clip_preprocess(json.loads(config_file.read_text(encoding="utf-8")))
    elif processor is not None:
        raise ConfigError(f"no preprocessor_config.json in {processor}")
    else:
        size = int(model.config.vision_config.image_size)
        preprocess = ImagePreprocess(layout="crop", size=size, crop_size=(size, size))
    dtype_ = next(model.parameters()).dtype
    return ImageEncoder(lambda x: _embeddings(model.get_image_features(pixel_values=x.to(dtype_))), name=f"clip:{path}",
                        module=model, preprocess=preprocess, num_features=int(model.config.projection_dim))


def _open_clip_encoder(model: torch.nn.Module, preprocess, name: str) -> ImageEncoder:
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    dtype_ = next(model.parameters()).dtype
    return ImageEncoder(lambda x: model.encode_image(x.to(dtype_)), name=name, module=model, preprocess=preprocess,
                        num_features=int(dim) if isinstance(dim, int) else None)


def image_encoder(spec, *, device=None, dtype: Optional[torch.dtype] = None, name: Optional[str] = None) -> ImageEncoder:
    """A feature module ``images in [0, 1] -> (N, D)`` from what you have locally.

    ``spec`` is one of:

    - a reward spec naming image weights (the syntax of ``ngdiag.rewards.scorers.load_reward``, nothing
      is downloaded): ``clip:DIR[,processor=DIR]`` or ``pickscore:DIR[,processor=DIR]`` (a transformers
      ``CLIPModel`` folder: ``get_image_features`` after CLIP's preprocessing, read from the folder's
      ``preprocessor_config.json``, else OpenAI's mean / std at the model's image size);
      ``clip:FILE,arch=ARCH`` and ``hpsv2:FILE[,arch=ViT-H-14]`` (open_clip checkpoints, need
      ``open_clip_torch``: ``encode_image`` after the reward's preprocessing); ``world:DIR`` (the
      miniature world's judge, 128 features);
    - a folder path: a world judge folder, else a transformers CLIP folder;
    - a module: a transformers ``CLIPModel`` (OpenAI preprocessing at its image size), an open_clip
      model (``encode_image``, OpenAI preprocessing at its image size), the world's ``WorldJudge``
      (``features``), an :class:`ImageEncoder` (returned as it is), or any other module. A module you
      pass is used as it is (not moved, not switched to ``eval()``: call that first); weights loaded
      here are frozen and in eval mode;
    - any callable: called on the ``[0, 1]`` images as they are (do your own resizing and
      normalisation, as a torchvision model's transforms would), returning ``(N, D)``.

    ``device`` and ``dtype`` (default float32) apply to the weights loaded here. ``name`` overrides
    the name results record.
    """
    from ngdiag.world.judge import WorldJudge

    if isinstance(spec, ImageEncoder):
        encoder = spec
    elif isinstance(spec, (str, os.PathLike)):
        encoder = _encoder_from_spec(spec, device, dtype)
    elif isinstance(spec, WorldJudge):
        encoder = ImageEncoder(spec.features, name="world judge", module=spec, num_features=spec.num_features)
    elif isinstance(spec, torch.nn.Module) and hasattr(spec, "get_image_features"):
        from ngdiag.rewards.preprocess import ImagePreprocess

        size = int(spec.config.vision_config.image_size)
        dim = getattr(spec.config, "projection_dim", None)
        encoder = ImageEncoder(lambda x: _embeddings(spec.get_image_features(pixel_values=x)), name=type(spec).__name__,
                               module=spec, preprocess=ImagePreprocess(layout="crop", size=size, crop_size=(size, size)),
                               num_features=int(dim) if isinstance(dim, int) else None)
    elif isinstance(spec, torch.nn.Module) and hasattr(spec, "encode_image"):
        from ngdiag.rewards.preprocess import ImagePreprocess

        size = getattr(getattr(spec, "visual", None), "image_size", 224)
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        encoder = _open_clip_encoder(spec, ImagePreprocess(layout="crop", size=size, crop_size=(size, size),
                                                           crop_offset="round"), type(spec).__name__)
    elif callable(spec):
        module = spec if isinstance(spec, torch.nn.Module) else None
        dim = getattr(spec, "num_features", None)
        encoder = ImageEncoder(spec, name=getattr(spec, "__name__", None) or type(spec).__name__, module=module,
                               num_features=dim if isinstance(dim, int) else None)
    else:
        raise ConfigError(f"an image encoder is a spec, a folder, a module or a callable, got {type(spec).__name__}")
    if name is not None:
        encoder.name = name
    return encoder


def _check_clip_folder(path: Path) -> None:
    """A transformers CLIP folder: ``config.json`` with ``model_type`` ``clip`` (PickScore's is one too)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{path} holds no readable config.json: not a transformers CLIP folder") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") or config.get("kind") if isinstance(config, dict) else None
        raise ConfigError(f"{path} is not a transformers CLIP folder (its config.json says {kind!r}, not 'clip')")


def check_encoder_spec(spec: str, *, option: Optional[str] = None) -> None:
    """Check an image-encoder spec without loading any weights: its kind, that its path exists, and that a
    CLIP / PickScore folder is one (``config.json`` of ``model_type`` ``clip``) and a world folder holds the
    judge. ``option`` (e.g. ``"--fd-encoder"``) starts the error message."""
    from ngdiag.rewards.specs import existing_path, split_reward_spec

    try:
        text = str(spec)
        path = Path(text).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"an image encoder file needs its kind and architecture: clip:{text},arch=ViT-B-32")
            if not _is_judge(path):
                _check_clip_folder(path)
            return
        kind, where, _ = split_reward_spec(text)
        if where is None:
            raise ConfigError(f"{text!r} is not an image encoder: use clip:DIR, pickscore:DIR, world:DIR, hpsv2:FILE "
                              "or a CLIP folder")
        path = existing_path(where)
        if kind in ("clip", "pickscore") and path.is_dir():
            _check_clip_folder(path)
        if kind == "world" and not (_is_judge(path) or _is_judge(path / "judge")):
            raise ConfigError(f"{path} holds no world judge (config.json of kind ngdiag-world-judge)")
    except ConfigError as exc:
        if option is None:
            raise
        message = str(exc).replace("unknown reward kind", "unknown encoder kind").replace("reward weights not found",
                                                                                          "encoder weights not found")
        raise ConfigError(f"{option}: {message}") from None


def _encoder_from_spec(spec, device, dtype) -> ImageEncoder:
    from ngdiag.rewards.specs import existing_path, split_reward_spec
    from ngdiag.world.judge import load_judge

    text = str(spec)
    if isinstance(spec, os.PathLike) or Path(text).expanduser().exists():
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ConfigError(f"an image encoder file needs its kind and architecture: clip:{text},arch=ViT-B-32")
        if (path / "model.safetensors").is_file() and _is_judge(path):
            kind, options = "world", {}
        else:
            kind, options = "clip", {}
    else:
        kind, path, options = split_reward_spec(text)
        if path is None:
            raise ConfigError(f"{text!r} is an image statistic, not an image encoder: use a CLIP, PickScore, "
                              "open_clip or world spec")
        path = existing_path(path)
    if kind == "world":
        judge = load_judge(path if _is_judge(path) else path / "judge").to(device=device, dtype=dtype or torch.float32)
        judge.eval().requires_grad_(False)
        return ImageEncoder(judge.features, name=f"world:{path}", module=judge, num_features=judge.num_features)
    if kind in ("clip", "pickscore") and path.is_dir():
        processor = options.get("processor")
        return _clip_folder_encoder(path, existing_path(processor) if processor else None, device, dtype)
    if kind == "clip":
        if "arch" not in options:
            raise ConfigError(f"an open_clip checkpoint needs its architecture: clip:{path},arch=ViT-B-32")
        from ngdiag.rewards.scorers import OpenClipScoreReward

        # the reward's model is frozen and in eval mode; its preprocessing is the encoder's
        reward = OpenClipScoreReward.from_checkpoint(path, clip_arch=options["arch"], device=device, dtype=dtype)
        return _open_clip_encoder(reward.model, reward.preprocess, f"open_clip {options['arch']}:{path}")
    if kind == "hpsv2":
        from ngdiag.rewards.scorers import HPSv2Reward

        arch = options.get("arch", "ViT-H-14")
        reward = HPSv2Reward.from_checkpoint(path, clip_arch=arch, device=device, dtype=dtype)
        return _open_clip_encoder(reward.model, reward.preprocess, f"hpsv2 {arch}:{path}")
    raise ConfigError(f"{kind}:{path} is not a folder of image weights")


def _is_judge(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("kind") == "ngdiag-world-judge"
    except (OSError, ValueError, AttributeError):
        return False


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(path, size: Optional[tuple] = None, *, limit: Optional[int] = None) -> torch.Tensor:
    """The PNG and JPEG images of folder ``path`` (sorted by name, not recursive) as ``(N, 3, H, W)``
    float32 in ``[0, 1]`` (RGB; 8-bit values ``v`` become ``v / 255``), resized with PIL's bicubic
    filter to ``size = (H, W)`` where they differ (``None``: every image must have the first's size).
    ``limit`` keeps the first ``limit`` files."""
    from PIL import Image

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"image folder not found: {path}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ConfigError(f"no PNG or JPEG images in {path}")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("RGB")
                target = tuple(size) if size is not None else arrays[0].shape[:2] if arrays else None
                if target is not None and (img.height, img.width) != target:
                    if size is None:
                        raise ConfigError(f"{file} is {img.height}x{img.width}, the first image "
                                          f"{target[0]}x{target[1]}: pass size= to resize")
                    img = img.resize((target[1], target[0]), Image.BICUBIC)
                arrays.append(np.asarray(img, dtype=np.uint8))
        except OSError as exc:
            raise ConfigError(f"cannot read image {file}: {exc}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@dataclass(frozen=True)
class FrechetResult:
    """A Fréchet distance with what it rests on: ``num_images`` and ``num_reference`` images, features
    of width ``num_features`` from ``encoder``. It is biased upwards, more so with fewer images and
    wider features: compare values only at equal sample sizes and encoder."""

    value: float
    num_images: int
    num_reference: int
    encoder: str
    num_features: int

    def __float__(self) -> float:
        return self.value

    def to_dict(self) -> dict:
        return {"value": self.value, "num_images": self.num_images, "num_reference": self.num_reference,
                "encoder": self.encoder, "num_features": self.num_features}


class _Features(torch.nn.Module):
    """Passes precomputed features to torchmetrics' Fréchet distance (its ``feature`` module)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_of_features(features, reference, *, encoder: str = "features") -> FrechetResult:
    """:class:`FrechetResult` of two feature sets already computed (``(N, D)`` and ``(M, D)``, ``N, M >= 2``)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if x.ndim != 2 or r.ndim != 2 or x.shape[1] != r.shape[1]:
        raise ConfigError(f"feature sets must be (N, D) and (M, D) with the same D, got {tuple(x.shape)} and {tuple(r.shape)}")
    if len(x) < 2 or len(r) < 2:
        raise ConfigError("a Fréchet distance needs at least 2 images on each side")
    return FrechetResult(value=_frechet_of_features(x, r), num_images=len(x), num_reference=len(r), encoder=encoder,
                         num_features=int(x.shape[1]))


def _frechet_of_features(features: torch.Tensor, reference: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Features(features.shape[1]), normalize=False, reset_real_features=True)
    metric.update(reference, real=True)
    metric.update(features, real=False)
    return float(metric.compute())


def frechet(encoder, images: torch.Tensor, reference, *, batch: int = 64, device=None) -> FrechetResult:
    """Fréchet distance between the features of ``images`` and of ``reference``:
    ``||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` (torchmetrics' arithmetic).

    Args:
        encoder: anything :func:`image_encoder` takes (a spec, a folder, a module, a callable).
        images: ``(N, 3, H, W)`` in [0, 1] (clamped here), ``N >= 2``.
        reference: the same kind of tensor (any ``N >= 2``), or a folder of PNG / JPEG images,
            held out from training, loaded with :func:`load_image_folder` at ``images``' size.
        batch: images per encoder call. device: for weights loaded from a spec.

    Returns:
        A :class:`FrechetResult` with the value and both sample sizes.

    Warning:
        The estimate is biased upwards and the bias grows as the sample shrinks (roughly like
        ``1 / N``) and as the features widen: with a few hundred images and 512- or 1024-wide CLIP
        features most of the value can be bias. Compare distances only at the same sample sizes and
        encoder, and prefer paired per-sample measures (:func:`quality_panel`) for small audits.
    """
    encoder = image_encoder(encoder, device=device)
    x = _check(images)
    if isinstance(reference, (str, os.PathLike)):
        reference = load_image_folder(reference, size=tuple(x.shape[-2:]))
    r = _check(reference)
    if len(x) < 2 or len(r) < 2:
        raise ConfigError("a Fréchet distance needs at least 2 images on each side")
    return frechet_of_features(encoder.encode(x, batch=batch), encoder.encode(r, batch=batch), encoder=encoder.name)
