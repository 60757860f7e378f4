"""Evaluate theta and ref at the same ``(x_t, t, c)`` while sampling, and record their comparison.

The pieces plug into :func:`ngdiag.core.sampling.sample`, which owns the loop and the step index:

- :class:`PairedVelocity` is the step velocity: at every state it evaluates the audited model and
  the reference and returns theta's :class:`~ngdiag.core.sampling.VelocityEval` with the reference's in
  ``extras["ref"]``. The sampler steps with theta's guided velocity (``trajectory="theta"``, what
  users of the fine-tune get) or the reference's (``trajectory="ref"``, the base model's own
  trajectory). It holds no state: one instance serves any number of runs.
- :class:`PairRecorder` is the step callback: it checks that both velocities are finite and
  records their norms, cosines and drift split for the guided and the conditional velocity into a
  :class:`~ngdiag.probes.records.NormRecord`.
- Renormalization is an intervention (:mod:`ngdiag.probes.renorm`).

Example:
    >>> recorder = PairRecorder(sample_ids)                                     # doctest: +SKIP
    >>> sample(PairedVelocity(theta, ref), x_init, sigmas, callback=recorder)   # doctest: +SKIP
    >>> recorder.record().ratio                                                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ngdiag.core.tensors import check_finite
from ngdiag.core.errors import ConfigError
from ngdiag.probes.metrics import compare_velocities
from ngdiag.probes.records import CALLS, NormRecord, StepRecorder
from ngdiag.core.sampling import StepRecord, VelocityEval

__all__ = ["PairedVelocity", "PairRecorder", "check_pair_finite", "compare_pair", "TRAJECTORIES"]

TRAJECTORIES = ("theta", "ref")


class PairedVelocity:
    """Step velocity that evaluates theta and ref at the same state.

    Args:
        theta, ref: step velocities ``(x, t) -> VelocityEval`` of the audited and the reference
            model with the same conditioning (:class:`~ngdiag.core.sampling.GuidedVelocity`).
        trajectory: ``"theta"`` or ``"ref"``: whose guided velocity the sampler applies.
        fused: for a LoRA pair (``ref`` is theta's module with the adapter off), a
            :class:`~ngdiag.models.pair.FusedLoraPair` that evaluates both in one mixed-adapter
            forward instead of ``theta`` and ``ref``.

    Calling it returns theta's :class:`~ngdiag.core.sampling.VelocityEval` (``cond``, ``guided``,
    ``uncond``) with ``extras["ref"]`` the reference's, and ``applied`` the reference's guided
    velocity when ``trajectory="ref"``.
    """

    def __init__(
        self,
        theta: Callable[[torch.Tensor, torch.Tensor], VelocityEval],
        ref: Callable[[torch.Tensor, torch.Tensor], VelocityEval],
        *,
        trajectory: str = "theta",
        fused: Optional[Callable[[torch.Tensor, torch.Tensor], tuple]] = None,
    ):
        if trajectory not in TRAJECTORIES:
            raise ConfigError(f"trajectory must be 'theta' or 'ref', got {trajectory!r}")
        self.theta, self.ref = theta, ref
        self.trajectory = trajectory
        self.fused = fused

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> VelocityEval:
        if self.fused is not None:
            ev_theta, ev_ref = self.fused(x, t)
        else:
            ev_theta, ev_ref = self.theta(x, t), self.ref(x, t)
        return VelocityEval(
            cond=ev_theta.cond, guided=ev_theta.guided, uncond=ev_theta.uncond,
            applied=ev_ref.guided if self.trajectory == "ref" else None, extras={"ref": ev_ref},
        )


def check_pair_finite(ev: VelocityEval, *, step: int, t: Union[float, torch.Tensor], sample_ids: Optional[Sequence[int]] = None) -> None:
    """Raise :class:`~ngdiag.core.errors.NumericalError` when theta's or (if present) ref's guided velocity is not finite.

    The message names the step, its time and the global sample ids, e.g.
    ``"ref's velocity is not finite at step 3 (t=0.6000) for samples [4, 5]"``.
    """
    named = [("theta", ev)] + ([("ref", ev.extras["ref"])] if "ref" in ev.extras else [])
    for who, velocity in named:
        check_finite(velocity.guided, lambda who=who: f"{who}'s velocity is not finite at step {step} (t={float(t):.4f})",
                     sample_ids=sample_ids)


def compare_pair(theta: VelocityEval, ref: VelocityEval, *, step: int) -> dict:
    """Theta against ref for each recorded call: ``{"guided": VelocityComparison, "cond": ...}``."""
    return {
        "guided": compare_velocities(theta.guided, ref.guided, step=step),
        "cond": compare_velocities(theta.cond, ref.cond, step=step),
    }


class PairRecorder:
    """Step callback for :func:`ngdiag.core.sampling.sample` with a :class:`PairedVelocity`: records theta against ref.

    At every step it checks both guided velocities (:func:`check_pair_finite`) and adds the
    comparison of theta's and ref's guided and conditional velocities at the step's state.

    Args:
        sample_ids: global ids of the batch's samples (for the record and error messages).
    """

    def __init__(self, sample_ids: Sequence[int]):
        self.sample_ids = list(sample_ids)
        self._recorder = StepRecorder(self.sample_ids, CALLS)

    def __call__(self, step: StepRecord) -> None:
        check_pair_finite(step.velocity, step=step.step, t=step.t, sample_ids=self.sample_ids)
        self._recorder.add(step.t, step.t_next, compare_pair(step.velocity, step.velocity.extras["ref"], step=step.step))

    def record(self) -> NormRecord:
        """The :class:`~ngdiag.probes.records.NormRecord` of the steps so far."""
        return self._recorder.record()
