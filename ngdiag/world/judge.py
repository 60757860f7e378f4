"""The miniature world's judge: a small CNN that recognises a scene's four factors.

It is trained on rendered scenes (:mod:`ngdiag.world.build`) and used three ways:

- recognisability: the share of a model's samples whose shape is the one their prompt names;
- the world's reward (:class:`ngdiag.rewards.scorers.WorldReward`): log-probability of the prompt's
  shape and colour, plus a vividness preference;
- a feature space (:meth:`WorldJudge.features`, 128 numbers per image) for the Fréchet distance of
  :mod:`ngdiag.quality`.

A judge folder holds ``config.json`` and ``model.safetensors``; :func:`load_judge` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ngdiag.core.errors import CheckpointError
from ngdiag.world.scene import FACTORS

__all__ = ["WorldJudge", "load_judge", "save_judge", "JUDGE_CONFIG"]

JUDGE_CONFIG = "config.json"
JUDGE_WEIGHTS = "model.safetensors"


class WorldJudge(nn.Module):
    """Images in [0, 1], ``(N, 3, 32, 32)`` -> logits per factor (:meth:`forward`) or features."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 16x16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(values)) for name, values in FACTORS.items()})

    @property
    def num_features(self) -> int:
        return 4 * self.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, num_features)`` features of images in [0, 1]."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}


def save_judge(judge: WorldJudge, path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / JUDGE_CONFIG).write_text(json.dumps({"kind": "ngdiag-world-judge", "width": judge.width}, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in judge.state_dict().items()}, str(path / JUDGE_WEIGHTS))
    return path


def load_judge(path) -> WorldJudge:
    """The judge saved in folder ``path``, in eval mode on CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / JUDGE_CONFIG, path / JUDGE_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not a world judge folder (needs {JUDGE_CONFIG} and {JUDGE_WEIGHTS})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict) or config.get("kind") != "ngdiag-world-judge":
        raise CheckpointError(f"{config_file} does not describe a world judge (kind 'ngdiag-world-judge')")
    judge = WorldJudge(width=int(config.get("width", 32)))
    try:
        judge.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load the world judge from {weights}: {str(exc).splitlines()[0]}") from None
    return judge.eval()
