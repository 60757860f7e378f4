"""Reward-adjoint sensitivity of a flow-matching sampler to its velocity's magnitude (paper eq. 4-5).

:func:`norm_sensitivity` returns a :class:`SensitivityResult` with ``S[k, i] = a_{k+1} . d_k``
per step and sample; see ``docs/sensitivity.md``.
"""

from ngdiag.sensitivity.adjoint import ADAPTIVE_SOLVERS, FIXED_GRID_SOLVERS, norm_sensitivity
from ngdiag.sensitivity.result import SensitivityResult

__all__ = ["norm_sensitivity", "SensitivityResult", "FIXED_GRID_SOLVERS", "ADAPTIVE_SOLVERS"]
