"""``ngdiag sensitivity`` and ``ngdiag merge-sensitivity``: parse, call :mod:`ngdiag.sensitivity.run`, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ngdiag.commands.common import (
    FORMATS,
    Device,
    Guidance,
    Height,
    MaxSequenceLength,
    NegativePrompt,
    SamplingFrom,
    Steps,
    TextEncoderOutLayers,
    Width,
    Progress,
    batch_progress,
    check_choice,
    check_device,
    check_dtype,
    describe_sampling,
    finite_float,
    launcher_world,
    merge_launched,
    output_folders,
    print_checkpoint_notes,
    print_notes,
    read_prompts,
    resolve_device,
    resume_note,
    reused_batches,
    run_inputs,
    sampling_config,
    sampling_options,
)
from ngdiag.sensitivity.specs import reward_kinds_help


def format_human(summary: dict) -> str:
    sampling = summary.get("config", {}).get("sampling", {})
    lines = [
        f"checkpoint : {summary['checkpoint']}",
        f"reward     : {summary['reward']}  (mean {summary['reward_mean']:.4f})",
        f"method     : {summary['method']}, {summary['num_samples']} samples x {summary['num_steps']} steps"
        + (f", guidance {sampling['guidance_scale']:g}" if sampling.get("guidance_scale") is not None else ""),
        f"NSR        : median {summary['nsr_median']:.2f}, range [{summary['nsr_min']:.2f}, {summary['nsr_max']:.2f}]",
        f"dR/d(eps)  : {summary['directional_derivative']['mean']:+.4g} ± {summary['directional_derivative']['std']:.4g}",
        "",
        f"{'step':>4} {'t':>7} {'mean S':>11} {'std S':>11} {'NSR':>8} {'frac>0':>7}",
    ]
    for row in summary["per_step"]:
        nsr = row["nsr"] if row["nsr"] is not None else float("nan")
        lines.append(f"{row['step']:>4} {row['t']:>7.4f} {row['mean']:>11.4g} {row['std']:>11.4g} {nsr:>8.2f} {row['frac_positive']:>7.2f}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def sensitivity(
        checkpoint: Annotated[str, typer.Argument(help="Checkpoint path (pipeline, transformer folder, adapter, LoRA file).")],
        reward: Annotated[str, typer.Option(help=f"Reward spec: {reward_kinds_help()}.")],
        base: Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder.")] = None,
        prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Text file with one prompt per line [default: 8 built-in prompts].")] = None,
        prompt: Annotated[Optional[List[str]], typer.Option("--prompt", metavar="<str>", help="A prompt (repeatable).")] = None,
        num_samples: Annotated[Optional[int], typer.Option(help="Number of samples [default: one per prompt].")] = None,
        steps: Steps = None,
        guidance_scale: Guidance = None,
        height: Height = None,
        width: Width = None,
        max_sequence_length: MaxSequenceLength = None,
        negative_prompt: NegativePrompt = None,
        text_encoder_out_layers: TextEncoderOutLayers = None,
        sampling_from: SamplingFrom = None,
        seed: Annotated[int, typer.Option(help="Sample i uses seed + i (0 <= seed, seed + samples - 1 < 2**63).")] = 0,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 2,
        method: Annotated[str, typer.Option(help="discrete (exact adjoint of the sampler) or continuous (torchdiffeq).")] = "discrete",
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("sensitivity-out"),
        device: Device = "auto",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
        output_format: Annotated[str, typer.Option("--format", help="human or json.")] = "human",
        shard: Annotated[Optional[str], typer.Option(help="Run shard i/n of the batches; join with merge-sensitivity.")] = None,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle weights.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no notes on stderr (errors only).")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
        lora_alpha: Annotated[Optional[float], typer.Option(parser=finite_float, help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")] = None,
    ):
        """Norm-scaling sensitivity S(t) = a(t) . d(t) of a reward, per sample and step (paper eq. 4-5).

        Writes report.html, sensitivity.json and records.parquet into --out; resumable and shardable
        (--shard i/n, or automatically under torchrun, where rank 0 merges into --out). Sampling
        settings not given come from the checkpoint's training run as for ngdiag audit.

        Example: ngdiag sensitivity runs/nft/checkpoint-200 --base models/sd35m --reward pickscore:/models/pickscore --num-samples 64
        """
        from ngdiag.durable import parse_shard
        from ngdiag.sensitivity.specs import parse_reward_spec

        notes: list = []
        check_choice("--format", output_format, FORMATS)
        check_device(device)
        check_dtype(dtype)
        shard_spec = parse_shard(shard)
        parse_reward_spec(reward)
        prompts = read_prompts(prompts_file, prompt, notes)
        given = sampling_options(steps, guidance_scale, height, width, max_sequence_length, negative_prompt, text_encoder_out_layers)
        sampling = sampling_config(checkpoint, given, sampling_from, notes)

        from ngdiag.commands.common import torch_dtype
        from ngdiag.durable import shard_batches
        from ngdiag.models.loading import load_checkpoint
        from ngdiag.sensitivity.run import SensitivityConfig, merge_sensitivity, part_name, run_sensitivity

        config = SensitivityConfig(
            prompts=prompts, reward=reward, num_samples=num_samples, sampling=sampling,
            seed=seed, batch_size=batch_size, method=method,
        )
        launched = launcher_world() if shard is None else None
        local_rank = None
        if launched is not None:
            # Under torchrun / accelerate launch: one shard per process, rank 0 merges into --out.
            shard_spec = launched[:2]
            local_rank = launched[2]
        main_process = launched is None or launched[0] == 0
        inputs = run_inputs(checkpoint, base, prompts_file, reward)
        with output_folders(out, launched, kind="sensitivity", inputs=inputs, overwrite=overwrite,
                            shard_spec=shard_spec) as (folder, merge_target):
            ckpt = load_checkpoint(checkpoint, base, device=resolve_device(device, local_rank), dtype=torch_dtype(dtype),
                                   allow_pickle=allow_pickle, lora_alpha=lora_alpha)
            if main_process:
                print_checkpoint_notes(ckpt)
            config = config.resolved(ckpt)
            batches = shard_batches(config.num_batches, shard_spec)
            reused = reused_batches(folder, "sensitivity", config.fingerprint(ckpt.describe()), shard_spec, batches,
                                    part_name)
            notes.append(describe_sampling(config.sampling))
            if launched is not None:
                notes.append(f"sensitivity: {launched[1]} processes; the progress bar follows process 0 "
                             f"({len(batches)} of the {config.num_batches} batches)")
            if reused:
                notes.append(resume_note("sensitivity", folder.path, len(reused), len(batches)))
            print_notes(notes if main_process else [], quiet)
            desc = "sensitivity" if launched is None else f"sensitivity (process 0 of {launched[1]})"
            with Progress(desc, "batch", len(batches), done=len(reused), enabled=not quiet and main_process) as bar:
                run = run_sensitivity(ckpt, config, out_dir=folder, shard=shard_spec, overwrite=overwrite,
                                      progress=batch_progress(bar, reused))
            if launched is not None:
                run = merge_launched(merge_target, shard_spec, overwrite, merge_sensitivity)
        if launched is not None:
            if run is None:
                return 0
        elif run is None:
            if not quiet:
                typer.echo(f"shard {shard_spec[0]}/{shard_spec[1]} done: {out}", err=True)
            return 0
        summary = json.loads((out / "sensitivity.json").read_text())
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        if not quiet:
            typer.echo(f"report: {out / 'report.html'}", err=True)
        return 0

    @app.command("merge-sensitivity")
    def merge_sensitivity_cmd(
        shards: Annotated[List[Path], typer.Argument(help="Output folders of the shards of one run.")],
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("sensitivity-merged"),
        output_format: Annotated[str, typer.Option("--format", help="human or json (the summary to stdout).")] = "human",
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No notes on stderr (errors only).")] = False,
    ):
        """Join the shards of a sensitivity run (--shard i/n) into one result.

        Example: ngdiag merge-sensitivity sens-0 sens-1 --out sens
        """
        check_choice("--format", output_format, FORMATS)
        from ngdiag.sensitivity.run import merge_sensitivity

        run = merge_sensitivity(shards, out, overwrite=overwrite)
        summary = run.summary()
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        if not quiet:
            typer.echo(f"report: {out / 'report.html'}", err=True)
        return 0
