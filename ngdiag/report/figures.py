"""Report figures: each function takes plain data (pandas frames, dicts of arrays) and returns a
:class:`matplotlib.figure.Figure`.

Figures are built with matplotlib's object API (``Figure(...)``, never ``pyplot``), so nothing is
registered in pyplot's global figure manager and no global style is changed; style settings are
applied inside :func:`matplotlib.rc_context`. Encode one with
:func:`ngdiag.report.html.figure_to_data_uri`, which also releases it.

Colours are fixed across every figure and every report:

- :data:`THETA_COLOR` (vermillion): the model under audit ("current", ``theta``) and every
  quantity of theta relative to the reference (ratio, cosine, radial share, sensitivity);
- :data:`REF_COLOR` (blue): the pretrained reference and the reference level (ratio 1);
- :data:`RENORM_COLOR` (green): theta with inference-time renormalization (paper eq. 3);
- :data:`RUN_COLORS`: the first, second, ... run when two training runs are compared.

Time runs from ``t = 1`` (noise) to ``t = 0`` (data) (CONVENTIONS "Time, interpolant, velocity"),
so every curve against ``t`` has an inverted x axis: sampling reads left to right.

Example:
    >>> import pandas as pd
    >>> from ngdiag.report.figures import ratio_curve
    >>> frame = pd.DataFrame({"step": [0, 1], "t": [1.0, 0.5], "mean_ratio": [1.1, 1.05],
    ...                       "ci_low": [1.0, 1.0], "ci_high": [1.2, 1.1]})
    >>> fig = ratio_curve(frame)
    >>> fig.axes[0].get_xlabel()
    't (1 = noise, 0 = data)'
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ngdiag.core.errors import ConfigError

__all__ = [
    "THETA_COLOR",
    "REF_COLOR",
    "RENORM_COLOR",
    "RUN_COLORS",
    "MODEL_COLORS",
    "T_LABEL",
    "select_call",
    "ratio_curve",
    "ratio_curves",
    "norm_curves",
    "ratio_histogram",
    "cosine_and_radial",
    "image_grid",
    "spatial_maps",
    "spatial_steps",
    "attribution_bars",
    "sensitivity_curves",
    "sensitivity_spread",
    "training_curves",
    "run_curves",
    "power_spectrum",
]

# Okabe-Ito colour-blind-safe palette.
THETA_COLOR = "#D55E00"
REF_COLOR = "#0072B2"
RENORM_COLOR = "#009E73"
RUN_COLORS = ("#CC79A7", "#E69F00", "#56B4E9", "#000000")
MODEL_COLORS = {"rl": THETA_COLOR, "theta": THETA_COLOR, "base": REF_COLOR, "ref": REF_COLOR, "rl+renorm": RENORM_COLOR}
NEUTRAL_COLOR = "#555555"

T_LABEL = "t (1 = noise, 0 = data)"
RATIO_LABEL = "||v_θ|| / ||v_ref||"

_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
}
_WIDE = (7.0, 3.4)


def _style():
    return matplotlib.rc_context(_RC)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ConfigError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{what} is missing columns {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise ConfigError(f"{what} has no rows")


def select_call(per_step: pd.DataFrame, call: str = "guided") -> pd.DataFrame:
    """The rows of one velocity ``call`` (``"guided"`` or ``"cond"``), sorted by step.

    A frame without a ``call`` column is taken as one call. When ``call`` is absent but the frame
    has another call (e.g. only ``cond``), that one is used rather than failing.
    """
    if "call" in per_step.columns:
        calls = list(dict.fromkeys(per_step["call"]))
        if call not in calls:
            if not calls:
                raise ConfigError("per_step has no rows")
            call = calls[0]
        per_step = per_step[per_step["call"] == call]
    sort = "step" if "step" in per_step.columns else "t"
    if sort == "t":
        return per_step.sort_values("t", ascending=False, ignore_index=True)
    return per_step.sort_values(sort, ignore_index=True)


def _t_axis(ax, t) -> None:
    """Time axis from noise (left) to data (right)."""
    t = np.asarray(t, dtype=float)
    lo, hi = (0.0, 1.0) if t.size == 0 or (t.min() >= 0 and t.max() <= 1) else (float(t.min()), float(t.max()))
    ax.set_xlim(hi + 0.02 * (hi - lo), lo - 0.02 * (hi - lo))
    ax.set_xlabel(T_LABEL)


def _call_note(per_step: pd.DataFrame, call: str) -> str:
    if "call" not in per_step.columns:
        return ""
    used = select_call(per_step, call)["call"].iloc[0]
    return f" ({used} velocity)"


def _plain_number(value, _pos=None) -> str:
    """A tick label as a plain number: ``1``, ``10``, ``0.2``, ``1e+06`` (``%g``), never mathtext."""
    return f"{value:g}"


def _log_axis(ax, values: np.ndarray) -> None:
    """A log y axis over whole decades that cover ``values``, labelled with plain numbers.

    The decades at both ends are major ticks, so the axis always has a label at or above the
    largest value and at or below the smallest (matplotlib's default leaves a range such as
    0.05 to 5 with no label above 1). Over at most three decades the 2 and 5 of each decade are
    labelled too.
    """
    logs = np.log10(np.asarray(values, dtype=float))
    lo, hi = int(np.floor(logs.min())), int(np.ceil(logs.max()))
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    ax.set_yscale("log")
    ax.set_ylim(10.0 ** lo, 10.0 ** hi)
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(_plain_number) if hi - lo <= 3 else NullFormatter())


# ----------------------------------------------------------------------------- audit figures
def power_spectrum(spectrum: pd.DataFrame, *, reference: str = "base") -> Figure:
    """Mean radial power spectrum of luma per model (log power against frequency, top) and each
    model's ratio to ``reference``'s (bottom; 1 = the same power). ``spectrum`` has columns
    ``frequency`` (cycles per pixel), ``model`` and ``power``, as the audit's ``spectrum.csv``;
    rings with no power in a model are left out of its line."""
    _require(spectrum, ("frequency", "model", "power"), "spectrum")
    models = list(dict.fromkeys(spectrum["model"]))
    known = ("base", "rl", "rl+renorm")
    order = [m for m in known if m in models] + [m for m in models if m not in known]
    curves = {m: spectrum[spectrum["model"] == m].sort_values("frequency") for m in order}
    positive = spectrum["power"].to_numpy(float)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if positive.size == 0:
        raise ConfigError("the spectrum has no positive power to plot")
    has_ratio = reference in curves and len(curves) > 1
    with _style():
        fig = Figure(figsize=(_WIDE[0], 5.2 if has_ratio else _WIDE[1]), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2)) if has_ratio else [fig.add_subplot()]
        ax = axes[0]
        for i, (model, sub) in enumerate(curves.items()):
            f, p = sub["frequency"].to_numpy(float), sub["power"].to_numpy(float)
            ok = np.isfinite(p) & (p > 0)
            color = MODEL_COLORS.get(model, RUN_COLORS[i % len(RUN_COLORS)])
            ax.plot(f[ok], p[ok], color=color, marker="o", markersize=2.5, linewidth=1.5, label=str(model))
        _log_axis(ax, positive)
        ax.set_ylabel("mean power (luma)")
        ax.set_title("Radial power spectrum")
        ax.legend(loc="best", frameon=False)
        if has_ratio:
            ax = axes[1]
            ref = curves[reference].set_index("frequency")["power"]
            ratios = []
            for i, (model, sub) in enumerate(curves.items()):
                if model == reference:
                    continue
                mine = sub.set_index("frequency")["power"]
                joined = pd.concat([mine, ref], axis=1, keys=["m", "r"], join="inner")
                ok = (joined["r"] > 0) & (joined["m"] > 0)
                ratio = (joined["m"][ok] / joined["r"][ok])
                ratios.append(ratio.to_numpy(float))
                color = MODEL_COLORS.get(model, RUN_COLORS[i % len(RUN_COLORS)])
                ax.plot(ratio.index.to_numpy(float), ratio.to_numpy(float), color=color, marker="o", markersize=2.5,
                        linewidth=1.5, label=f"{model} / {reference}")
            ax.axhline(1.0, color=REF_COLOR, linestyle="--", linewidth=1.2)
            values = np.concatenate(ratios + [np.array([1.0])])
            values = values[np.isfinite(values) & (values > 0)]
            _log_axis(ax, values)
            ax.set_ylabel(f"power / {reference}")
            ax.legend(loc="best", frameon=False)
        axes[-1].set_xlabel("spatial frequency (cycles per pixel)")
    return fig


def ratio_curve(per_step: pd.DataFrame, *, call: str = "guided") -> Figure:
    """Mean ratio ``||v_theta|| / ||v_ref||`` over samples with its CI band, against ``t`` (paper Figure 3).

    Args:
        per_step: columns ``t, mean_ratio, ci_low, ci_high`` (and ``step``, optionally ``call``).
        call: which velocity to plot when the frame has a ``call`` column (``guided`` by default).
    """
    _require(per_step, ("t", "mean_ratio", "ci_low", "ci_high"), "per_step")
    frame = select_call(per_step, call)
    with _style():
        fig = Figure(figsize=_WIDE, layout="constrained")
        ax = fig.add_subplot()
        t = frame["t"].to_numpy(float)
        ax.fill_between(t, frame["ci_low"].to_numpy(float), frame["ci_high"].to_numpy(float), color=THETA_COLOR,
                        alpha=0.2, linewidth=0, label="confidence interval")
        ax.plot(t, frame["mean_ratio"].to_numpy(float), color=THETA_COLOR, marker="o", markersize=3, linewidth=1.6,
                label="mean ratio (θ / ref)")
        ax.axhline(1.0, color=REF_COLOR, linestyle="--", linewidth=1.2, label="reference level (ratio 1)")
        _t_axis(ax, t)
        ax.set_ylabel(RATIO_LABEL)
        ax.set_title("Velocity-norm ratio along the trajectory" + _call_note(per_step, call))
        ax.legend(loc="best", frameon=False)
    return fig


def ratio_curves(curves: Mapping[str, pd.DataFrame], *, call: str = "guided",
                 colors: Optional[Sequence[str]] = None) -> Figure:
    """Several per-step ratio curves (e.g. the final checkpoints of compared runs) on one axis.

    Args:
        curves: name -> per-step frame as for :func:`ratio_curve`; drawn in order with
            :data:`RUN_COLORS` (or ``colors``).
    """
    if not curves:
        raise ConfigError("ratio_curves needs at least one curve")
    colors = list(colors or RUN_COLORS)
    with _style():
        fig = Figure(figsize=_WIDE, layout="constrained")
        ax = fig.add_subplot()
        all_t = []
        for i, (name, per_step) in enumerate(curves.items()):
            _require(per_step, ("t", "mean_ratio"), f"ratio curve {name!r}")
            frame = select_call(per_step, call)
            color = colors[i % len(colors)]
            t = frame["t"].to_numpy(float)
            all_t.append(t)
            if {"ci_low", "ci_high"} <= set(frame.columns):
                ax.fill_between(t, frame["ci_low"].to_numpy(float), frame["ci_high"].to_numpy(float), color=color,
                                alpha=0.15, linewidth=0)
            ax.plot(t, frame["mean_ratio"].to_numpy(float), color=color, marker="o", markersize=3, linewidth=1.6,
                    label=str(name))
        ax.axhline(1.0, color=REF_COLOR, linestyle="--", linewidth=1.2, label="reference level (ratio 1)")
        _t_axis(ax, np.concatenate(all_t))
        ax.set_ylabel(RATIO_LABEL)
        ax.set_title("Velocity-norm ratio along the trajectory")
        ax.legend(loc="best", frameon=False)
    return fig


def norm_curves(per_step: pd.DataFrame, *, call: str = "guided") -> Figure:
    """Mean ``||v_theta||`` and mean ``||v_ref||`` over samples against ``t``."""
    _require(per_step, ("t", "mean_norm_theta", "mean_norm_ref"), "per_step")
    frame = select_call(per_step, call)
    with _style():
        fig = Figure(figsize=_WIDE, layout="constrained")
        ax = fig.add_subplot()
        t = frame["t"].to_numpy(float)
        ax.plot(t, frame["mean_norm_ref"].to_numpy(float), color=REF_COLOR, marker="o", markersize=3, linewidth=1.6,
                label="reference ||v_ref||")
        ax.plot(t, frame["mean_norm_theta"].to_numpy(float), color=THETA_COLOR, marker="o", markersize=3,
                linewidth=1.6, label="current ||v_θ||")
        _t_axis(ax, t)
        ax.set_ylabel("mean velocity norm")
        ax.set_title("Velocity norms along the trajectory" + _call_note(per_step, call))
        ax.legend(loc="best", frameon=False)
    return fig


def _histogram_bins(values: np.ndarray):
    """Bins for ratios: automatic, except that a spread narrower than 2 % of the axis (which spans
    the values and 1) becomes one visible bar instead of bars too thin to see (e.g. a planted,
    exactly constant ratio)."""
    lo, hi = float(values.min()), float(values.max())
    extent = max(hi, 1.0) - min(lo, 1.0)
    min_width = 0.02 * extent if extent > 0 else 0.01
    if hi - lo < min_width:
        center = 0.5 * (lo + hi)
        return np.array([center - min_width / 2, center + min_width / 2])
    return int(np.clip(np.ceil(np.sqrt(len(values))) * 2, 5, 40))


def ratio_histogram(per_sample: pd.DataFrame) -> Figure:
    """Histogram of the per-sample mean ratio, with the reference level 1 and the geometric mean.

    The geometric mean ``exp(mean_i l_i)`` (when ``log_ratio`` is given) is ``1 + inflation``.
    """
    _require(per_sample, ("mean_ratio",), "per_sample")
    values = per_sample["mean_ratio"].to_numpy(float)
    values = values[np.isfinite(values)]
    with _style():
        fig = Figure(figsize=_WIDE, layout="constrained")
        ax = fig.add_subplot()
        if len(values):
            ax.hist(values, bins=_histogram_bins(values), color=THETA_COLOR, alpha=0.75, edgecolor="white",
                    linewidth=0.5, label=f"samples (n = {len(values)})")
        ax.axvline(1.0, color=REF_COLOR, linestyle="--", linewidth=1.2, label="reference level (ratio 1)")
        if "log_ratio" in per_sample.columns:
            logs = per_sample["log_ratio"].to_numpy(float)
            logs = logs[np.isfinite(logs)]
            if len(logs):
                gm = float(np.exp(logs.mean()))
                ax.axvline(gm, color=THETA_COLOR, linewidth=1.6, label=f"geometric mean {gm:.3f}")
        ax.set_xlabel("per-sample mean ratio " + RATIO_LABEL)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("samples")
        ax.set_title("Per-sample norm ratio")
        ax.legend(loc="best", frameon=False)
    return fig


def cosine_and_radial(per_step: pd.DataFrame, *, call: str = "guided") -> Figure:
    """Cosine between ``v_theta`` and ``v_ref`` (top) and the radial share of the drift (bottom) against ``t``.

    Radial share = ``(||v_theta|| - ||v_ref||)^2 / ||v_theta - v_ref||^2`` (CONVENTIONS "Norms and
    ratios"): near 1, theta differs from the reference mostly in magnitude; near 0, in direction.
    """
    _require(per_step, ("t", "mean_cos", "radial_share"), "per_step")
    frame = select_call(per_step, call)
    with _style():
        fig = Figure(figsize=(7.0, 4.6), layout="constrained")
        ax_cos, ax_rad = fig.subplots(2, 1, sharex=True)
        t = frame["t"].to_numpy(float)
        ax_cos.plot(t, frame["mean_cos"].to_numpy(float), color=THETA_COLOR, marker="o", markersize=3, linewidth=1.6)
        ax_cos.axhline(1.0, color=REF_COLOR, linestyle="--", linewidth=1.2)
        ax_cos.set_ylabel("cos(v_θ, v_ref)")
        ax_cos.set_title("Direction and magnitude of the drift" + _call_note(per_step, call))
        ax_rad.plot(t, frame["radial_share"].to_numpy(float), color=THETA_COLOR, marker="o", markersize=3,
                    linewidth=1.6)
        ax_rad.set_ylim(-0.03, 1.03)
        ax_rad.set_ylabel("radial share")
        _t_axis(ax_rad, t)
        ax_cos.set_xlabel("")
    return fig


def _as_images(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().float().numpy()
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ConfigError(f"images[{name!r}] must have shape (N, 3, H, W) or (N, 1, H, W), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"images[{name!r}] has non-finite values")
    return np.clip(arr, 0.0, 1.0)


def _downsample(img: np.ndarray, max_side: int) -> np.ndarray:
    """(C, H, W) -> (H', W', C) with an integer box filter so that max(H', W') <= max_side."""
    c, h, w = img.shape
    f = int(np.ceil(max(h, w) / max_side))
    if f > 1:
        h2, w2 = h // f, w // f
        img = img[:, : h2 * f, : w2 * f].reshape(c, h2, f, w2, f).mean(axis=(2, 4))
    img = np.transpose(img, (1, 2, 0))
    return img[..., 0] if c == 1 else img


def image_grid(images: Mapping[str, object], max_images: int = 8, *,
               column_labels: Optional[Sequence[str]] = None, max_side: int = 256) -> Figure:
    """Images side by side: one row per model (in ``images`` order), one column per sample index.

    Args:
        images: model name (``"base"``, ``"rl"``, ``"rl+renorm"``...) -> ``(N, 3, H, W)`` array or
            tensor in ``[0, 1]``; column ``j`` of every row has the same seed.
        max_images: at most this many columns.
        column_labels: a title per column (e.g. ``"seed 3"``); default ``"sample j"``.
        max_side: images are box-downsampled to at most this many pixels a side.
    """
    if not images:
        raise ConfigError("image_grid needs at least one model's images")
    rows = {str(name): _as_images(str(name), value) for name, value in images.items()}
    ncols = min(int(max_images), max(len(a) for a in rows.values()))
    if ncols < 1:
        raise ConfigError("image_grid got no images")
    h, w = next(iter(rows.values())).shape[2:]
    cell = 1.55
    with _style():
        fig = Figure(figsize=(0.5 + cell * ncols, 0.35 + cell * (h / w) * len(rows)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
        for r, (name, arr) in enumerate(rows.items()):
            for j in range(ncols):
                ax = axes[r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if j < len(arr):
                    img = _downsample(arr[j], max_side)
                    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="antialiased")
                    color = MODEL_COLORS.get(name.lower())
                    if color is not None:
                        for spine in ax.spines.values():
                            spine.set_visible(True)
                            spine.set_color(color)
                            spine.set_linewidth(2.0)
                if j == 0:
                    ax.set_ylabel(name, fontsize=10, color=MODEL_COLORS.get(name.lower(), "black"))
                if r == 0:
                    label = column_labels[j] if column_labels is not None and j < len(column_labels) else f"sample {j}"
                    ax.set_title(str(label), fontsize=8)
    return fig


# ----------------------------------------------------------------------------- spatial maps
RATIO_CMAP = "RdBu_r"  # red: theta's velocity larger (the theta colour's side), blue: the reference's


def _ratio_norm(maps: Sequence[np.ndarray]):
    """A diverging colour scale centred on ratio 1, symmetric in log, shared by ``maps``."""
    from matplotlib.colors import TwoSlopeNorm

    values = np.concatenate([np.log(np.asarray(m, dtype=float)).ravel() for m in maps])
    if not np.isfinite(values).all() or not (np.asarray([np.min(m) for m in maps]) > 0).all():
        raise ConfigError("ratio maps must be positive and finite")
    span = max(float(np.abs(values).max()), 1e-6)
    return TwoSlopeNorm(vcenter=1.0, vmin=float(np.exp(-span)), vmax=float(np.exp(span)))


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def spatial_maps(sample_maps: np.ndarray, mean_map: np.ndarray, *, images: Optional[np.ndarray] = None,
                 column_labels: Optional[Sequence[str]] = None, max_maps: int = 8, max_side: int = 256) -> Figure:
    """Heat maps of ``||v_theta(p)|| / ||v_ref(p)||`` on the latent grid, under the decoded images.

    Args:
        sample_maps: ``(M, h, w)`` per-sample maps (mean over steps, geometric).
        mean_map: ``(h, w)`` the mean map over all samples, drawn in the last column.
        images: optional ``(M', 3, H, W)`` images in ``[0, 1]`` of the same samples (first row).
        column_labels: a title per sample column.
    """
    sample_maps = np.asarray(sample_maps, dtype=float)
    mean_map = np.asarray(mean_map, dtype=float)
    if sample_maps.ndim != 3 or mean_map.ndim != 2:
        raise ConfigError(f"spatial maps need (M, h, w) and (h, w), got {sample_maps.shape} and {mean_map.shape}")
    m = min(int(max_maps), len(sample_maps))
    rows = 2 if images is not None and len(images) else 1
    imgs = _as_images("images", images) if rows == 2 else None
    norm = _ratio_norm([mean_map] + [sample_maps[j] for j in range(m)])
    cell = 1.55
    with _style():
        fig = Figure(figsize=(1.2 + cell * (m + 1), 0.4 + cell * rows), layout="constrained")
        axes = np.atleast_2d(fig.subplots(rows, m + 1, squeeze=False))
        for j in range(m + 1):
            for r in range(rows):
                _bare(axes[r, j])
            mapped = axes[rows - 1, j]
            if j < m:
                label = column_labels[j] if column_labels is not None and j < len(column_labels) else f"sample {j}"
                axes[0, j].set_title(str(label), fontsize=8)
                image = mapped.imshow(sample_maps[j], cmap=RATIO_CMAP, norm=norm, interpolation="nearest")
                if rows == 2 and j < len(imgs):
                    axes[0, j].imshow(_downsample(imgs[j], max_side), vmin=0, vmax=1)
            else:
                axes[0, j].set_title("mean over samples", fontsize=8)
                image = mapped.imshow(mean_map, cmap=RATIO_CMAP, norm=norm, interpolation="nearest")
                if rows == 2:
                    axes[0, j].axis("off")
        if rows == 2:
            axes[0, 0].set_ylabel("image", fontsize=9)
        axes[rows - 1, 0].set_ylabel("ratio map", fontsize=9)
        fig.colorbar(image, ax=axes[rows - 1, :].tolist(), shrink=0.9, label=RATIO_LABEL)
    return fig


def spatial_steps(step_maps: np.ndarray, times: Sequence[float], *, max_panels: int = 6) -> Figure:
    """The per-step mean maps ``M_k(p)`` at up to ``max_panels`` steps spread over the trajectory."""
    step_maps = np.asarray(step_maps, dtype=float)
    if step_maps.ndim != 3 or len(step_maps) != len(times):
        raise ConfigError(f"step maps need shape (S, h, w) with S = len(times), got {step_maps.shape}")
    picks = sorted(set(np.linspace(0, len(step_maps) - 1, min(max_panels, len(step_maps))).round().astype(int).tolist()))
    norm = _ratio_norm([step_maps[k] for k in picks])
    cell = 1.45
    with _style():
        fig = Figure(figsize=(1.2 + cell * len(picks), 0.5 + cell), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(picks), squeeze=False)[0])
        for ax, k in zip(axes, picks):
            _bare(ax)
            image = ax.imshow(step_maps[k], cmap=RATIO_CMAP, norm=norm, interpolation="nearest")
            ax.set_title(f"step {k}, t={float(times[k]):.2f}", fontsize=8)
        fig.colorbar(image, ax=axes.tolist(), shrink=0.9, label=RATIO_LABEL)
    return fig


# ----------------------------------------------------------------------------- attribution
def attribution_bars(table: pd.DataFrame, *, max_groups: int = 30) -> Figure:
    """Per-group effects on the log-ratio, largest first: leave-one-out (theta colour) and single-group
    (reference colour) with their intervals; the total as a vertical line.

    ``table`` has ``group``, ``loo_effect``, ``loo_ci_low``, ``loo_ci_high`` and optionally
    ``single_effect``, ``single_ci_low``, ``single_ci_high``; ``table.attrs["total"]`` the total.
    """
    _require(table, ("group", "loo_effect", "loo_ci_low", "loo_ci_high"), "attribution_bars")
    frame = table.head(int(max_groups)).iloc[::-1]
    y = np.arange(len(frame))
    single = "single_effect" in frame.columns
    height = 0.38 if single else 0.7
    with _style():
        fig = Figure(figsize=(7.0, 1.3 + 0.28 * len(frame)), layout="constrained")
        ax = fig.subplots()
        def bars(prefix, offset, color, label):
            v = frame[f"{prefix}_effect"].to_numpy(float)
            err = np.vstack([v - frame[f"{prefix}_ci_low"].to_numpy(float), frame[f"{prefix}_ci_high"].to_numpy(float) - v])
            ax.barh(y + offset, v, height=height, color=color, xerr=np.clip(err, 0, None), capsize=2, label=label,
                    error_kw={"linewidth": 0.8})
        bars("loo", height / 2 if single else 0, THETA_COLOR, "leave-one-out: total − without the group")
        if single:
            bars("single", -height / 2, REF_COLOR, "single: only the group on")
        total = table.attrs.get("total")
        if total is not None:
            ax.axvline(float(total), color=NEUTRAL_COLOR, linestyle="--", linewidth=1, label="total")
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_yticks(y)
        ax.set_yticklabels([str(g) for g in frame["group"]], fontsize=7)
        ax.set_xlabel("effect on the mean log-ratio log(||v_θ|| / ||v_ref||)")
        ax.grid(axis="y", visible=False)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False)
    return fig


# ----------------------------------------------------------------------------- sensitivity figures
def sensitivity_curves(frame: pd.DataFrame, *, color: str = THETA_COLOR) -> Figure:
    """Mean sensitivity ``S(t)`` with a ±standard-error band and a zero line (top), ``NSR`` on a log
    axis over whole decades with plain-number labels (bottom), against ``t`` (paper Figure 4).

    Args:
        frame: one row per step: ``t, mean, stderr, nsr`` (``SensitivityResult.summary_frame()``).
    """
    _require(frame, ("t", "mean", "stderr", "nsr"), "sensitivity per-step frame")
    frame = frame.sort_values("t", ascending=False, ignore_index=True)
    t = frame["t"].to_numpy(float)
    mean = frame["mean"].to_numpy(float)
    err = np.nan_to_num(frame["stderr"].to_numpy(float), nan=0.0)
    nsr = frame["nsr"].to_numpy(float)
    with _style():
        fig = Figure(figsize=(7.0, 4.8), layout="constrained")
        ax_s, ax_n = fig.subplots(2, 1, sharex=True)
        ax_s.fill_between(t, mean - err, mean + err, color=color, alpha=0.2, linewidth=0, label="± standard error")
        ax_s.plot(t, mean, color=color, marker="o", markersize=3, linewidth=1.6, label="mean S(t)")
        ax_s.axhline(0.0, color=NEUTRAL_COLOR, linestyle="--", linewidth=1.0)
        ax_s.set_ylabel("S(t)")
        ax_s.set_title("Norm-scaling sensitivity of the reward")
        ax_s.legend(loc="best", frameon=False)
        ok = np.isfinite(nsr) & (nsr > 0)
        if ok.any():
            ax_n.plot(t[ok], nsr[ok], color=color, marker="o", markersize=3, linewidth=1.6, clip_on=False)
            _log_axis(ax_n, np.append(nsr[ok], 1.0))
        else:
            ax_n.text(0.5, 0.5, "NSR undefined (one sample, or zero means)", transform=ax_n.transAxes,
                      ha="center", va="center")
        ax_n.axhline(1.0, color=NEUTRAL_COLOR, linestyle="--", linewidth=1.0)
        ax_n.set_ylabel("NSR = σ / |μ|")
        _t_axis(ax_n, t)
        ax_s.set_xlabel("")
    return fig


def sensitivity_spread(long_frame: pd.DataFrame, *, color: str = THETA_COLOR, max_points: int = 4000) -> Figure:
    """Per-sample ``S`` by step: a box per step (quartiles) with the samples as jittered points.

    Args:
        long_frame: one row per step and sample: ``step, S`` (and ``t`` for the tick labels).
        max_points: at most this many points are drawn (a seeded subsample beyond that).
    """
    _require(long_frame, ("step", "S"), "sensitivity long frame")
    frame = long_frame[np.isfinite(long_frame["S"].to_numpy(float))]
    steps = sorted(frame["step"].unique())
    groups = [frame.loc[frame["step"] == k, "S"].to_numpy(float) for k in steps]
    pos = np.arange(len(steps))
    with _style():
        fig = Figure(figsize=(max(7.0, 0.28 * len(steps) + 1.5), 3.6), layout="constrained")
        ax = fig.add_subplot()
        if groups:
            ax.boxplot(groups, positions=pos, widths=0.6, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": "none", "edgecolor": NEUTRAL_COLOR},
                       medianprops={"color": color, "linewidth": 1.6},
                       whiskerprops={"color": NEUTRAL_COLOR}, capprops={"color": NEUTRAL_COLOR})
            rng = np.random.default_rng(0)
            keep = 1.0 if len(frame) <= max_points else max_points / len(frame)
            for p, g in zip(pos, groups):
                if keep < 1:
                    g = g[rng.random(len(g)) < keep]
                ax.scatter(p + rng.uniform(-0.18, 0.18, len(g)), g, s=8, color=color, alpha=0.55, linewidths=0)
        ax.axhline(0.0, color=NEUTRAL_COLOR, linestyle="--", linewidth=1.0)
        ax.set_xticks(pos)
        if "t" in frame.columns and len(steps):
            t_of = frame.groupby("step")["t"].first()
            every = max(1, len(steps) // 14)
            ax.set_xticklabels([f"{k}\n{t_of[k]:.2f}" if i % every == 0 else "" for i, k in enumerate(steps)])
            ax.set_xlabel("step (top) and t (bottom); t = 1 is noise")
        else:
            ax.set_xticklabels([str(k) for k in steps])
            ax.set_xlabel("step")
        ax.set_ylabel("per-sample S")
        ax.set_title("Spread of the sensitivity over samples")
    return fig


# ----------------------------------------------------------------------------- training figures
def run_curves(frames: Sequence[pd.DataFrame], labels: Sequence[str], *,
               colors: Optional[Sequence[str]] = None) -> Figure:
    """Reward (top, with a ±std band when ``reward_std`` is logged) and inflation in % (bottom)
    against training iteration, one colour per run (:data:`RUN_COLORS`).

    Args:
        frames: per run, a metrics frame with ``iteration``, ``reward_mean`` and optionally
            ``reward_std`` and ``inflation`` (a fraction).
        labels: one name per run.
    """
    if len(frames) != len(labels) or not frames:
        raise ConfigError(f"run_curves needs one label per run, got {len(frames)} runs and {len(labels)} labels")
    colors = list(colors or RUN_COLORS)
    with _style():
        fig = Figure(figsize=(7.0, 4.8), layout="constrained")
        ax_r, ax_i = fig.subplots(2, 1, sharex=True)
        any_inflation = False
        for i, (frame, label) in enumerate(zip(frames, labels)):
            _require(frame, ("iteration", "reward_mean"), f"metrics of run {label!r}")
            frame = frame.sort_values("iteration")
            color = colors[i % len(colors)]
            it = frame["iteration"].to_numpy(float)
            mean = frame["reward_mean"].to_numpy(float)
            if "reward_std" in frame.columns:
                std = frame["reward_std"].to_numpy(float)
                ax_r.fill_between(it, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            ax_r.plot(it, mean, color=color, linewidth=1.6, label=str(label))
            if "inflation" in frame.columns:
                infl = frame["inflation"].to_numpy(float) * 100
                ok = np.isfinite(infl)
                if ok.any():
                    any_inflation = True
                    ax_i.plot(it[ok], infl[ok], color=color, linewidth=1.6, label=str(label))
        ax_i.axhline(0.0, color=REF_COLOR, linestyle="--", linewidth=1.2, label="reference level (0 %)")
        if not any_inflation:
            ax_i.text(0.5, 0.5, "inflation not logged", transform=ax_i.transAxes, ha="center", va="center")
        ax_r.set_ylabel("reward (mean ± std)")
        ax_r.set_title("Training runs")
        ax_r.legend(loc="best", frameon=False)
        ax_i.set_ylabel("inflation (%)")
        ax_i.set_xlabel("iteration")
        ax_i.legend(loc="best", frameon=False)
    return fig


def training_curves(metrics_a: pd.DataFrame, metrics_b: pd.DataFrame,
                    labels: Sequence[str] = ("run A", "run B")) -> Figure:
    """Two training runs compared: reward and inflation against iteration (:func:`run_curves` for two runs;
    run A in ``RUN_COLORS[0]``, run B in ``RUN_COLORS[1]``)."""
    if len(labels) != 2:
        raise ConfigError(f"training_curves needs two labels, got {len(labels)}")
    return run_curves([metrics_a, metrics_b], list(labels))


def inflation_by_iteration(frame: pd.DataFrame, *, run_column: str = "run") -> Figure:
    """Inflation (with ``ci_low`` / ``ci_high``) against ``iteration``, one line per run (paper Table 5)."""
    _require(frame, (run_column, "iteration", "inflation", "ci_low", "ci_high"), "inflation by iteration")
    with _style():
        fig = Figure(figsize=_WIDE, layout="constrained")
        ax = fig.add_subplot()
        for i, (run, sub) in enumerate(frame.groupby(run_column, sort=False)):
            sub = sub.sort_values("iteration")
            color = RUN_COLORS[i % len(RUN_COLORS)]
            x = sub["iteration"].to_numpy(float)
            ax.fill_between(x, 100 * sub["ci_low"].to_numpy(float), 100 * sub["ci_high"].to_numpy(float), color=color,
                            alpha=0.15, linewidth=0)
            ax.plot(x, 100 * sub["inflation"].to_numpy(float), color=color, marker="o", markersize=4, label=str(run))
        ax.axhline(0.0, color=REF_COLOR, linestyle="--", linewidth=1.2, label="no inflation")
        ax.set_xlabel("training iteration (checkpoint)")
        ax.set_ylabel("inflation (%)")
        ax.set_title("Norm inflation across training")
        ax.legend(loc="best", frameon=False)
    return fig


def _setting_values(frame: pd.DataFrame, key: str) -> tuple:
    """Positions and tick labels of a setting's values: numbers where they all are, else categories."""
    values = list(frame[key])
    try:
        numbers = np.asarray([float(v) for v in values], float)
        if np.isfinite(numbers).all():
            return numbers, None
    except (TypeError, ValueError):
        pass
    cats = list(dict.fromkeys(str(v) for v in values))
    return np.asarray([cats.index(str(v)) for v in values], float), cats


def setting_curve(frame: pd.DataFrame, setting: str) -> Figure:
    """Inflation (top, with its interval) and reward difference against the base (bottom, with its interval
    when given) against one training setting (e.g. ``normguard.lam``): a lambda sweep (paper Figure 9).

    ``frame``: one row per run with ``setting``, ``inflation``, ``ci_low``, ``ci_high`` (fractions) and
    optionally ``reward_delta`` with ``reward_delta_low`` / ``reward_delta_high``, and ``label``.
    """
    _require(frame, (setting, "inflation", "ci_low", "ci_high"), "setting curve")
    frame = frame.copy()
    x, cats = _setting_values(frame, setting)
    order = np.argsort(x, kind="stable")
    frame, x = frame.iloc[order], x[order]
    rewards = "reward_delta" in frame.columns and frame["reward_delta"].notna().any()
    with _style():
        fig = Figure(figsize=(7.0, 4.8 if rewards else 3.2), layout="constrained")
        axes = fig.subplots(2 if rewards else 1, 1, sharex=True, squeeze=False)[:, 0]
        ax = axes[0]
        y = 100 * frame["inflation"].to_numpy(float)
        err = np.vstack([y - 100 * frame["ci_low"].to_numpy(float), 100 * frame["ci_high"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=err, color=THETA_COLOR, marker="o", capsize=3, linewidth=1.6, label="inflation")
        ax.axhline(0.0, color=REF_COLOR, linestyle="--", linewidth=1.2, label="no inflation")
        if "label" in frame.columns:
            for xi, yi, lab in zip(x, y, frame["label"]):
                ax.annotate(str(lab), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_ylabel("inflation (%)")
        ax.set_title(f"Inflation and reward against {setting}")
        ax.legend(loc="best", frameon=False)
        if rewards:
            r = frame["reward_delta"].to_numpy(float)
            lo = frame.get("reward_delta_low", frame["reward_delta"]).to_numpy(float)
            hi = frame.get("reward_delta_high", frame["reward_delta"]).to_numpy(float)
            axes[1].errorbar(x, r, yerr=np.vstack([r - lo, hi - r]), color=NEUTRAL_COLOR, marker="s", capsize=3,
                             linewidth=1.6)
            axes[1].axhline(0.0, color=REF_COLOR, linestyle="--", linewidth=1.2)
            axes[1].set_ylabel("reward − base")
        axes[-1].set_xlabel(setting)
        if cats is not None:
            axes[-1].set_xticks(range(len(cats)), cats)
    return fig


def setting_grid(frame: pd.DataFrame, rows: str, columns: str, *, values: Sequence[str] = ("inflation", "reward_delta")) -> Figure:
    """Heat maps of ``values`` (one panel each; ``inflation`` in %) over two training settings, one cell per run
    (the paper's Table 6: lambda x KL). Cells without a run are blank; each cell prints its value."""
    _require(frame, (rows, columns), "setting grid")
    values = [v for v in values if v in frame.columns and frame[v].notna().any()]
    if not values:
        raise ConfigError("setting_grid needs at least one of the value columns")
    row_keys = sorted(dict.fromkeys(frame[rows]), key=lambda v: (isinstance(v, str), v))
    col_keys = sorted(dict.fromkeys(frame[columns]), key=lambda v: (isinstance(v, str), v))
    with _style():
        fig = Figure(figsize=(3.6 * len(values) + 0.6, 0.6 * len(row_keys) + 2.0), layout="constrained")
        axes = fig.subplots(1, len(values), squeeze=False)[0]
        for ax, value in zip(axes, values):
            grid = np.full((len(row_keys), len(col_keys)), np.nan)
            for _, rec in frame.iterrows():
                grid[row_keys.index(rec[rows]), col_keys.index(rec[columns])] = float(rec[value])
            shown = 100 * grid if value == "inflation" else grid
            limit = np.nanmax(np.abs(shown)) if np.isfinite(shown).any() else 1.0
            cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")  # no run in that cell: grey, not 0
            image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
            for i in range(len(row_keys)):
                for j in range(len(col_keys)):
                    if np.isfinite(shown[i, j]):
                        dark = abs(shown[i, j]) > 0.6 * limit
                        ax.text(j, i, f"{shown[i, j]:+.2f}", ha="center", va="center", fontsize=9,
                                color="white" if dark else "black")
                    else:
                        ax.text(j, i, "no run", ha="center", va="center", fontsize=8, color=NEUTRAL_COLOR)
            ax.set_xticks(range(len(col_keys)), [str(c) for c in col_keys])
            ax.set_yticks(range(len(row_keys)), [str(r) for r in row_keys])
            ax.set_xlabel(columns)
            ax.set_ylabel(rows)
            ax.set_title("inflation (%)" if value == "inflation" else ("reward − base" if value == "reward_delta" else value))
            fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
