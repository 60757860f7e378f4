"""Shared test helpers: running the CLI in-process and tiny sampling settings."""

from __future__ import annotations

import contextlib
import io

from ngdiag.cli import main

FAST = {"sd3": dict(num_steps=3), "flux": dict(num_steps=3), "flux2-klein": dict(num_steps=3)}


def run_cli(*args):
    """Run ``ngdiag ARGS`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()
