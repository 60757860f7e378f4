"""Reports: figures (:mod:`ngdiag.report.figures`) and self-contained HTML (:mod:`ngdiag.report.html`).

Rendering only: every function takes plain data (summary dicts, pandas frames, image arrays), so a
report can be rebuilt from a run's saved ``summary.json`` and CSV/parquet files without rerunning it.
Imported lazily, so that ``import ngdiag.report`` does not import matplotlib or jinja2.
"""

from ngdiag.core.lazy import lazy_attributes

_LAZY = {
    **dict.fromkeys(
        ("render_audit_report", "render_sensitivity_report", "render_compare_report", "render_attribution_report",
         "write_html", "figure_to_data_uri",
         "format_interval"),
        "ngdiag.report.html",
    ),
    **dict.fromkeys(("THETA_COLOR", "REF_COLOR", "RENORM_COLOR", "RUN_COLORS"), "ngdiag.report.figures"),
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
