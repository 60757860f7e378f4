"""``ngdiag sensitivity`` and ``ngdiag merge-sensitivity``: parse, call :mod:`ngdiag.workflows.sensitivity`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ngdiag.cli.common import finite_float, format_number, print_notes
from ngdiag.cli.runs import RunCommand, RunOptions
from ngdiag.rewards.specs import reward_kinds_help


MERGE_HELP = """Join the shards of a sensitivity run (--shard i/n) into one result.

Example: ngdiag merge-sensitivity sens-0 sens-1 --out sens
"""


def _first_order_lines(block: dict, confidence) -> list:
    """The predicted reward change of removing the inflation and, from an audit, the measured one."""
    level = f"{confidence:.0%} CI" if isinstance(confidence, (int, float)) else "CI"
    lines = [
        f"removal    : inflation {block['inflation']:.2%} (eps = {block['eps']:+.4g}): first-order reward change "
        f"{format_number(block['mean'])} [{level} {format_number(block['ci_low'])}, {format_number(block['ci_high'])}] = eps * dR/d(eps)",
    ]
    measured = block.get("measured_renorm_reward_change")
    if measured:
        n = measured.get("num_samples")
        lines.append(f"measured   : {format_number(measured['mean'])} ± {format_number(measured.get('stderr'), '.4g')} (standard error; std "
                     f"{format_number(measured.get('std'), '.4g')} over {n if n else '?'} samples) rl+renorm minus rl in {block['audit']}")
        if block.get("same_reward") is False:
            lines.append(f"             (the audit's reward is {block.get('audit_reward')}, not this run's)")
    elif block.get("audit"):
        lines.append(f"measured   : none in {block['audit']} (run the audit with --renorm and --reward)")
    return lines


def format_human(summary: dict) -> str:
    sampling = summary.get("config", {}).get("sampling", {})
    dd = summary["directional_derivative"]
    confidence = (summary.get("intervals") or {}).get("confidence")
    ci = (f"  [{confidence:.0%} CI {format_number(dd.get('ci_low'))}, {format_number(dd.get('ci_high'))}]"
          if "ci_low" in dd and isinstance(confidence, (int, float)) else "")
    lines = [
        f"checkpoint : {summary['checkpoint']}",
        f"reward     : {summary['reward']}  (mean {summary['reward_mean']:.4f})",
        f"method     : {summary['method']}, {summary['num_samples']} samples x {summary['num_steps']} steps"
        + (f", guidance {sampling['guidance_scale']:g}" if sampling.get("guidance_scale") is not None else ""),
        f"NSR        : median {summary['nsr_median']:.2f}, range [{summary['nsr_min']:.2f}, {summary['nsr_max']:.2f}]",
        f"dR/d(eps)  : {dd['mean']:+.4g} ± {dd['std']:.4g}{ci}",
    ]
    if summary.get("first_order_reward_change"):
        lines += _first_order_lines(summary["first_order_reward_change"], confidence)
    lines += ["", f"{'step':>4} {'t':>7} {'mean S':>11} {'CI low':>11} {'CI high':>11} {'std S':>11} {'NSR':>8} {'frac>0':>7}"]
    for row in summary["per_step"]:
        nsr = row["nsr"] if row["nsr"] is not None else float("nan")
        lines.append(f"{row['step']:>4} {row['t']:>7.4f} {row['mean']:>11.4g} {format_number(row.get('mean_ci_low'), '.4g'):>11} "
                     f"{format_number(row.get('mean_ci_high'), '.4g'):>11} {row['std']:>11.4g} {nsr:>8.2f} {row['frac_positive']:>7.2f}")
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
        inflation: Annotated[Optional[float], typer.Option(
            parser=finite_float, metavar="FRACTION",
            help="An inflation to remove (a fraction above -1, 0.059 for 5.9 %): report the first-order reward "
                 "change eps * dR/d(eps), eps = 1/(1 + FRACTION) - 1.")] = None,
        audit: Annotated[Optional[Path], typer.Option(
            metavar="AUDIT_DIR",
            help="An audit's output folder: take the inflation from its summary.json, and show its measured "
                 "reward change under RL renorm (audit --renorm --reward) next to the prediction.")] = None,
    ):
        """Norm-scaling sensitivity S(t) = a(t) . d(t) of a reward, per sample and step (paper eq. 4-5).

        Writes report.html, sensitivity.json and records.parquet into --out; resumable and shardable
        (--shard i/n, or automatically under torchrun, where rank 0 merges into --out). Sampling
        settings not given come from the checkpoint's training run as for ngdiag audit.

        With --inflation or --audit, also the first-order reward change of removing that inflation
        (every step's velocity scaled by 1/(1 + inflation)), with its bootstrap interval over samples.

        Example: ngdiag sensitivity runs/nft/checkpoint-200 --base models/sd35m --reward pickscore:/models/pickscore --num-samples 64

        Example: ngdiag sensitivity runs/nft/checkpoint-200 --base models/sd35m --reward pickscore:/models/pickscore --audit audit-nft
        """
        def make_config(prompts, sampling):
            from ngdiag.core.errors import ConfigError
            from ngdiag.workflows.sensitivity import SensitivityConfig, audit_reference

            if inflation is not None and audit is not None:
                raise ConfigError("give --inflation or --audit, not both")
            if inflation is not None and not inflation > -1:
                raise ConfigError(f"--inflation must be a fraction above -1 (0.059 for 5.9 %), got {inflation:g}")
            reference = audit_reference(audit) if audit is not None else None
            if inflation is not None and abs(inflation) > 1:
                print_notes([f"--inflation is a fraction: {inflation:g} means {100 * inflation:+.0f} %"], options.quiet)
            return SensitivityConfig(prompts=prompts, reward=reward, num_samples=options.num_samples, sampling=sampling,
                                     seed=options.seed, batch_size=options.batch_size, method=method,
                                     inflation=inflation, audit=reference)

        command.run(options, reward=reward, make_config=make_config)
        return 0
