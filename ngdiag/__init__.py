"""ngdiag: diagnostics for RL post-trained flow-matching models.

The public API: the workflows, their configs and their results, and the few pieces a user calls
around them (imported lazily, so that ``import ngdiag`` stays cheap; docs/architecture.md draws the
layers behind them):

- :func:`load_checkpoint` / :class:`Checkpoint`: a local checkpoint as a (theta, ref) pair;
- :func:`run_audit` (:class:`AuditConfig` -> :class:`AuditResult`), :func:`merge_audits`: the
  norm-inflation audit with its verdict;
- :func:`run_sensitivity` (:class:`SensitivityConfig` -> :class:`SensitivityRun`),
  :func:`merge_sensitivity`, and :func:`norm_sensitivity` (-> :class:`SensitivityResult`) for any
  velocity model: the reward-adjoint norm-scaling sensitivity S(t);
- :func:`run_attribution` (:class:`AttributionConfig` -> :class:`AttributionResult`),
  :func:`merge_attributions`: which LoRA modules or blocks the inflation comes from;
- :func:`run_training` (:class:`TrainConfig` -> :class:`TrainResult`; it is
  :func:`ngdiag.train.train`, named apart from the ``ngdiag.train`` package) and :func:`compare_runs`
  (-> :class:`CompareResult`): NormGuard training and the comparison of training runs;
- :func:`probe`: record ``||v_theta|| / ||v_ref||`` during a live diffusers pipeline call;
- :func:`sample` and :class:`SamplingConfig`: Euler sampling exactly as diffusers does it;
- :func:`load_reward` and :func:`normguard_penalty`.
"""

from typing import TYPE_CHECKING

from ngdiag.core.lazy import lazy_attributes

__version__ = "0.1.0"

#: public name -> "module" (the same name there) or "module:name"
_LAZY = {
    "load_checkpoint": "ngdiag.models.loading",
    "Checkpoint": "ngdiag.models.loading",
    "run_audit": "ngdiag.workflows.audit",
    "merge_audits": "ngdiag.workflows.audit",
    "AuditConfig": "ngdiag.workflows.audit",
    "AuditResult": "ngdiag.workflows.audit",
    "run_sensitivity": "ngdiag.workflows.sensitivity",
    "merge_sensitivity": "ngdiag.workflows.sensitivity",
    "SensitivityConfig": "ngdiag.workflows.sensitivity",
    "SensitivityRun": "ngdiag.workflows.sensitivity",
    "run_attribution": "ngdiag.workflows.attribution",
    "merge_attributions": "ngdiag.workflows.attribution",
    "AttributionConfig": "ngdiag.workflows.attribution",
    "AttributionResult": "ngdiag.workflows.attribution",
    "norm_sensitivity": "ngdiag.sensitivity.adjoint",
    "SensitivityResult": "ngdiag.sensitivity.result",
    "run_training": "ngdiag.train.trainer:train",
    "TrainConfig": "ngdiag.train.config",
    "TrainResult": "ngdiag.train.trainer",
    "compare_runs": "ngdiag.workflows.compare",
    "CompareResult": "ngdiag.workflows.compare",
    "probe": "ngdiag.probes.live",
    "sample": "ngdiag.core.sampling",
    "SamplingConfig": "ngdiag.models.generation",
    "load_reward": "ngdiag.rewards.scorers",
    "normguard_penalty": "ngdiag.train.losses",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from ngdiag.core.sampling import sample
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import Checkpoint, load_checkpoint
    from ngdiag.probes.live import probe
    from ngdiag.rewards.scorers import load_reward
    from ngdiag.sensitivity.adjoint import norm_sensitivity
    from ngdiag.sensitivity.result import SensitivityResult
    from ngdiag.train.config import TrainConfig
    from ngdiag.train.losses import normguard_penalty
    from ngdiag.train.trainer import TrainResult
    from ngdiag.train.trainer import train as run_training
    from ngdiag.workflows.attribution import AttributionConfig, AttributionResult, merge_attributions, run_attribution
    from ngdiag.workflows.audit import AuditConfig, AuditResult, merge_audits, run_audit
    from ngdiag.workflows.compare import CompareResult, compare_runs
    from ngdiag.workflows.sensitivity import SensitivityConfig, SensitivityRun, merge_sensitivity, run_sensitivity

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__():
    return sorted(__all__)
