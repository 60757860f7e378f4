"""Errors ngdiag raises for bad input.

Every error the CLI turns into a one-line message and exit code 2 derives from
:class:`NgdiagError`. Library code raises them with a short, complete sentence;
the CLI prints ``error: <message>`` and exits with ``exit_code``.
"""

from __future__ import annotations


class NgdiagError(Exception):
    """Base class of ngdiag's user-facing errors (bad input, unusable checkpoint...)."""

    exit_code: int = 2


class CheckpointError(NgdiagError):
    """A checkpoint path that cannot be loaded: missing, unknown format, corrupted, incompatible."""


class ConfigError(NgdiagError):
    """An invalid configuration value, option combination or spec string."""


class NumericalError(NgdiagError):
    """A zero or non-finite norm, velocity or gradient, reported with the step and the samples."""


def sample_list(bad, limit: int = 10) -> str:
    """The indices of the true entries of a 1-D mask as ``[0, 2]``, cut after ``limit``.

    Longer lists read ``[0, 1, ..., 9, ...] (24 in all)``. ``bad`` is a bool tensor or array.
    """
    import numpy as np

    mask = bad.detach().cpu().numpy() if hasattr(bad, "detach") else np.asarray(bad)
    idx = np.flatnonzero(mask).tolist()
    if len(idx) <= limit:
        return str(idx)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"[{shown}, ...] ({len(idx)} in all)"
