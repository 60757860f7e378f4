"""Reports: figures (:mod:`ngdiag.report.figures`) and self-contained HTML (:mod:`ngdiag.report.html`).

Rendering only: every function takes plain data (summary dicts, pandas frames, image arrays), so a
report can be rebuilt from a run's saved ``summary.json`` and CSV/parquet files without rerunning it.
Imported lazily, so that ``import ngdiag.report`` does not import matplotlib or jinja2.
"""

_LAZY = {
    "render_audit_report": "ngdiag.report.html",
    "render_sensitivity_report": "ngdiag.report.html",
    "render_compare_report": "ngdiag.report.html",
    "write_html": "ngdiag.report.html",
    "figure_to_data_uri": "ngdiag.report.html",
    "format_interval": "ngdiag.report.html",
    "THETA_COLOR": "ngdiag.report.figures",
    "REF_COLOR": "ngdiag.report.figures",
    "RENORM_COLOR": "ngdiag.report.figures",
    "RUN_COLORS": "ngdiag.report.figures",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ngdiag.report' has no attribute {name!r}")
