"""Self-contained HTML reports: the audit, the sensitivity analysis and the comparison of training runs.

Rendering is separate from computing: every ``render_*`` function takes plain data (the summary
dict written to JSON, pandas frames, arrays) and returns one HTML string; :func:`write_html` writes
it atomically. A report is one file that needs nothing else:

- CSS inlined in a ``<style>`` element (``templates/report.css``), figures as base64 PNG
  ``data:`` URIs, no JavaScript, no external URL (a Content-Security-Policy ``<meta>`` forbids any
  other source, so a browser would refuse one anyway);
- every string from the inputs (prompts, paths, config values, labels) is HTML-escaped by jinja2's
  autoescape;
- fixed colours for theta ("current"), the reference and renormalization in every figure
  (:mod:`ngdiag.report.figures`).

Example:
    >>> from ngdiag.report.html import format_interval
    >>> format_interval({"value": 0.08, "ci_low": 0.078, "ci_high": 0.082, "confidence": 0.95, "tolerance": 0.01})
    '+8.0 % [7.8 %, 8.2 %] at 95 %, tolerance ±1 %'
"""

from __future__ import annotations

import base64
import io
import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ngdiag.core.io import atomic_write_text
from ngdiag.core.errors import ConfigError
from ngdiag.report import figures as F

__all__ = [
    "figure_to_data_uri",
    "format_percent",
    "format_interval",
    "render_audit_report",
    "render_sensitivity_report",
    "render_compare_report",
    "render_attribution_report",
    "render_demo_page",
    "table_of",
    "figure_block",
    "write_html",
    "TEMPLATES_DIR",
]

TEMPLATES_DIR = Path(__file__).with_name("templates")
SUPPORTED_SCHEMA_VERSIONS = (1,)
DEFAULT_DPI = 110
_MODEL_ORDER = ("base", "rl", "rl+renorm")  # image grid rows: these first, in this order
_MAX_SAMPLE_ROWS = 40  # per-sample table: all rows up to this, else the top and bottom halves
_MODEL_DESCRIPTIONS = {"base": "the base model", "rl": "the RL model",
                       "rl+renorm": "the RL model with renormalization"}

_VERDICT_TEXT = {
    "inflated": "The whole {conf} interval lies above +{tol}: the fine-tuned model's velocity norm is larger "
                "than the reference's along its sampling trajectories.",
    "deflated": "The whole {conf} interval lies below -{tol}: the fine-tuned model's velocity norm is smaller "
                "than the reference's.",
    "no-inflation": "The whole {conf} interval lies inside ±{tol}: no change of the velocity norm beyond the "
                    "tolerance.",
    "inconclusive": "The {conf} interval crosses the tolerance ±{tol}: the data do not decide; more samples "
                    "narrow the interval.",
}


# ----------------------------------------------------------------------------- formatting
def _finite(x) -> Optional[float]:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def format_percent(x, digits: int = 1, *, sign: bool = False) -> str:
    """A fraction as a percentage: ``0.08 -> "8.0 %"`` (``"+8.0 %"`` with ``sign``); ``"n/a"`` for None/NaN."""
    v = _finite(x)
    if v is None:
        return "n/a"
    v = round(v * 100, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{v:+.{digits}f} %" if sign else f"{v:.{digits}f} %"


def _plain_percent(x) -> str:
    """``0.01 -> "1"``, ``0.005 -> "0.5"``, ``0.95 -> "95"``: tolerance and confidence levels."""
    v = _finite(x)
    return "n/a" if v is None else f"{v * 100:.6g}"


def format_interval(inflation: Mapping[str, Any], digits: int = 1) -> str:
    """The inflation with its interval: ``"+8.0 % [7.8 %, 8.2 %] at 95 %, tolerance ±1 %"``."""
    return (f"{format_percent(inflation.get('value'), digits, sign=True)} "
            f"[{format_percent(inflation.get('ci_low'), digits)}, {format_percent(inflation.get('ci_high'), digits)}] "
            f"at {_plain_percent(inflation.get('confidence'))} %, tolerance ±{_plain_percent(inflation.get('tolerance'))} %")


def _num(x, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits, integers as they are, ``n/a`` for None/NaN."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    v = _finite(x)
    if v is None:
        return "n/a" if x is None or isinstance(x, (float, np.floating)) else str(x)
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _cell(x) -> str:
    if isinstance(x, (dict, list, tuple)):
        return json.dumps(x, default=str, ensure_ascii=False)
    if isinstance(x, str):
        return x
    return _num(x)


def _flatten(d: Mapping, prefix: str = "") -> list:
    """Nested dict -> ``[(dotted.key, value text)]`` in insertion order."""
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            rows.extend(_flatten(v, key + "."))
        else:
            rows.append((key, _cell(v)))
    return rows


# ----------------------------------------------------------------------------- figures and templates
def figure_to_data_uri(fig, dpi: int = DEFAULT_DPI) -> str:
    """Encode a matplotlib figure as a ``data:image/png;base64,...`` URI and release the figure.

    The PNG carries no software/date metadata, so the same figure encodes to the same bytes.
    """
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    finally:
        fig.clear()
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:  # a figure made through pyplot: drop it from pyplot's registry too
            pyplot.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = format_percent
    env.filters["num"] = _num
    env.filters["cell"] = _cell
    env.globals["css"] = Markup((TEMPLATES_DIR / "report.css").read_text(encoding="utf-8"))
    env.globals["colors"] = {"theta": F.THETA_COLOR, "ref": F.REF_COLOR, "renorm": F.RENORM_COLOR}
    return env


def _render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)


def _figure(make, *args, alt: str, dpi: int = DEFAULT_DPI, **kwargs) -> dict:
    return {"src": figure_to_data_uri(make(*args, **kwargs), dpi=dpi), "alt": alt}


def _missing(frame: Optional[pd.DataFrame], columns: Sequence[str]) -> list:
    if frame is None:
        return list(columns)
    return [c for c in columns if c not in frame.columns]


def _table(frame: pd.DataFrame, columns: Sequence[tuple]) -> dict:
    """``columns``: ``(column name, header)``; keeps those present. Cells are formatted text."""
    cols = [(c, h) for c, h in columns if c in frame.columns]
    return {"headers": [h for _, h in cols],
            "numeric": [pd.api.types.is_numeric_dtype(frame[c]) for c, _ in cols],
            "rows": [[_cell(v) for v in row] for row in frame[[c for c, _ in cols]].itertuples(index=False)]}


def _check_schema(summary: Mapping, what: str) -> None:
    if not isinstance(summary, Mapping):
        raise ConfigError(f"the {what} summary must be a dict, got {type(summary).__name__}")
    version = summary.get("schema_version", 1)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ConfigError(f"the {what} summary has schema_version {version!r}; this ngdiag renders {list(SUPPORTED_SCHEMA_VERSIONS)}")


def _versions_of(summary: Mapping) -> list:
    return [(k, _cell(v)) for k, v in (summary.get("versions") or {}).items()]


def _config_rows(config: Mapping, prompts_listed: bool) -> list:
    rows = []
    for key, value in _flatten(config or {}):
        if prompts_listed and key == "prompts":
            n = len(config.get("prompts") or [])
            value = f"{n} prompt{'s' if n != 1 else ''} (listed under Prompts)"
        rows.append((key, value))
    return rows


# ----------------------------------------------------------------------------- audit
def _reward_table(reward: Mapping) -> dict:
    """The paper's Table 1 row: reward of base, RL and RL+renorm, and the deltas, each with a spread."""
    rows = list(reward.get("rows") or [])
    by_model = {str(r.get("model")): r for r in rows}
    table_rows = [{"model": str(r.get("model")), "mean": _num(r.get("mean")), "std": _num(r.get("std")),
                   "n": _num(r.get("n"))} for r in rows]

    def stderr_of_difference(a: str, b: str, factor: float) -> str:
        ra, rb = by_model.get(a), by_model.get(b)
        if not ra or not rb:
            return "n/a"
        try:
            se = math.sqrt(float(ra["std"]) ** 2 / float(ra["n"]) + float(rb["std"]) ** 2 / float(rb["n"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return "n/a"
        return _num(abs(factor) * se)

    def deltas_of(block: Mapping, factor: float = 1.0) -> list:
        """The differences of ``block`` (the raw block, or one scale's: ``factor`` times the raw)."""
        deltas = []
        for key, label, a, b in (("delta_rl_minus_base", "RL − base", "rl", "base"),
                                 ("delta_renorm_minus_rl", "RL+renorm − RL", "rl+renorm", "rl")):
            if block.get(key) is not None:
                paired_std, n = block.get(f"{key}_std"), (by_model.get(a) or {}).get("n")
                if paired_std is not None and n:
                    se = _num(float(paired_std) / math.sqrt(float(n)))  # paired: same prompts and seeds
                else:
                    se = stderr_of_difference(a, b, factor)
                deltas.append({"label": label, "value": _num(block.get(key)), "se": se})
        return deltas

    deltas = deltas_of(reward)
    # Published alternative scales (PickScore / 26 as flow_grpo and Flow-Factory log it, ...): the same
    # rows and differences times the scale's factor, one named table each.
    scales = []
    for name, scale in (reward.get("scales") or {}).items():
        factor = _finite(scale.get("factor"))
        scales.append({"name": str(name), "factor": _num(scale.get("factor")), "description": scale.get("description"),
                       "source": scale.get("source"), "deltas": deltas_of(scale, 1.0 if factor is None else factor),
                       "rows": [{"model": str(r.get("model")), "mean": _num(r.get("mean")), "std": _num(r.get("std"))}
                                for r in scale.get("rows") or []]})
    models = [str(r.get("model")) for r in rows]
    described = [_MODEL_DESCRIPTIONS.get(m, f"the {m} model") for m in models]
    caption = "Reward of " + _join_words(described)
    if "base" in models and "rl" in models:
        caption += " (paper Table 1 row" + ("" if "rl+renorm" in models else ", without renormalization") + ")"
    caption += ", mean ± standard deviation over samples"
    if reward.get("raw_scale"):
        caption += f"; raw scale: {reward['raw_scale']}"
    return {"name": reward.get("name"), "rows": table_rows, "deltas": deltas, "caption": caption, "scales": scales}


_QUALITY_LABELS = {"clipping_rate": "clipping rate", "saturation": "saturation", "colourfulness": "colourfulness",
                   "high_frequency_energy": "high-frequency energy", "sharpness": "sharpness",
                   "luminance": "luminance", "contrast": "contrast"}


def _quality_section(quality: Mapping, spectrum: Optional[pd.DataFrame]) -> Optional[dict]:
    """The quality block of the summary as a table (means per model, paired differences against the
    base with their interval when the summary has one) and the spectrum figure when given."""
    models = dict(quality.get("models") or {})
    measures = [str(m) for m in (quality.get("measures") or [])]
    if not models or not measures:
        return None
    deltas = {str(m): quality.get(f"delta_{m.replace('+', '_')}_minus_base") for m in models if m != "base"}
    deltas = {m: d for m, d in deltas.items() if isinstance(d, Mapping)}
    headers = ["measure"] + [f"{m} mean" for m in models] + [f"{m} − base" for m in deltas]
    rows = []
    for k in measures:
        row = [_QUALITY_LABELS.get(k, k)]
        row += [_num((models[m].get(k) or {}).get("mean")) for m in models]
        for d in deltas.values():
            entry = d.get(k) or {}
            text = _num(entry.get("mean"))
            if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
                text += f" [{_num(entry.get('ci_low'))}, {_num(entry.get('ci_high'))}]"
            row.append(text)
        rows.append(row)
    interval = quality.get("interval") or {}
    if interval:
        level = _plain_percent(interval.get("confidence"))
        unit = str(interval.get("unit") or "samples").split(" (")[0]
        caption = (f"Means over samples; differences are paired (same prompt and seed), "
                   f"mean [{level} % {interval.get('method')} bootstrap interval over {unit}]")
    else:
        caption = "Means over samples; differences are paired (same prompt and seed), mean over samples"
    frechet = quality.get("frechet") or {}
    distances = {m: v for m, v in frechet.items() if isinstance(v, Mapping) and v.get("value") is not None}
    if distances:
        parts = [f"{m} {_num(v['value'])} ({v['num_images']} vs {v['num_reference']} images)" for m, v in distances.items()]
        caption += (f". Fréchet distance to the base's images, features of {frechet.get('encoder')} "
                    f"({next(iter(distances.values())).get('num_features')} wide; biased upwards at small samples, "
                    f"compare only at equal sizes): " + "; ".join(parts))
    figure = None
    if spectrum is not None and len(spectrum) and not _missing(spectrum, ("frequency", "model", "power")):
        figure = _figure(F.power_spectrum, spectrum,
                         alt="Mean radial power spectrum of every model and its ratio to the base's")
    return {"table": {"headers": headers, "numeric": [False] + [True] * (len(headers) - 1), "rows": rows},
            "caption": caption, "spectrum": figure}


def _join_words(items: Sequence[str]) -> str:
    """``["a"] -> "a"``, ``["a", "b"] -> "a and b"``, ``["a", "b", "c"] -> "a, b and c"``."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _share_text(share: float) -> str:
    """A share in ``(0, 1]`` as a percentage that never rounds a partial share up to 100 %."""
    if share >= 1.0:
        return "100 %"
    if share > 0.999:
        return "more than 99.9 %"
    return format_percent(share)


def _renorm_conclusion(renorm: Mapping) -> Optional[str]:
    """One sentence from the mean relative distances of the final latents to the base model's:
    how close renormalization brought theta's final latents, against theta alone."""
    rl = _finite(renorm.get("rl_relative_distance_to_base_mean"))
    rn = _finite(renorm.get("rl_renorm_relative_distance_to_base_mean"))
    if rl is None or rn is None:
        return None
    if rn < rl:
        return (f"Renormalization brought the final latents within a mean relative distance of {_num(rn)} of the "
                f"base model's (RL alone: {_num(rl)}), removing {_share_text(1 - rn / rl)} of the RL model's distance.")
    if rn == rl:
        return (f"Renormalization left the final latents as far from the base model's as the RL model alone "
                f"(mean relative distance {_num(rn)}).")
    return (f"Renormalization moved the final latents further from the base model's: mean relative distance "
            f"{_num(rn)} against {_num(rl)} for the RL model alone.")


def _renorm_block(renorm: Mapping) -> dict:
    """Relative distances to the base (``{model}_relative_distance_to_base_{mean,std}``) as rows; the rest as facts."""
    suffix = "_relative_distance_to_base_mean"
    rows, facts = [], []
    used = set()
    for key, value in renorm.items():
        if key.endswith(suffix):
            model = key[: -len(suffix)]
            std_key = f"{model}_relative_distance_to_base_std"
            used.update((key, std_key))
            rows.append({"model": model.replace("_renorm", "+renorm"), "mean": _num(value),
                         "std": _num(renorm.get(std_key))})
    for key, value in renorm.items():
        if key not in used:
            facts.append((key, _cell(value)))
    return {"rows": rows, "facts": facts, "conclusion": _renorm_conclusion(renorm)}


def _per_sample_block(per_sample: pd.DataFrame) -> dict:
    frame = per_sample.sort_values("mean_ratio", ascending=False, ignore_index=True)
    columns = [("sample", "sample"), ("seed", "seed"), ("mean_ratio", "mean ratio"), ("log_ratio", "log ratio"),
               ("prompt", "prompt")]
    note = None
    if len(frame) > _MAX_SAMPLE_ROWS:
        half = _MAX_SAMPLE_ROWS // 2
        note = f"The {half} highest and {half} lowest of {len(frame)} samples; the rest are in the records."
        frame = pd.concat([frame.head(half), frame.tail(half)], ignore_index=True)
    block = _table(frame, columns)
    block["note"] = note
    return block


def _column_labels(per_sample: Optional[pd.DataFrame], n: int) -> Optional[list]:
    if per_sample is None or "seed" not in per_sample.columns:
        return None
    frame = per_sample.sort_values("sample") if "sample" in per_sample.columns else per_sample
    seeds = list(frame["seed"])[:n]
    return [f"seed {s}" for s in seeds] if len(seeds) == n else None


def _spatial_block(spatial, summary: Mapping, images: Optional[Mapping], per_sample: pd.DataFrame) -> Optional[dict]:
    """The spatial section: heat maps beside the decoded images, the per-step maps and the share."""
    if spatial is None:
        return None
    arrays = spatial.arrays() if hasattr(spatial, "arrays") else dict(spatial)
    missing = [k for k in ("mean_map", "sample_ids", "sample_maps", "step_maps", "times") if k not in arrays]
    if missing:
        raise ConfigError(f"the spatial maps lack {', '.join(missing)}")
    ids = np.asarray(arrays["sample_ids"])
    row = None
    if images:
        name = next((k for k in ("rl", "base") if k in images), next(iter(images)))
        row = np.asarray(images[name])
    n = min(8, len(ids)) if row is None else min(8, len(ids), len(row))
    order = np.argsort(ids, kind="stable")[:n]
    labels = _column_labels(per_sample, n) if row is not None else [f"sample {int(i)}" for i in ids[order]]
    block = dict(summary.get("spatial") or {})
    block["maps"] = _figure(F.spatial_maps, np.asarray(arrays["sample_maps"])[order], arrays["mean_map"],
                            images=None if row is None else row[:n], column_labels=labels,
                            alt="Ratio maps ||v_θ||/||v_ref|| per latent position under the decoded images, and the mean map")
    block["steps"] = _figure(F.spatial_steps, arrays["step_maps"], arrays["times"],
                             alt="Mean ratio map over samples at several steps")
    return block


def render_audit_report(summary: Mapping, per_step: pd.DataFrame, per_sample: pd.DataFrame,
                        images: Optional[Mapping] = None, prompts: Optional[Sequence[str]] = None,
                        spectrum: Optional[pd.DataFrame] = None, spatial=None) -> str:
    """The audit report (one self-contained HTML page).

    Args:
        summary: the ``summary.json`` document (``AuditResult.summary()``): verdict, inflation
            interval, per-step curve, checkpoint, config, versions, optional ``renorm`` and ``reward``.
        per_step: per-step frame (``AuditResult.per_step``): ``step, t, mean_ratio, ci_low, ci_high,
            mean_cos, radial_share, mean_norm_theta, mean_norm_ref`` and optionally ``call``
            (the ``guided`` rows are plotted when present).
        per_sample: one row per sample: ``sample, prompt, seed, mean_ratio, log_ratio``.
        images: optional model name -> ``(N, 3, H, W)`` in ``[0, 1]``; column ``j`` has the same seed
            in every model.
        prompts: the audit's prompts (sample ``i`` uses ``prompts[i % len(prompts)]``).
        spectrum: the mean radial power spectrum per model (``AuditResult.spectrum``, the audit's
            ``spectrum.csv``: ``frequency, model, power``), plotted in the quality section.
        spatial: optional :class:`~ngdiag.probes.spatial.SpatialMaps` (or a mapping of its ``arrays()``):
            heat maps beside the images; its numbers come from ``summary["spatial"]`` when present.

    Returns:
        The HTML text; write it with :func:`write_html`.
    """
    _check_schema(summary, "audit")
    verdict = str(summary.get("verdict"))
    if verdict not in _VERDICT_TEXT:
        raise ConfigError(f"unknown verdict {verdict!r}; expected one of {list(_VERDICT_TEXT)}")
    inflation = dict(summary.get("inflation") or {})
    if per_step is None:
        per_step = pd.DataFrame(summary.get("per_step") or [])
    if not isinstance(per_step, pd.DataFrame) or not isinstance(per_sample, pd.DataFrame):
        raise ConfigError("per_step and per_sample must be pandas DataFrames")
    steps = F.select_call(per_step) if len(per_step) else per_step
    call = str(steps["call"].iloc[0]) if "call" in steps.columns and len(steps) else None

    figures, unavailable = {}, {}

    def add(key, make, frame, needed, alt, **kw):
        miss = _missing(frame, needed)
        if miss or frame is None or len(frame) == 0:
            unavailable[key] = f"not available: the input lacks {', '.join(miss) or 'rows'}"
        else:
            figures[key] = _figure(make, frame, alt=alt, **kw)

    add("ratio", F.ratio_curve, per_step, ("t", "mean_ratio", "ci_low", "ci_high"),
        "Mean velocity-norm ratio of theta to the reference with its confidence band, against t")
    add("norms", F.norm_curves, per_step, ("t", "mean_norm_theta", "mean_norm_ref"),
        "Mean velocity norms of theta and of the reference against t")
    add("histogram", F.ratio_histogram, per_sample, ("mean_ratio",), "Histogram of the per-sample mean ratio")
    add("drift", F.cosine_and_radial, per_step, ("t", "mean_cos", "radial_share"),
        "Cosine between theta's and the reference's velocity, and the radial share of their difference, against t")
    grid = None
    if images:
        order = [k for k in _MODEL_ORDER if k in images] + [k for k in images if k not in _MODEL_ORDER]
        images = {k: images[k] for k in order}
        n = min(8, max(len(v) for v in images.values()))
        grid = _figure(F.image_grid, images, alt="Images: one row per model, one column per seed", max_images=8,
                       column_labels=_column_labels(per_sample, n))
        grid["models"] = [str(k) for k in images]

    step_table = _table(steps, [("step", "step"), ("t", "t"), ("mean_ratio", "mean ratio"), ("ci_low", "CI low"),
                                ("ci_high", "CI high"), ("mean_cos", "mean cos"), ("radial_share", "radial share"),
                                ("mean_norm_theta", "mean ||v_θ||"), ("mean_norm_ref", "mean ||v_ref||")])
    prompts = [str(p) for p in prompts] if prompts is not None else None
    conf = f"{_plain_percent(inflation.get('confidence'))} %"
    tol = f"{_plain_percent(inflation.get('tolerance'))} %"
    return _render(
        "audit.html.j2",
        title=f"ngdiag audit: {summary.get('checkpoint') or 'checkpoint'}",
        summary=summary,
        verdict=verdict,
        verdict_text=_VERDICT_TEXT[verdict].format(conf=conf, tol=tol),
        interval=format_interval(inflation),
        inflation=inflation,
        call=call,
        facts=[("checkpoint", _cell(summary.get("checkpoint"))), ("base", _cell(summary.get("base"))),
               ("family", _cell(summary.get("family"))), ("checkpoint kind", _cell(summary.get("checkpoint_kind"))),
               ("samples", _cell(summary.get("num_samples"))), ("steps", _cell(summary.get("num_steps"))),
               ("interval method", _cell(inflation.get("method")))],
        figures=figures,
        unavailable=unavailable,
        grid=grid,
        renorm=_renorm_block(summary["renorm"]) if summary.get("renorm") else None,
        spatial=_spatial_block(spatial, summary, images, per_sample),
        reward=_reward_table(summary["reward"]) if summary.get("reward") else None,
        quality=_quality_section(summary["quality"], spectrum) if summary.get("quality") else None,
        step_table=step_table,
        samples=_per_sample_block(per_sample) if "mean_ratio" in per_sample.columns else None,
        prompts=prompts,
        config_rows=_config_rows(summary.get("config") or {}, prompts is not None),
        versions=_versions_of(summary),
    )


# ----------------------------------------------------------------------------- attribution
def render_attribution_report(summary: Mapping, table: pd.DataFrame) -> str:
    """The per-layer attribution report: ranked table, bar chart with intervals, sums against the total.

    Args:
        summary: the attribution's ``summary.json`` (``AttributionResult.summary()``).
        table: ``AttributionResult.table`` (``group, loo_effect, loo_ci_low, loo_ci_high, loo_share`` and
            optionally the ``single_*`` columns), ranked.
    """
    _check_schema(summary, "attribution")
    if not isinstance(table, pd.DataFrame):
        raise ConfigError("table must be a pandas DataFrame")
    total = summary.get("total") or {}
    frame = table.copy()
    frame.attrs["total"] = total.get("log_ratio")
    figure = _figure(F.attribution_bars, frame, alt="Effect of each group on the mean log-ratio, with intervals")
    columns = [("rank", "rank"), ("group", "group"), ("loo_effect", "leave-one-out effect"), ("loo_ci_low", "CI low"),
               ("loo_ci_high", "CI high"), ("loo_share", "share of total"), ("single_effect", "single effect"),
               ("single_ci_low", "CI low"), ("single_ci_high", "CI high"), ("single_share", "share of total")]
    sums = [("total T (mean log-ratio)", _num(total.get("log_ratio"))),
            ("total inflation exp(T) − 1", format_percent(total.get("inflation"), 2, sign=True)),
            ("sum of leave-one-out effects", _num(summary.get("sum_loo_effects"))),
            ("interaction (total − sum, leave-one-out)", _num(summary.get("interaction_loo")))]
    if "sum_single_effects" in summary:
        sums += [("sum of single-group effects", _num(summary.get("sum_single_effects"))),
                 ("interaction (total − sum, single)", _num(summary.get("interaction_single")))]
    facts = [("checkpoint", _cell(summary.get("checkpoint"))), ("base", _cell(summary.get("base"))),
             ("family", _cell(summary.get("family"))), ("groups", f"{summary.get('num_groups')} by {summary.get('group_by')}"),
             ("switch", _cell(summary.get("switch"))), ("samples", _cell(summary.get("num_samples")))]
    return _render("attribution.html.j2", title=f"ngdiag attribution: {summary.get('checkpoint') or 'checkpoint'}",
                   summary=summary, facts=facts, bars=figure, sums=sums,
                   table=_table(frame.drop(columns=[c for c in ("modules",) if c in frame.columns]), columns),
                   config_rows=_config_rows(summary.get("config") or {}, False), versions=_versions_of(summary))


# ----------------------------------------------------------------------------- sensitivity
def _first_order_rows(block: Optional[Mapping], level: str) -> list:
    """Key numbers of ``first_order_reward_change``: the prediction and, from an audit, the measurement."""
    if not block:
        return []
    rows = [(f"first-order reward change of removing {format_percent(block.get('inflation'))} inflation "
             f"(ε = {_num(block.get('eps'))}, ε · dR/dε)",
             f"{_num(block.get('mean'))} ({level} interval {_num(block.get('ci_low'))} to {_num(block.get('ci_high'))})")]
    measured = block.get("measured_renorm_reward_change")
    if measured:
        note = "" if block.get("same_reward", True) else f"; the audit's reward is {block.get('audit_reward')}"
        rows.append((f"measured reward change, RL + renorm minus RL (audit {block.get('audit')})",
                     f"{_num(measured.get('mean'))} ± {_num(measured.get('std'))} (mean ± std over samples{note})"))
    return rows


def render_sensitivity_report(summary: Mapping, per_step: pd.DataFrame, long: pd.DataFrame) -> str:
    """The norm-scaling sensitivity report (paper eq. 4-5, Figure 4).

    Args:
        summary: the ``sensitivity.json`` document (``SensitivityRun.summary()``).
        per_step: one row per step: ``step, t, mean, std, nsr, stderr, frac_positive`` (and the interval
            of the mean, ``mean_ci_low, mean_ci_high``, when present).
        long: one row per step and sample: ``step, t, sample, S``.
    """
    _check_schema(summary, "sensitivity")
    if not isinstance(per_step, pd.DataFrame) or not isinstance(long, pd.DataFrame):
        raise ConfigError("per_step and long must be pandas DataFrames")
    figures = {
        "curves": _figure(F.sensitivity_curves, per_step,
                          alt="Mean sensitivity S(t) with a standard-error band, and its noise-to-signal ratio, against t"),
        "spread": _figure(F.sensitivity_spread, long, alt="Per-sample sensitivity S by step"),
    }
    dd = summary.get("directional_derivative") or {}
    confidence = (summary.get("intervals") or {}).get("confidence")
    level = format_percent(confidence, 0) if isinstance(confidence, (int, float)) else "bootstrap"
    facts = [("checkpoint", summary.get("checkpoint")), ("base", summary.get("base")), ("family", summary.get("family")),
             ("model", summary.get("model")), ("reward", summary.get("reward")), ("method", summary.get("method")),
             ("samples", summary.get("num_samples")), ("steps", summary.get("num_steps"))]
    key_numbers = [
        ("median NSR over steps", summary.get("nsr_median")),
        ("NSR range", f"{_num(summary.get('nsr_min'))} to {_num(summary.get('nsr_max'))}"
         if "nsr_min" in summary else None),
        ("share of steps with NSR > 3", format_percent(summary.get("fraction_of_steps_with_nsr_above_3"))
         if "fraction_of_steps_with_nsr_above_3" in summary else None),
        ("dR/dε (every step scaled by 1 + ε)", f"{_num(dd.get('mean'))} ± {_num(dd.get('std'))} (mean ± std over samples)"
         if dd else None),
        (f"dR/dε, {level} interval of the mean", f"{_num(dd.get('ci_low'))} to {_num(dd.get('ci_high'))}"
         if "ci_low" in dd else None),
        *_first_order_rows(summary.get("first_order_reward_change"), level),
        ("mean reward", summary.get("reward_mean")),
    ]
    columns = [("step", "step"), ("t", "t"), ("mean", "mean S")]
    if {"mean_ci_low", "mean_ci_high"} <= set(per_step.columns):
        columns += [("mean_ci_low", f"{level} CI low"), ("mean_ci_high", f"{level} CI high")]
    columns += [("std", "std"), ("stderr", "std. error"), ("nsr", "NSR"), ("frac_positive", "share S > 0")]
    step_table = _table(per_step.sort_values("step") if "step" in per_step.columns else per_step, columns)
    return _render(
        "sensitivity.html.j2",
        title=f"ngdiag sensitivity: {summary.get('checkpoint') or summary.get('model') or 'model'}",
        summary=summary,
        facts=[(k, _cell(v)) for k, v in facts if v is not None],
        key_numbers=[(k, _cell(v)) for k, v in key_numbers if v is not None],
        figures=figures,
        step_table=step_table,
        config_rows=_config_rows(summary.get("config") or {}, False),
        versions=_versions_of(summary),
    )


# ----------------------------------------------------------------------------- comparison of runs
def _compare_conclusion(inflation: Sequence[Mapping]) -> list:
    """One sentence per step count at which exactly two runs have an inflation: which run inflated
    more, by how many percentage points, both intervals, and whether the intervals overlap.

    ``inflation``: ``[{"name", "steps", "value", "ci_low", "ci_high"}]`` with fractions, and
    optionally ``"confidence"``.
    """
    by_steps: dict = {}
    for row in inflation:
        if _finite(row.get("value")) is not None:
            by_steps.setdefault(row.get("steps"), []).append(row)
    sentences = []
    for steps, rows in by_steps.items():
        if len(rows) != 2:
            continue
        hi, lo = sorted(rows, key=lambda r: float(r["value"]), reverse=True)

        def interval(r):
            return (f"{format_percent(r['value'], sign=True)} [{format_percent(r.get('ci_low'))}, "
                    f"{format_percent(r.get('ci_high'))}]")

        at = f"At {_num(steps)} sampling steps, " if steps is not None else ""
        conf = _finite(rows[0].get("confidence"))
        level = f" ({_plain_percent(conf)} % intervals)" if conf is not None else ""
        diff = float(hi["value"]) - float(lo["value"])
        if diff == 0:
            sentences.append(f"{at}{hi['name']} and {lo['name']} inflated equally: {interval(hi)} and {interval(lo)}{level}.")
            continue
        bounds = [_finite(r.get(k)) for r in (hi, lo) for k in ("ci_low", "ci_high")]
        if None in bounds:
            overlap = "."
        elif bounds[0] > bounds[3]:
            overlap = "; the intervals do not overlap."
        else:
            overlap = "; the intervals overlap, so these samples do not separate the two runs."
        sentences.append(f"{at}{hi['name']} inflated more than {lo['name']}, by {diff * 100:.1f} percentage points: "
                         f"{interval(hi)} against {interval(lo)}{level}{overlap}")
    return sentences


def _rows_table(rows) -> dict:
    """A table from a list of row dicts (columns in order of first appearance; cells formatted)."""
    rows = [dict(r) for r in (rows or [])]
    headers = list(dict.fromkeys(k for r in rows for k in r))
    numeric = [all(isinstance(r.get(h), (int, float, np.number)) and not isinstance(r.get(h), bool)
                   for r in rows if r.get(h) is not None) for h in headers]
    return {"headers": headers, "numeric": numeric, "rows": [[_cell(r.get(h)) if h in r else "" for h in headers] for r in rows]}


def render_compare_report(context: Mapping) -> str:
    """A comparison of training runs (e.g. without and with NormGuard).

    Args:
        context: a dict with (all optional but ``runs``):

            - ``runs``: ``[{"name": str, "metrics": DataFrame}]``, metrics with ``iteration,
              reward_mean`` and optionally ``reward_std, inflation`` (a fraction);
            - ``table``: rows (dicts) of the summary table (e.g. reward and inflation per run and
              step count, the paper's Table 3); columns in order of first appearance;
            - ``paired``: rows (dicts) of the paired differences against the baseline;
            - ``layout``: ``{"kind": "curve" | "grid", "keys": [setting, ...], "frame": DataFrame}``: the
              runs' inflation (and ``reward_delta``) against one setting, or over two
              (:func:`ngdiag.report.figures.setting_curve` / :func:`~ngdiag.report.figures.setting_grid`);
            - ``ratio_curves``: name -> per-step frame (as for the audit) of each final checkpoint;
            - ``images``: label -> ``(N, 3, H, W)`` in ``[0, 1]``, one grid row per label;
            - ``inflation``: ``[{"name", "steps", "value", "ci_low", "ci_high"}]`` (fractions,
              optionally ``confidence``): the final inflation of each run at each step count, from
              which the report's conclusion is written (which run inflated more, by how much);
            - ``title``, ``notes`` (list of str), ``config`` (dict), ``versions`` (dict).
    """
    if not isinstance(context, Mapping):
        raise ConfigError(f"the compare context must be a dict, got {type(context).__name__}")
    runs = list(context.get("runs") or [])
    if not runs:
        raise ConfigError("the compare report needs at least one run in context['runs']")
    names = [str(r.get("name", f"run {i}")) for i, r in enumerate(runs)]
    figures = {"training": _figure(F.run_curves, [r["metrics"] for r in runs], names,
                                   alt="Reward and inflation against training iteration, one colour per run")}
    if context.get("ratio_curves"):
        figures["ratio"] = _figure(F.ratio_curves, dict(context["ratio_curves"]),
                                   alt="Velocity-norm ratio against t for each run's final checkpoint")
    if context.get("images"):
        figures["images"] = _figure(F.image_grid, dict(context["images"]), alt="Images, one row per label")
    layout = context.get("layout")
    if layout:
        keys = list(layout["keys"])
        if layout["kind"] == "curve":
            figures["layout"] = _figure(F.setting_curve, layout["frame"], keys[0],
                                        alt=f"Inflation and reward against {keys[0]}")
        else:
            figures["layout"] = _figure(F.setting_grid, layout["frame"], keys[0], keys[1],
                                        alt=f"Inflation and reward over {keys[0]} x {keys[1]}")
    table = _rows_table(context.get("table"))
    paired = _rows_table(context.get("paired"))
    return _render(
        "compare.html.j2",
        title=str(context.get("title") or "ngdiag: comparison of training runs"),
        runs=[{"name": n, "color": F.RUN_COLORS[i % len(F.RUN_COLORS)],
               "iterations": int(len(r["metrics"]))} for i, (n, r) in enumerate(zip(names, runs))],
        figures=figures,
        table=table,
        paired=paired,
        layout={"kind": layout["kind"], "keys": list(layout["keys"]), "steps": layout.get("steps")} if layout else None,
        notes=[str(n) for n in (context.get("notes") or [])],
        conclusion=_compare_conclusion(list(context.get("inflation") or [])),
        config_rows=_flatten(context.get("config") or {}),
        versions=[(k, _cell(v)) for k, v in (context.get("versions") or {}).items()],
    )


# ----------------------------------------------------------------------------- writing
def render_demo_page(title: str, sections: Sequence[Mapping], *, kicker: str = "ngdiag demo", lead: str = "",
                     versions: Optional[Mapping] = None) -> str:
    """A self-contained page of ``sections``: each a mapping with ``id``, ``title`` and optional ``verdict``
    (one line), ``paragraphs`` (text), ``links`` (``href``, ``text``, ``note``), ``tables`` (as
    :func:`table_of` builds them, with an optional ``caption``) and ``figures`` (``src``, ``alt``,
    ``caption``)."""
    full = [{"verdict": None, "paragraphs": [], "links": [], "tables": [], "figures": [], **s} for s in sections]
    return _render("demo.html.j2", title=title, kicker=kicker, lead=lead, sections=full,
                   versions=sorted((versions or {}).items()))


def table_of(frame: pd.DataFrame, columns: Optional[Sequence[tuple]] = None, caption: str = "") -> dict:
    """A table for :func:`render_demo_page` from ``frame`` (``columns``: ``(column, header)``, default all)."""
    table = _table(frame, columns or [(c, c) for c in frame.columns])
    table["caption"] = caption
    return table


def figure_block(fig, *, alt: str, caption: str = "") -> dict:
    """A figure for :func:`render_demo_page` (the matplotlib figure is encoded and released)."""
    return {"src": figure_to_data_uri(fig), "alt": alt, "caption": caption}


def write_html(html: str, path) -> Path:
    """Write ``html`` to ``path`` atomically (:func:`ngdiag.core.io.atomic_write_text`: a temporary file
    in the same folder, flushed to disk, then renamed over ``path``). A failure at any point leaves an
    existing ``path`` untouched and no temporary file behind. Returns the path."""
    if not isinstance(html, str):
        raise ConfigError(f"write_html needs the HTML text (str), got {type(html).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, html)
