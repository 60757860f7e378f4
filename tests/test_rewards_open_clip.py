"""The open_clip rewards (HPSv2, CLIP score on open_clip) against the real open_clip_torch.

open_clip is the optional extra ``ngdiag[hps]``; it needs torchvision, which needs the torch build it
was made for, so these tests run in a second environment (README, "Tests"; ``.ci/run``). Where
open_clip is not importable (the main test environment) the whole module is skipped.

No weights are downloaded: a tiny ViT architecture is registered with open_clip's own
``add_model_config`` (a JSON model config, like the ones open_clip ships), built with random
weights and saved in each checkpoint layout HPSv2 files come in. ngdiag loads them through
``load_reward("hpsv2:FILE,arch=...")``, exactly the path ``HPS_v2.1_compressed.pt`` takes with
``arch=ViT-H-14``. The references are open_clip's own loader (``create_model(arch, pretrained=FILE)``),
model forward (``image_features`` / ``text_features``, as ``hpsv2/img_score.py`` scores), tokenizer
and evaluation transform (``image_transform``) on PIL images, and HPSv2's own transform (longest side,
black padding) done with torchvision on the float tensor, as HPSv2's bundled open_clip does it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

# This file runs in the hps environment only (open_clip, torchvision and their own torch build; README "Tests").
# Deprecations raised inside those third-party packages (also on import) are shown there instead of failing
# the run; those attributed to ngdiag's own code stay errors (pyproject.toml).
_THIRD_PARTY = r"(open_clip|timm|torchvision|torch|huggingface_hub)(\.|$)"
with warnings.catch_warnings():
    for _category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("default", category=_category, module=_THIRD_PARTY)
    open_clip = pytest.importorskip(  # an optional extra: skipped where it is not installed
        "open_clip", reason="open_clip_torch is not installed (the optional extra: pip install 'ngdiag[hps]')"
    )

from ngdiag.core.errors import CheckpointError, ConfigError  # noqa: E402
from ngdiag.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from ngdiag.rewards.scorers import HPSv2Reward, OpenClipScoreReward, load_reward  # noqa: E402

pytestmark = [
    pytest.mark.hps,
    pytest.mark.filterwarnings(f"default::FutureWarning:{_THIRD_PARTY}"),
    pytest.mark.filterwarnings(f"default::DeprecationWarning:{_THIRD_PARTY}"),
]

PROMPTS = ["a red cube", "two cats on a sofa"]

#: A two-layer ViT / text transformer with open_clip's real tokenizer vocabulary (49408 tokens,
#: 77-token context) and HPSv2's 224 x 224 input: 1.7 M parameters.
TINY_ARCH = "ngdiag-tiny-vit-test"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# Pixel space against open_clip's transform on PIL images, in units of 1/255 (see docs/rewards.md,
# "Measured differences from the PIL pipelines"): measured max 0.95 - 1.10, mean 0.19 - 0.30.
SMOOTH_MAX_DIFF = 1.5
SMOOTH_MEAN_DIFF = 0.4
# On white noise PIL clamps bicubic overshoot to [0, 255] between its passes and torch does not:
# measured mean 0.20 - 0.42, at most 1.5% of the pixels beyond 2/255 (as in tests/test_rewards.py).
NOISE_MEAN_DIFF = 0.6
NOISE_FRAC_ABOVE_2 = 0.03
# Non-square sizes whose PIL resize differs by PIL's 8-bit rounding, and sizes with no resize.
PIL_SIZES = [(300, 200), (160, 240), (1024, 768), (199, 301), (100, 150), (240, 200)]
EXACT_SIZES = [(224, 224), (224, 150)]
# Largest cosine-score gap to open_clip's PIL pipeline on those sizes: measured 2.5e-4 (HPSv2) and
# 4.8e-4 (CLIP score / 100) on the tiny model.
HPS_MAX_GAP = 1e-3


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, H, W) image of low-frequency waves in [0.1, 0.9] (as in tests/test_rewards.py)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(height, 1)
    x = torch.linspace(0, 1, width).view(1, width)
    channels = []
    for _ in range(3):
        fx, fy, px, py = torch.rand(4, generator=gen)
        wave = torch.sin(2 * math.pi * (1 + 3 * fx) * x + 6 * px) * torch.cos(2 * math.pi * (1 + 3 * fy) * y + 6 * py)
        channels.append(0.5 + 0.2 * wave + 0.15 * (x - y))
    return torch.stack(channels)[None]


def images_of(hw=(256, 192), batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.cat([smooth_image(*hw, seed=seed + i) for i in range(batch)])


def quantize(images: torch.Tensor) -> tuple[torch.Tensor, list[Image.Image]]:
    """The 8-bit version of ``images``: as floats in [0, 1] and as PIL images."""
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return u8.float() / 255, [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]


def pixel_space(normalised: torch.Tensor) -> torch.Tensor:
    """Undo OpenAI CLIP mean / std normalisation: back to [0, 1] pixel values."""
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    return normalised * std + mean


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Registers the tiny architecture with open_clip (its public ``add_model_config``); removed afterwards."""
    config_file = tmp_path_factory.mktemp("open_clip_config") / f"{TINY_ARCH}.json"
    config_file.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_file)
    assert TINY_ARCH in open_clip.list_models()
    yield TINY_ARCH
    # open_clip has no public way to unregister; its registry is the module's config list and dict
    paths = getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", [])
    if config_file in paths:
        paths.remove(config_file)
    getattr(open_clip.factory, "_MODEL_CONFIGS", {}).pop(TINY_ARCH, None)


@pytest.fixture(scope="module")
def source_state(tiny_arch) -> dict[str, torch.Tensor]:
    """The random weights every checkpoint below holds, from ``open_clip.create_model``."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory, source_state):
    """The HPSv2 release layout: ``{"state_dict": ...}``."""
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": source_state}, path)
    return path


@pytest.fixture(scope="module")
def hps(hps_file, tiny_arch) -> HPSv2Reward:
    reward = load_reward(f"hpsv2:{hps_file},arch={tiny_arch}")
    assert isinstance(reward, HPSv2Reward)
    return reward


@pytest.fixture(scope="module")
def reference(hps_file, tiny_arch):
    """open_clip's own loading of the same file, as HPSv2's reference builds its model (``output_dict=True``)."""
    model = open_clip.create_model(tiny_arch, pretrained=str(hps_file), output_dict=True).eval()
    return model, open_clip.get_tokenizer(tiny_arch)


def reference_scores(reference, pixel_values: torch.Tensor, prompts=PROMPTS) -> torch.Tensor:
    """``hpsv2/img_score.py``: ``diagonal(image_features @ text_features.T)`` of the model's forward."""
    model, tokenizer = reference
    with torch.no_grad():
        out = model(pixel_values, tokenizer(prompts))
    return (out["image_features"] @ out["text_features"].T).diagonal()


def first_order_gap(reference, got_pixels: torch.Tensor, ref_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine-score gap ``s(ref_pixels) - s(got_pixels)`` and its first-order prediction ``grad s . delta``.

    Both through open_clip's model; when the prediction matches, the whole gap is the effect of the
    pixel difference (model, tokenizer, normalisation and padding are the same on both sides).
    """
    model, tokenizer = reference
    pixels = got_pixels.detach().requires_grad_(True)
    out = model(pixels, tokenizer(PROMPTS))
    scores = (out["image_features"] * out["text_features"]).sum(-1)
    (grad,) = torch.autograd.grad(scores.sum(), pixels)
    predicted = (grad * (ref_pixels - pixels.detach())).flatten(1).sum(1)
    return reference_scores(reference, ref_pixels) - scores.detach(), predicted


def assert_gap_is_the_pixel_difference(reference, got_pixels, ref_pixels, max_gap: float) -> None:
    gap, predicted = first_order_gap(reference, got_pixels, ref_pixels)
    # second-order remainder: measured at most 6% of the largest gap of the batch (plus float32 noise)
    assert (gap - predicted).abs().max() <= 0.1 * gap.abs().max() + 1e-6, (gap, predicted)
    assert gap.abs().max() <= max_gap, gap


# --------------------------------------------------------------------------------------------
# HPSv2 scores.


@pytest.mark.parametrize("hw", [(256, 192), (160, 240), (224, 224)])
def test_hpsv2_equals_open_clip_on_the_same_pixel_values(hps, reference, hw):
    images = images_of(hw)
    scores = hps(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    # the same preprocessed tensor through open_clip's own model, loaded by open_clip from the file
    ref = reference_scores(reference, hps.preprocess(images))
    torch.testing.assert_close(scores, ref, rtol=0, atol=1e-6)  # measured: <= 1.2e-7
    # and through the model's encode_* API with normalize=True (what open_clip's forward calls)
    model, tokenizer = reference
    with torch.no_grad():
        img = model.encode_image(hps.preprocess(images), normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (img * txt).sum(-1), rtol=0, atol=1e-6)
    # the tiny model still tells the prompts and images apart, so the comparisons above mean something
    assert (scores[0] - scores[1]).abs() > 0.05


@pytest.mark.parametrize("hw", PIL_SIZES + EXACT_SIZES)
def test_hpsv2_close_to_open_clip_transform_on_pil_images(hps, reference, hw):
    """HPSv2's geometry, longest side + black padding, as open_clip's ``resize_mode="longest"`` on PIL images.

    HPSv2's bundled open_clip spells it ``image_transform(..., resize_longest_max=True)`` (``ResizeMaxSize``,
    on the float tensor: see the next test); open_clip >= 2.24 calls it ``resize_mode="longest"``
    (``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad``), on the PIL image: the same sizes (Python's
    ``round``), the same black padding with the odd pixel on the right / bottom, PIL's 8-bit resize.
    """
    transform = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    x, pils = quantize(images_of(hw))
    ref_pixels = torch.stack([transform(p) for p in pils])
    got_pixels = hps.preprocess(x)

    d = (pixel_space(got_pixels) - pixel_space(ref_pixels)).abs() * 255
    got, ref = hps(x, PROMPTS), reference_scores(reference, ref_pixels)
    if hw in EXACT_SIZES:  # no resize on either side: identical inputs, identical scores
        assert d.max() < 1e-4, d.max()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        return
    # PIL rounds its 8-bit resize output (up to 0.5/255) and works in fixed point (measured: max
    # 0.99 - 1.10, mean 0.19 - 0.20 on these sizes)
    assert d.max() <= SMOOTH_MAX_DIFF and d.mean() <= SMOOTH_MEAN_DIFF, (d.max(), d.mean())
    # the score gap is that pixel difference's first-order effect; measured 1e-5 - 2.5e-4 (cosines;
    # the two test images score about 0.2 apart), the test allows 1e-3
    assert_gap_is_the_pixel_difference(reference, got_pixels, ref_pixels, max_gap=HPS_MAX_GAP)
    torch.testing.assert_close(got, ref, rtol=0, atol=HPS_MAX_GAP)


def hpsv2_tensor_transform(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's own evaluation transform (its bundled open_clip's ``ResizeMaxSize``), with torchvision.

    There ``ToTensor`` comes first, so the float ``(3, H, W)`` tensor is resized by torchvision's
    ``F.resize`` (bicubic; antialiased since torchvision 0.17) to ``round(side * size / longest)``, then
    padded with 0, ``missing // 2`` on the left / top; nothing happens when the longest side is ``size``.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    height, width = image.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return image
    new_h, new_w = round(height * scale), round(width * scale)
    image = TF.resize(image, [new_h, new_w], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new_h, size - new_w
    return TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)


@pytest.mark.parametrize("hw", PIL_SIZES)
@pytest.mark.parametrize("content", ["smooth", "noise"])
def test_hpsv2_equals_hpsv2_tensor_transform(hps, reference, hw, content):
    """HPSv2's reference resizes the float tensor with torchvision: the same kernel as ngdiag, so no gap."""
    if content == "smooth":
        x, _ = quantize(images_of(hw))
    else:
        x = (torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    geometry = torch.stack([hpsv2_tensor_transform(img) for img in x])
    assert (hps.preprocess.geometry(x) - geometry).abs().max() <= 1e-6  # measured: 0 (bit-identical)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(hps(x, PROMPTS), reference_scores(reference, (geometry - mean) / std), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(1024, 768), (300, 200), (100, 150)])
@pytest.mark.parametrize("kind", ["hpsv2", "clip"])
def test_geometry_matches_open_clip_transform_on_noise(hps_file, tiny_arch, kind, hw):
    """White noise, where antialiasing and the resize kernel matter most (downsampling 4.6x, upsampling 1.5x)."""
    reward = load_reward(f"{kind}:{hps_file},arch={tiny_arch}")
    resize_mode = "longest" if kind == "hpsv2" else "shortest"
    transform = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    gen = torch.Generator().manual_seed(0)
    u8 = (torch.rand(2, 3, *hw, generator=gen) * 255).round().to(torch.uint8)
    ref = pixel_space(torch.stack([transform(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in u8]))
    d = (reward.preprocess.geometry(u8.float() / 255) - ref).abs() * 255
    assert d.mean() <= NOISE_MEAN_DIFF and (d > 2).float().mean() <= NOISE_FRAC_ABOVE_2, (d.mean(), (d > 2).float().mean())


def test_hpsv2_gradients_reach_the_images(hps, reference):
    images = images_of((300, 200)).requires_grad_(True)
    scores = hps(images, PROMPTS)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    # the same gradient through open_clip's own model on the same preprocessing
    model, tokenizer = reference
    x = images.detach().requires_grad_(True)
    out = model(hps.preprocess(x), tokenizer(PROMPTS))
    ref = (out["image_features"] * out["text_features"].detach()).sum(-1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    # each image's score depends on that image only; the reward model is frozen
    (grad0,) = torch.autograd.grad(hps(images, PROMPTS)[0], images)
    assert grad0[1].abs().sum() == 0 and grad0[0].abs().sum() > 0
    assert all(not p.requires_grad for p in hps.parameters()) and not hps.model.training


def test_hpsv2_float64_gradient_matches_finite_differences(hps_file, tiny_arch):
    reward = HPSv2Reward.from_checkpoint(hps_file, clip_arch=tiny_arch, dtype=torch.float64)
    assert next(reward.parameters()).dtype == torch.float64
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 48, generator=gen, dtype=torch.float64).requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.dtype == torch.float64
    (grad,) = torch.autograd.grad(scores.sum(), x)
    direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (reward(x + eps * direction, PROMPTS) - reward(x - eps * direction, PROMPTS)).sum() / (2 * eps)
    # central difference error O(eps^2): measured relative error ~1e-9
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Loading.


@pytest.mark.parametrize("layout", ["state_dict", "plain", "module_prefix"])
def test_hpsv2_loads_each_checkpoint_layout(tmp_path, tiny_arch, source_state, layout):
    payload = {
        "state_dict": {"state_dict": source_state, "epoch": 3},
        "plain": source_state,
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in source_state.items()}},  # saved from DDP
    }[layout]
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save(payload, path)
    reward = load_reward(f"hpsv2:{path},arch={tiny_arch}")
    assert isinstance(reward, HPSv2Reward) and reward.name == "hpsv2" and reward.requires_prompts
    loaded = reward.model.state_dict()
    assert loaded.keys() == source_state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in source_state.items())
    # open_clip's own loader reads the same layouts to the same scores
    images = images_of()
    ref = reference_scores(
        (open_clip.create_model(tiny_arch, pretrained=str(path), output_dict=True).eval(), open_clip.get_tokenizer(tiny_arch)),
        reward.preprocess(images),
    )
    torch.testing.assert_close(reward(images, PROMPTS), ref, rtol=0, atol=1e-6)
    # the class method is the same loader
    direct = HPSv2Reward.from_checkpoint(path, clip_arch=tiny_arch)
    torch.testing.assert_close(direct(images, PROMPTS), reward(images, PROMPTS), rtol=0, atol=0)


def test_hpsv2_checkpoint_errors(tmp_path, tiny_arch, source_state):
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"state_dict": {"unrelated.weight": torch.zeros(2)}}, unrelated)
    missing_key = tmp_path / "missing_key.pt"
    torch.save({"state_dict": {k: v for k, v in source_state.items() if k != "text_projection"}}, missing_key)
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save({"state_dict": {**source_state, "text_projection": torch.zeros(32, 8)}}, wrong_shape)
    for bad in (unrelated, missing_key, wrong_shape):
        with pytest.raises(CheckpointError, match=f"does not match the open_clip architecture {tiny_arch}"):
            load_reward(f"hpsv2:{bad},arch={tiny_arch}")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read reward weights"):
        load_reward(f"hpsv2:{garbage},arch={tiny_arch}")
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(CheckpointError, match="holds neither a state dict"):
        load_reward(f"hpsv2:{not_a_dict},arch={tiny_arch}")

    # open_clip's own error for an unknown architecture becomes a ConfigError
    with pytest.raises(ConfigError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_reward(f"hpsv2:{unrelated},arch=ViT-Q-99")


def test_default_architecture_is_open_clips_vit_h_14_at_224():
    # spec strings without arch= build ViT-H-14 (HPSv2's); too large to build here, so check its config
    assert "ViT-H-14" in open_clip.list_models()
    config = open_clip.get_model_config("ViT-H-14")
    assert config["vision_cfg"]["image_size"] == 224 and config["embed_dim"] == 1024
    assert HPSv2Reward.from_checkpoint.__kwdefaults__["clip_arch"] == "ViT-H-14"


# --------------------------------------------------------------------------------------------
# CLIP score on an open_clip checkpoint.


def test_open_clip_score_equals_100_cos(hps_file, tiny_arch, reference):
    reward = load_reward(f"clip:{hps_file},arch={tiny_arch}")
    assert isinstance(reward, OpenClipScoreReward) and reward.name == "clip"
    images = images_of((300, 200))
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, 100 * reference_scores(reference, reward.preprocess(images)), rtol=0, atol=1e-4)
    (grad,) = torch.autograd.grad(reward(images.requires_grad_(True), PROMPTS).sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("hw", PIL_SIZES + [(224, 224)])
def test_open_clip_score_close_to_open_clip_transform_on_pil_images(hps_file, tiny_arch, reference, hw):
    """open_clip's default evaluation transform: shortest side to 224, centre crop 224."""
    reward = OpenClipScoreReward.from_checkpoint(hps_file, clip_arch=tiny_arch)
    transform = open_clip.image_transform(224, is_train=False)
    x, pils = quantize(images_of(hw))
    ref_pixels = torch.stack([transform(p) for p in pils])
    d = (pixel_space(reward.preprocess(x)) - pixel_space(ref_pixels)).abs() * 255
    assert d.max() <= SMOOTH_MAX_DIFF and d.mean() <= SMOOTH_MEAN_DIFF, (d.max(), d.mean())
    # the same first-order check as for HPSv2, in cosines (the score is 100 cos): measured gap
    # 4e-7 - 4.8e-4, at most 5% second-order remainder (6% for HPSv2)
    assert_gap_is_the_pixel_difference(reference, reward.preprocess(x), ref_pixels, max_gap=HPS_MAX_GAP)
    torch.testing.assert_close(reward(x, PROMPTS), 100 * reference_scores(reference, ref_pixels), rtol=0, atol=100 * HPS_MAX_GAP)


def test_open_clip_score_crops_the_same_window_on_odd_margins(hps_file, tiny_arch):
    """open_clip (torchvision's ``CenterCrop``) offsets the crop by ``round((old - new) / 2)``, one pixel
    more than transformers' ``(old - new) // 2`` when the margin is odd; the open_clip reward follows it.

    203 x 300: the width becomes int(224 * 300 / 203) = 331, margin 107; both crop from column 54.
    """
    reward = OpenClipScoreReward.from_checkpoint(hps_file, clip_arch=tiny_arch)
    assert reward.preprocess.crop_offset == "round"
    x, pils = quantize(images_of((203, 300)))
    ref = pixel_space(torch.stack([open_clip.image_transform(224, is_train=False)(p) for p in pils]))
    got = pixel_space(reward.preprocess(x))
    d = (got - ref).abs() * 255
    assert d.max() <= SMOOTH_MAX_DIFF and d.mean() <= SMOOTH_MEAN_DIFF, (d.max(), d.mean())
    floor = pixel_space(dataclasses.replace(reward.preprocess, crop_offset="floor")(x))
    assert ((floor - ref).abs() * 255).max() > 2  # the transformers rule would take another window


def test_tokenizer_is_open_clips_for_the_architecture(hps, tiny_arch):
    tokens = hps.tokenizer(PROMPTS)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))  # the CLIP BPE, <start> ... <end>, zero padded
    assert np.array_equal(tokens[:, 0].numpy(), [49406, 49406])


def test_image_encoder_of_an_open_clip_checkpoint_is_encode_image(hps_file, tiny_arch, source_state):
    """``ngdiag.quality.image_encoder`` on an open_clip checkpoint (the reward spec's syntax) and on an open_clip
    model object: open_clip's ``encode_image`` after the CLIP-score reward's preprocessing; a Fréchet distance
    of a set with itself is 0 and grows when the images darken."""
    from ngdiag.quality import frechet, image_encoder

    encoder = image_encoder(f"clip:{hps_file},arch={tiny_arch}")
    assert encoder.num_features == TINY_CONFIG["embed_dim"]
    x = images_of((256, 192), batch=8)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    model.load_state_dict(source_state)
    model.eval()
    preprocess = OpenClipScoreReward.from_checkpoint(hps_file, clip_arch=tiny_arch).preprocess
    with torch.no_grad():
        expected = model.encode_image(preprocess(x))
    torch.testing.assert_close(encoder.encode(x).float(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image_encoder(model).encode(x).float(), expected, rtol=1e-5, atol=1e-6)
    same = frechet(encoder, x, x)
    assert same.value == pytest.approx(0.0, abs=1e-3) and (same.num_images, same.num_reference) == (8, 8)
    assert frechet(encoder, x * 0.5, x).value > 10 * max(same.value, 1e-4)
