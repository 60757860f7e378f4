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
