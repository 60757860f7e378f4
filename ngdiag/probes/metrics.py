"""The per-sample comparison of two velocities (CONVENTIONS "Norms and ratios").

``||v||`` is the L2 norm of one sample over all its non-batch elements, in whatever latent layout
the model uses: packing latents into tokens only permutes elements, so the norm is unchanged
(:func:`ngdiag.core.tensors.velocity_norm`). For a velocity ``v_theta`` of the model under audit
and ``v_ref`` of the reference, evaluated at the same ``(x_t, t, c)``:

- ratio ``r = ||v_theta|| / ||v_ref||``,
- cosine ``cos`` between the flattened velocities,
- drift decomposition (exact identity)::

      ||v_theta - v_ref||^2 = (||v_theta|| - ||v_ref||)^2 + 2 ||v_theta|| ||v_ref|| (1 - cos)
                               `------- radial -------'   `-------- directional --------'

  and the radial share ``radial / (radial + directional)`` (0 when the two velocities are equal).

Example:
    >>> import torch
    >>> from ngdiag.probes.metrics import compare_velocities
    >>> c = compare_velocities(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    >>> float(c.ratio[0]), float(c.cos[0]), float(c.radial_share[0])
    (2.0, 1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ngdiag.core.tensors import check_finite_norms, per_sample, working_dtype
from ngdiag.core.errors import ConfigError

__all__ = ["VelocityComparison", "compare_velocities"]


@dataclass(frozen=True)
class VelocityComparison:
    """Per-sample comparison of ``v_theta`` with ``v_ref`` at one step; every field has shape ``(B,)``.

    Attributes:
        norm_theta: ``||v_theta||``.
        norm_ref: ``||v_ref||``.
        ratio: ``r = ||v_theta|| / ||v_ref||`` (> 1 means the audited model's velocity is larger).
        cos: cosine between the flattened velocities, in ``[-1, 1]``.
        radial: radial drift ``(||v_theta|| - ||v_ref||)^2``.
        directional: directional drift ``2 ||v_theta|| ||v_ref|| (1 - cos)``.
        radial_share: ``radial / (radial + directional)`` in ``[0, 1]``; 0 where the total drift is 0.

    ``radial + directional == ||v_theta - v_ref||^2`` (see :attr:`drift`).
    """

    norm_theta: torch.Tensor
    norm_ref: torch.Tensor
    ratio: torch.Tensor
    cos: torch.Tensor
    radial: torch.Tensor
    directional: torch.Tensor
    radial_share: torch.Tensor

    @property
    def drift(self) -> torch.Tensor:
        """Total drift ``||v_theta - v_ref||^2 = radial + directional``, shape ``(B,)``."""
        return self.radial + self.directional

    def to_dict(self) -> dict:
        """Field name -> numpy array of shape ``(B,)``."""
        return {f.name: getattr(self, f.name).detach().cpu().numpy() for f in fields(self)}

    def to_frame(self) -> pd.DataFrame:
        """One row per sample (column ``sample``), one column per field."""
        data = self.to_dict()
        n = len(next(iter(data.values())))
        return pd.DataFrame({"sample": np.arange(n), **data})


def compare_velocities(
    v_theta: torch.Tensor, v_ref: torch.Tensor, *, step: Optional[int] = None
) -> VelocityComparison:
    """Compare two velocities per sample: norms, ratio, cosine and drift decomposition.

    CONVENTIONS "Norms and ratios". The directional drift is computed in the cancellation-free form
    ``||v_theta|| ||v_ref|| ||u_theta - u_ref||^2`` with unit vectors ``u = v / ||v||`` (equal to
    ``2 ||v_theta|| ||v_ref|| (1 - cos)``), so that it stays accurate when the two directions
    nearly agree; ``cos = 1 - ||u_theta - u_ref||^2 / 2``.

    Args:
        v_theta: velocity of the model under audit, shape ``(B, ...)``.
        v_ref: velocity of the reference at the same ``(x_t, t, c)``, same shape.
        step: step index, only used in error messages.

    Returns:
        :class:`VelocityComparison` of detached ``(B,)`` tensors, float32 (float64 when either input
        is float64).

    Raises:
        ConfigError: the shapes differ.
        NumericalError: a sample has a zero or non-finite norm (the ratio or cosine would be undefined).
    """
    if v_theta.shape != v_ref.shape:
        raise ConfigError(
            f"v_theta and v_ref must have the same shape, got {tuple(v_theta.shape)} and {tuple(v_ref.shape)}"
        )
    dtype = working_dtype(v_theta, v_ref)
    a = per_sample(v_theta.detach(), dtype)
    b = per_sample(v_ref.detach(), dtype)
    norm_theta = torch.linalg.vector_norm(a, dim=1)
    norm_ref = torch.linalg.vector_norm(b, dim=1)
    check_finite_norms(norm_theta, what="v_theta", step=step)
    check_finite_norms(norm_ref, what="v_ref", step=step)

    unit_gap = (a / norm_theta[:, None] - b / norm_ref[:, None]).square().sum(dim=1)
    unit_gap = unit_gap.clamp(0.0, 4.0)  # ||u_theta - u_ref||^2 = 2 (1 - cos) lies in [0, 4]
    cos = 1.0 - 0.5 * unit_gap
    radial = (norm_theta - norm_ref).square()
    directional = norm_theta * norm_ref * unit_gap
    total = radial + directional
    radial_share = torch.where(total > 0, radial / torch.where(total > 0, total, 1.0), 0.0)
    return VelocityComparison(
        norm_theta=norm_theta,
        norm_ref=norm_ref,
        ratio=norm_theta / norm_ref,
        cos=cos,
        radial=radial,
        directional=directional,
        radial_share=radial_share,
    )
