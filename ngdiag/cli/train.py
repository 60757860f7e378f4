"""``ngdiag train`` and ``ngdiag compare``: parse, call :mod:`ngdiag.train`, print.

Progress goes to stderr (rank 0 only under torchrun / accelerate launch), results to stdout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ngdiag.cli.common import (
    FORMATS,
    Device,
    Progress,
    check_choice,
    check_device,
    finite_float,
    print_notes,
    resolve_device,
)
from ngdiag.core.errors import ConfigError
from ngdiag.rewards.specs import reward_kinds_help


class _TrainProgress:
    """The trainer's ``progress(done, total, row)``: a bar over iterations with the latest reward and norm ratio.

    The trainer calls it once at the start (``row`` ``None``; ``done`` > 0 for a resumed run,
    which is said on stderr) and after every iteration.
    """

    def __init__(self, quiet: bool, output_dir: str):
        self.quiet = quiet
        self.output_dir = output_dir
        self.bar: Optional[Progress] = None

    def __call__(self, done: int, total: int, row: Optional[dict]) -> None:
        if self.bar is None:
            if done > 0:
                print_notes([f"train: resuming the run in {self.output_dir} from checkpoint-{done} "
                             f"({done} of {total} iterations done)"], self.quiet)
            self.bar = Progress("train", "it", total, done=done, enabled=not self.quiet)
            return
        if row is not None:
            post = {"reward": f"{row['reward_mean']:.4f}"}
            if row.get("norm_ratio_mean") is not None:
                post["ratio"] = f"{row['norm_ratio_mean']:.3f}"
            if row.get("penalty"):
                post["penalty"] = f"{row['penalty']:.3g}"
            self.bar.set_postfix(post)
        self.bar.advance_to(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parse_steps(text: str) -> list:
    from ngdiag.models.generation import MAX_STEPS

    try:
        steps = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--steps must be comma-separated integers, e.g. 28,10,4; got {text!r}") from None
    if not steps or any(not 1 <= s <= MAX_STEPS for s in steps):
        raise ConfigError(f"--steps needs step counts in [1, {MAX_STEPS}], got {text!r}")
    return steps


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Annotated[Path, typer.Argument(help="Training config (YAML).")],
        set_: Annotated[
            Optional[List[str]], typer.Option("--set", help="Override a config key: --set normguard.lam=0.5 (repeatable).")
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no notes on stderr (errors only).")] = False,
        output_format: Annotated[str, typer.Option("--format", help="human or json (final summary to stdout).")] = "human",
    ):
        """Train a LoRA with NFT, AWM, DPO or flow matching, with the NormGuard penalty.

        Rerunning the same command resumes from the last checkpoint in output_dir (and says so). For several processes or GPUs, launch the same command with torchrun (docs/training.md).

        Example: ngdiag train examples/train_nft_tiny.yaml --set normguard.lam=0.5 --set output_dir=runs/ng

        Example: torchrun --standalone --nproc_per_node 2 -m ngdiag.cli train config.yaml
        """
        check_choice("--format", output_format, FORMATS)
        from ngdiag.train.config import load_config
        from ngdiag.train.trainer import train as run_training

        cfg = load_config(config, set_ or [])
        rank = int(os.environ.get("RANK", "0"))
        progress = _TrainProgress(quiet or rank != 0, cfg.output_dir)
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
        runs: Annotated[List[Path], typer.Argument(help="Two or more training run folders, or checkpoint-N folders inside them (labelled A, B, C... in this order).")],
        steps: Annotated[str, typer.Option(help="Sampling step counts of the few-step ablation, comma-separated.")] = "28,10,4",
        reward: Annotated[Optional[str], typer.Option(help=f"Reward spec [default: the runs' training reward]: {reward_kinds_help()}.")] = None,
        prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Text file with one prompt per line, e.g. held out from training [default: run A's training prompts].")] = None,
        prompt: Annotated[Optional[List[str]], typer.Option("--prompt", metavar="<str>", help="A prompt (repeatable).")] = None,
        num_samples: Annotated[int, typer.Option(help="Samples per model and step count.")] = 8,
        guidance_scale: Annotated[Optional[float], typer.Option(
            parser=finite_float, help="CFG scale [default: run A's training guidance].")] = None,
        seed: Annotated[int, typer.Option(help="Sample i uses seed + i (0 <= seed, seed + samples - 1 < 2**63).")] = 0,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4,
        fd_encoder: Annotated[Optional[str], typer.Option(help="Image encoder for a Fréchet distance of each run's images to the base's: clip:DIR, pickscore:DIR, world:DIR, hpsv2:FILE.")] = None,
        baseline: Annotated[str, typer.Option(help="What the paired differences are taken against: base, or a run's label (A, B...).")] = "base",
        out: Annotated[Path, typer.Option(help="Output HTML report.")] = Path("compare.html"),
        device: Device = "auto",
        output_format: Annotated[str, typer.Option("--format", help="human or json (the table to stdout).")] = "human",
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no notes on stderr (errors only).")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report written by ngdiag compare.")] = False,
    ):
        """Compare training runs or checkpoints: reward and inflation over training, paired differences, a few-step ablation.

        Writes one HTML report: reward and inflation against iteration for every run, a table shaped like the paper's Table 3, paired differences (reward, norm ratio, image quality) against --baseline with intervals, a curve when the runs differ in one training setting (a lambda sweep) or a grid when in two (lambda x kl_beta), ratio curves and image grids. The base is sampled once per step count.

        Example: ngdiag compare runs/nft runs/nft-lam0.5 runs/nft-lam1 --prompts held-out.txt --num-samples 32 --steps 28,10
        """
        from ngdiag.cli.common import read_prompts
        from ngdiag.models.generation import SampleSet, SamplingConfig

        check_choice("--format", output_format, FORMATS)
        check_device(device)
        step_list = _parse_steps(steps)
        if guidance_scale is not None:
            SamplingConfig(guidance_scale=guidance_scale)
        SampleSet(prompts=["-"], num_samples=num_samples, seed=seed, batch_size=batch_size)
        if reward is not None:
            from ngdiag.rewards.specs import parse_reward_spec

            parse_reward_spec(reward)
        if fd_encoder is not None:
            from ngdiag.quality import check_encoder_spec

            check_encoder_spec(fd_encoder, option="--fd-encoder")
        notes: list = []
        held_out = read_prompts(prompts_file, prompt, notes) if (prompts_file is not None or prompt) else None
        from ngdiag.workflows.compare import check_compare_output, compare_runs, load_runs, run_inputs

        infos = load_runs(runs)
        labels = [r.label for r in infos]
        if baseline != "base" and baseline not in labels:
            raise ConfigError(f"--baseline must be 'base' or one of {', '.join(labels)}, got {baseline!r}")
        # the report path is checked before any model is loaded (the runs are only read here)
        check_compare_output(out, run_inputs(infos), overwrite=overwrite)
        first = infos[0]
        guidance = first.config.sampling.guidance_scale if guidance_scale is None else guidance_scale
        where = "command line (--guidance-scale)" if guidance_scale is not None else f"{first.path / 'config.yaml'}"
        notes.append(f"compare: {len(infos)} runs, {', '.join(map(str, step_list))} steps, guidance {guidance:g} "
                     f"(guidance: {where}), {num_samples} samples per model and step count, "
                     f"prompts: {'given' if held_out else 'run A training prompts'}")
        resolved_device = resolve_device(device)
        print_notes(notes, quiet)
        with Progress("compare", "audit", len(infos) * len(step_list), enabled=not quiet) as bar:
            result = compare_runs(
                infos, steps=step_list, reward=reward, prompts=held_out, num_samples=num_samples,
                guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, baseline=baseline, fd_encoder=fd_encoder,
                device=resolved_device, progress=lambda done, total: bar.advance_to(done),
            )
        path = result.save_html(out, overwrite=overwrite)
        table = result.table_wide()
        if output_format == "json":
            typer.echo(json.dumps(result.summary(), indent=2))
        else:
            typer.echo(table.to_string(index=False))
        if not quiet:
            typer.echo(f"report: {path}", err=True)
        return 0
