"""The quality panel with planted effects of known size: paired intervals, the spectrum, Fréchet distances over
any local encoder, image-folder references, and the audit's quality block, spectrum and report. The open_clip
encoder is tested beside the open_clip rewards (tests/test_rewards_open_clip.py, the hps environment)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ngdiag.core.errors import ConfigError
from ngdiag.quality import (
    MEASURES,
    FrechetResult,
    ImageEncoder,
    frechet,
    frechet_distance,
    image_encoder,
    load_image_folder,
    paired_differences,
    quality_panel,
    quality_table,
    radial_power_spectrum,
    saturation,
)
from ngdiag.world.scene import render_seeds

BLEND = 0.7  # the planted desaturation: every pixel moves 30 % of the way to its own grey


def _scenes(n: int = 24) -> torch.Tensor:
    images, _, _ = render_seeds(range(n))
    return images.double()


def _toward_grey(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Each pixel blended toward the grey of its brightest channel ``(m, m, m)``, keeping ``keep`` of its
    colour: ``max`` stays ``m`` and ``max - min`` scales by ``keep``, so the HSV saturation
    ``(max - min) / max`` scales by exactly ``keep``."""
    m = x.amax(dim=1, keepdim=True)
    return m - keep * (m - x)


def _gaussian_kernel(sigma: float, dtype=torch.float64) -> torch.Tensor:
    r = math.ceil(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=dtype) ** 2 / (2 * sigma**2))
    return k / k.sum()


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A separable Gaussian blur with circular padding: a circular convolution, as the FFT sees images."""
    k = _gaussian_kernel(sigma, x.dtype)
    r = len(k) // 2
    pad = torch.nn.functional.pad(x, (r, r, r, r), mode="circular")
    pad = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(pad, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


# ----------------------------------------------------------------------------- paired differences
def test_planted_desaturation_is_the_paired_difference_with_an_interval_that_covers_it():
    reference = _scenes()
    images = _toward_grey(reference, BLEND)
    panel = quality_panel(images, reference, n_resamples=1000, seed=3)
    row = panel.to_frame().set_index("measure").loc["saturation"]
    planted = (BLEND - 1) * float(saturation(reference).mean())  # known in advance from the reference alone
    assert row.model_mean == pytest.approx(BLEND * row.reference_mean, rel=1e-12)
    assert row.difference == pytest.approx(planted, rel=1e-12)
    assert row.ci_low < planted < row.ci_high < 0  # covers it, excludes 0
    assert planted < -0.04  # measured -0.0533 [-0.0589, -0.0495] on these scenes
    # the same seed gives the same interval
    again = quality_panel(images, reference, n_resamples=1000, seed=3).to_frame()
    pd.testing.assert_frame_equal(again, panel.to_frame())
    # no clipping on either side: a constant difference of 0 and a [0, 0] interval
    clip = panel.to_frame().set_index("measure").loc["clipping_rate"]
    assert (clip.difference, clip.ci_low, clip.ci_high, clip.interval_method) == (0.0, 0.0, 0.0, "constant")
    # with images of random colours as well
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64)
    row = quality_panel(_toward_grey(ref, 0.5), ref, n_resamples=500).to_frame().set_index("measure").loc["saturation"]
    assert row.difference == pytest.approx(-0.5 * float(saturation(ref).mean()), rel=1e-12)
    assert row.ci_low < row.difference < row.ci_high < 0


def test_planted_blur_lowers_sharpness_and_high_frequencies_and_the_spectrum_ratio():
    reference = _scenes()
    images = _gaussian_blur(reference, sigma=1.0)
    panel = quality_panel(images, reference, n_resamples=1000)
    frame = panel.to_frame().set_index("measure")
    for measure in ("sharpness", "high_frequency_energy"):
        assert frame.loc[measure, "ci_high"] < 0, measure
    # a normalised kernel keeps the mean luma: a difference within rounding, reported as constant
    assert frame.loc["luminance", "interval_method"] == "constant" and abs(frame.loc["luminance", "difference"]) < 1e-12
    spectrum = panel.spectrum_frame()
    assert list(spectrum.columns) == ["frequency", "model", "reference", "ratio"] and len(spectrum) == 16
    # Known answer: a circular convolution multiplies each frequency's power by |H(f)|^2, the kernel's
    # transfer function, so each ring's ratio lies between the least and the largest |H|^2 in the ring.
    k = _gaussian_kernel(1.0)
    kernel = torch.zeros(32, dtype=torch.float64)
    kernel[: len(k)] = k
    h = torch.fft.fft(kernel).abs() ** 2
    gain = h.view(-1, 1) * h.view(1, -1)  # separable: |H(fy, fx)|^2
    f = torch.fft.fftfreq(32, dtype=torch.float64)
    radius = (f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).sqrt()
    ring = (torch.ceil(radius * 32 - 1e-9) - 1).long()
    for j, ratio in enumerate(spectrum["ratio"]):
        inside = gain[(ring == j) & (radius > 0) & (radius <= 0.5)]
        assert inside.min() - 1e-9 <= ratio <= inside.max() + 1e-9, j
    assert spectrum["ratio"].iloc[0] > 0.95  # measured 0.962: the lowest frequency passes
    assert (spectrum["ratio"].iloc[-4:] < 0.01).all()  # measured 1.7e-4 .. 7.7e-4
    assert spectrum["ratio"].is_monotonic_decreasing


def test_power_spectrum_figure_plots_power_and_the_ratio_to_the_base():
    from ngdiag.report.figures import MODEL_COLORS, power_spectrum

    frequency = np.array([0.1, 0.2, 0.3])
    frame = pd.concat([pd.DataFrame({"frequency": frequency, "model": "rl", "power": [1.0, 0.5, 0.2]}),
                       pd.DataFrame({"frequency": frequency, "model": "base", "power": [1.0, 0.25, 0.05]})])
    fig = power_spectrum(frame)
    top, bottom = fig.axes
    assert [line.get_label() for line in top.lines] == ["base", "rl"]
    assert top.get_yscale() == "log" and top.lines[1].get_color() == MODEL_COLORS["rl"]
    np.testing.assert_allclose(bottom.lines[0].get_ydata(), [1.0, 2.0, 4.0])
    assert len(power_spectrum(frame[frame["model"] == "rl"]).axes) == 1  # no base: no ratio panel


def test_lowest_ring_holds_the_lowest_frequency():
    n = 16
    x = torch.arange(n, dtype=torch.float64)
    wave = (0.5 + 0.3 * torch.cos(2 * math.pi * x / n)).view(1, 1, 1, n).expand(1, 3, n, n)
    freqs, power = radial_power_spectrum(wave)
    assert power[0].argmax().item() == 0 and freqs[0].item() == pytest.approx(1 / 32)
    assert power[0, 1:].abs().max().item() < 1e-20


def test_paired_differences_from_the_long_table_equal_the_panel_from_images():
    reference = _scenes(12)
    images = _toward_grey(reference, BLEND)
    long = pd.concat([quality_table(reference).assign(model="base", sample=range(12)),
                      quality_table(images).assign(model="rl", sample=range(12))], ignore_index=True)
    long = long.sample(frac=1.0, random_state=0)  # row order does not matter: pairs are joined by sample
    from_table = paired_differences(long, "rl", "base", n_resamples=500, seed=1).to_frame()
    from_images = quality_panel(images, reference, n_resamples=500, seed=1).to_frame()
    pd.testing.assert_frame_equal(from_table, from_images, rtol=1e-12)
    # clusters: whole prompts resampled; the mean is the same, the interval differs
    long["prompt"] = long["sample"] % 3
    clustered = paired_differences(long, "rl", "base", clusters="prompt", n_resamples=500, seed=1)
    assert clustered.num_clusters == 3
    np.testing.assert_allclose(clustered.difference, from_table["difference"], rtol=1e-12)
    with pytest.raises(ConfigError, match="same samples"):
        paired_differences(long[~((long["model"] == "rl") & (long["sample"] == 0))], "rl")
    with pytest.raises(ConfigError, match="no rows of model"):
        paired_differences(long, "rl+renorm")
    with pytest.raises(ConfigError, match="same shape"):
        quality_panel(images[:4], reference[:5])


def test_panel_to_dict_is_json():
    reference = _scenes(6)
    panel = quality_panel(_gaussian_blur(reference), reference, n_resamples=200)
    doc = json.loads(json.dumps(panel.to_dict()))
    assert set(doc["measures"]) == set(MEASURES) and doc["num_pairs"] == 6 and len(doc["spectrum"]["frequency"]) == 16


# ----------------------------------------------------------------------------- Fréchet distance
class ChannelMeans(torch.nn.Module):
    def forward(self, images):
        return images.mean(dim=(2, 3))


def _shifted_sets():
    g = torch.Generator().manual_seed(0)
    a = 0.3 + 0.4 * torch.rand(64, 3, 8, 8, generator=g)
    b = a.clone()
    b[:, 0] += 0.1  # the channel-mean features shift by 0.1 in one coordinate, the covariance is unchanged
    return a, b


def test_frechet_with_a_tiny_module_states_its_sample_sizes():
    a, b = _shifted_sets()
    same = frechet(ChannelMeans(), a, a)
    assert isinstance(same, FrechetResult) and same.value == pytest.approx(0.0, abs=1e-6)
    shifted = frechet(ChannelMeans(), b, a[:48])  # any reference size
    assert (shifted.num_images, shifted.num_reference, shifted.num_features) == (64, 48, 3)
    assert shifted.encoder == "ChannelMeans"
    full = frechet(ChannelMeans(), b, a)
    assert float(full) == pytest.approx(0.01, rel=1e-3)  # ||shift||^2
    assert float(full) == pytest.approx(frechet_distance(_WithWidth(), b, a), rel=1e-6)  # float32 features there
    bigger = a.clone()
    bigger[:, 0] += 0.2
    assert frechet(ChannelMeans(), bigger, a).value == pytest.approx(0.04, rel=1e-3)
    # a plain callable works too; a 4-d output is refused
    assert frechet(lambda x: x.mean(dim=(2, 3)), b, a).value == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        frechet(torch.nn.Identity(), a, a)
    with pytest.raises(ConfigError, match="at least 2"):
        frechet(ChannelMeans(), a[:1], a)


class _WithWidth(ChannelMeans):
    num_features = 3


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    import transformers

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    transformers.CLIPModel(config).eval().save_pretrained(str(folder))
    return folder


def test_frechet_with_a_tiny_clip_folder(clip_folder):
    import transformers

    encoder = image_encoder(f"clip:{clip_folder}")
    assert encoder.num_features == 8 and encoder.name == f"clip:{clip_folder}"
    assert image_encoder(clip_folder).num_features == 8  # a bare folder is a CLIP folder
    images = _scenes(16).float()
    # the features are CLIPModel.get_image_features of OpenAI-normalised pixels at the model's size
    model = transformers.CLIPModel.from_pretrained(str(clip_folder), local_files_only=True).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=(images - mean) / std)
    expected = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(encoder.encode(images, batch=5).float(), expected, rtol=1e-4, atol=1e-5)
    same = frechet(encoder, images, images)
    assert same.value == pytest.approx(0.0, abs=1e-4) and same.num_features == 8
    darker = frechet(encoder, images * 0.8, images).value
    darkest = frechet(encoder, images * 0.5, images).value
    assert 0 < darker < darkest  # measured 0.116 and 2.68 with this random CLIP (16 images)
    # a processor config is read when the folder has one
    (clip_folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 32}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    try:
        assert image_encoder(f"pickscore:{clip_folder}").preprocess.mean == (0.5, 0.5, 0.5)
    finally:
        (clip_folder / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="image statistic"):
        image_encoder("brightness")


def test_an_image_folder_reference_round_trips(tmp_path):
    from PIL import Image

    images = _scenes(6).float()
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(tmp_path / f"{i:02d}.{'png' if i % 2 else 'PNG'}")
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_image_folder(tmp_path)
    assert loaded.shape == (6, 3, 32, 32) and loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=0)
    assert (loaded - images).abs().max() <= 0.5 / 255 + 1e-6
    assert load_image_folder(tmp_path, size=(16, 16)).shape == (6, 3, 16, 16)
    # as a reference: loaded at the images' size
    result = frechet(ChannelMeans(), images, tmp_path)
    assert result.num_reference == 6 and result.value == pytest.approx(0.0, abs=1e-5)
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="area")
    assert frechet(ChannelMeans(), small, tmp_path).num_reference == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no PNG or JPEG"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    Image.fromarray(pixels[0]).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(pixels[0][:16]).save(tmp_path / "mixed" / "b.jpg")
    with pytest.raises(ConfigError, match="pass size="):
        load_image_folder(tmp_path / "mixed")
    assert load_image_folder(tmp_path / "mixed", size=(32, 32)).shape == (2, 3, 32, 32)


def test_image_encoder_of_the_world_judge(tmp_path):
    from ngdiag.world.judge import WorldJudge, save_judge

    torch.manual_seed(0)
    judge = WorldJudge(width=4)
    save_judge(judge, tmp_path / "judge")
    for spec in (f"world:{tmp_path / 'judge'}", tmp_path / "judge", judge):
        encoder = image_encoder(spec)
        assert isinstance(encoder, ImageEncoder) and encoder.num_features == 16
    images = _scenes(4).float()
    torch.testing.assert_close(image_encoder(tmp_path / "judge").encode(images).float(), judge.features(images).detach())


# ----------------------------------------------------------------------------- the audit
def test_audit_quality_block_has_intervals_spectrum_and_report(tiny_bases, tmp_path):
    from ngdiag.models.generation import SamplingConfig
    from ngdiag.models.loading import load_checkpoint
    from ngdiag.testing import save_scaled_finetune
    from ngdiag.workflows.audit import AuditConfig, merge_audits, run_audit

    planted = save_scaled_finetune(tiny_bases["flux"], tmp_path / "planted", 1.08)
    ckpt = load_checkpoint(planted, tiny_bases["flux"])
    cfg = AuditConfig(prompts=["a red cube", "a cat"], num_samples=4, sampling=SamplingConfig(num_steps=3), batch_size=2,
                      renorm=True, reward="brightness", grid_size=2)
    result = run_audit(ckpt, cfg, out_dir=tmp_path / "single")
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    block = summary["quality"]
    # 4 samples on 2 prompts: the paired differences are resampled over prompts, as the inflation is
    assert block["interval"]["unit"].startswith("prompts (2 prompts") and block["interval"]["n_resamples"] == cfg.n_resamples
    for key in ("delta_rl_minus_base", "delta_rl_renorm_minus_base"):
        for measure in MEASURES:
            entry = block[key][measure]
            assert set(entry) == {"mean", "std", "ci_low", "ci_high"}
            assert entry["ci_low"] <= entry["mean"] + 1e-12 and entry["mean"] <= entry["ci_high"] + 1e-12
    panel = paired_differences(result.quality, "rl", seed=cfg.seed, clusters=[0, 1, 0, 1])
    assert block["interval"]["method"] == panel.method
    assert block["delta_rl_minus_base"]["saturation"]["ci_low"] == float(panel.ci_low[1])
    # the spectrum: mean over samples per model; renormalising the 1.08 model gives back the base's images
    spectrum = pd.read_csv(tmp_path / "single" / "spectrum.csv")
    assert list(spectrum.columns) == ["frequency", "model", "power"]
    assert set(spectrum["model"]) == {"base", "rl", "rl+renorm"}
    wide = spectrum.pivot(index="frequency", columns="model", values="power")
    np.testing.assert_allclose(wide["rl+renorm"], wide["base"], rtol=1e-3)
    html = (tmp_path / "single" / "report.html").read_text()
    assert 'id="quality"' in html and "Radial power spectrum" not in html.split('id="quality"')[0]
    section = html.split('id="quality"')[1].split("</section>")[0]
    assert "power spectrum" in section and "<img" in section and "BCa bootstrap interval" in section
    assert section.count(" [") >= 2 * len(MEASURES)  # every difference with its interval
    # shards merge to the same spectrum and quality block
    for i in range(2):
        run_audit(ckpt, cfg, out_dir=tmp_path / f"shard{i}", shard=(i, 2))
    merge_audits([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")
    assert (tmp_path / "merged" / "spectrum.csv").read_bytes() == (tmp_path / "single" / "spectrum.csv").read_bytes()
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert merged["quality"] == block
