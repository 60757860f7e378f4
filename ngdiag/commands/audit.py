"""``ngdiag audit`` and ``ngdiag merge``: parse, call :mod:`ngdiag.audit`, print."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ngdiag.errors import ConfigError

DEFAULT_PROMPTS = [
    "a photo of a red fox in a snowy forest",
    "a bowl of fresh fruit on a wooden table",
    "a lighthouse on a rocky coast at sunset",
    "a portrait of an elderly man with a grey beard",
    "a city street in the rain at night",
    "a watercolor painting of a mountain lake",
    "a cup of coffee next to an open book",
    "a golden retriever running on a beach",
]


def read_prompts(prompts_file: Optional[Path], prompts: Optional[List[str]]) -> list:
    """Prompts from ``--prompts FILE`` (one per line, blank lines ignored) and/or ``--prompt``."""
    out = []
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompt file not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        file_prompts = [line for line in lines if line]
        if not file_prompts:
            raise ConfigError(f"prompt file {path} has no prompts (it is empty or blank)")
        out += file_prompts
    if prompts:
        if any(not p.strip() for p in prompts):
            raise ConfigError("--prompt must not be empty")
        out += list(prompts)
    return out or list(DEFAULT_PROMPTS)


def format_human(summary: dict) -> str:
    inf = summary["inflation"]
    pct = lambda v: f"{100 * v:+.2f} %"  # noqa: E731
    lines = [
        f"checkpoint : {summary['checkpoint']}",
        f"base       : {summary['base']}",
        f"family     : {summary['family']}",
        f"samples    : {summary['num_samples']} x {summary['num_steps']} steps",
        f"inflation  : {pct(inf['value'])}  [{pct(inf['ci_low'])}, {pct(inf['ci_high'])}] "
        f"({100 * inf['confidence']:.0f} % CI, tolerance ±{100 * inf['tolerance']:.1f} %)",
        f"verdict    : {summary['verdict']}",
    ]
    if "reward" in summary:
        for row in summary["reward"]["rows"]:
            lines.append(f"reward {row['model']:<10}: {row['mean']:.4f} ± {row['std']:.4f} (n={row['n']})")
    if "renorm" in summary:
        r = summary["renorm"]
        for key in ("rl_relative_distance_to_base_mean", "rl_renorm_relative_distance_to_base_mean"):
            if key in r:
                lines.append(f"{key.replace('_', ' ')}: {r[key]:.4f}")
    return "\n".join(lines)


class _Progress:
    def __init__(self, quiet: bool, desc: str):
        self.bar = None
        self.quiet = quiet
        self.desc = desc

    def __call__(self, done: int, total: int):
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="batch", file=sys.stderr)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def launcher_world():
    """``(rank, world_size, local_rank)`` under torchrun / accelerate launch with several processes, else None."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def launched_shard_dir(out: Path, shard_spec: tuple) -> Path:
    """Where process ``i`` of ``n`` writes its shard under a launcher: ``OUT.shards/i-of-n``."""
    return Path(f"{out}.shards") / f"{shard_spec[0]}-of-{shard_spec[1]}"


def run_inputs(checkpoint, base, prompts_file, reward) -> list:
    """The local inputs of an audit or sensitivity run, which its output folder must stay clear of."""
    inputs = [("checkpoint", checkpoint), ("base", base), ("prompts file", prompts_file)]
    if reward is not None:
        from ngdiag.sensitivity.rewards import parse_reward_spec

        inputs.append(("reward weights", parse_reward_spec(reward)[1]))
    return inputs


@contextlib.contextmanager
def output_folders(out: Path, launched, *, kind: str, inputs: list, overwrite: bool, config: dict, shard_spec: tuple):
    """Check and lock the output folders of a run before any model is loaded.

    Yields ``(run_folder, merge_target)``: the folder this process writes its run (or shard) into,
    and what rank 0 merges into under a launcher (``out`` locked by rank 0, ``None`` elsewhere).
    """
    from ngdiag.durable import check_output_folder, open_output

    with contextlib.ExitStack() as stack:
        merge_target = None
        run_out = out
        if launched is not None:
            check_output_folder(out, kind=kind, inputs=inputs, overwrite=overwrite)
            if shard_spec[0] == 0:
                merge_target = stack.enter_context(open_output(out, kind=kind, inputs=inputs, overwrite=overwrite))
            run_out = launched_shard_dir(out, shard_spec)
        folder = stack.enter_context(open_output(run_out, kind=kind, inputs=inputs, overwrite=overwrite, config=config,
                                                 shard=list(shard_spec)))
        yield folder, merge_target


def merge_launched(out, shard_spec: tuple, overwrite: bool, merge):
    """Wait for every process (gloo barrier), then rank 0 joins the shards into ``out`` with ``merge``.

    ``out`` is rank 0's locked merge target (:func:`output_folders`) or the output path."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
        result = None
        if shard_spec[0] == 0:
            path = out.path if hasattr(out, "path") else out
            shards = [launched_shard_dir(path, (i, shard_spec[1])) for i in range(shard_spec[1])]
            result = merge(shards, out, overwrite=overwrite)
        dist.barrier()
        return result
    finally:
        if created:
            dist.destroy_process_group()


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        checkpoint: Annotated[str, typer.Argument(help="RL checkpoint: pipeline folder, transformer folder, PEFT adapter or LoRA file.")],
        base: Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder (the reference).")] = None,
        prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Text file with one prompt per line.")] = None,
        prompt: Annotated[Optional[List[str]], typer.Option("--prompt", help="A prompt (repeatable).")] = None,
        num_samples: Annotated[Optional[int], typer.Option(help="Number of samples (default: one per prompt).")] = None,
        steps: Annotated[int, typer.Option(help="Sampling steps.")] = 28,
        guidance_scale: Annotated[float, typer.Option(help="CFG scale (embedded guidance for FLUX.1).")] = 4.5,
        height: Annotated[Optional[int], typer.Option(help="Image height (default: the pipeline's).")] = None,
        width: Annotated[Optional[int], typer.Option(help="Image width (default: the pipeline's).")] = None,
        seed: Annotated[int, typer.Option(help="Sample i uses seed + i.")] = 0,
        batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4,
        trajectory: Annotated[str, typer.Option(help="theta (the fine-tune's own trajectory) or ref.")] = "theta",
        renorm: Annotated[bool, typer.Option("--renorm", help="Also sample RL+renorm (paper eq. 3) and the base.")] = False,
        reward: Annotated[Optional[str], typer.Option(help="Reward spec, e.g. pickscore:/models/pickscore or brightness.")] = None,
        tolerance: Annotated[float, typer.Option(help="Verdict tolerance as a fraction (0.01 = 1 %).")] = 0.01,
        confidence: Annotated[float, typer.Option(help="Confidence level of the interval.")] = 0.95,
        out: Annotated[Path, typer.Option(help="Output folder.")] = Path("audit-out"),
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...")] = "cpu",
        dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
        output_format: Annotated[str, typer.Option("--format", help="human or json (summary to stdout).")] = "human",
        fail_on_inflation: Annotated[Optional[float], typer.Option(help="Exit 1 when the CI's lower end exceeds this inflation in percent.")] = None,
        shard: Annotated[Optional[str], typer.Option(help="Run shard i/n of the batches; join with ngdiag merge.")] = None,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle weights.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")] = False,
        lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")] = None,
    ):
        """Audit a checkpoint for velocity-norm inflation against its base.

        Writes report.html, summary.json, steps.csv and records.parquet into --out. A killed
        audit rerun with the same arguments resumes. Under torchrun (several processes or GPUs)
        each process runs one shard in OUT.shards/ and rank 0 merges them into --out.

        Example: ngdiag audit runs/nft/checkpoint-200/lora --base models/sd35m --prompts prompts.txt --num-samples 64
        """
        from ngdiag.audit import AuditConfig, run_audit
        from ngdiag.durable import parse_shard
        from ngdiag.cli import _device, _dtype, print_notes
        from ngdiag.generation import SamplingConfig
        from ngdiag.models.loading import load_checkpoint

        if output_format not in ("human", "json"):
            raise ConfigError(f"--format must be human or json, got {output_format!r}")
        if fail_on_inflation is not None and fail_on_inflation < 0:
            raise ConfigError("--fail-on-inflation must be a non-negative percentage")
        shard_spec = parse_shard(shard)
        prompts = read_prompts(prompts_file, prompt)
        if reward is not None:
            from ngdiag.sensitivity.rewards import parse_reward_spec

            parse_reward_spec(reward)
        config = AuditConfig(
            prompts=prompts,
            num_samples=num_samples,
            sampling=SamplingConfig(num_steps=steps, guidance_scale=guidance_scale, height=height, width=width),
            seed=seed,
            batch_size=batch_size,
            trajectory=trajectory,
            renorm=renorm,
            reward=reward,
            tolerance=tolerance,
            confidence=confidence,
        )
        launched = launcher_world() if shard is None else None
        if launched is not None:
            # Under torchrun / accelerate launch: one shard per process, rank 0 merges into --out.
            rank, world, local_rank = launched
            shard_spec = (rank, world)
            if device.startswith("cuda") and ":" not in device:
                device = f"cuda:{local_rank}"
        inputs = run_inputs(checkpoint, base, prompts_file, reward)
        with output_folders(out, launched, kind="audit", inputs=inputs, overwrite=overwrite, config=config.to_dict(),
                            shard_spec=shard_spec) as (folder, merge_target):
            ckpt = load_checkpoint(checkpoint, base, device=_device(device), dtype=_dtype(dtype), allow_pickle=allow_pickle,
                                   lora_alpha=lora_alpha)
            if launched is None or launched[0] == 0:
                print_notes(ckpt)
            ckpt.require_ref()
            progress = _Progress(quiet or (launched is not None and launched[0] != 0), "audit")
            try:
                result = run_audit(ckpt, config, out_dir=folder, shard=shard_spec, overwrite=overwrite, progress=progress)
            finally:
                progress.close()
            if launched is not None:
                from ngdiag.audit import merge_audits

                result = merge_launched(merge_target, shard_spec, overwrite, merge_audits)
        if launched is not None:
            if result is None:
                return 0
            summary = result.summary()
        elif result is None:
            typer.echo(f"shard {shard_spec[0]}/{shard_spec[1]} done: {out}", err=True)
            return 0
        else:
            summary = json.loads((out / "summary.json").read_text())
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        if output_format == "human" and not quiet:
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
    ):
        """Join the shards of an audit (run with --shard i/n) into one result.

        Example: ngdiag merge out-0 out-1 out-2 out-3 --out audit
        """
        from ngdiag.audit import merge_audits

        result = merge_audits(shards, out, overwrite=overwrite)
        summary = result.summary()
        typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
        return 0
