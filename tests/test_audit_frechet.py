"""The audit's Fréchet distance to the base with any image encoder (``--fd-encoder``)."""

import json

import numpy as np
import pytest
import torch

from ngdiag.models.generation import SamplingConfig
from ngdiag.models.loading import load_checkpoint
from ngdiag.quality import frechet
from ngdiag.testing import TINY_CALL_KWARGS, save_scaled_finetune
from ngdiag.workflows.audit import AuditConfig, merge_audits, run_audit
from ngdiag.world.build import ASSETS
from tests.helpers import run_cli

JUDGE = f"world:{ASSETS / 'judge'}"


def _config(**kw):
    sampling = SamplingConfig(num_steps=3, guidance_scale=2.0, **TINY_CALL_KWARGS["sd3"])
    return AuditConfig(prompts=["a red circle", "a blue square", "a green star"], num_samples=18, sampling=sampling,
                       seed=2, batch_size=6, reward="brightness", grid_size=18, fd_encoder=JUDGE, **kw)


@pytest.fixture(scope="module")
def planted(tiny_bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    base = tiny_bases["sd3"]
    return base, {s: save_scaled_finetune(base, root / f"x{s}", s) for s in (1.0, 1.2)}


def test_fd_is_zero_for_the_base_itself_and_what_the_encoder_gives_on_the_images(planted, tmp_path):
    base, fts = planted
    same = run_audit(load_checkpoint(fts[1.0], base), _config())
    assert np.array_equal(same.features["rl"], same.features["base"])  # the same images, the same features
    spread = float(np.trace(np.cov(same.features["base"].T)))  # about 717 over the judge's 128 features
    assert abs(same.frechet["rl"].value) < 1e-6 * spread  # zero up to the matrix square root's rounding (1e-4)
    assert same.frechet["rl"].num_images == same.frechet["rl"].num_reference == 18
    result = run_audit(load_checkpoint(fts[1.2], base), _config(renorm=True), out_dir=tmp_path / "a")
    fd = result.frechet["rl"]
    assert fd.value > 1e-4 and fd.num_features == 128
    # independently: the same encoder on the audit's own images (grid_size = num_samples keeps them all)
    images = {m: torch.as_tensor(a) for m, a in result.images.items()}
    direct = frechet(JUDGE, images["rl"], images["base"])
    assert fd.value == pytest.approx(direct.value, rel=1e-6, abs=1e-9)
    assert result.frechet["rl+renorm"].value < fd.value  # renormalising moves the images back towards the base's
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    block = summary["quality"]["frechet"]
    assert block["encoder"] == JUDGE and block["rl"]["value"] == pytest.approx(fd.value)
    assert "Fréchet distance to the base" in (tmp_path / "a" / "report.html").read_text()
    # shards write the features in their parts; the merge gives the single run's distances
    for i in range(2):
        run_audit(load_checkpoint(fts[1.2], base), _config(renorm=True), out_dir=tmp_path / f"s{i}", shard=(i, 2))
    merged = merge_audits([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")
    assert merged.frechet["rl"].value == pytest.approx(fd.value, rel=1e-9)


def test_fd_encoder_is_checked_before_anything_is_written(planted, tmp_path):
    base, fts = planted
    args = ["audit", fts[1.2], "--base", base, "--num-samples", 2, "--steps", 2, "--quiet"]
    code, _, err = run_cli(*args, "--fd-encoder", JUDGE, "--out", tmp_path / "a")
    assert code == 2 and "needs a reward" in err and not (tmp_path / "a").exists()
    code, _, err = run_cli(*args, "--reward", "brightness", "--fd-encoder", "clip:/no/such/folder", "--out", tmp_path / "b")
    assert code == 2 and "Traceback" not in err and not (tmp_path / "b").exists()
    code, _, err = run_cli(*args, "--reward", "brightness", "--fd-encoder", "brightness", "--out", tmp_path / "c")
    assert code == 2 and "not an image encoder" in err and not (tmp_path / "c").exists()
    with pytest.raises(Exception, match="needs a reward"):
        AuditConfig(prompts=["x"], num_samples=2, fd_encoder=JUDGE)
