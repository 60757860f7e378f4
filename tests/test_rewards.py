"""Tests of ngdiag.rewards.preprocess and ngdiag.rewards.scorers (offline, tiny models)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    center_crop,
    clip_preprocess,
    hpsv2_preprocess,
    pad_to_square,
)
from ngdiag.rewards.scorers import (
    REWARD_KINDS,
    BrightnessReward,
    ClipScoreReward,
    ContrastReward,
    PickScoreReward,
    Reward,
    SaturationReward,
    load_reward,
)

# Pixel-space tolerances against the PIL pipelines, in units of 1/255 (see docs/rewards.md).
# Both sides use the same antialiased bicubic kernel (a = -0.5); PIL rounds its 8-bit output
# (<= 0.5) and works in fixed point, measured on smooth images: max 1.10, mean 0.31.
SMOOTH_MAX_DIFF = 1.5
SMOOTH_MEAN_DIFF = 0.4
# On white noise PIL's clamp to [0, 255] between its horizontal and vertical passes changes
# overshooting pixels; measured mean 0.42, fraction above 2/255 at most 1.5%.
NOISE_MEAN_DIFF = 0.6
NOISE_FRAC_ABOVE_2 = 0.03

SIZES = [(300, 200), (160, 240), (1024, 768), (199, 301)]  # portrait, landscape (upsampled), SD-like, odd


def _clip_image_processor(**kwargs):
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kwargs)


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A (1, 3, H, W) image of low-frequency waves in [0.1, 0.9], like a natural image's colour field."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(height, 1)
    x = torch.linspace(0, 1, width).view(1, width)
    channels = []
    for _ in range(3):
        fx, fy, px, py = torch.rand(4, generator=gen)
        wave = torch.sin(2 * math.pi * (1 + 3 * fx) * x + 6 * px) * torch.cos(2 * math.pi * (1 + 3 * fy) * y + 6 * py)
        channels.append(0.5 + 0.2 * wave + 0.15 * (x - y))
    return torch.stack(channels)[None]


def quantize(images: torch.Tensor) -> tuple[torch.Tensor, list[Image.Image]]:
    """The 8-bit version of ``images``: as floats in [0, 1] and as PIL images."""
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    pils = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in u8]
    return u8.float() / 255, pils


def pil_hpsv2_geometry(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's ResizeMaxSize done with PIL: longest side to ``size`` (bicubic), pasted on black."""
    width, height = image.size
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((size - new_w) // 2, (size - new_h) // 2))
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def diff_255(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs() * 255


# --------------------------------------------------------------------------------------------
# Preprocessing against the PIL references.


@pytest.mark.parametrize("hw", SIZES)
def test_clip_preprocess_matches_transformers_pil_processor(hw):
    processor = _clip_image_processor()
    x, pils = quantize(smooth_image(*hw))
    ref = processor(images=pils, return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    pre = clip_preprocess(processor)
    d = diff_255(pre.geometry(x), ref * std + mean)  # compare in pixel space, before normalisation
    assert d.max() <= SMOOTH_MAX_DIFF and d.mean() <= SMOOTH_MEAN_DIFF, (d.max(), d.mean())
    # normalised outputs differ by the same amount divided by std
    assert (pre(x) - ref).abs().max() <= SMOOTH_MAX_DIFF / 255 / min(OPENAI_CLIP_STD) + 1e-6


@pytest.mark.parametrize("hw", [(90, 61), (61, 90)])
def test_clip_preprocess_reads_processor_config(hw):
    # non-default size, non-square crop and statistics, all read from the processor
    processor = _clip_image_processor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
    )
    pre = clip_preprocess(processor)
    assert (pre.size, pre.crop_size, pre.mean, pre.std) == (40, (32, 36), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x, pils = quantize(smooth_image(*hw, seed=1))
    ref = processor(images=pils, return_tensors="pt")["pixel_values"]
    d = diff_255(pre(x) * torch.tensor(pre.std).view(1, 3, 1, 1), ref * torch.tensor(pre.std).view(1, 3, 1, 1))
    assert d.max() <= SMOOTH_MAX_DIFF and d.mean() <= SMOOTH_MEAN_DIFF, (d.max(), d.mean())


@pytest.mark.parametrize("hw", SIZES)
def test_hpsv2_preprocess_matches_pil_resize_and_black_padding(hw):
    x, pils = quantize(smooth_image(*hw, seed=2))
    ref = torch.stack([pil_hpsv2_geometry(p) for p in pils])
    got = hpsv2_preprocess().geometry(x)
    d = diff_255(got, ref)
    assert d.max() <= SMOOTH_MAX_DIFF and d.mean() <= SMOOTH_MEAN_DIFF, (d.max(), d.mean())
    # the padding is exactly black, on the same rows / columns as the reference
    black = ref.sum(dim=1) == 0
    assert black.any() and torch.all(got.sum(dim=1)[black].abs() < 2 / 255)


@pytest.mark.parametrize("hw", [(300, 200), (160, 240)])
def test_preprocess_on_noise_differs_only_where_pil_clamps(hw):
    gen = torch.Generator().manual_seed(3)
    x, pils = quantize(torch.rand(1, 3, *hw, generator=gen))
    ref_clip = _clip_image_processor()(images=pils, return_tensors="pt")["pixel_values"]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    for got, ref in [
        (clip_preprocess().geometry(x), ref_clip * std + mean),
        (hpsv2_preprocess().geometry(x), torch.stack([pil_hpsv2_geometry(p) for p in pils])),
    ]:
        d = diff_255(got, ref)
        assert d.mean() <= NOISE_MEAN_DIFF and (d > 2).float().mean() <= NOISE_FRAC_ABOVE_2


@pytest.mark.parametrize("layout", ["crop", "pad"])
def test_preprocess_gradients_match_finite_differences(layout):
    pre = ImagePreprocess(layout=layout, size=6, crop_size=(6, 6) if layout == "crop" else None)
    x = torch.rand(1, 3, 9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pre, (x,))


def test_center_crop_and_pad_offsets():
    img = torch.arange(5 * 7, dtype=torch.float32).view(1, 1, 5, 7)
    assert torch.equal(center_crop(img, 3, 4), img[..., 1:4, 1:5])
    padded = pad_to_square(img, 10, fill=-1.0)  # 3 columns: 1 left, 2 right; 5 rows: 2 top, 3 bottom
    assert torch.equal(padded[..., 2:7, 1:8], img)
    assert (padded[..., :2, :] == -1).all() and (padded[..., 7:, :] == -1).all()
    assert (padded[..., :, :1] == -1).all() and (padded[..., :, 8:] == -1).all()
    small = center_crop(img, 7, 9)  # too small: zero-padded ceil(missing / 2) top / left
    assert torch.equal(small[..., 1:6, 1:8], img) and small[..., 0, :].abs().sum() == 0


def test_preprocess_rejects_bad_input_and_processors():
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        hpsv2_preprocess()(torch.rand(3, 8, 8))
    with pytest.raises(ConfigError, match="float"):
        hpsv2_preprocess()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="centre crop"):
        clip_preprocess({"do_center_crop": False, "size": {"shortest_edge": 224}})
    with pytest.raises(ConfigError, match="shortest_edge"):
        clip_preprocess({"size": {"height": 224, "width": 224}, "crop_size": {"height": 224, "width": 224}})


# --------------------------------------------------------------------------------------------
# Tiny CLIP folder for PickScore / CLIP score.

PROMPTS = ["a red cube", "two cats on a sofa"]
CUSTOM_MEAN = (0.5, 0.45, 0.4)
CUSTOM_STD = (0.25, 0.26, 0.27)


def _write_tokenizer(folder: Path):
    """A byte-level CLIP BPE tokenizer with every byte as a token and no merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = _write_tokenizer(root / "tokenizer_src")
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        ),
        projection_dim=16,
        logit_scale_init_value=math.log(20.0),
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    processor = transformers.CLIPProcessor(
        image_processor=_clip_image_processor(image_mean=list(CUSTOM_MEAN), image_std=list(CUSTOM_STD)), tokenizer=tokenizer
    )
    folder = root / "clip"
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pickscore(clip_dir) -> PickScoreReward:
    reward = load_reward(f"pickscore:{clip_dir}")
    assert isinstance(reward, PickScoreReward)
    return reward


def _images(batch: int = 2, hw=(256, 192), seed: int = 0) -> torch.Tensor:
    return torch.cat([smooth_image(*hw, seed=seed + i) for i in range(batch)])


def test_pickscore_equals_clipmodel_logits_on_the_same_pixel_values(pickscore, clip_dir):
    images = _images()
    scores = pickscore(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert pickscore.preprocess.mean == CUSTOM_MEAN and pickscore.preprocess.std == CUSTOM_STD
    model = transformers.CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)(
        PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=pickscore.preprocess(images))
    # logits_per_image = exp(logit_scale) * cos; PickScore is its diagonal
    torch.testing.assert_close(scores, out.logits_per_image.diagonal(), rtol=0, atol=1e-5)


def test_pickscore_close_to_clipprocessor_on_pil_images(pickscore, clip_dir):
    images = _images(hw=(300, 200))
    x, pils = quantize(images)
    processor = transformers.CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
    inputs = processor(text=PROMPTS, images=pils, padding=True, truncation=True, max_length=77, return_tensors="pt")
    model = pickscore.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = model(**inputs).logits_per_image.diagonal()
        got = pickscore(x, PROMPTS)
        # the score change caused by moving every pixel by up to one grey level (1/255)
        one_level = max(
            (pickscore(x + (torch.rand(x.shape, generator=gen) - 0.5) * 2 / 255, PROMPTS) - got).abs().max()
            for _ in range(3)
        )
    # the pixel inputs differ by <= 1.5/255, mean 0.3/255 (tests above): the scores must differ by
    # less than twice what a one-grey-level perturbation does (measured: 0.0097 vs 0.013)
    assert (got - ref).abs().max() <= 2 * one_level, ((got - ref).abs().max(), one_level)
    assert (got - ref).abs().max() < 0.05 * (ref.max() - ref.min())


def test_pickscore_gradients_reach_the_images(pickscore):
    images = _images(hw=(160, 240)).requires_grad_(True)
    scores = pickscore(images, PROMPTS)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all()
    assert (grad[0].abs().sum() > 0) and (grad[1].abs().sum() > 0)
    # each image's score depends on that image only
    (grad0,) = torch.autograd.grad(pickscore(images, PROMPTS)[0], images)
    assert grad0[1].abs().sum() == 0 and grad0[0].abs().sum() > 0
    assert all(not p.requires_grad for p in pickscore.parameters())


def test_pickscore_prompts(pickscore):
    images = _images()
    same = pickscore(images, "a red cube")
    torch.testing.assert_close(same, pickscore(images, ["a red cube"] * 2))
    with pytest.raises(ConfigError, match="prompts=None"):
        pickscore(images)
    with pytest.raises(ConfigError, match="expected 2 prompt"):
        pickscore(images, ["only one"])


def test_clip_score_is_pickscore_rescaled_to_100(pickscore, clip_dir):
    clip = load_reward(f"clip:{clip_dir}")
    assert isinstance(clip, ClipScoreReward) and clip.name == "clip"
    images = _images()
    torch.testing.assert_close(clip(images, PROMPTS), pickscore(images, PROMPTS) * 100 / 20, rtol=1e-5, atol=1e-5)


def test_pickscore_processor_path_and_dtype(clip_dir, tmp_path):
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="tokenizer"):
        load_reward(f"pickscore:{weights_only}")
    reward = load_reward(f"pickscore:{weights_only},processor={clip_dir}", dtype=torch.float64)
    assert next(reward.parameters()).dtype == torch.float64
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float64  # a float64 reward model scores in float64 (exact adjoint checks)
    torch.testing.assert_close(scores.float(), load_reward(f"pickscore:{clip_dir}")(images, PROMPTS), rtol=0, atol=1e-4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="CLIPModel"):
        PickScoreReward.from_pretrained(empty, processor_path=clip_dir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pickscore_on_cuda(clip_dir):
    images = _images()
    cpu = load_reward(f"pickscore:{clip_dir}")(images, PROMPTS)
    f32 = load_reward(f"pickscore:{clip_dir}", device="cuda")
    torch.testing.assert_close(f32(images.cuda(), PROMPTS).cpu(), cpu, rtol=0, atol=1e-3)
    bf16 = load_reward(f"pickscore:{clip_dir}", device="cuda", dtype=torch.bfloat16)
    x = images.cuda().requires_grad_(True)
    scores = bf16(x, PROMPTS)
    assert scores.device == x.device and scores.dtype == torch.float32 and scores.shape == (2,)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# HPSv2 without open_clip. With open_clip installed (the `.venv-hps` environment), scores, gradients,
# checkpoint layouts and loading errors are tested against the real library in
# tests/test_rewards_open_clip.py.


def test_hpsv2_without_open_clip_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    path = tmp_path / "HPS_v2_compressed.pt"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"HPSv2 needs open_clip_torch: pip install 'ngdiag\[hps\]'"):
        load_reward(f"hpsv2:{path}")


# --------------------------------------------------------------------------------------------
# Built-in rewards.


def test_builtin_rewards_hand_computed():
    flat = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    halves = torch.zeros(1, 3, 4, 4)
    halves[..., 2:] = 1.0  # half black, half white
    dark_red = torch.zeros(1, 3, 2, 2)
    dark_red[:, 0] = 0.005  # below the 0.01 floor
    images = torch.cat([flat, halves, torch.nn.functional.interpolate(dark_red, size=4)])
    luma_flat = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    torch.testing.assert_close(load_reward("brightness")(images), torch.tensor([luma_flat, 0.5, 0.299 * 0.005]))
    torch.testing.assert_close(load_reward("contrast")(images), torch.tensor([0.0, 0.5, 0.0]))
    torch.testing.assert_close(load_reward("saturation")(images), torch.tensor([0.4 / 0.6, 0.0, 0.005 / 0.01]))


def test_builtin_reward_gradients():
    images = torch.rand(2, 3, 5, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(BrightnessReward()(images).sum(), images)
    expected = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).expand(2, 3, 5, 4) / 20
    torch.testing.assert_close(grad, expected)
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    # on score(), which keeps float64 (the call returns float32, too coarse for finite differences)
    assert torch.autograd.gradcheck(lambda t: ContrastReward().score(t, None), (x,))
    assert torch.autograd.gradcheck(lambda t: SaturationReward().score(t, None), (x,))


def test_builtin_rewards_ignore_prompts_and_follow_the_protocol():
    images = torch.rand(3, 3, 8, 8)
    for kind in ("brightness", "saturation", "contrast"):
        reward = load_reward(kind)
        assert isinstance(reward, Reward) and reward.name == kind and not reward.requires_prompts
        torch.testing.assert_close(reward(images), reward(images, ["x", "y", "z"]))
        assert reward(images.double()).dtype == torch.float64  # float64 images keep float64 scores


# --------------------------------------------------------------------------------------------
# Spec strings.


def test_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="known kinds: brightness, clip, contrast, hpsv2, pickscore, saturation"):
        load_reward("aesthetic:/x")
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"reward weights not found: {missing}"):
        load_reward(f"pickscore:{missing}")
    with pytest.raises(ConfigError, match="reward weights not found"):
        load_reward(f"hpsv2:{missing}.pt")
    with pytest.raises(ConfigError, match="needs a path"):
        load_reward("pickscore")
    with pytest.raises(ConfigError, match="takes no path"):
        load_reward("brightness:/x")
    with pytest.raises(ConfigError, match="known options: processor"):
        load_reward(f"pickscore:{tmp_path},arch=ViT-H-14")
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ConfigError, match="arch=ViT-B-32"):
        load_reward(f"clip:{checkpoint}")
    assert set(REWARD_KINDS) == {"brightness", "clip", "contrast", "hpsv2", "pickscore", "saturation", "world"}
    assert load_reward("  Saturation ").name == "saturation"
