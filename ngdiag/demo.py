"""The Quickstart demo: audit a tiny built-in model whose velocity is planted 8 % too large.

``python -m ngdiag.demo --out demo-out`` builds a tiny random SD3 pipeline (the base), saves a full
fine-tune of it whose output projection is scaled by 1.08 (so ``v_theta = 1.08 v_ref`` exactly),
and runs ``ngdiag audit`` on it. Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ngdiag.cli import main as cli_main, quiet_third_party
from ngdiag.models.families import FAMILIES


def build_demo_models(root: Path, family: str = "sd3", scale: float = 1.08) -> tuple[Path, Path]:
    """Save the tiny base pipeline and the planted fine-tune under ``root``; returns their paths."""
    from ngdiag.testing import save_planted_base, save_scaled_finetune

    base = root / f"tiny-{family}-base"
    finetune = root / f"tiny-{family}-x{scale:g}"
    if not (base / "model_index.json").is_file():
        save_planted_base(base, family)
    if not (finetune / "config.json").is_file():
        save_scaled_finetune(base, finetune, scale)
    return base, finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="folder for the tiny models and the audit")
    parser.add_argument("--family", default="sd3", choices=list(FAMILIES))
    parser.add_argument("--scale", type=float, default=1.08, help="planted velocity scale")
    args = parser.parse_args(argv)
    quiet_third_party()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    base, finetune = build_demo_models(root / "models", args.family, args.scale)
    return cli_main([
        "audit", str(finetune), "--base", str(base), "--num-samples", "16", "--steps", "8",
        "--batch-size", "8", "--renorm", "--reward", "saturation", "--out", str(root / "audit"), "--overwrite",
    ])


if __name__ == "__main__":
    sys.exit(main())
