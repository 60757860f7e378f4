"""The miniature world's images: seeded 32x32 RGB scenes of one object, and their captions.

Each scene has four named factors, all written in its caption:

- ``shape``: circle, square, triangle or cross (the class the world's judge recognises);
- ``colour``: red, green, blue, yellow, purple or orange, at a natural, moderate saturation;
- ``background``: dark, light or gray;
- ``light``: lit from the left, the right or above (a smooth brightness gradient over the scene).

Position, size, a small tilt, the exact hue and a faint film grain vary from seed to seed. Every image is a
pure function of its seed (:func:`scene_params` draws from a ``torch.Generator`` seeded with it), so the
data set is regenerated bit-for-bit anywhere. Images are float32 in ``[0, 1]``, shape ``(N, 3, 32, 32)``.

The scenes are muted on purpose: a model that over-saturates, over-sharpens or over-lights them
(what RL post-training does to real models) moves visibly and measurably away from the data.

Example:
    >>> from ngdiag.world.scene import render, caption, scene_params
    >>> params = scene_params(range(4))
    >>> render(params).shape
    torch.Size([4, 3, 32, 32])
    >>> caption(scene_params([7])[0])
    'a purple square on a light background, lit from above'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ngdiag.core.errors import ConfigError

__all__ = [
    "SIZE", "SHAPES", "COLOURS", "BACKGROUNDS", "LIGHTS", "FACTORS", "HELD_OUT_SEED", "Scene", "scene_params",
    "render", "caption", "parse_caption", "all_captions", "render_seeds",
]

#: Image side in pixels.
SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
#: name -> RGB at moderate saturation (HSV saturation about 0.6, value 0.8)
COLOURS = {
    "red": (0.80, 0.30, 0.28),
    "green": (0.32, 0.72, 0.34),
    "blue": (0.30, 0.42, 0.82),
    "yellow": (0.82, 0.76, 0.32),
    "purple": (0.62, 0.34, 0.78),
    "orange": (0.85, 0.52, 0.24),
}
BACKGROUNDS = {"dark": 0.16, "light": 0.82, "gray": 0.50}
#: name -> unit direction the light comes from, in (x, y) image coordinates (y down)
LIGHTS = {"the left": (-1.0, 0.0), "the right": (1.0, 0.0), "above": (0.0, -1.0)}
#: factor -> its values, in label order
FACTORS = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "light": tuple(LIGHTS),
}
#: Seeds from here on are never used for training: evaluation draws from them.
HELD_OUT_SEED = 1_000_000

_CAPTION = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+) on a (?P<background>\w+) background, lit from (?P<light>the left|the right|above)$"
)


@dataclass(frozen=True)
class Scene:
    """One scene's factors (label indices into :data:`FACTORS`) and its continuous parameters."""

    seed: int
    shape: int
    colour: int
    background: int
    light: int
    center: tuple[float, float]
    radius: float
    angle: float
    hue_jitter: tuple[float, float, float]

    @property
    def labels(self) -> dict[str, int]:
        return {"shape": self.shape, "colour": self.colour, "background": self.background, "light": self.light}


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"scene seeds are integers in [0, 2**63), got {seed!r}")
    return seed


def scene_params(seeds: Iterable[int]) -> list[Scene]:
    """The scene of each seed (a pure function of the seed)."""
    scenes = []
    for seed in seeds:
        g = torch.Generator().manual_seed(_check_seed(int(seed)))
        labels = [int(torch.randint(len(values), (1,), generator=g)) for values in FACTORS.values()]
        u = torch.rand(7, generator=g, dtype=torch.float64).tolist()
        scenes.append(
            Scene(
                seed=int(seed),
                shape=labels[0],
                colour=labels[1],
                background=labels[2],
                light=labels[3],
                center=(15.5 + 8.0 * (u[0] - 0.5), 15.5 + 8.0 * (u[1] - 0.5)),
                radius=7.0 + 4.0 * u[2],
                angle=0.5 * (u[3] - 0.5),  # upright, tilted by up to about 14 degrees
                hue_jitter=(0.06 * (u[4] - 0.5), 0.06 * (u[5] - 0.5), 0.06 * (u[6] - 0.5)),
            )
        )
    return scenes


def _coverage(scenes: Sequence[Scene]) -> torch.Tensor:
    """``(N, 1, SIZE, SIZE)`` anti-aliased object coverage in [0, 1] from each shape's signed distance."""
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    cx = torch.tensor([s.center[0] for s in scenes]).view(-1, 1, 1)
    cy = torch.tensor([s.center[1] for s in scenes]).view(-1, 1, 1)
    r = torch.tensor([s.radius for s in scenes], dtype=torch.float32).view(-1, 1, 1)
    a = torch.tensor([s.angle for s in scenes], dtype=torch.float32).view(-1, 1, 1)
    px, py = xs - cx, ys - cy
    qx, qy = px * torch.cos(a) + py * torch.sin(a), -px * torch.sin(a) + py * torch.cos(a)
    circle = torch.sqrt(px**2 + py**2) - r
    square = torch.maximum(qx.abs(), qy.abs()) - 0.8 * r
    triangle = torch.stack(
        [qx * math.cos(phi) + qy * math.sin(phi) for phi in (a0 + k * 2 * math.pi / 3 for a0 in (-math.pi / 2,) for k in range(3))]
    ).amax(0) - 0.6 * r
    arm = 0.3 * r
    cross = torch.minimum(torch.maximum(qx.abs() - r, qy.abs() - arm), torch.maximum(qx.abs() - arm, qy.abs() - r))
    sdf = torch.stack([circle, square, triangle, cross])  # (4, N, H, W)
    index = torch.tensor([s.shape for s in scenes]).view(1, -1, 1, 1).expand(1, -1, SIZE, SIZE)
    chosen = sdf.gather(0, index)[0]
    return torch.sigmoid(-chosen / 0.6).unsqueeze(1)


def render(scenes: Sequence[Scene]) -> torch.Tensor:
    """The images of ``scenes``: float32 ``(N, 3, SIZE, SIZE)`` in [0, 1]."""
    if len(scenes) == 0:
        return torch.zeros(0, 3, SIZE, SIZE)
    colours = list(COLOURS.values())
    backgrounds = list(BACKGROUNDS.values())
    lights = list(LIGHTS.values())
    obj = torch.tensor([colours[s.colour] for s in scenes]) + torch.tensor([s.hue_jitter for s in scenes])
    bg = torch.tensor([backgrounds[s.background] for s in scenes]).view(-1, 1).expand(-1, 3) * torch.tensor([1.0, 0.98, 0.95])
    cover = _coverage(scenes)
    image = cover * obj.view(-1, 3, 1, 1) + (1 - cover) * bg.reshape(-1, 3, 1, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    lx = torch.tensor([lights[s.light][0] for s in scenes]).view(-1, 1, 1, 1)
    ly = torch.tensor([lights[s.light][1] for s in scenes]).view(-1, 1, 1, 1)
    shading = 1.0 + 0.22 * -(lx * xs + ly * ys)  # brighter towards the light, 0.78 .. 1.22
    grain = torch.stack([_grain(s.seed) for s in scenes])
    return (image * shading + grain).clamp(0.0, 1.0)


def _grain(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed ^ 0x5EED)
    return 0.015 * torch.randn(1, SIZE, SIZE, generator=g).expand(3, -1, -1)


def render_seeds(seeds: Iterable[int]) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """``(images, captions, scenes)`` of ``seeds``."""
    scenes = scene_params(seeds)
    return render(scenes), [caption(s) for s in scenes], scenes


def caption(scene: Scene) -> str:
    """The scene's caption: ``'a red circle on a dark background, lit from the left'``."""
    names = {k: v[i] for (k, v), i in zip(FACTORS.items(), (scene.shape, scene.colour, scene.background, scene.light))}
    article = "an" if names["colour"][0] in "aeiou" else "a"
    return f"{article} {names['colour']} {names['shape']} on a {names['background']} background, lit from {names['light']}"


def parse_caption(text: str) -> dict[str, int]:
    """The factor labels a world caption names; :class:`ConfigError` for any other text."""
    match = _CAPTION.match(str(text).strip())
    if match is None:
        raise ConfigError(f"not a miniature-world caption: {text!r} (expected e.g. {caption(scene_params([0])[0])!r})")
    labels = {}
    for factor, values in FACTORS.items():
        name = match.group(factor)
        if name not in values:
            raise ConfigError(f"unknown {factor} {name!r} in caption {text!r}; known: {', '.join(values)}")
        labels[factor] = values.index(name)
    return labels


def all_captions() -> list[str]:
    """Every caption the world has (4 x 6 x 3 x 3 = 216), in label order."""
    out = []
    for s in range(len(SHAPES)):
        for c in range(len(COLOURS)):
            for b in range(len(BACKGROUNDS)):
                for li in range(len(LIGHTS)):
                    scene = Scene(0, s, c, b, li, (0.0, 0.0), 0.0, 0.0, (0.0, 0.0, 0.0))
                    out.append(caption(scene))
    return out
