"""Per-sample norms and the drift decomposition (CONVENTIONS "Norms and ratios")."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ngdiag.core.errors import ConfigError, NumericalError
from ngdiag.core.tensors import velocity_norm
from ngdiag.probes.metrics import VelocityComparison, compare_velocities


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """FLUX-style 2x2 patch packing (B, C, H, W) -> (B, H/2 * W/2, 4C), a permutation of elements."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def test_velocity_norm_hand_values():
    v = torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]])
    out = velocity_norm(v)
    assert out.shape == (3,)
    assert torch.equal(out, torch.tensor([5.0, 2.0, math.sqrt(2.0)], dtype=torch.float32))
    # Over all non-batch dims: (1, 2, 2) with entries 1, 2, 2, 4 -> sqrt(25) = 5.
    assert velocity_norm(torch.tensor([[[1.0, 2.0], [2.0, 4.0]]])).item() == 5.0


def test_velocity_norm_dtypes():
    v = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert velocity_norm(v.double()).dtype == torch.float64
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert velocity_norm(v.to(dtype)).dtype == torch.float32
    # float16 would overflow if squared in float16: 1000 * 300^2 = 9e7 > 65504.
    big = torch.full((2, 1000), 300.0, dtype=torch.float16)
    torch.testing.assert_close(velocity_norm(big), torch.full((2,), 300.0 * math.sqrt(1000.0)))


def test_velocity_norm_is_layout_free():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(3, 16, 8, 8, generator=g, dtype=torch.float64)
    packed = _pack(lat)
    assert packed.shape == (3, 16, 64)
    perm = torch.randperm(16 * 64, generator=g)
    shuffled = lat.reshape(3, -1)[:, perm]
    ref = velocity_norm(lat)
    torch.testing.assert_close(velocity_norm(packed), ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(velocity_norm(shuffled), ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(ref, lat.reshape(3, -1).pow(2).sum(1).sqrt(), rtol=1e-14, atol=0)


def test_velocity_norm_keeps_autograd():
    v = torch.tensor([[3.0, 4.0]], requires_grad=True)
    velocity_norm(v).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.6, 0.8]]))


def test_velocity_norm_rejects_0dim():
    with pytest.raises(ConfigError):
        velocity_norm(torch.tensor(1.0))


def test_compare_hand_values():
    # sample 0: orthogonal, equal norms; 1: v_theta = 2 v_ref; 2: identical; 3: opposite.
    v_theta = torch.tensor([[3.0, 4.0], [2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    v_ref = torch.tensor([[4.0, -3.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    c = compare_velocities(v_theta, v_ref)
    exp = dict(
        norm_theta=[5.0, 2.0, math.sqrt(2), 1.0],
        norm_ref=[5.0, 1.0, math.sqrt(2), 1.0],
        ratio=[1.0, 2.0, 1.0, 1.0],
        cos=[0.0, 1.0, 1.0, -1.0],
        radial=[0.0, 1.0, 0.0, 0.0],
        directional=[50.0, 0.0, 0.0, 4.0],
        radial_share=[0.0, 1.0, 0.0, 0.0],
    )
    for name, values in exp.items():
        torch.testing.assert_close(
            getattr(c, name), torch.tensor(values, dtype=torch.float64), rtol=1e-14, atol=1e-14, msg=name
        )


def test_drift_decomposition_is_exact():
    g = torch.Generator().manual_seed(2)
    v_ref = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 1.3, 0.7, -1.0, 2.0, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    mix = torch.tensor([0.0, 0.1, 0.5, 0.0, 3.0, 1e-4], dtype=torch.float64).view(-1, 1, 1, 1)
    v_theta = scales * v_ref + mix * noise
    c = compare_velocities(v_theta, v_ref)
    drift = (v_theta - v_ref).reshape(6, -1).pow(2).sum(1)
    torch.testing.assert_close(c.radial + c.directional, drift, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.drift, drift, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.radial, (c.norm_theta - c.norm_ref) ** 2, rtol=0, atol=0)
    torch.testing.assert_close(c.directional, 2 * c.norm_theta * c.norm_ref * (1 - c.cos), rtol=1e-12, atol=1e-12)
    flat_t, flat_r = v_theta.reshape(6, -1), v_ref.reshape(6, -1)
    cos = (flat_t * flat_r).sum(1) / (flat_t.norm(dim=1) * flat_r.norm(dim=1))
    torch.testing.assert_close(c.cos, cos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.ratio, c.norm_theta / c.norm_ref, rtol=0, atol=0)
    assert ((c.radial_share >= 0) & (c.radial_share <= 1)).all()
    assert drift[0] == 0 and c.radial_share[0] == 0  # v_theta == v_ref: share defined as 0
    torch.testing.assert_close(c.radial_share[1:], c.radial[1:] / drift[1:], rtol=1e-12, atol=0)


def test_compare_is_layout_free():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    b = a * 1.1 + 0.2 * torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    c1, c2 = compare_velocities(a, b), compare_velocities(_pack(a), _pack(b))
    for name, x in c1.to_dict().items():
        np.testing.assert_allclose(c2.to_dict()[name], x, rtol=1e-12, atol=1e-14)


def test_directional_drift_accurate_in_float32_when_directions_nearly_agree():
    # 1 - cos is about 5e-7 here: the naive float32 cosine loses most of its digits.
    g = torch.Generator().manual_seed(4)
    v_ref = torch.randn(4, 4096, generator=g, dtype=torch.float64)
    v_theta = 1.05 * v_ref + 1e-3 * torch.randn(4, 4096, generator=g, dtype=torch.float64)
    exact = compare_velocities(v_theta, v_ref)
    c32 = compare_velocities(v_theta.float(), v_ref.float())
    assert c32.directional.dtype == torch.float32
    torch.testing.assert_close(c32.directional.double(), exact.directional, rtol=1e-3, atol=0)


def test_compare_detaches_and_converts():
    v_theta = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    c = compare_velocities(v_theta, torch.tensor([[0.0, 5.0], [0.0, 2.0]]))
    assert isinstance(c, VelocityComparison)
    assert not c.ratio.requires_grad
    d = c.to_dict()
    assert list(d) == ["norm_theta", "norm_ref", "ratio", "cos", "radial", "directional", "radial_share"]
    assert all(isinstance(x, np.ndarray) and x.shape == (2,) for x in d.values())
    np.testing.assert_allclose(d["ratio"], [1.0, 0.5])
    frame = c.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2
    assert list(frame.columns) == ["sample", *d]
    with pytest.raises(Exception):
        c.ratio = c.cos  # frozen


def test_compare_errors():
    a = torch.ones(3, 4)
    with pytest.raises(ConfigError, match="same shape"):
        compare_velocities(a, torch.ones(3, 5))
    b = a.clone()
    b[1] = 0.0
    with pytest.raises(NumericalError, match=r"^v_ref has a zero or non-finite norm at step 5 for samples \[1\]$"):
        compare_velocities(a, b, step=5)
    a2 = a.clone()
    a2[0, 0] = float("nan")
    a2[2, 3] = float("inf")
    with pytest.raises(NumericalError, match=r"^v_theta has a zero or non-finite norm for samples \[0, 2\]$"):
        compare_velocities(a2, a)
