"""The versions a result was computed with, recorded in every summary (``versions``)."""

from __future__ import annotations

import platform

__all__ = ["versions"]


def versions() -> dict:
    """``{"ngdiag", "torch", "diffusers", "transformers", "peft", "scipy", "python"}``: version strings."""
    import diffusers
    import peft
    import scipy
    import torch
    import transformers

    import ngdiag

    return {
        "ngdiag": ngdiag.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }
