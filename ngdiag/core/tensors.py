"""Tensor helpers shared by every layer: per-sample views, the working dtype, norms and finite checks.

A batch of samples is a tensor whose first axis is the sample; everything else (channels, tokens,
pixels) belongs to one sample. ``||v||`` is the L2 norm of one sample over all its elements
(CONVENTIONS "Norms and ratios"), so packing latents into tokens does not change it.

Bad values are never turned into a silent NaN: :func:`check_finite` and :func:`check_finite_norms`
raise :class:`~ngdiag.core.errors.NumericalError` naming the samples (and, in the caller's words, the step).

Example:
    >>> import torch
    >>> from ngdiag.core.tensors import nonfinite_samples, velocity_norm
    >>> velocity_norm(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    tensor([5., 2.])
    >>> nonfinite_samples(torch.tensor([[1.0, float("nan")], [0.0, 2.0]]))
    tensor([ True, False])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ngdiag.core.errors import ConfigError, NumericalError, sample_list

__all__ = [
    "working_dtype",
    "per_sample",
    "velocity_norm",
    "nonfinite_samples",
    "check_finite",
    "check_finite_norms",
]


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precisions and integers are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def per_sample(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` as ``(B, -1)``: one row of elements per sample, cast to ``dtype`` when given.

    Raises:
        ConfigError: ``x`` is a 0-dim tensor (it has no sample axis).
    """
    if x.dim() == 0:
        raise ConfigError("a batch of samples needs a batch dimension, got a 0-dim tensor")
    flat = x.reshape(x.shape[0], -1)
    return flat if dtype is None else flat.to(dtype)


def velocity_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm ``||v_i||`` over all non-batch dimensions (CONVENTIONS "Norms and ratios").

    Args:
        v: velocity of shape ``(B, ...)`` in any layout (``(B, C, H, W)`` latents or ``(B, N, D)``
            packed tokens give the same norms).

    Returns:
        Tensor of shape ``(B,)``, float32 (float64 when ``v`` is float64), on ``v``'s device.
        Autograd is kept, so the result can enter a loss.
    """
    return torch.linalg.vector_norm(per_sample(v, working_dtype(v)), ord=2, dim=1)


def nonfinite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the samples with a NaN or infinite element in any of ``tensors`` (first axis: samples)."""
    masks = [~torch.isfinite(per_sample(x.detach())).all(dim=1) for x in tensors]
    bad = masks[0]
    for mask in masks[1:]:
        bad = bad | mask.to(bad.device)
    return bad


def _sample_names(bad: torch.Tensor, sample_ids: Optional[Sequence[int]]) -> str:
    """``[0, 3]``: the (global) ids of the true entries of ``bad``, cut after ten as :func:`sample_list` does."""
    bad = bad.cpu().numpy()
    if sample_ids is None:
        return sample_list(bad)
    ids = np.asarray(list(sample_ids), dtype=np.int64)[bad]
    mask = np.zeros(int(ids.max()) + 1, dtype=bool)
    mask[ids] = True
    return sample_list(mask)


def check_finite(
    x: Union[torch.Tensor, Sequence[torch.Tensor]],
    problem: Union[str, Callable[[], str]],
    *,
    sample_ids: Optional[Sequence[int]] = None,
    hint: str = "",
) -> None:
    """Raise when a sample of ``x`` has a NaN or infinite element.

    Args:
        x: a tensor of shape ``(B, ...)``, or several of them sharing the sample axis (a sample is
            bad when it is bad in any of them).
        problem: the message up to the samples, in the caller's words, e.g.
            ``"theta's velocity is not finite at step 3 (t=0.6000)"``; a function returning it is
            called only when a sample is bad (no device-to-host copy to format a time every step).
        sample_ids: the global ids of the ``B`` samples; default ``0 ... B-1``.
        hint: appended after the samples, e.g. ``"(the latents are finite: check the VAE)"``.

    Raises:
        NumericalError: ``"<problem> for samples [1, 3] <hint>"``.
        ConfigError: a tensor without a sample axis (0-dim).
    """
    tensors = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    bad = nonfinite_samples(*tensors)
    if bool(bad.any()):
        message = f"{problem() if callable(problem) else problem} for samples {_sample_names(bad, sample_ids)}"
        raise NumericalError(f"{message} {hint}" if hint else message)


def check_finite_norms(norms: torch.Tensor, *, what: str, step: Optional[int] = None) -> None:
    """Raise when any per-sample norm is zero or non-finite (a ratio or direction would be undefined).

    Args:
        norms: per-sample norms, shape ``(B,)``.
        what: the velocity's name for the message (``"v_theta"``, ``"v_cfg"``...).
        step: step index for the message, if known.

    Raises:
        NumericalError: e.g. ``"v_theta has a zero or non-finite norm at step 3 for samples [0, 2]"``.
    """
    norms = torch.as_tensor(norms).detach()
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        where = "" if step is None else f" at step {int(step)}"
        raise NumericalError(f"{what} has a zero or non-finite norm{where} for samples {sample_list(bad)}")
