"""Lazy exports: a package names its public objects, and their module is imported on first use.

So that ``import ngdiag`` (and ``ngdiag --help``) does not import torch, diffusers or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``.

    ``names`` maps each public name to ``"module"`` (the object of the same name there) or to
    ``"module:name"``; any other name raises :class:`AttributeError` as Python would.
    """

    def __getattr__(name: str):
        if name in names:
            module, _, attribute = names[name].partition(":")
            return getattr(importlib.import_module(module), attribute or name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
