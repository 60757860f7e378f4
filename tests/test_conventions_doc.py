"""docs/conventions.md: linked from the index, it names the four places where ngdiag differs from the
paper's text, and the claim about the final clamp holds in the code."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONVENTIONS = ROOT / "docs" / "conventions.md"
DIFFERENCES = "## Where ngdiag differs from the paper's text, and why"


def _section() -> str:
    text = CONVENTIONS.read_text(encoding="utf-8")
    assert DIFFERENCES in text
    return text.split(DIFFERENCES, 1)[1]


def test_conventions_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "](conventions.md)" in index


def test_conventions_page_states_the_contract():
    text = CONVENTIONS.read_text(encoding="utf-8")
    for heading in ("Time, interpolant, velocity", "Which velocity", "Norms and ratios", "Inflation and verdict",
                    "Inference-time renormalization", "NormGuard penalty", "Norm-scaling sensitivity"):
        assert f"## {heading}" in text, heading
    assert "x_t = (1 - t) x0 + t eps" in text and "v = eps - x0" in text


def test_the_four_differences_are_named_each_with_the_paper_ngdiag_and_why():
    section = _section()
    items = re.split(r"^### ", section, flags=re.M)[1:]
    titles = [item.splitlines()[0] for item in items]
    assert len(titles) == 4, titles
    for title, needle in zip(titles, ("eq. 4", "eq. 10", "eq. 13", "clamp")):
        assert needle in title, (title, needle)
    for item in items:
        for part in ("**The paper", "**ngdiag", "**Why:**"):
            assert part in item, (item.splitlines()[0], part)
    # every file the section cites exists
    for path in set(re.findall(r"`((?:ngdiag|docs|tests)/[\w/.]+\.(?:py|md))`", section)):
        assert (ROOT / path).is_file(), path


def test_decode_clamps_hard_so_saturated_pixels_send_no_gradient():
    """What item 4 says: ``adapter.decode`` (used by ``ngdiag sensitivity``) ends with ``clamp(0, 1)``,
    whose gradient is 0 outside [0, 1]: the gradient of the shown image equals that of the unclamped one
    with the outside pixels masked out, and differs from the unclamped one's."""
    from ngdiag.models.families import adapter_for
    from ngdiag.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    adapter, f = adapter_for(pipe), pipe.vae_scale_factor
    x0 = 10 * torch.randn(2, pipe.vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))

    def grad(fn):
        x = x0.clone().requires_grad_(True)
        return torch.autograd.grad(fn(x).sum(), x)[0]

    raw = adapter.decode(x0, 4 * f, 4 * f, clamp=False).detach()
    inside = (raw >= 0) & (raw <= 1)
    assert (~inside).any()  # some pixels leave [0, 1]
    shown = grad(lambda x: adapter.decode(x, 4 * f, 4 * f))
    torch.testing.assert_close(shown, grad(lambda x: adapter.decode(x, 4 * f, 4 * f, clamp=False) * inside))
    assert not torch.allclose(shown, grad(lambda x: adapter.decode(x, 4 * f, 4 * f, clamp=False)))
