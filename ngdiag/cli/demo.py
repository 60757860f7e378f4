"""``ngdiag demo`` and ``ngdiag world-build``: the paper's analyses on the shipped miniature world, and
the command that rebuilds that world from its seed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ngdiag.cli.common import FORMATS, check_choice


def _stderr_progress(quiet: bool):
    start = time.time()

    def say(message: str) -> None:
        if not quiet:
            print(f"[{time.time() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Annotated[Path, typer.Option(help="Folder for the reports (empty, absent, or an earlier demo's).")] = Path("demo-out"),
        quick: Annotated[bool, typer.Option("--quick", help="Fewer samples and steps (29 s instead of 116 s on one CPU thread).")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
        output_format: Annotated[str, typer.Option("--format", help="human or json (the findings to stdout).")] = "human",
    ):
        """The NormGuard paper's analyses on the shipped miniature world, one HTML report each.

        Writes OUT/index.html (self-contained) linking the reports: inflation along the trajectory, inference-time
        renormalization, S(t), NormGuard vs none, few-step sampling, the checkpoints of each run, and where the inflation sits (spatial maps, per-block attribution). The world
        (a trained SD3-family base, its judge and reward, and two ngdiag-trained DiffusionNFT fine-tunes) ships
        with ngdiag; nothing is downloaded.

        Example: ngdiag demo --out demo-out
        """
        check_choice("--format", output_format, FORMATS)
        from ngdiag.world.demo import run_demo

        findings = run_demo(out, quick=quick, progress=_stderr_progress(quiet))
        if output_format == "json":
            typer.echo(json.dumps(findings, indent=2))
            return
        typer.echo(f"wrote {out / 'index.html'} in {findings['seconds']:.0f} s")
        for stem, verdict in findings["verdicts"].items():
            typer.echo(f"{stem}: {verdict}")

    @app.command("world-build")
    def world_build(
        work: Annotated[Path, typer.Argument(help="Working folder for the build (stages are cached there and resumed).")],
        ship: Annotated[bool, typer.Option("--ship", help="Replace the package's shipped world with this build.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
        output_format: Annotated[str, typer.Option("--format", help="human or json (the report to stdout).")] = "human",
    ):
        """Rebuild the miniature world from its seed: data, VAE, judge, base model, and both fine-tunes.

        About an hour on 2 CPU cores (2 threads for the base, 1 for each fine-tune, whatever --threads says, as
        the shipped world was built, so that the weights can be the same). Prints the time of each stage and, for each shipped file, whether the
        rebuild reproduced it bit for bit (compared by SHA-256 with ngdiag/world/assets/world.json).

        Example: ngdiag world-build world-work
        """
        check_choice("--format", output_format, FORMATS)
        from ngdiag.world.build import ASSETS, regenerate

        report = regenerate(work, dest=ASSETS if ship else None, threads=2, progress=_stderr_progress(quiet),
                            compare_with=ASSETS)
        if output_format == "json":
            typer.echo(json.dumps(report, indent=2))
            return
        for stage, seconds in report["seconds"].items():
            typer.echo(f"{stage:>12}: {seconds} s")
        if "weights_identical" in report:
            same = sum(report["weights_identical"].values())
            typer.echo(f"weights reproduced bit for bit: {same} of {len(report['weights_identical'])} files")
            for name, ok in report["weights_identical"].items():
                if not ok:
                    typer.echo(f"  differs: {name}")
