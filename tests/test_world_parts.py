"""The miniature world's parts with known answers: the scene generator, the quality measures, the reward."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.quality import (
    MEASURES,
    clipping_rate,
    colourfulness,
    contrast,
    frechet_distance,
    high_frequency_energy,
    luminance,
    quality_table,
    radial_power_spectrum,
    saturation,
    sharpness,
)
from ngdiag.rewards.scorers import WorldReward, load_reward
from ngdiag.world.judge import WorldJudge, load_judge, save_judge
from ngdiag.world.scene import (
    COLOURS,
    FACTORS,
    HELD_OUT_SEED,
    all_captions,
    caption,
    parse_caption,
    render,
    render_seeds,
    scene_params,
)

# ----------------------------------------------------------------------------- scenes


def test_scenes_are_a_pure_function_of_the_seed():
    a, caps_a, _ = render_seeds([5, 17, 3])
    b, caps_b, _ = render_seeds([3, 5, 17])
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[2]) and torch.equal(a[2], b[0])
    assert caps_a == [caps_b[1], caps_b[2], caps_b[0]]
    assert a.dtype == torch.float32 and a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1


def test_scenes_are_the_same_in_a_fresh_process():
    code = (
        "import torch; from ngdiag.world.scene import render_seeds; "
        "im, caps, _ = render_seeds(range(8)); print(repr(im.double().sum().item()), caps[3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    im, caps, _ = render_seeds(range(8))
    assert float(out[0]) == im.double().sum().item()
    assert out[1].strip() == caps[3]


def test_the_first_captions_are_pinned():
    # the labels come from integer draws of a seeded torch.Generator: any change to the generator's use
    # changes the data set, and must be deliberate (regenerate the world then).
    assert [caption(s) for s in scene_params(range(3))] == [
        "a yellow circle on a gray background, lit from the left",
        "an orange square on a dark background, lit from above",
        "a yellow circle on a gray background, lit from the left",
    ]


def test_every_caption_parses_back_to_its_labels():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == math.prod(len(v) for v in FACTORS.values())
    for scene in scene_params(range(200)):
        assert parse_caption(caption(scene)) == scene.labels


@pytest.mark.parametrize("text", ["a cat", "a red circle on a dark background", "a pink circle on a dark background, lit from above"])
def test_other_text_is_not_a_caption(text):
    with pytest.raises(ConfigError):
        parse_caption(text)


def test_the_caption_names_what_is_drawn():
    # a red object: the mean colour inside the object is red-dominant; a dark background is dark
    scenes = [s for s in scene_params(range(400)) if s.colour == list(COLOURS).index("red") and s.background == 0][:5]
    assert scenes
    images = render(scenes)
    centre = images[:, :, 14:18, 14:18].mean(dim=(2, 3))
    assert (centre[:, 0] > centre[:, 1] + 0.2).all()
    assert (images[:, :, :2, :2].mean(dim=(1, 2, 3)) < 0.35).all()


def test_held_out_seeds_are_far_from_the_training_range():
    assert HELD_OUT_SEED >= 10**6
    with pytest.raises(ConfigError):
        scene_params([-1])


# ----------------------------------------------------------------------------- quality measures


def test_saturation_and_colourfulness_of_known_colours():
    gray = torch.full((1, 3, 4, 4), 0.5)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 0.8
    red[:, 1:] = 0.2  # HSV saturation (0.8 - 0.2) / 0.8 = 0.75
    assert saturation(gray).item() == 0 and colourfulness(gray).item() == pytest.approx(0, abs=1e-5)
    assert saturation(red).item() == pytest.approx(0.75)
    # uniform colour: no spread; mean rg = 0.6, yb = 0.5 - 0.2 = 0.3 -> 0.3 * sqrt(0.36 + 0.09)
    assert colourfulness(red).item() == pytest.approx(0.3 * math.sqrt(0.45), rel=1e-5)
    # pushing the colour away from gray raises both
    vivid = 0.5 + 1.5 * (red - 0.5)
    assert saturation(vivid) > saturation(red) and colourfulness(vivid) > colourfulness(red)


def test_clipping_rate_counts_what_the_clamp_hides():
    x = torch.full((2, 3, 4, 4), 0.5)
    x[0, 0, 0, :2] = 1.2  # 2 of 48 channels
    x[1, :, :, :] = -0.1
    assert clipping_rate(x).tolist() == pytest.approx([2 / 48, 1.0])


def _blur(x):
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    return torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), kernel.expand(3, 1, 3, 3), groups=3
    )


def test_blur_lowers_and_sharpening_raises_high_frequencies():
    images, _, _ = render_seeds(range(8))
    blurred = _blur(images)
    sharpened = (images + 1.0 * (images - blurred)).clamp(0, 1)
    for measure in (high_frequency_energy, sharpness):
        assert (measure(blurred) < measure(images)).all()
        assert (measure(sharpened) > measure(images)).all()


def test_radial_spectrum_peaks_at_a_sinusoids_frequency():
    n = 32
    x = torch.arange(n, dtype=torch.float64)
    wave = 0.5 + 0.3 * torch.cos(2 * math.pi * 8 * x / n)  # 0.25 cycles per pixel
    images = wave.view(1, 1, 1, n).expand(1, 3, n, n)
    freqs, power = radial_power_spectrum(images)
    assert freqs[power[0].argmax()].item() == pytest.approx(0.25, abs=1 / 32)
    # all its power sits at 0.25: above the 0.2 cutoff it is all, above 0.3 none
    assert high_frequency_energy(images, cutoff=0.2).item() == pytest.approx(1.0)
    assert high_frequency_energy(images, cutoff=0.3).item() == pytest.approx(0.0, abs=1e-12)


def test_luminance_and_contrast():
    x = torch.zeros(1, 3, 2, 2)
    x[..., 0, :] = 1.0
    assert luminance(x).item() == pytest.approx(0.5)
    assert contrast(x).item() == pytest.approx(0.5)


def test_quality_table_has_every_measure_per_sample():
    images, _, _ = render_seeds(range(3))
    table = quality_table(images)
    assert list(table.columns) == list(MEASURES) and len(table) == 3


class ChannelMeans(torch.nn.Module):
    num_features = 3

    def forward(self, images):
        return images.mean(dim=(2, 3)).double()


def test_frechet_distance_of_a_known_shift():
    g = torch.Generator().manual_seed(0)
    a = 0.3 + 0.4 * torch.rand(64, 3, 4, 4, generator=g)
    b = a.clone()
    b[:, 0] += 0.1  # the features shift by 0.1 in one coordinate, the covariance is unchanged
    assert frechet_distance(ChannelMeans(), a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(ChannelMeans(), b, a) == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ConfigError):
        frechet_distance(torch.nn.Identity(), a, a)


# ----------------------------------------------------------------------------- the world's reward


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_judge(WorldJudge(width=8), tmp_path_factory.mktemp("judge") / "judge")


def test_world_reward_is_alignment_plus_colourfulness_and_contrast(judge_dir):
    reward = load_reward(f"world:{judge_dir}")
    strong = load_reward(f"world:{judge_dir},vivid=3")
    assert isinstance(reward, WorldReward) and reward.vivid == 1.0 and strong.vivid == 3.0
    images, prompts, scenes = render_seeds(range(4))
    images.requires_grad_(True)
    r = reward(images, prompts)
    logits = load_judge(judge_dir)(images.detach())
    rows = torch.arange(4)
    align = sum(logits[f].log_softmax(1)[rows, torch.tensor([s.labels[f] for s in scenes])] for f in ("shape", "colour")) / 2
    from ngdiag.quality import colourfulness, contrast

    vivid = colourfulness(images.detach()) + contrast(images.detach())
    assert torch.allclose(r, (align + vivid).float(), atol=1e-5)
    assert torch.allclose(strong(images, prompts) - r, 2 * vivid.float(), atol=1e-5)
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_world_reward_refuses_what_it_cannot_judge(judge_dir, tmp_path):
    reward = load_reward(f"world:{judge_dir}")
    with pytest.raises(ConfigError, match="not a miniature-world caption"):
        reward(torch.rand(1, 3, 32, 32), ["a cat"])
    with pytest.raises(ConfigError, match="vivid"):
        load_reward(f"world:{judge_dir},vivid=nan")
    with pytest.raises(CheckpointError, match="not a world judge folder"):
        load_reward(f"world:{tmp_path}")


# ----------------------------------------------------------------------------- the build is deterministic


def test_build_stages_are_deterministic():
    from ngdiag.world.build import train_judge, train_vae, scene_labels

    images, _, scenes = render_seeds(range(64))
    a = train_vae(images, steps=2, batch=4)
    b = train_vae(images, steps=2, batch=4)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert a.config.scaling_factor == b.config.scaling_factor
    labels = scene_labels(scenes)
    ja = train_judge(images, labels, steps=2, batch=4)
    jb = train_judge(images, labels, steps=2, batch=4)
    assert all(torch.equal(x, y) for x, y in zip(ja.state_dict().values(), jb.state_dict().values()))


def test_the_world_tokenizer_reads_every_caption_word():
    from ngdiag.world.build import TEXT_LENGTH, world_tokenizer

    tok = world_tokenizer()
    unk = tok.convert_tokens_to_ids("<|unk|>")
    for text in all_captions():
        ids = tok(text, padding="max_length", max_length=TEXT_LENGTH).input_ids
        assert len(ids) == TEXT_LENGTH and unk not in ids and ids[0] == 0 and 1 in ids
    assert unk in tok("a cat").input_ids
