"""Probe a live diffusers pipeline call: ``with ngdiag.probe(pipe, ref=...) as rec: pipe(...)``.

The probe hooks two places and removes both hooks when the block exits (also on error):

- a forward hook on ``pipe.transformer``: after each transformer call it evaluates the reference
  on the same inputs (``ref`` a transformer, or ``None`` for a LoRA pipeline: the same transformer
  with its adapters switched off, ``modules_to_save`` copies included);
- a wrapper around ``pipe.scheduler.step``: there the calls of the step are combined into the
  conditional and guided velocities of theta and ref, checked and recorded as the sampler's
  :class:`~ngdiag.probes.paired.PairRecorder` does, and, if asked, the guided velocity is
  renormalized by the sampler's own intervention (:mod:`ngdiag.probes.renorm`) before the
  scheduler applies it.

The guidance combination is recovered from the calls themselves: one call on a doubled batch
is ``[uncond; cond]`` (SD3), two calls are ``cond`` then ``uncond`` (FLUX.2, FLUX.1 true CFG,
Qwen-Image), one call is ``cond`` alone. The scale ``w`` is solved from the scheduler's input and
checked, also with Qwen-Image's per-token rescale of the guided velocity; the probe refuses
pipelines whose guided velocity is neither.

It also records where the ratio sits on the latent grid (:mod:`ngdiag.probes.spatial`): the image
size is read from the transformer's inputs (FLUX's position ids, Qwen-Image's ``img_shapes``) and the
packed tokens are unpacked by the family adapter; :meth:`LiveProbe.spatial` returns the maps.

Without an intervention the probe only reads: the pipeline's images are bit-identical.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.models.families import adapter_for
from ngdiag.models.pair import adapter_layers, adapters_disabled
from ngdiag.probes.paired import check_pair_finite, compare_pair
from ngdiag.probes.records import CALLS, NormRecord, StepRecorder
from ngdiag.probes.renorm import cfg_renorm_intervention, rl_renorm_intervention
from ngdiag.probes.spatial import SpatialMaps, SpatialRecorder
from ngdiag.core.sampling import VelocityEval, apply_guidance

__all__ = ["probe", "LiveProbe"]


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


class LiveProbe:
    """What ``probe`` yields: call :meth:`record` (or read :attr:`records`) after the pipeline call."""

    def __init__(self, pipe, ref=None, *, renorm: Optional[str] = None, rtol: float = 1e-4):
        if renorm not in (None, "rl", "cfg"):
            raise ConfigError(f"renorm must be 'rl', 'cfg' or None, got {renorm!r}")
        self.pipe = pipe
        self.ref = ref
        self.renorm = renorm
        self.rtol = rtol
        self.records: list[NormRecord] = []
        self._calls: list = []
        self._inside = False
        self._recorder: Optional[StepRecorder] = None
        self._intervene = None
        self._offset = 0
        self._batch = None
        self._spatial: Optional[SpatialRecorder] = None
        self._spatial_parts: list = []
        self._size = None
        try:
            self._family = adapter_for(pipe)
        except CheckpointError:  # a pipeline of another family: norms only, no spatial maps
            self._family = None
        self._layers = None

    # ----- transformer hook -----
    def _after_forward(self, module, args, kwargs, output):
        if self._inside:
            return None
        self._inside = True
        try:
            with torch.no_grad():
                if self.ref is None:
                    if self._layers is None:  # found once per probe, not at every transformer call
                        self._layers = adapter_layers(module)
                    with adapters_disabled(module, self._layers):
                        ref_out = module(*args, **kwargs)
                else:
                    ref_out = self.ref(*args, **kwargs)
        finally:
            self._inside = False
        self._calls.append((_first_tensor(output).detach(), _first_tensor(ref_out).detach()))
        if self._family is not None:
            self._size = self._family.image_size_of_call(kwargs)
        return None

    # ----- scheduler hook -----
    def _combine(self, calls, guided_theta: torch.Tensor):
        """(theta_cond, theta_guided, ref_cond, ref_guided) from the step's calls; ``guided_theta`` is
        the velocity the pipeline hands to the scheduler."""
        n = guided_theta.shape[0]
        cut = lambda v: v[:, : guided_theta.shape[1]] if v.dim() == 3 else v  # noqa: E731  (klein image tokens)
        if len(calls) == 1 and calls[0][0].shape[0] == 2 * n:
            t_unc, t_cond = cut(calls[0][0]).chunk(2)
            r_unc, r_cond = cut(calls[0][1]).chunk(2)
        elif len(calls) == 2 and all(c[0].shape[0] == n for c in calls):
            t_cond, t_unc = cut(calls[0][0]), cut(calls[1][0])
            r_cond, r_unc = cut(calls[0][1]), cut(calls[1][1])
        elif len(calls) == 1 and calls[0][0].shape[0] == n:
            t_cond, r_cond = cut(calls[0][0]), cut(calls[0][1])
            return t_cond, guided_theta, r_cond, r_cond
        else:
            raise ConfigError(f"the probe cannot interpret {len(calls)} transformer calls in one scheduler step")
        w, rescale = self._solve_guidance(t_cond, t_unc, guided_theta)
        return t_cond, guided_theta, r_cond, apply_guidance(r_cond, r_unc, w, rescale)

    def _solve_guidance(self, cond, unc, guided):
        """``(w, rescale)`` with ``guided == apply_guidance(cond, unc, w, rescale)``, or ConfigError.

        Tries plain CFG (``w`` by least squares) and CFG followed by the per-token rescale to the
        conditional norm (QwenImagePipeline; ``w`` by a bounded 1-D search).
        """
        from scipy.optimize import minimize_scalar

        g = guided.double()

        def error(w, rescale):
            rebuilt = apply_guidance(cond.double(), unc.double(), w, rescale)
            return float((rebuilt - g).norm() / g.norm().clamp_min(1e-30))

        diff = (cond - unc).double()
        denom = (diff * diff).sum()
        w = round(float(((g - unc.double()) * diff).sum() / denom), 4) if denom > 0 else 1.0
        if error(w, None) <= self.rtol:
            return w, None
        found = minimize_scalar(lambda v: error(v, "token_norm"), bounds=(0.0, 50.0), method="bounded",
                                options={"xatol": 1e-6})
        w = round(float(found.x), 4)
        if error(w, "token_norm") <= self.rtol:
            return w, "token_norm"
        raise ConfigError("the pipeline's guided velocity is not uncond + w (cond - uncond), with or without the "
                          "per-token rescale; the probe cannot pair it")

    def _wrap_step(self, original):
        def step(model_output, timestep, sample, *args, **kwargs):
            calls, self._calls = self._calls, []
            if not calls:
                return original(model_output, timestep, sample, *args, **kwargs)
            n = model_output.shape[0]
            if self._recorder is None or self._batch != n:
                self._start_record(n)
            scheduler = self.pipe.scheduler
            if scheduler.step_index is None:
                scheduler._init_step_index(timestep)
            k = scheduler.step_index
            t, t_next = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
            t_cond, t_guided, r_cond, r_guided = self._combine(calls, model_output)
            ev = VelocityEval(cond=t_cond, guided=t_guided, extras={"ref": VelocityEval(cond=r_cond, guided=r_guided)})
            ids = self._recorder.sample_ids
            check_pair_finite(ev, step=k, t=t, sample_ids=ids)
            self._recorder.add(t, t_next, compare_pair(ev, ev.extras["ref"], step=k))
            if self._spatial is not None and (t_guided.dim() == 4 or self._size is not None):
                self._spatial.add(t, t_guided, r_guided, step=k)
            else:  # packed tokens whose image size the call does not tell: norms only, no spatial maps
                self._spatial = None
            if self._intervene is not None:
                model_output = self._intervene(k, scheduler.sigmas[k].expand(n), ev)
            out = original(model_output, timestep, sample, *args, **kwargs)
            if scheduler.step_index is not None and scheduler.step_index >= len(scheduler.sigmas) - 1:
                self._finish_record()
            return out

        return step

    def _start_record(self, n: int):
        self._finish_record()
        self._batch = n
        self._recorder = StepRecorder(range(self._offset, self._offset + n), CALLS)
        if self.renorm is not None:  # the sampler's own intervention, step for step
            make = rl_renorm_intervention if self.renorm == "rl" else cfg_renorm_intervention
            self._intervene = make(sample_ids=self._recorder.sample_ids)
        if self._family is not None:
            self._spatial = SpatialRecorder(self._recorder.sample_ids, self._layout)

    def _layout(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 4 or self._size is None:
            return v
        return self._family.latent_grid(v, *self._size)

    def _finish_record(self):
        if self._recorder is not None and self._recorder.num_steps:
            self.records.append(self._recorder.record())
            if self._spatial is not None and self._spatial.maps:
                self._spatial_parts.append(self._spatial.part())
            self._offset += self._batch
        self._recorder = None
        self._spatial = None

    def record(self) -> NormRecord:
        """All pipeline calls made inside the block, joined along samples (ids 0, 1, ...)."""
        self._finish_record()
        if not self.records:
            raise ConfigError("the probe recorded nothing: call the pipeline inside the with-block")
        return NormRecord.concat(self.records) if len(self.records) > 1 else self.records[0]

    def to_frame(self):
        return self.record().to_frame()

    def spatial(self) -> SpatialMaps:
        """The spatial ratio maps of the guided velocity (:class:`~ngdiag.probes.spatial.SpatialMaps`) of
        all pipeline calls in the block: every sample's map, the per-step and the mean map."""
        self._finish_record()
        if not self._spatial_parts:
            raise ConfigError("the probe recorded no spatial maps: call a pipeline of a supported family inside the with-block")
        return SpatialMaps.join(self._spatial_parts)


@contextlib.contextmanager
def probe(pipe, ref=None, *, renorm: Optional[str] = None):
    """Record ``||v_theta||/||v_ref||`` during ``pipe(...)`` calls inside the block.

    Args:
        pipe: a diffusers flow-matching pipeline (SD3, FLUX.1, FLUX.2-klein...).
        ref: the reference transformer; ``None`` when ``pipe.transformer`` carries a LoRA adapter
            (the reference is then the same transformer with the adapter switched off).
        renorm: ``None`` (read only, images unchanged), ``"rl"`` (eq. 3) or ``"cfg"`` (eq. 2).

    Example:
        >>> with probe(pipe, ref=base.transformer) as rec:          # doctest: +SKIP
        ...     images = pipe(["a cat"], num_inference_steps=28).images
        >>> rec.record().ratio.mean()                               # doctest: +SKIP
    """
    live = LiveProbe(pipe, ref, renorm=renorm)
    if ref is None:
        if not adapter_layers(pipe.transformer):
            raise ConfigError("probe needs ref=: the pipeline's transformer has no LoRA adapter to switch off")
    handle = pipe.transformer.register_forward_hook(live._after_forward, with_kwargs=True)
    scheduler = pipe.scheduler
    had_own = "step" in scheduler.__dict__
    original = scheduler.step
    scheduler.step = live._wrap_step(original)
    try:
        yield live
    finally:
        handle.remove()
        if had_own:
            scheduler.step = original
        else:
            del scheduler.step
        live._finish_record()
