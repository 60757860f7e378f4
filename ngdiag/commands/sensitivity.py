"""``ngdiag sensitivity`` and ``ngdiag merge-sensitivity``: parse, call :mod:`ngdiag.sensitivity.run`, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ngdiag.errors import ConfigError


def format_human(summary: dict) -> str:
    lines = [
        f"checkpoint : {summary['checkpoint']}",
        f"reward     : {summary['reward']}  (mean {summary['reward_mean']:.4f})",
        f"method     : {summary['method']}, {summary['num_samples']} samples x {summary['num_steps']} steps",
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
        reward: Annotated[str, typer.Option(help="Reward spec: pickscore:DIR, hpsv2:FILE, clip:DIR, brightness, saturation, contrast.")],
        base: Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder.")] = None,
        prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Text file with one prompt per line.")] = None,
        prompt: Annotated[Optional[List[str]], typer.Option("--prompt", help="A prompt (repeatable).")] = None,
        num_samples: Annotated[Optional[int], typer.Option(help="Number of samples (default: one per prompt).")] = None,
        steps: Annotated[int, typer.Option(help="Sampling steps.")] = 28,
        guidance_scale: Annotated[float, typer.Option(help="CFG scale (embedded guidance for FLUX.1).")] = 4.5,
        height: Annotated[Optional[int], typer.Option(help="Image height.")] = None,
        width: Annotated[Optional[int], typer.Option(help="Image width.")] = None,
        seed: Annotated[int, typer.Option(help="Sample i uses seed + i.")] = 0,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 2,
        method: Annotated[str, typer.Option(help="discrete (exact adjoint of the sampler) or continuous (torchdiffeq).")] = "discrete",
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("sensitivity-out"),
        device: Annotated[str, typer.Option(help="cpu, cuda...")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
        output_format: Annotated[str, typer.Option("--format", help="human or json.")] = "human",
        shard: Annotated[Optional[str], typer.Option(help="Run shard i/n of the batches; join with merge-sensitivity.")] = None,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle weights.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
        lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")] = None,
    ):
        """Norm-scaling sensitivity S(t) = a(t) . d(t) of a reward, per sample and step (paper eq. 4-5).

        Writes report.html, sensitivity.json and records.parquet into --out; resumable and shardable
        (--shard i/n, or automatically under torchrun, where rank 0 merges into --out).

        Example: ngdiag sensitivity runs/nft/checkpoint-200/lora --base models/sd35m --reward pickscore:/models/pickscore --num-samples 64
        """
        from ngdiag.cli import _device, _dtype, print_notes
        from ngdiag.commands.audit import _Progress, launcher_world, merge_launched, output_folders, read_prompts, run_inputs
        from ngdiag.durable import parse_shard
        from ngdiag.generation import SamplingConfig
        from ngdiag.models.loading import load_checkpoint
        from ngdiag.sensitivity.rewards import parse_reward_spec
        from ngdiag.sensitivity.run import SensitivityConfig, run_sensitivity

        if output_format not in ("human", "json"):
            raise ConfigError(f"--format must be human or json, got {output_format!r}")
        shard_spec = parse_shard(shard)
        parse_reward_spec(reward)
        config = SensitivityConfig(
            prompts=read_prompts(prompts_file, prompt), reward=reward, num_samples=num_samples,
            sampling=SamplingConfig(num_steps=steps, guidance_scale=guidance_scale, height=height, width=width),
            seed=seed, batch_size=batch_size, method=method,
        )
        launched = launcher_world() if shard is None else None
        if launched is not None:
            # Under torchrun / accelerate launch: one shard per process, rank 0 merges into --out.
            shard_spec = launched[:2]
            if device.startswith("cuda") and ":" not in device:
                device = f"cuda:{launched[2]}"
        inputs = run_inputs(checkpoint, base, prompts_file, reward)
        with output_folders(out, launched, kind="sensitivity", inputs=inputs, overwrite=overwrite, config=config.to_dict(),
                            shard_spec=shard_spec) as (folder, merge_target):
            ckpt = load_checkpoint(checkpoint, base, device=_device(device), dtype=_dtype(dtype), allow_pickle=allow_pickle,
                                   lora_alpha=lora_alpha)
            if launched is None or launched[0] == 0:
                print_notes(ckpt)
            progress = _Progress(quiet or (launched is not None and launched[0] != 0), "sensitivity")
            try:
                run = run_sensitivity(ckpt, config, out_dir=folder, shard=shard_spec, overwrite=overwrite, progress=progress)
            finally:
                progress.close()
            if launched is not None:
                from ngdiag.sensitivity.run import merge_sensitivity

                run = merge_launched(merge_target, shard_spec, overwrite, merge_sensitivity)
        if launched is not None and run is None:
            return 0
        elif run is None:
            typer.echo(f"shard {shard_spec[0]}/{shard_spec[1]} done: {out}", err=True)
            return 0
        summary = json.loads((out / "sensitivity.json").read_text())
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        return 0

    @app.command("merge-sensitivity")
    def merge_sensitivity_cmd(
        shards: Annotated[List[Path], typer.Argument(help="Output folders of the shards of one run.")],
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("sensitivity-merged"),
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
    ):
        """Join the shards of a sensitivity run (--shard i/n) into one result."""
        from ngdiag.sensitivity.run import merge_sensitivity

        run = merge_sensitivity(shards, out, overwrite=overwrite)
        typer.echo(format_human(run.summary()))
        return 0
