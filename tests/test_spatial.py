"""Spatial ratio maps: planted scales on one quadrant of the latent grid (SD3 and the packed FLUX layout)
and on the whole image, their top-10 % share, the audit's outputs and report, and the live probe."""

import json
import math

import numpy as np
import pytest
import torch

import ngdiag
from ngdiag.core.errors import NumericalError
from ngdiag.models.loading import load_checkpoint
from ngdiag.probes.spatial import SpatialMaps, locality, log_ratio_map, top_share
from ngdiag.testing import TINY_CALL_KWARGS, save_scaled_finetune, tiny_pipeline
from ngdiag.workflows.audit import AuditConfig, run_audit

PROMPTS = ["a red cube", "a cat on a hill", "a lighthouse at dusk"]
SCALE = 1.1


class QuadrantScaled(torch.nn.Module):
    """A transformer whose output is multiplied by ``SCALE`` on the top-right quadrant of the latent grid.

    The mask is built by hand in the transformer's own layout: on the (C, h, w) grid for SD3, and on
    the row-major 2 x 2 token grid for FLUX (token ``(i, j)`` covers latent rows ``2i, 2i+1`` and
    columns ``2j, 2j+1``), so the test checks the adapter's unpacking against an independent layout.
    """

    def __init__(self, inner, packed: bool):
        super().__init__()
        self.inner = inner if isinstance(inner, torch.nn.Module) else None
        self.call = inner
        self.packed = packed

    @property
    def dtype(self):
        return self.call.dtype

    def forward(self, *args, **kwargs):
        out = self.call(*args, **kwargs)[0]
        mask = torch.ones_like(out)
        if self.packed:
            side = int(round(out.shape[1] ** 0.5))
            grid = torch.ones(side, side)
            grid[: side // 2, side // 2:] = SCALE
            mask = mask * grid.reshape(1, -1, 1).to(out)
        else:
            h, w = out.shape[2:]
            mask[:, :, : h // 2, w // 2:] = SCALE
        return (out * mask,)


def _quadrant_checkpoint(base, family):
    ckpt = load_checkpoint(base, base)  # theta and ref: two copies of the same weights
    ckpt.theta = ckpt.adapter.velocity_model(QuadrantScaled(ckpt.theta.transformer, family != "sd3"))
    return ckpt


def _config(**kw):
    return AuditConfig(prompts=PROMPTS, num_samples=4, sampling=ngdiag.SamplingConfig(num_steps=3), batch_size=2,
                       grid_size=2, **kw)


def _expected(grid_shape):
    h, w = grid_shape
    expected = np.ones((h, w))
    expected[: h // 2, w // 2:] = SCALE
    return expected


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2-klein", "qwenimage"])
def test_quadrant_scale_maps_to_its_quadrant_and_is_local(tiny_bases, family):
    ckpt = _quadrant_checkpoint(tiny_bases[family], family)
    result = run_audit(ckpt, _config(spatial_maps=True))
    maps = result.spatial
    side = 32 // ckpt.adapter.pipe.vae_scale_factor  # 32 x 32 images: the latent grid, also for packed tokens
    assert maps.grid == (side, side)
    expected = _expected(maps.grid)
    np.testing.assert_allclose(maps.mean_map, expected, rtol=0, atol=2e-6)
    assert maps.step_maps.shape == (3, side, side) and maps.sample_maps.shape == (4, side, side)
    np.testing.assert_allclose(maps.step_maps, np.broadcast_to(expected, (3, side, side)), rtol=0, atol=2e-6)
    np.testing.assert_allclose(maps.sample_maps, np.broadcast_to(expected, (4, side, side)), rtol=0, atol=2e-6)
    assert maps.sample_ids.tolist() == [0, 1, 2, 3]
    # a quarter of the P positions carry the excess: the top ceil(P / 10) hold that many quarters of it
    # (26/64 on the 16 x 16 grid of SD3 and FLUX, 7/16 on Qwen-Image's 8 x 8)
    assert maps.top_share == pytest.approx(math.ceil(side * side / 10) / (side * side / 4), abs=1e-4)
    assert maps.locality == "local"
    block = result.summary()["spatial"]
    assert block["locality"] == "local" and block["grid"] == [side, side] and block["num_sample_maps"] == 4
    assert block["mean_map_max"] == pytest.approx(SCALE, abs=2e-6) and block["mean_map_min"] == pytest.approx(1, abs=2e-6)


def test_uniform_scale_is_uniform(tiny_bases, tmp_path):
    ft = save_scaled_finetune(tiny_bases["sd3"], tmp_path / "ft", SCALE)
    result = run_audit(load_checkpoint(ft, tiny_bases["sd3"]), _config())
    maps = result.spatial
    np.testing.assert_allclose(maps.mean_map, np.full((16, 16), SCALE), rtol=0, atol=2e-6)
    assert maps.top_share == pytest.approx(26 / 256, abs=1e-3) and maps.locality == "uniform"
    # without spatial_maps only the image grid's samples keep their own map
    assert maps.sample_ids.tolist() == [0, 1] and maps.sample_maps.shape == (2, 16, 16)


def test_audit_folder_report_fingerprint_and_old_parts(tiny_bases, tmp_path):
    ckpt = _quadrant_checkpoint(tiny_bases["sd3"], "sd3")
    out = tmp_path / "audit"
    result = run_audit(ckpt, _config(), out_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema_version"] == 1 and summary["spatial"]["locality"] == "local"
    assert summary["config"]["spatial_maps"] is False  # recorded; test_runs pins that old fingerprints still match
    with np.load(out / "spatial.npz") as data:
        np.testing.assert_allclose(data["mean_map"], _expected((16, 16)), atol=2e-6)
        assert data["step_maps"].shape == (3, 16, 16) and data["sample_ids"].tolist() == [0, 1]
    html = (out / "report.html").read_text()
    assert 'id="spatial"' in html and "is <strong>local</strong>" in html
    # parts written before spatial maps existed: the audit still finishes, without maps
    for part in (out / "parts").glob("spatial-*.npz"):
        part.unlink()
    from ngdiag.runs.engine import load_finished
    from ngdiag.workflows.audit import AuditWorkflow

    old = load_finished(AuditWorkflow(result.config, ckpt.describe()), out)
    assert old.spatial is None and "spatial" not in old.summary()
    from ngdiag.report.html import render_audit_report

    assert 'id="spatial"' not in render_audit_report(old.summary(), old.per_step, old.per_sample)


def test_share_rule_and_zero_norm():
    assert top_share(np.ones((10, 10))) is None and locality(None) == "none"
    m = np.ones((10, 10))
    m[0, :5] = 2.0  # 5 of 100 positions: all the excess in the top 10
    assert top_share(m) == pytest.approx(1.0) and locality(1.0) == "local"
    assert locality(0.25) == "mixed" and locality(0.2) == "uniform" and locality(0.31) == "local"
    with pytest.raises(NumericalError, match="zero or non-finite norm .* step 3 .* samples \\[7\\]"):
        log_ratio_map(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), step=3, sample_ids=[7])


def test_join_is_the_mean_of_log_maps():
    rng = np.random.default_rng(0)
    logs = rng.normal(size=(3, 5, 4, 4))  # steps, samples, h, w
    parts = [{"times": np.array([1.0, 0.6, 0.3]), "step_log_sum": logs[:, s].sum(axis=1), "count": s.stop - s.start,
              "ids": np.arange(s.start, s.stop), "sample_log_maps": logs[:, s].mean(axis=0)} for s in (slice(0, 2), slice(2, 5))]
    maps = SpatialMaps.join(parts)
    np.testing.assert_allclose(maps.mean_map, np.exp(logs.mean(axis=(0, 1))))
    np.testing.assert_allclose(maps.step_maps, np.exp(logs.mean(axis=1)))
    np.testing.assert_allclose(maps.sample_maps, np.exp(logs.mean(axis=0)), rtol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2-klein", "qwenimage"])
def test_live_probe_records_maps_on_the_latent_grid(family):
    pipe = tiny_pipeline(family)
    ref = tiny_pipeline(family).transformer
    masked = QuadrantScaled(lambda output: output, packed=family != "sd3")  # the same mask, as a hook on the pipeline's transformer
    handle = pipe.transformer.register_forward_hook(lambda module, args, output: masked.forward(output))
    try:
        with ngdiag.probe(pipe, ref=ref) as rec:
            pipe(prompt=["a cat", "a dog"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 **TINY_CALL_KWARGS[family])
    finally:
        handle.remove()
    maps = rec.spatial()
    side = 32 // pipe.vae_scale_factor
    assert maps.step_maps.shape == (2, side, side) and maps.sample_maps.shape == (2, side, side)
    np.testing.assert_allclose(maps.mean_map, _expected((side, side)), atol=2e-6)
    assert maps.locality == "local"


def test_cli_spatial_maps_option_and_summary_line(tiny_bases, tmp_path):
    from tests.helpers import run_cli

    ft = save_scaled_finetune(tiny_bases["sd3"], tmp_path / "ft", SCALE)
    code, out, err = run_cli("audit", ft, "--base", tiny_bases["sd3"], "--prompt", "a cat", "--num-samples", 3,
                             "--steps", 2, "--out", tmp_path / "a", "--quiet", "--spatial-maps")
    assert code == 0, err
    assert "spatial    : uniform" in out
    with np.load(tmp_path / "a" / "spatial.npz") as data:
        assert data["sample_ids"].tolist() == [0, 1, 2]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["config"]["spatial_maps"] is True


def test_held_out_share_sees_through_noise_but_keeps_a_real_hot_spot():
    from ngdiag.probes.spatial import held_out_top_share, top_share

    rng = np.random.default_rng(0)
    # uniform inflation of 6 % plus position noise: the in-sample top share reads "local", the held-out one not
    noisy = np.exp(np.log(1.06) + 0.15 * rng.standard_normal((16, 16, 16)))
    mean_map = np.exp(np.log(noisy).mean(axis=0))
    assert top_share(mean_map) > 0.2
    assert held_out_top_share(noisy) < 0.15
    # a real hot spot (one quadrant at 1.1, the rest at 1) with weaker noise (0.02) is found again on held-out
    # samples (with noise 0.15 and 16 maps it is not: the held-out share needs samples in proportion to the noise)
    planted = np.ones((16, 16))
    planted[:8, :8] = 1.1
    spot = planted * np.exp(0.02 * rng.standard_normal((16, 16, 16)))
    assert held_out_top_share(spot) > 0.3
    exact = np.repeat(planted[None], 4, axis=0)  # noise-free maps: held out = in sample
    assert held_out_top_share(exact) == pytest.approx(top_share(planted), rel=1e-12)
    assert held_out_top_share(exact[:3]) is None


def test_the_reading_uses_every_sample_whichever_maps_are_kept(tiny_bases):
    """The held-out share comes from all samples (even and odd ids), not from the maps kept for the image
    grid: the grid's size or --spatial-maps does not change the reading."""
    from ngdiag.probes.spatial import held_out_top_share

    ckpt = _quadrant_checkpoint(tiny_bases["sd3"], "sd3")
    few = run_audit(ckpt, AuditConfig(prompts=PROMPTS, num_samples=6, sampling=ngdiag.SamplingConfig(num_steps=3),
                                      batch_size=4, grid_size=2)).spatial
    every = run_audit(ckpt, AuditConfig(prompts=PROMPTS, num_samples=6, sampling=ngdiag.SamplingConfig(num_steps=3),
                                        batch_size=4, grid_size=2, spatial_maps=True)).spatial
    assert len(few.sample_ids) == 2 and len(every.sample_ids) == 6
    assert few.held_out_top_share == pytest.approx(every.held_out_top_share, rel=1e-9)
    # and it is the held-out share of all six samples' own maps (even ids against odd ids)
    assert every.held_out_top_share == pytest.approx(held_out_top_share(every.sample_maps), rel=1e-6)
