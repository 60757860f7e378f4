"""``ngdiag sweep RUN_DIR``: audit every checkpoint of a training run (:mod:`ngdiag.workflows.sweep`).

Every argument is checked, and the run's checkpoints listed, before any model is loaded or anything written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ngdiag.cli.common import (
    FORMATS,
    Device,
    Guidance,
    Height,
    Steps,
    Width,
    check_choice,
    check_device,
    check_dtype,
    describe_sampling,
    finite_float,
    print_notes,
    read_prompts,
    resolve_device,
    sampling_config,
    sampling_options,
    torch_dtype,
)
from ngdiag.rewards.specs import reward_kinds_help


def format_human(summary: dict) -> str:
    pct = lambda v: "" if v is None else f"{100 * v:+.2f} %"  # noqa: E731
    lines = [f"run       : {summary['run']}", f"base      : {summary['base']}",
             f"samples   : {summary['num_samples']} per checkpoint"]
    for row in summary["checkpoints"]:
        line = (f"  checkpoint-{row['iteration']:<6}: inflation {pct(row['inflation'])} "
                f"[{pct(row['ci_low'])}, {pct(row['ci_high'])}] {row['verdict']}")
        if row.get("reward") is not None:
            line += f", reward {row['reward']:.4f} ({row['reward_delta']:+.4f} vs base)"
        lines.append(line)
    first = summary["first_above"]
    lines.append(f"first above {100 * summary['threshold']:g} %: " + ("none" if first is None else f"checkpoint-{first}"))
    return "\n".join(lines)


def _training_prompts(config_file: Path) -> list:
    """The prompts an ngdiag training run was trained on (its ``config.yaml``)."""
    from ngdiag.core.configs import read_yaml_mapping
    from ngdiag.train.config import TrainConfig

    return TrainConfig.from_dict(read_yaml_mapping(config_file, "run config")).rollouts.load_prompts()


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        run_dir: Annotated[Path, typer.Argument(help="Training run folder with checkpoint-N folders (or checkpoints/checkpoint-N).")],
        base: Annotated[Optional[str], typer.Option(help="Base pipeline folder [default: the run's config.yaml, or what the adapters record].")] = None,
        prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Text file with one prompt per line (held-out prompts) [default: the run's training prompts (its config.yaml), else 8 built-in prompts].")] = None,
        prompt: Annotated[Optional[List[str]], typer.Option("--prompt", metavar="<str>", help="A prompt (repeatable).")] = None,
        num_samples: Annotated[Optional[int], typer.Option(help="Samples per checkpoint [default: one per prompt].")] = None,
        steps: Steps = None,
        guidance_scale: Guidance = None,
        height: Height = None,
        width: Width = None,
        sampling_from: Annotated[Optional[Path], typer.Option(
            help="Take the sampling settings not given here from this training config (ngdiag config.yaml or a "
                 "Flow-Factory YAML) [default: RUN_DIR/config.yaml when there is one].")] = None,
        seed: Annotated[int, typer.Option(help="Sample i uses seed + i (0 <= seed, seed + samples - 1 < 2**63).")] = 0,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4,
        reward: Annotated[Optional[str], typer.Option(help=f"Reward spec (reward and quality against the base): {reward_kinds_help()}.")] = None,
        fd_encoder: Annotated[Optional[str], typer.Option(help="Image encoder for a Fréchet distance of each checkpoint's images to the base's (needs --reward): clip:DIR, pickscore:DIR, world:DIR, hpsv2:FILE.")] = None,
        threshold: Annotated[float, typer.Option(parser=finite_float, help="Mark the first checkpoint whose inflation interval lies above this, in percent.")] = 0.0,
        confidence: Annotated[float, typer.Option(parser=finite_float, help="Confidence level of the intervals.")] = 0.95,
        out: Annotated[Path, typer.Option(help="Sweep folder (one audit folder per checkpoint inside; a rerun resumes).")] = Path("sweep-out"),
        device: Device = "auto",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
        output_format: Annotated[str, typer.Option("--format", help="human or json (the summary to stdout).")] = "human",
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress and no notes on stderr (errors only).")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo checkpoints whose audit folder holds a finished audit with other arguments.")] = False,
    ):
        """Audit every checkpoint of a training run on the same prompts and seeds.

        One table and one report: inflation with its interval, and with --reward the reward and image-quality measures paired against the base (sampled once), against the training iteration. The first checkpoint whose inflation interval lies above --threshold is marked (early stopping). Each checkpoint's audit is kept in OUT/checkpoint-N; a rerun reads the finished ones.

        Example: ngdiag sweep runs/nft --prompts held-out.txt --num-samples 32 --reward pickscore:/models/pickscore --threshold 5
        """
        from ngdiag.workflows.audit import AuditConfig
        from ngdiag.workflows.sweep import check_sweep_output, find_checkpoints, run_sweep

        check_choice("--format", output_format, FORMATS)
        check_device(device)
        check_dtype(dtype)
        notes: list = []
        run_config = Path(run_dir) / "config.yaml"
        if prompts_file is None and not prompt and run_config.is_file():
            prompts = _training_prompts(run_config)
            notes.append(f"prompts: the run's {len(prompts)} training prompts ({run_config}); pass --prompts for held-out ones")
        else:
            prompts = read_prompts(prompts_file, prompt, notes)
        if reward is not None:
            from ngdiag.rewards.specs import parse_reward_spec

            parse_reward_spec(reward)
        if fd_encoder is not None:
            from ngdiag.quality import check_encoder_spec

            check_encoder_spec(fd_encoder, option="--fd-encoder")
        if threshold <= -100:
            from ngdiag.core.errors import ConfigError

            raise ConfigError(f"--threshold must lie above -100 %, got {threshold:g}")
        skipped: list = []
        checkpoints = find_checkpoints(run_dir, skipped=skipped)
        notes += [f"skipping checkpoint-{n}: {why} (a checkpoint still being written?)" for n, _, why in skipped]
        check_sweep_output(out, [("run", Path(run_dir).resolve()), *([("base", base)] if base else [])])
        given = sampling_options(steps, guidance_scale, height, width, None, None, None)
        if sampling_from is None and run_config.is_file():
            sampling_from = run_config  # also for checkpoints one level down (RUN/checkpoints/checkpoint-N)
        sampling = sampling_config(str(checkpoints[-1][1]), given, sampling_from, notes)
        config = AuditConfig(prompts=prompts, num_samples=num_samples or len(prompts), sampling=sampling, seed=seed,
                             batch_size=batch_size, reward=reward, confidence=confidence, fd_encoder=fd_encoder)
        notes.append(f"sweep: {len(checkpoints)} checkpoints ({', '.join(f'checkpoint-{n}' for n, _ in checkpoints)}), "
                     f"{config.num_samples} samples each; {describe_sampling(sampling)}")
        print_notes(notes, quiet)
        say = None if quiet else (lambda message: typer.echo(f"sweep: {message}", err=True))
        result = run_sweep(run_dir, config, out_dir=out, base=base, threshold=threshold / 100,
                           device=resolve_device(device), dtype=torch_dtype(dtype), overwrite=overwrite, progress=say)
        if result.reused and not quiet:
            typer.echo(f"sweep: read {len(result.reused)} finished audits in {out} instead of redoing them", err=True)
        summary = json.loads((out / "summary.json").read_text())
        if output_format == "json":
            typer.echo(json.dumps(summary, indent=2))
        else:
            typer.echo(format_human(summary))
        if not quiet:
            typer.echo(f"report: {out / 'report.html'}", err=True)
        return 0
