"""``ngdiag audit`` and ``ngdiag merge``: parse, call :mod:`ngdiag.audit`, print.

Every argument is checked before anything is written or any model is loaded; the sampling
settings are checked against the pipeline as soon as it is loaded, before the run starts.
"""

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
    Progress,
)
from ngdiag.errors import ConfigError
from ngdiag.sensitivity.specs import reward_kinds_help

def format_human(summary: dict) -> str:
    inf = summary["inflation"]
    pct = lambda v: f"{100 * v:+.2f} %"  # noqa: E731
    sampling = summary.get("config", {}).get("sampling", {})
    lines = [
        f"checkpoint : {summary['checkpoint']}",
        f"base       : {summary['base']}",
        f"family     : {summary['family']}",
        f"samples    : {summary['num_samples']} x {summary['num_steps']} steps"
        + (f", guidance {sampling['guidance_scale']:g}" if sampling.get("guidance_scale") is not None else "")
        + (f", {sampling['height']}x{sampling['width']}" if sampling.get("height") else ""),
        f"inflation  : {pct(inf['value'])}  [{pct(inf['ci_low'])}, {pct(inf['ci_high'])}] "
        f"({100 * inf['confidence']:.0f} % CI, tolerance ±{100 * inf['tolerance']:.1f} %)",
        f"verdict    : {summary['verdict']}",
    ]
    if "reward" in summary:
        lines.append(f"reward     : {summary['reward'].get('name')}")
        for row in summary["reward"]["rows"]:
            lines.append(f"  {row['model']:<10}: {row['mean']:.4f} ± {row['std']:.4f} (n={row['n']})")
    if "renorm" in summary:
        r = summary["renorm"]
        for key in ("rl_relative_distance_to_base_mean", "rl_renorm_relative_distance_to_base_mean"):
            if key in r:
                lines.append(f"{key.replace('_', ' ')}: {r[key]:.4f}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        checkpoint: Annotated[str, typer.Argument(help="RL checkpoint: pipeline folder, transformer folder, PEFT adapter or LoRA file.")],
        base: Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder (the reference).")] = None,
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
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4,
        trajectory: Annotated[str, typer.Option(help="theta (the fine-tune's own trajectory) or ref.")] = "theta",
        renorm: Annotated[bool, typer.Option("--renorm", help="Also sample RL+renorm (paper eq. 3) and the base.")] = False,
        reward: Annotated[Optional[str], typer.Option(help=f"Reward spec: {reward_kinds_help()}.")] = None,
        tolerance: Annotated[float, typer.Option(parser=finite_float, help="Verdict tolerance as a fraction (0.01 = 1 %).")] = 0.01,
        confidence: Annotated[float, typer.Option(parser=finite_float, help="Confidence level of the interval.")] = 0.95,
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("audit-out"),
        device: Device = "auto",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
        output_format: Annotated[str, typer.Option("--format", help="human or json (summary to stdout).")] = "human",
        fail_on_inflation: Annotated[Optional[float], typer.Option(
            parser=finite_float, help="Exit 1 when the CI's lower end exceeds this inflation in percent.")] = None,
        shard: Annotated[Optional[str], typer.Option(help="Run shard i/n of the batches; join with ngdiag merge.")] = None,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle weights.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no notes on stderr (errors only).")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
        lora_alpha: Annotated[Optional[float], typer.Option(parser=finite_float, help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")] = None,
    ):
        """Audit a checkpoint for velocity-norm inflation against its base.

        Writes report.html, summary.json, steps.csv and records.parquet into --out. A killed
        audit rerun with the same arguments resumes. Under torchrun (several processes or GPUs)
        each process runs one shard in OUT.shards/ and rank 0 merges them into --out.

        Sampling settings not given take the values recorded by the ngdiag training run of the
        checkpoint (its run folder's config.yaml), or --sampling-from FILE, else 28 steps and
        guidance 4.5; the settings used and their source are printed on stderr and recorded in
        summary.json.

        Example: ngdiag audit runs/nft/checkpoint-200 --base models/sd35m --prompts prompts.txt --num-samples 64
        """
        from ngdiag.durable import parse_shard

        notes: list = []
        check_choice("--format", output_format, FORMATS)
        if fail_on_inflation is not None and fail_on_inflation < 0:
            raise ConfigError("--fail-on-inflation must be a non-negative percentage")
        check_device(device)
        check_dtype(dtype)
        shard_spec = parse_shard(shard)
        prompts = read_prompts(prompts_file, prompt, notes)
        if reward is not None:
            from ngdiag.sensitivity.specs import parse_reward_spec

            parse_reward_spec(reward)
        given = sampling_options(steps, guidance_scale, height, width, max_sequence_length, negative_prompt, text_encoder_out_layers)
        sampling = sampling_config(checkpoint, given, sampling_from, notes)

        from ngdiag.audit import AuditConfig, merge_audits, run_audit
        from ngdiag.commands.common import torch_dtype
        from ngdiag.models.loading import load_checkpoint

        config = AuditConfig(
            prompts=prompts, num_samples=num_samples, sampling=sampling, seed=seed, batch_size=batch_size,
            trajectory=trajectory, renorm=renorm, reward=reward, tolerance=tolerance, confidence=confidence,
        )
        launched = launcher_world() if shard is None else None
        local_rank = None
        if launched is not None:
            # Under torchrun / accelerate launch: one shard per process, rank 0 merges into --out.
            rank, world, local_rank = launched
            shard_spec = (rank, world)
        main_process = launched is None or launched[0] == 0
        inputs = run_inputs(checkpoint, base, prompts_file, reward)
        with output_folders(out, launched, kind="audit", inputs=inputs, overwrite=overwrite,
                            shard_spec=shard_spec) as (folder, merge_target):
            ckpt = load_checkpoint(checkpoint, base, device=resolve_device(device, local_rank), dtype=torch_dtype(dtype),
                                   allow_pickle=allow_pickle, lora_alpha=lora_alpha)
            if main_process:
                print_checkpoint_notes(ckpt)
            ckpt.require_ref()
            config = config.resolved(ckpt)

            from ngdiag.audit import part_names
            from ngdiag.durable import shard_batches

            batches = shard_batches(config.num_batches, shard_spec)
            reused = reused_batches(folder, "audit", config.fingerprint(ckpt.describe()), shard_spec, batches,
                                    lambda b: part_names(b)["records"])
            notes.append(describe_sampling(config.sampling))
            if launched is not None:
                notes.append(f"audit: {launched[1]} processes; the progress bar follows process 0 "
                             f"({len(batches)} of the {config.num_batches} batches)")
            if reused:
                notes.append(resume_note("audit", folder.path, len(reused), len(batches)))
            print_notes(notes if main_process else [], quiet)
            desc = "audit" if launched is None else f"audit (process 0 of {launched[1]})"
            with Progress(desc, "batch", len(batches), done=len(reused), enabled=not quiet and main_process) as bar:
                result = run_audit(ckpt, config, out_dir=folder, shard=shard_spec, overwrite=overwrite,
                                   progress=batch_progress(bar, reused))
            if launched is not None:
                result = merge_launched(merge_target, shard_spec, overwrite, merge_audits)
        if launched is not None:
            if result is None:
                return 0
            summary = result.summary()
        elif result is None:
            if not quiet:
                typer.echo(f"shard {shard_spec[0]}/{shard_spec[1]} done: {out}", err=True)
            return 0
        else:
            summary = json.loads((out / "summary.json").read_text())
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        if not quiet:
            typer.echo(f"report: {out / 'report.html'}", err=True)
        if fail_on_inflation is not None and summary["inflation"]["ci_low"] * 100 > fail_on_inflation:
            typer.echo(
                f"inflation check failed: CI low {100 * summary['inflation']['ci_low']:.2f} % > {fail_on_inflation} %",
                err=True,
            )
            return 1
        return 0

    @app.command()
    def merge(
        shards: Annotated[List[Path], typer.Argument(help="Output folders of the shards of one audit.")],
        out: Annotated[Path, typer.Option(help="Output folder of the merged audit.")] = Path("audit-merged"),
        output_format: Annotated[str, typer.Option("--format", help="human or json.")] = "human",
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No notes on stderr (errors only).")] = False,
    ):
        """Join the shards of an audit (run with --shard i/n) into one result.

        Example: ngdiag merge out-0 out-1 out-2 out-3 --out audit
        """
        check_choice("--format", output_format, FORMATS)
        from ngdiag.audit import merge_audits

        result = merge_audits(shards, out, overwrite=overwrite)
        summary = result.summary()
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        if not quiet:
            typer.echo(f"report: {out / 'report.html'}", err=True)
        return 0
