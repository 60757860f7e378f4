"""Reward-adjoint sensitivity of a flow-matching sampler to its velocity's magnitude (paper eq. 4-5).

:func:`norm_sensitivity` returns a :class:`SensitivityResult` with ``S[k, i] = a_{k+1} . d_k``
per step and sample; see ``docs/sensitivity.md``. The names are imported lazily, so that the
torch-free :mod:`ngdiag.rewards.specs` (the reward spec registry) stays cheap to import.
"""

from ngdiag.core.lazy import lazy_attributes

_LAZY = {
    "norm_sensitivity": "ngdiag.sensitivity.adjoint",
    "ADAPTIVE_SOLVERS": "ngdiag.sensitivity.adjoint",
    "FIXED_GRID_SOLVERS": "ngdiag.sensitivity.adjoint",
    "SensitivityResult": "ngdiag.sensitivity.result",
    "FirstOrderRewardChange": "ngdiag.sensitivity.result",
    "removal_eps": "ngdiag.sensitivity.result",
}

__all__ = ["norm_sensitivity", "SensitivityResult", "FirstOrderRewardChange", "removal_eps", "FIXED_GRID_SOLVERS",
           "ADAPTIVE_SOLVERS"]


__getattr__ = lazy_attributes(__name__, _LAZY)
