"""ngdiag: diagnostics for RL post-trained flow-matching models.

The public entry points (imported lazily so that ``import ngdiag`` stays cheap):

- :func:`load_checkpoint`: a local checkpoint as a (theta, ref) pair of velocity models;
- :func:`sample` and :class:`SamplingConfig`: Euler sampling exactly as diffusers does it;
- :func:`probe`: record ``||v_theta|| / ||v_ref||`` during a live diffusers pipeline call;
- :func:`run_audit` and :class:`AuditConfig`: the norm-inflation audit with its verdict;
- :func:`norm_sensitivity`: the reward-adjoint norm-scaling sensitivity S(t);
- :func:`normguard_penalty`: the NormGuard training penalty.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_checkpoint": "ngdiag.models.loading",
    "Checkpoint": "ngdiag.models.loading",
    "sample": "ngdiag.sampling",
    "GuidedVelocity": "ngdiag.sampling",
    "SamplingConfig": "ngdiag.generation",
    "generate": "ngdiag.generation",
    "probe": "ngdiag.probes.live",
    "NormRecord": "ngdiag.probes.records",
    "compare_velocities": "ngdiag.probes.metrics",
    "rl_renorm": "ngdiag.probes.renorm",
    "cfg_renorm": "ngdiag.probes.renorm",
    "inflation_summary": "ngdiag.stats",
    "run_audit": "ngdiag.audit",
    "merge_audits": "ngdiag.audit",
    "AuditConfig": "ngdiag.audit",
    "norm_sensitivity": "ngdiag.sensitivity",
    "load_reward": "ngdiag.sensitivity.rewards",
    "normguard_penalty": "ngdiag.train.losses",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ngdiag' has no attribute {name!r}")
