"""Evaluate theta and ref at the same ``(x_t, t, c)`` while sampling, and intervene.

:class:`PairedVelocity` is a step velocity for :func:`ngdiag.sampling.sample`: at every step it
evaluates the audited model and the reference on the same state, records their norms, cosines
and drift split for the guided and the conditional velocity, and returns the velocity to step
with:

- ``trajectory="theta"`` (default): theta's guided velocity (what users of the fine-tune get);
- ``trajectory="ref"``: the reference's guided velocity (the base model's own trajectory);
- ``renorm="rl"``: theta rescaled to the reference norm (paper eq. 3), on the guided velocity
  by default or on the conditional and unconditional outputs before guidance
  (``renorm_on="cond"``, then the pipeline's own guidance, Qwen-Image's per-token rescale included);
- ``renorm="cfg"``: theta's guided velocity rescaled to the norm of its conditional output
  (paper eq. 2, the CFG-renormalization trick).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ngdiag.errors import ConfigError, NumericalError
from ngdiag.probes.metrics import compare_velocities
from ngdiag.probes.records import CALLS, StepRecorder
from ngdiag.probes.renorm import cfg_renorm, rl_renorm
from ngdiag.sampling import GuidedVelocity, VelocityEval, apply_guidance

__all__ = ["PairedVelocity", "check_velocity_finite", "RenormVelocity"]

TRAJECTORIES = ("theta", "ref")
RENORMS = (None, "rl", "cfg")


def check_velocity_finite(v: torch.Tensor, *, who: str, step: int, t: float, sample_ids: Sequence[int]) -> None:
    """Raise :class:`NumericalError` naming the step and the global sample ids with non-finite values."""
    bad = ~torch.isfinite(v.detach().reshape(v.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        ids = [int(sample_ids[i]) for i in torch.nonzero(bad).flatten().tolist()]
        raise NumericalError(f"{who}'s velocity is not finite at step {step} (t={t:.4f}) for samples {ids}")


def _renorm_cond_then_guide(theta: VelocityEval, ref: VelocityEval, guided: GuidedVelocity, step: int) -> torch.Tensor:
    """Eq. 3 on the conditional and the unconditional call, then the pipeline's own guidance (rescale included)."""
    cond = rl_renorm(theta.cond, ref.cond, step=step)
    if theta.uncond is None:
        return cond
    uncond = rl_renorm(theta.uncond, ref.uncond, step=step)
    return apply_guidance(cond, uncond, guided.guidance_scale, guided.rescale)


class PairedVelocity:
    """Step velocity that evaluates theta and ref together and records their comparison.

    Args:
        theta, ref: :class:`GuidedVelocity` of the audited and reference models with the same
            conditioning.
        sigmas: the schedule, ``(K + 1,)``.
        sample_ids: global ids of the batch's samples (for records and error messages).
        trajectory: ``"theta"`` or ``"ref"``: whose guided velocity the sampler applies.
        renorm: ``None``, ``"rl"`` (eq. 3) or ``"cfg"`` (eq. 2); only with ``trajectory="theta"``.
        renorm_on: ``"guided"`` (default) or ``"cond"`` for ``renorm="rl"``.
        record: keep a :class:`StepRecorder` (``self.recorder``).
        fused: for a LoRA pair (``ref`` is theta's module with the adapter off), a
            :class:`FusedLoraPair` that evaluates both in one mixed-adapter forward instead.
    """

    def __init__(
        self,
        theta: GuidedVelocity,
        ref: GuidedVelocity,
        sigmas: torch.Tensor,
        sample_ids: Sequence[int],
        *,
        trajectory: str = "theta",
        renorm: Optional[str] = None,
        renorm_on: str = "guided",
        record: bool = True,
        fused: Optional["FusedLoraPair"] = None,
    ):
        if trajectory not in TRAJECTORIES:
            raise ConfigError(f"trajectory must be 'theta' or 'ref', got {trajectory!r}")
        if renorm not in RENORMS:
            raise ConfigError(f"renorm must be 'rl', 'cfg' or None, got {renorm!r}")
        if renorm is not None and trajectory != "theta":
            raise ConfigError("renormalization applies to theta's trajectory only")
        if renorm_on not in ("guided", "cond"):
            raise ConfigError(f"renorm_on must be 'guided' or 'cond', got {renorm_on!r}")
        self.theta, self.ref = theta, ref
        self.sigmas = sigmas
        self.sample_ids = list(sample_ids)
        self.trajectory, self.renorm, self.renorm_on = trajectory, renorm, renorm_on
        self.recorder = StepRecorder(self.sample_ids, CALLS) if record else None
        self.fused = fused
        self._step = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> VelocityEval:
        k = self._step
        tk, tn = float(self.sigmas[k]), float(self.sigmas[k + 1])
        if self.fused is not None:
            ev_theta, ev_ref = self.fused(x, t)
        else:
            ev_theta, ev_ref = self.theta(x, t), None
        check_velocity_finite(ev_theta.guided, who="theta", step=k, t=tk, sample_ids=self.sample_ids)
        if ev_ref is None:
            ev_ref = self.ref(x, t)
        check_velocity_finite(ev_ref.guided, who="ref", step=k, t=tk, sample_ids=self.sample_ids)
        if self.recorder is not None:
            comparisons = {
                "guided": compare_velocities(ev_theta.guided, ev_ref.guided, step=k),
                "cond": compare_velocities(ev_theta.cond, ev_ref.cond, step=k),
            }
            self.recorder.add(tk, tn, comparisons)
        if self.trajectory == "ref":
            applied = ev_ref.guided
        elif self.renorm == "rl":
            applied = (
                rl_renorm(ev_theta.guided, ev_ref.guided, step=k)
                if self.renorm_on == "guided"
                else _renorm_cond_then_guide(ev_theta, ev_ref, self.theta, k)
            )
        elif self.renorm == "cfg":
            applied = cfg_renorm(ev_theta.guided, ev_theta.cond, step=k)
        else:
            applied = ev_theta.guided
        self._step += 1
        return VelocityEval(
            cond=ev_theta.cond, guided=ev_theta.guided, uncond=ev_theta.uncond, applied=applied,
            extras={"ref": ev_ref},
        )


class FusedLoraPair:
    """Theta and ref of a LoRA checkpoint in one forward on the doubled batch ``[x; x]``.

    The first half of the batch runs with the adapter, the second with it switched off
    (peft's mixed-adapter batches: LoRA layers and ``modules_to_save`` copies alike); the guided
    velocities are then split. Numerically this equals two separate passes up to float rounding of
    the larger batched matmuls. Checkpoints peft cannot mix (DoRA layers, ``modules_to_save`` copies
    of modules other than linear, embedding or convolution layers) raise :class:`ConfigError`.
    """

    def __init__(self, conditioning, velocity_module, adapter_name: str):
        from ngdiag.models.loading import mixed_adapter_batch, mixed_batch_problem

        problem = mixed_batch_problem(velocity_module)
        if problem is not None:
            raise ConfigError(f"theta and ref cannot share one mixed-adapter forward: {problem}; use fuse_lora=False")
        self._mixed = mixed_adapter_batch
        self.module = velocity_module
        self.guided = conditioning.repeat(2).guided(velocity_module)
        self.adapter_name = adapter_name

    def __call__(self, x, t):
        n = x.shape[0]
        pattern = [self.adapter_name] * n + ["__base__"] * n
        with self._mixed(self.module, pattern):
            ev = self.guided(torch.cat([x, x]), torch.cat([t, t]))
        split = lambda v: (None, None) if v is None else v.chunk(2)  # noqa: E731
        (tc, rc), (tg, rg), (tu, ru) = split(ev.cond), split(ev.guided), split(ev.uncond)
        return VelocityEval(cond=tc, guided=tg, uncond=tu), VelocityEval(cond=rc, guided=rg, uncond=ru)


class RenormVelocity:
    """Theta with the CFG renormalization only (eq. 2): needs no reference evaluation."""

    def __init__(self, theta: GuidedVelocity):
        self.theta = theta
        self._step = 0

    def __call__(self, x, t):
        ev = self.theta(x, t)
        ev.applied = cfg_renorm(ev.guided, ev.cond, step=self._step)
        self._step += 1
        return ev

