"""``ngdiag sensitivity`` and ``ngdiag merge-sensitivity``: parse, call :mod:`ngdiag.workflows.sensitivity`, print."""

from __future__ import annotations

from typing import Annotated

import typer

from ngdiag.cli.runs import RunCommand, RunOptions
from ngdiag.rewards.specs import reward_kinds_help


MERGE_HELP = """Join the shards of a sensitivity run (--shard i/n) into one result.

Example: ngdiag merge-sensitivity sens-0 sens-1 --out sens
"""


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
    command = RunCommand(
        kind="sensitivity", what="sensitivity run", execute="ngdiag.workflows.sensitivity:run_sensitivity",
        merge="ngdiag.workflows.sensitivity:merge_sensitivity", merge_name="merge-sensitivity", merge_doc=MERGE_HELP,
        summary_file="sensitivity.json", batch_size=2, format_human=format_human)

    @command.register(app)
    def sensitivity(
        options: RunOptions,
        reward: Annotated[str, typer.Option(help=f"Reward spec: {reward_kinds_help()}.")],
        method: Annotated[str, typer.Option(help="discrete (exact adjoint of the sampler) or continuous (torchdiffeq).")] = "discrete",
    ):
        """Norm-scaling sensitivity S(t) = a(t) . d(t) of a reward, per sample and step (paper eq. 4-5).

        Writes report.html, sensitivity.json and records.parquet into --out; resumable and shardable
        (--shard i/n, or automatically under torchrun, where rank 0 merges into --out). Sampling
        settings not given come from the checkpoint's training run as for ngdiag audit.

        Example: ngdiag sensitivity runs/nft/checkpoint-200 --base models/sd35m --reward pickscore:/models/pickscore --num-samples 64
        """
        def make_config(prompts, sampling):
            from ngdiag.workflows.sensitivity import SensitivityConfig

            return SensitivityConfig(prompts=prompts, reward=reward, num_samples=options.num_samples, sampling=sampling,
                                     seed=options.seed, batch_size=options.batch_size, method=method)

        command.run(options, reward=reward, make_config=make_config)
        return 0
