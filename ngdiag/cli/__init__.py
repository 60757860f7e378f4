"""Presentation: the ``ngdiag`` command line (``app.py``), its shared helpers (``common.py``) and one
module per command group. Start-up imports neither torch nor diffusers."""

from ngdiag.cli.app import app, main, quiet_third_party

__all__ = ["app", "main", "quiet_third_party"]
