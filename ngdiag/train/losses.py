"""Velocity-local training losses and the NormGuard penalty (paper eq. 7-8; CONVENTIONS "NormGuard penalty").

Every function here is a pure function of tensors: the caller runs the model forwards (policy, old
policy, reference, EMA) and passes their velocities in. Time convention (CONVENTIONS "Time,
interpolant, velocity"): ``x_t = (1 - t) x0 + t eps``, ``t = 1`` is noise, flow target ``v = eps - x0``
and ``x0_hat = x_t - t v``. ``t`` is the scheduler sigma in ``[0, 1]`` (Flow-Factory's
``timestep / 1000``).

A loss is *velocity-local* when it is an expectation, over forward-process draws ``(x0, eps, t)``,
of a function of the model's velocity at that one ``(x_t, t, c)``. The NormGuard penalty is a
function of the same velocity at the same point, so it can be added to any such loss:

- :func:`normguard_penalty`: ``R_i = lam * max(0, (||v_theta_i||^2 - ||v_ref_i||^2) / ||v_ref_i||^2)``,
  batch mean.
- :func:`flow_matching_loss`: plain (weighted) flow matching.
- :func:`nft_loss`: DiffusionNFT (implicit positive / negative policies, adaptive x0 weighting).
- :func:`awm_loss`: Advantage Weighted Matching (PPO-clipped ratio of matching "log-likelihoods").
- :func:`dpo_loss`: Diffusion-DPO with the flow-matching error.
- :func:`with_normguard`: adds the penalty to any base :class:`LossTerms`.

Base losses return :class:`LossTerms`: ``total`` (scalar with autograd) and ``terms`` (detached
Python floats for logging, read from the device in one transfer). Flow-GRPO is not velocity-local
and has no function here; ``docs/losses.md`` explains why.

Example:
    >>> import torch
    >>> from ngdiag.train.losses import flow_matching_loss, normguard_penalty
    >>> v_theta = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> v_ref = torch.tensor([[0.0, 4.0], [0.0, 2.0]])
    >>> p = normguard_penalty(v_theta, v_ref, lam=2.0)
    >>> p.per_sample.tolist(), float(p.loss), p.active_fraction, p.mean_ratio
    ([1.125, 0.0], 0.5625, 0.5, 0.875)
    >>> float(flow_matching_loss(torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)))
    2.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ngdiag.core.errors import ConfigError, NumericalError, sample_list
from ngdiag.core.tensors import working_dtype

__all__ = [
    "LossTerms",
    "NormGuardTerms",
    "normguard_penalty",
    "with_normguard",
    "flow_matching_loss",
    "nft_loss",
    "awm_log_prob",
    "awm_loss",
    "dpo_loss",
    "AWM_WEIGHTINGS",
]

AWM_WEIGHTINGS = ("Uniform", "t", "t**2", "huber", "ghuber")
"""Weighting schemes of :func:`awm_log_prob`, spelled as in Flow-Factory's ``awm_weighting``."""



# ----------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossTerms:
    """A training loss and its logging scalars.

    Attributes:
        total: scalar tensor to call ``backward()`` on (autograd kept).
        terms: detached Python floats for logging, keyed by name. Always holds ``"loss"`` (the value
            of ``total``); each loss adds its own parts (see its docstring), :func:`with_normguard`
            adds ``"normguard"``, ``"normguard_active_fraction"`` and ``"normguard_mean_ratio"``.
            Treat it as read-only.
    """

    total: torch.Tensor
    terms: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NormGuardTerms:
    """The NormGuard penalty of one batch (paper eq. 7-8).

    Attributes:
        loss: batch mean of ``per_sample``, scalar tensor with autograd (to add to a base loss).
        per_sample: ``R_i``, shape ``(B,)``, autograd kept (gradient only into ``v_theta``).
        active_fraction: fraction of samples with ``||v_theta_i|| > ||v_ref_i||`` (hinge active),
            a detached float. It does not depend on ``lam``, so it is a useful diagnostic at ``lam = 0``.
        mean_ratio: mean over samples of ``||v_theta_i|| / ||v_ref_i||``, a detached float.
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    active_fraction: float
    mean_ratio: float


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _dims(v: torch.Tensor) -> Tuple[int, ...]:
    """All non-batch dimensions of ``v``."""
    return tuple(range(1, v.dim()))


def _check_batched(name: str, v: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(v).__name__}.")
    if v.dim() < 1 or v.shape[0] == 0:
        raise ConfigError(f"{name} needs a non-empty batch dimension, got shape {tuple(v.shape)}.")


def _check_shapes(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """``ref`` has a non-empty batch dimension and every other tensor given (``None`` is skipped) its shape."""
    _check_batched(ref_name, ref)
    for name, v in others.items():
        if v is None:
            continue
        _check_batched(name, v)
        if v.shape != ref.shape:
            raise ConfigError(
                f"{name} must have the shape of {ref_name}, got {tuple(v.shape)} and {tuple(ref.shape)}."
            )


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}.")
    return value


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value}.")
    return value


def _per_sample(name: str, value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A per-sample quantity (float, 0-dim or ``(B,)`` tensor) as a ``(B,)`` tensor on ``like``'s device."""
    if isinstance(value, torch.Tensor):
        value = value.to(like.device)
    else:  # Python numbers keep their full precision until the caller casts
        value = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    if value.dim() == 0:
        value = value.expand(batch)
    elif value.shape != (batch,):
        raise ConfigError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}.")
    return value


def _broadcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(B,)`` to ``(B, 1, ..., 1)`` so that it broadcasts against ``like``."""
    return per_sample.reshape(-1, *([1] * (like.dim() - 1)))


def _to_floats(scalars: Mapping[str, torch.Tensor]) -> dict:
    """Detached scalars as Python floats, with a single device-to-host transfer."""
    names = list(scalars)
    if not names:
        return {}
    packed = torch.stack([scalars[n].detach().reshape(()).to(torch.float64) for n in names])
    return dict(zip(names, packed.tolist()))


def _mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean over non-batch elements of (a - b)^2``, shape ``(B,)``."""
    d = a - b
    return (d * d).mean(dim=_dims(d)) if d.dim() > 1 else d * d


# ----------------------------------------------------------------------------------------------
# NormGuard
# ----------------------------------------------------------------------------------------------


def _penalty_parts(
    pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], lam: float, eps: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample penalty, hinge mask, norm ratio, ``||v_theta||^2`` and ``||v_ref||^2`` (detached),
    each ``(B,)``, for one or more ``(v_theta, v_ref)`` pairs concatenated along the batch."""
    per_sample, active, ratio, sq_t_all, sq_r_all = [], [], [], [], []
    for k, (v_theta, v_ref) in enumerate(pairs):
        suffix = "" if len(pairs) == 1 else f"[{k}]"
        _check_shapes(f"v_theta{suffix}", v_theta, **{f"v_ref{suffix}": v_ref})
        dtype = working_dtype(v_theta, v_ref)
        vt = v_theta.reshape(v_theta.shape[0], -1).to(dtype)
        vr = v_ref.detach().reshape(v_ref.shape[0], -1).to(dtype)
        sq_t = (vt * vt).sum(dim=1)  # ||v_theta||^2, autograd kept
        sq_r = (vr * vr).sum(dim=1)  # ||v_ref||^2, no autograd
        den = sq_r.clamp(min=eps)
        excess = (sq_t - sq_r) / den
        on = excess > 0
        # torch.where (not clamp) so that the gradient is exactly zero at equality as well.
        per_sample.append(lam * torch.where(on, excess, torch.zeros_like(excess)))
        active.append(on)
        ratio.append((sq_t.detach().sqrt() / sq_r.sqrt()))
        sq_t_all.append(sq_t.detach())
        sq_r_all.append(sq_r)
    return (
        torch.cat(per_sample),
        torch.cat(active),
        torch.cat(ratio),
        torch.cat(sq_t_all),
        torch.cat(sq_r_all),
    )


def _normguard(
    pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], lam: float, eps: float
) -> Tuple[NormGuardTerms, float]:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"lam must be a finite number >= 0, got {lam}.")
    eps = _check_nonneg("eps", eps)
    per_sample, active, ratio, sq_t, sq_r = _penalty_parts(pairs, lam, eps)
    loss = per_sample.mean()
    b = sq_t.shape[0]
    # One device-to-host transfer for the checks and the logging floats.
    host = torch.cat(
        [
            sq_t.to(torch.float64),
            sq_r.to(torch.float64),
            torch.stack(
                [
                    active.to(torch.float64).mean(),
                    ratio.to(torch.float64).mean(),
                    loss.detach().to(torch.float64),
                ]
            ),
        ]
    ).cpu()
    bad_ref = ~torch.isfinite(host[b : 2 * b]) | (host[b : 2 * b] == 0)
    if bool(bad_ref.any()):
        raise NumericalError(f"v_ref has a zero or non-finite norm for samples {sample_list(bad_ref)}.")
    bad_theta = ~torch.isfinite(host[:b])
    if bool(bad_theta.any()):
        raise NumericalError(f"v_theta has a non-finite norm for samples {sample_list(bad_theta)}.")
    active_fraction, mean_ratio, loss_value = host[2 * b :].tolist()
    return NormGuardTerms(loss, per_sample, active_fraction, mean_ratio), loss_value


def normguard_penalty(
    v_theta: torch.Tensor, v_ref: torch.Tensor, lam: float, *, eps: float = 1e-12
) -> NormGuardTerms:
    """NormGuard penalty, paper eq. 7-8 (CONVENTIONS "NormGuard penalty").

    Per sample ``i``, with norms over all non-batch elements::

        R_i = lam * max(0, (||v_theta_i||^2 - ||v_ref_i||^2) / ||v_ref_i||^2)

    and ``loss = mean_i R_i``. ``v_ref`` is detached. ``R_i`` and its gradient are exactly zero
    whenever ``||v_theta_i|| <= ||v_ref_i||`` (equality included); otherwise
    ``dR_i / dv_theta_i = 2 lam v_theta_i / ||v_ref_i||^2``, so ``d loss / d v_theta_i`` is that divided
    by ``B``.

    Args:
        v_theta: velocity of the model being trained at ``(x_t, t, c)``, shape ``(B, ...)``, any layout.
        v_ref: reference velocity at the same ``(x_t, t, c)``, same shape (its gradient is never used).
        lam: penalty weight ``lam >= 0``. ``lam = 0`` gives an exactly zero penalty (the diagnostics
            ``active_fraction`` and ``mean_ratio`` are still computed).
        eps: floor under the denominator ``||v_ref_i||^2`` (guards against a tiny but non-zero
            reference norm); the formula above is exact whenever ``||v_ref_i||^2 >= eps``.

    Returns:
        :class:`NormGuardTerms`. Norms are computed in float32 (float64 when an input is float64).

    Raises:
        ConfigError: ``lam < 0`` or not finite, ``eps < 0``, or the shapes differ.
        NumericalError: ``||v_ref_i||`` is zero or non-finite, or ``||v_theta_i||`` is non-finite,
            for some sample (the samples are listed).

    Source: the NormGuard paper, eq. 7-8 (implemented from the formula; no public code was read).
    """
    terms, _ = _normguard([(v_theta, v_ref)], lam, eps)
    return terms


def with_normguard(
    base: LossTerms,
    v_theta: Union[torch.Tensor, Sequence[torch.Tensor]],
    v_ref: Union[torch.Tensor, Sequence[torch.Tensor]],
    lam: float,
    *,
    eps: float = 1e-12,
) -> LossTerms:
    """Add the NormGuard penalty to a velocity-local base loss: ``total = base.total + mean_i R_i``.

    The penalty uses the same ``v_theta`` the base loss was computed from and the reference velocity
    at the same ``(x_t, t, c)``. Where the base method already evaluates the reference (NFT or AWM
    with ``kl_beta > 0``, DPO), pass that same ``v_ref``: the penalty needs no extra forward pass.
    Otherwise one no-grad reference forward per training step is needed.

    With ``lam = 0`` the returned ``total`` is ``base.total`` itself (bit for bit, same autograd
    graph); the logging terms are still added.

    Args:
        base: the base loss, e.g. from :func:`nft_loss`, :func:`awm_loss`, :func:`dpo_loss`.
        v_theta: the trained model's velocity, ``(B, ...)``; or a sequence of velocities (e.g.
            ``(v_w, v_l)`` for DPO), in which case the penalty is the mean over all their samples,
            without concatenating the large tensors.
        v_ref: the reference velocity (or sequence of them) matching ``v_theta``.
        lam: penalty weight ``>= 0``.
        eps: see :func:`normguard_penalty`.

    Returns:
        A new :class:`LossTerms` whose terms are ``base.terms`` plus ``"normguard"`` (the penalty),
        ``"normguard_active_fraction"``, ``"normguard_mean_ratio"``, and ``"loss"`` updated to the new total.

    Raises:
        ConfigError: ``lam < 0``, ``base`` already holds a NormGuard term, mismatched shapes or
            sequence lengths.
        NumericalError: see :func:`normguard_penalty`.
    """
    if not isinstance(base, LossTerms):
        raise ConfigError(f"base must be a LossTerms, got {type(base).__name__}.")
    if "normguard" in base.terms:
        raise ConfigError("base already includes a NormGuard penalty.")
    thetas = [v_theta] if isinstance(v_theta, torch.Tensor) else list(v_theta)
    refs = [v_ref] if isinstance(v_ref, torch.Tensor) else list(v_ref)
    if len(thetas) != len(refs) or not thetas:
        raise ConfigError(f"v_theta and v_ref must pair up, got {len(thetas)} and {len(refs)} tensors.")
    pen, pen_value = _normguard(list(zip(thetas, refs)), lam, eps)
    total = base.total if float(lam) == 0.0 else base.total + pen.loss
    terms = dict(base.terms)
    terms["normguard"] = pen_value
    terms["normguard_active_fraction"] = pen.active_fraction
    terms["normguard_mean_ratio"] = pen.mean_ratio
    if "loss" in terms:
        terms["loss"] = terms["loss"] + pen_value
    return LossTerms(total=total, terms=terms)


# ----------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------


def flow_matching_loss(
    v_theta: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flow-matching loss ``mean_i w_i * mean_elements (v_theta_i - (eps_i - x0_i))^2``.

    Per sample the squared error is *averaged* over elements (not summed), so the loss does not
    scale with the latent size and is comparable across resolutions and families; this is the
    reduction of diffusers' SD3/FLUX training scripts, DiffusionNFT and Flow-Factory. The batch
    reduction is ``sum_i w_i l_i / B`` (weights multiply, the sum is not divided by ``sum_i w_i``),
    as diffusers applies ``compute_loss_weighting_for_sd3``.

    Args:
        v_theta: predicted velocity at ``x_t = (1 - t) x0 + t eps``, shape ``(B, ...)``.
        x0: clean latents, same shape.
        eps: the noise used to build ``x_t``, same shape.
        weight: optional per-sample weights, shape ``(B,)`` (e.g. a timestep weighting); ``None`` is 1.

    Returns:
        Scalar tensor (float32, or float64 when an input is float64), autograd kept.

    Raises:
        ConfigError: shapes differ, or ``weight`` is not ``(B,)``.
    """
    _check_shapes("v_theta", v_theta, x0=x0, eps=eps)
    dtype = working_dtype(v_theta, x0, eps)
    per = _mse_per_sample(v_theta.to(dtype), (eps - x0).to(dtype))
    if weight is not None:
        weight = torch.as_tensor(weight, device=v_theta.device)
        if weight.shape != per.shape:
            raise ConfigError(f"weight must have shape ({per.shape[0]},), got {tuple(weight.shape)}.")
        per = per * weight.to(dtype)
    return per.mean()


# ----------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------


def _adaptive_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``mean_elements (x0_pred - x0)^2 / w`` with ``w = max(mean_elements |x0_pred - x0|, 1e-5)`` detached.

    ``w`` is computed in float64 without gradient, as in the sources, so the result is float64.
    """
    with torch.no_grad():
        w = (x0_pred.double() - x0.double()).abs()
        w = (w.mean(dim=_dims(w), keepdim=True) if w.dim() > 1 else w).clamp(min=1e-5)
    err = (x0_pred - x0) ** 2 / w
    return err.mean(dim=_dims(err)) if err.dim() > 1 else err


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t,
    advantage,
    *,
    beta: float,
    adv_clip_max: float,
    kl_beta: float = 0.0,
    v_ref: Optional[torch.Tensor] = None,
) -> LossTerms:
    """DiffusionNFT loss (Zheng et al. 2025, arXiv 2509.16117) as DiffusionNFT and Flow-Factory code it.

    With ``m = adv_clip_max`` and ``sg`` = stop-gradient, per sample ``i``::

        r_i   = clip(clip(A_i, -m, m) / m / 2 + 1/2, 0, 1)              # advantage -> [0, 1]
        v+    = beta v_theta + (1 - beta) sg(v_old)                     # implicit positive policy
        v-    = (1 + beta) sg(v_old) - beta v_theta                     # implicit negative policy
        x0±   = x_t - t v±                                              # x0 predictions
        L±_i  = mean_el (x0± - x0)^2 / sg(max(mean_el |x0± - x0|, 1e-5))  # adaptive weighting
        P_i   = (r_i L+_i + (1 - r_i) L-_i) / beta
        policy_loss = mean_i (m P_i)
        kl_div = mean_i mean_el (v_theta - sg(v_ref))^2
        total = policy_loss + kl_beta * kl_div

    Both sources multiply by ``adv_clip_max`` and divide by ``beta`` exactly as above; the adaptive
    weights are computed in float64 without gradient, so the policy loss is float64. In
    Flow-Factory the KL term is added only when ``kl_beta > 0`` (DiffusionNFT always adds it, with
    its ``config.train.beta`` as coefficient); here it is added when ``kl_beta > 0`` and logged
    whenever ``v_ref`` is given.

    Args:
        v_theta: current-policy velocity at ``(x_t, t)``, shape ``(B, ...)``.
        v_old: sampling ("old") policy velocity at the same point, same shape; detached here.
        x_t: noised latents ``(1 - t) x0 + t eps``, same shape.
        x0: clean latents of the rollouts, same shape.
        t: noise level in ``[0, 1]``: a float, a 0-dim tensor or shape ``(B,)``.
        advantage: per-sample advantage (group-normalized reward), float or ``(B,)``.
        beta: NFT mixing strength ``beta > 0`` (``nft_beta`` / ``config.beta``).
        adv_clip_max: ``m > 0``; advantages are clipped to ``[-m, m]``.
        kl_beta: coefficient of the velocity-space KL to the reference, ``>= 0``.
        v_ref: reference velocity at the same point (required when ``kl_beta > 0``); detached.

    Returns:
        :class:`LossTerms` with terms ``loss``, ``policy_loss``, ``unweighted_policy_loss``
        (``mean_i P_i``), ``positive_loss`` (``mean_i L+_i``), ``negative_loss``, ``r_mean``, and
        ``kl_div`` / ``kl_loss`` when ``v_ref`` is given.

    Raises:
        ConfigError: non-positive ``beta`` or ``adv_clip_max``, negative ``kl_beta``, ``kl_beta > 0``
            without ``v_ref``, or mismatched shapes.

    Sources: NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` (read in the forks pkuhxy/DiffusionNFT
    and sebastian-stapf/DiffusionNFT); X-GenGroup/Flow-Factory ``src/flow_factory/trainers/nft.py``
    and ``src/flow_factory/trainers/rl/nft.py`` (``_matching_losses``, ``_normalized_squared_errors``,
    ``optimize``), KL from ``BaseTrainer._velocity_kl``.
    """
    beta = _check_positive("beta", beta)
    m = _check_positive("adv_clip_max", adv_clip_max)
    kl_beta = _check_nonneg("kl_beta", kl_beta)
    _check_shapes("v_theta", v_theta, v_old=v_old, x_t=x_t, x0=x0, v_ref=v_ref)
    if v_ref is None and kl_beta > 0:
        raise ConfigError("nft_loss needs v_ref when kl_beta > 0.")
    b = v_theta.shape[0]
    t_b = _broadcast(_per_sample("t", t, b, v_theta).to(working_dtype(v_theta, x_t, x0)), v_theta)
    adv = _per_sample("advantage", advantage, b, v_theta).to(torch.float64)

    r = (adv.clamp(-m, m) / m / 2.0 + 0.5).clamp(0.0, 1.0)
    v_old = v_old.detach()
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    pos = _adaptive_x0_error(x_t - t_b * v_pos, x0)
    neg = _adaptive_x0_error(x_t - t_b * v_neg, x0)
    per = (r * pos + (1.0 - r) * neg) / beta
    policy_loss = (per * m).mean()
    total = policy_loss
    scalars = {
        "policy_loss": policy_loss,
        "unweighted_policy_loss": per.mean(),
        "positive_loss": pos.mean(),
        "negative_loss": neg.mean(),
        "r_mean": r.mean(),
    }
    if v_ref is not None:
        kl_div = _mse_per_sample(v_theta, v_ref.detach()).mean()
        kl_loss = kl_beta * kl_div
        if kl_beta > 0:
            total = total + kl_loss
        scalars["kl_div"] = kl_div
        scalars["kl_loss"] = kl_loss
    scalars["loss"] = total
    return LossTerms(total=total, terms=_to_floats(scalars))


# ----------------------------------------------------------------------------------------------
# AWM
# ----------------------------------------------------------------------------------------------


def awm_log_prob(
    v: torch.Tensor,
    target: torch.Tensor,
    t,
    *,
    weighting: str = "Uniform",
    ghuber_power: float = 0.25,
) -> torch.Tensor:
    """AWM's per-sample matching "log-likelihood" surrogate (Flow-Factory ``compute_weighted_log_prob``).

    ``l_i = -mean_el (v_i - target_i)^2`` in float64, then reweighted with the noise level ``t_i``:

    - ``"Uniform"``: ``l``
    - ``"t"``: ``l t``;  ``"t**2"``: ``l t^2``
    - ``"huber"``: ``-(sqrt(-l + 1e-10) - 1e-5) t``
    - ``"ghuber"``: ``-((-l + 1e-10)^p - (1e-10)^p) t / p`` with ``p = ghuber_power``

    Args:
        v: velocity, shape ``(B, ...)``.
        target: flow target ``eps - x0``, same shape.
        t: noise level in ``[0, 1]`` (float, 0-dim or ``(B,)``); Flow-Factory's ``sigma = timestep / 1000``.
        weighting: one of :data:`AWM_WEIGHTINGS`.
        ghuber_power: ``p > 0`` for ``"ghuber"``.

    Returns:
        Shape ``(B,)``; float32 (Flow-Factory casts back to float32), float64 when an input is float64.

    Raises:
        ConfigError: unknown ``weighting``, non-positive ``ghuber_power``, mismatched shapes.

    Source: X-GenGroup/Flow-Factory ``src/flow_factory/trainers/rl/awm.py``
    (``apply_matching_weighting``, ``compute_weighted_log_prob``) and ``src/flow_factory/trainers/awm.py``.
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(AWM_WEIGHTINGS)}, got {weighting!r}.")
    p = _check_positive("ghuber_power", ghuber_power)
    _check_shapes("v", v, target=target)
    out_dtype = working_dtype(v, target)
    b = v.shape[0]
    sigma = _per_sample("t", t, b, v).to(torch.float64)
    lp = -_mse_per_sample(v.double(), target.double())
    if weighting == "t":
        lp = lp * sigma
    elif weighting == "t**2":
        lp = lp * sigma**2
    elif weighting == "huber":
        lp = -(torch.sqrt(-lp + 1e-10) - 1e-5) * sigma
    elif weighting == "ghuber":
        e = torch.tensor(1e-10, dtype=torch.float64, device=lp.device)
        lp = -(torch.pow(-lp + e, p) - torch.pow(e, p)) * sigma / p
    return lp.to(out_dtype)


def _clip_range(value) -> Tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"clip_range must be a number or a (low, high) pair, got {value!r}.")
        lo, hi = float(value[0]), float(value[1])
    else:
        hi = _check_nonneg("clip_range", value)
        lo = -hi
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > 0 or hi < 0 or lo <= -1:
        raise ConfigError(f"clip_range must satisfy -1 < low <= 0 <= high, got ({lo}, {hi}).")
    return lo, hi


def awm_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t,
    advantage,
    *,
    clip_range: Union[float, Tuple[float, float]] = 1e-4,
    adv_clip_max: float = 5.0,
    weighting: str = "Uniform",
    ghuber_power: float = 0.25,
    kl_beta: float = 0.0,
    v_ref: Optional[torch.Tensor] = None,
    ema_kl_beta: float = 0.0,
    v_ema: Optional[torch.Tensor] = None,
) -> LossTerms:
    """Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050) as Flow-Factory implements it.

    With ``l = awm_log_prob(., eps - x0, t)`` (:func:`awm_log_prob`), ``(lo, hi) = clip_range`` and
    ``sg`` = stop-gradient, per sample ``i``::

        A_i     = clip(A_i, -adv_clip_max, adv_clip_max)
        rho_i   = exp(l(v_theta_i) - sg(l(v_old_i)))                 # ratio to the sampling policy
        policy_loss = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 + lo, 1 + hi))   # PPO clipping
        kl_div      = mean_i mean_el (v_theta - sg(v_ref))^2
        ema_kl_div  = mean_i mean_el (v_theta - sg(v_ema))^2
        total = policy_loss + kl_beta * kl_div + ema_kl_beta * ema_kl_div

    Flow-Factory's defaults are ``clip_range = (-1e-4, 1e-4)`` and ``adv_clip_range = (-5, 5)``.
    ``v_old`` is the velocity of the policy that sampled the rollouts (the EMA when off-policy),
    evaluated at the same ``(x_t, t)`` and noise as ``v_theta``.

    Args:
        v_theta: current-policy velocity at ``x_t = (1 - t) x0 + t eps``, shape ``(B, ...)``.
        v_old: sampling-policy velocity at the same point, same shape; detached.
        x0: clean latents, same shape.
        eps: the noise used for ``x_t``, same shape.
        t: noise level in ``[0, 1]`` (float, 0-dim or ``(B,)``).
        advantage: per-sample advantage, float or ``(B,)``.
        clip_range: ``c`` for ``(-c, c)`` or a ``(low, high)`` pair; the ratio is clipped to
            ``[1 + low, 1 + high]``.
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]``.
        weighting, ghuber_power: see :func:`awm_log_prob`.
        kl_beta: coefficient of the velocity KL to the reference (needs ``v_ref`` when ``> 0``).
        v_ref: reference velocity at the same point; detached.
        ema_kl_beta: coefficient of the velocity KL to the EMA policy (needs ``v_ema`` when ``> 0``).
        v_ema: EMA-policy velocity at the same point; detached.

    Returns:
        :class:`LossTerms` with terms ``loss``, ``policy_loss``, ``ratio_mean``, ``clip_frac_high``,
        ``clip_frac_low``, and ``kl_div`` / ``kl_loss`` / ``ema_kl_div`` / ``ema_kl_loss`` when the
        velocities are given (the KL terms enter ``total`` only with a positive coefficient).

    Raises:
        ConfigError: bad coefficients, a missing ``v_ref`` / ``v_ema`` for a positive coefficient,
            mismatched shapes.

    Source: X-GenGroup/Flow-Factory ``src/flow_factory/trainers/rl/awm.py`` (``optimize``,
    ``_matching_log_prob``) and ``src/flow_factory/trainers/awm.py``; defaults from
    ``src/flow_factory/hparams`` ``AWMTrainingArguments``.
    """
    lo, hi = _clip_range(clip_range)
    m = _check_positive("adv_clip_max", adv_clip_max)
    kl_beta = _check_nonneg("kl_beta", kl_beta)
    ema_kl_beta = _check_nonneg("ema_kl_beta", ema_kl_beta)
    _check_shapes("v_theta", v_theta, v_old=v_old, x0=x0, eps=eps, v_ref=v_ref, v_ema=v_ema)
    for name, v, coef in (("v_ref", v_ref, kl_beta), ("v_ema", v_ema, ema_kl_beta)):
        if v is None and coef > 0:
            raise ConfigError(f"awm_loss needs {name} when its KL coefficient is > 0.")
    b = v_theta.shape[0]
    target = eps - x0
    lp = awm_log_prob(v_theta, target, t, weighting=weighting, ghuber_power=ghuber_power)
    with torch.no_grad():
        old_lp = awm_log_prob(v_old.detach(), target, t, weighting=weighting, ghuber_power=ghuber_power)
    adv = _per_sample("advantage", advantage, b, v_theta).to(lp.dtype).clamp(-m, m)

    ratio = torch.exp(lp - old_lp.to(lp.dtype))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 + lo, 1.0 + hi)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    total = policy_loss
    scalars = {
        "policy_loss": policy_loss,
        "ratio_mean": ratio.mean(),
        "clip_frac_high": (ratio > 1.0 + hi).to(lp.dtype).mean(),
        "clip_frac_low": (ratio < 1.0 + lo).to(lp.dtype).mean(),
    }
    for prefix, v, coef in (("", v_ref, kl_beta), ("ema_", v_ema, ema_kl_beta)):
        if v is None:
            continue
        kl_div = _mse_per_sample(v_theta, v.detach()).mean()
        kl_loss = coef * kl_div
        if coef > 0:
            total = total + kl_loss
        scalars[f"{prefix}kl_div"] = kl_div
        scalars[f"{prefix}kl_loss"] = kl_loss
    scalars["loss"] = total
    return LossTerms(total=total, terms=_to_floats(scalars))


# ----------------------------------------------------------------------------------------------
# Diffusion-DPO
# ----------------------------------------------------------------------------------------------


def dpo_loss(
    v_w: torch.Tensor,
    v_l: torch.Tensor,
    v_ref_w: torch.Tensor,
    v_ref_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
) -> LossTerms:
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908) for flow models, as Flow-Factory codes it.

    The winner ``w`` and loser ``l`` of a pair are noised with the same ``eps`` and ``t``; their
    flow targets are ``target = eps - x0``. Per pair ``i``, with errors averaged over elements::

        e_i   = mean_el (v_i - target_i)^2          for the policy (v_w, v_l) and the reference
        z_i   = -(beta / 2) * ((e_w - e_ref_w) - (e_l - e_ref_l))
        loss  = mean_i -log sigmoid(z_i)

    Beta convention: ``beta`` multiplies the *mean* squared error and carries the factor 1/2, as
    Flow-Factory's ``dpo_objective`` and the Diffusion-DPO reference training script
    (``scale_term = -0.5 * beta_dpo``) do; Flow-Factory's default is ``beta = 2000``. A positive ``z``
    means the policy improved on the winner more than on the loser, relative to the reference.

    Args:
        v_w, v_l: policy velocities on the winner and loser noised latents, shape ``(B, ...)``.
        v_ref_w, v_ref_l: reference velocities at the same points; detached.
        target_w, target_l: flow targets ``eps - x0_w`` and ``eps - x0_l`` (same ``eps``).
        beta: ``beta > 0``.

    Returns:
        :class:`LossTerms` with terms ``loss``, ``theta_w_err``, ``theta_l_err``, ``ref_w_err``,
        ``ref_l_err`` (batch means), ``implicit_accuracy`` (fraction of pairs whose winner implicit
        reward exceeds the loser's, i.e. ``z_i > 0``), ``implicit_reward_chosen`` and
        ``implicit_reward_rejected`` (batch means of ``-(beta/2)(e_w - e_ref_w)`` and
        ``-(beta/2)(e_l - e_ref_l)``).

    Raises:
        ConfigError: ``beta <= 0`` or mismatched shapes.

    To add NormGuard, reuse the reference velocities:
    ``with_normguard(base, (v_w, v_l), (v_ref_w, v_ref_l), lam)``.

    Sources: X-GenGroup/Flow-Factory ``src/flow_factory/trainers/rl/dpo.py`` (``_arm_velocity_error``,
    ``_optimize_dpo_samples``) and its shared ``dpo_objective`` (``trainers/common``); the older
    ``src/flow_factory/trainers/dpo.py`` has the same objective.
    """
    beta = _check_positive("beta", beta)
    _check_shapes("v_w", v_w, v_l=v_l, v_ref_w=v_ref_w, v_ref_l=v_ref_l, target_w=target_w, target_l=target_l)
    dtype = working_dtype(v_w, v_l, target_w, target_l)
    e_w = _mse_per_sample(v_w.to(dtype), target_w.to(dtype))
    e_l = _mse_per_sample(v_l.to(dtype), target_l.to(dtype))
    with torch.no_grad():
        r_w = _mse_per_sample(v_ref_w.detach().to(dtype), target_w.to(dtype))
        r_l = _mse_per_sample(v_ref_l.detach().to(dtype), target_l.to(dtype))
    d_w = e_w - r_w
    d_l = e_l - r_l
    z = -0.5 * beta * (d_w - d_l)
    total = -F.logsigmoid(z).mean()
    with torch.no_grad():
        reward_w = -0.5 * beta * d_w
        reward_l = -0.5 * beta * d_l
        scalars = {
            "theta_w_err": e_w.mean(),
            "theta_l_err": e_l.mean(),
            "ref_w_err": r_w.mean(),
            "ref_l_err": r_l.mean(),
            "implicit_accuracy": (reward_w > reward_l).to(dtype).mean(),
            "implicit_reward_chosen": reward_w.mean(),
            "implicit_reward_rejected": reward_l.mean(),
            "loss": total,
        }
    return LossTerms(total=total, terms=_to_floats(scalars))
