"""``ngdiag train`` and ``ngdiag compare``: parse, call :mod:`ngdiag.train`, print.

Progress goes to stderr (rank 0 only under torchrun / accelerate launch), results to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ngdiag.errors import ConfigError


class _TrainProgress:
    """A tqdm bar over iterations with the latest reward and norm ratio."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, done: int, total: int, row: Optional[dict]) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="train", unit="it", file=sys.stderr, dynamic_ncols=True)
            return
        self.bar.update(done - self.bar.n)
        if row is not None:
            post = {"reward": f"{row['reward_mean']:.4f}"}
            if row.get("norm_ratio_mean") is not None:
                post["ratio"] = f"{row['norm_ratio_mean']:.3f}"
            if row.get("penalty"):
                post["penalty"] = f"{row['penalty']:.3g}"
            self.bar.set_postfix(post, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parse_steps(text: str) -> list:
    try:
        steps = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--steps must be comma-separated integers, e.g. 28,10,4; got {text!r}") from None
    if not steps or any(s < 1 for s in steps):
        raise ConfigError(f"--steps needs at least one step count >= 1, got {text!r}")
    return steps


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Annotated[Path, typer.Argument(help="Training config (YAML).")],
        set_: Annotated[
            Optional[List[str]], typer.Option("--set", help="Override a config key: --set normguard.lam=0.5 (repeatable).")
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
        output_format: Annotated[str, typer.Option("--format", help="human or json (final summary to stdout).")] = "human",
    ):
        """Train a LoRA with NFT, AWM, DPO or flow matching, with the NormGuard penalty.

        Rerunning the same command resumes from the last checkpoint in output_dir. For several processes or GPUs, launch the same command with torchrun (docs/training.md).

        Example: ngdiag train examples/train_nft_tiny.yaml --set normguard.lam=0.5 --set output_dir=runs/ng

        Example: torchrun --standalone --nproc_per_node 2 -m ngdiag.cli train config.yaml
        """
        from ngdiag.train.config import load_config
        from ngdiag.train.trainer import train as run_training

        if output_format not in ("human", "json"):
            raise ConfigError(f"--format must be human or json, got {output_format!r}")
        cfg = load_config(config, set_ or [])
        import os

        rank = int(os.environ.get("RANK", "0"))
        progress = _TrainProgress(quiet or rank != 0)
        try:
            result = run_training(cfg, progress=progress)
        finally:
            progress.close()
        if rank != 0:
            return 0
        last = result.metrics[-1] if result.metrics else {}
        summary = {
            "output_dir": str(result.output_dir),
            "iterations": result.iterations_done,
            "resumed_from": result.resumed_from,
            "last_checkpoint": None if result.last_checkpoint is None else str(result.last_checkpoint),
            "reward_mean": last.get("reward_mean"),
            "norm_ratio_mean": last.get("norm_ratio_mean"),
            "inflation": last.get("inflation"),
        }
        if output_format == "json":
            typer.echo(json.dumps(summary, indent=2))
        else:
            for key, value in summary.items():
                typer.echo(f"{key:>16}: {value}")
        return 0

    @app.command()
    def compare(
        run_a: Annotated[Path, typer.Argument(help="First training run folder (e.g. without NormGuard).")],
        run_b: Annotated[Path, typer.Argument(help="Second training run folder (e.g. with NormGuard).")],
        steps: Annotated[str, typer.Option(help="Sampling step counts of the few-step ablation, comma-separated.")] = "28,10,4",
        reward: Annotated[Optional[str], typer.Option(help="Reward spec (default: the runs' training reward).")] = None,
        num_samples: Annotated[int, typer.Option(help="Samples per model and step count.")] = 8,
        guidance_scale: Annotated[Optional[float], typer.Option(help="CFG scale (default: the runs' sampling guidance).")] = None,
        seed: Annotated[int, typer.Option(help="Sample i uses seed + i.")] = 0,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4,
        out: Annotated[Path, typer.Option(help="Output HTML report.")] = Path("compare.html"),
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...")] = "cpu",
        output_format: Annotated[str, typer.Option("--format", help="human or json (the table to stdout).")] = "human",
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report written by ngdiag compare.")] = False,
    ):
        """Compare two training runs: reward and inflation over training, and a few-step ablation.

        Writes one HTML report: reward and inflation against iteration for both runs, the per-step ratio curves of their final checkpoints, rewards and image grids at each step count, and a table shaped like the paper's Table 3.

        Example: ngdiag compare runs/nft runs/nft-normguard --steps 28,10,4 --reward pickscore:/models/pickscore
        """
        from ngdiag.train.compare import check_compare_output, compare_runs, load_run, run_inputs

        if output_format not in ("human", "json"):
            raise ConfigError(f"--format must be human or json, got {output_format!r}")
        step_list = _parse_steps(steps)
        # the report path is checked before any model is loaded (the runs are only read here)
        check_compare_output(out, run_inputs([load_run(run_a, "A"), load_run(run_b, "B")]), overwrite=overwrite)
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(desc="compare", unit="audit", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            from ngdiag.cli import _device

            result = compare_runs(
                run_a, run_b, steps=step_list, reward=reward, num_samples=num_samples, guidance_scale=guidance_scale,
                seed=seed, batch_size=batch_size, device=_device(device), progress=progress,
            )
        finally:
            if bar is not None:
                bar.close()
        path = result.save_html(out, overwrite=overwrite)
        table = result.table_wide()
        if output_format == "json":
            typer.echo(json.dumps(result.summary(), indent=2))
        else:
            typer.echo(table.to_string(index=False))
            if not quiet:
                typer.echo(f"report: {path}", err=True)
        return 0
