"""``ngdiag attribute`` and ``ngdiag merge-attribution``: parse, call :mod:`ngdiag.workflows.attribution`, print."""

from __future__ import annotations

from typing import Annotated

import typer

from ngdiag.cli.common import check_choice, finite_float, format_number
from ngdiag.cli.runs import RunCommand, RunOptions

MERGE_HELP = """Join the shards of an attribution (--shard i/n) into one result.

Example: ngdiag merge-attribution attr-0 attr-1 --out attr
"""

GROUPINGS = ("block", "module")  # ngdiag.models.groups.GROUPINGS, without importing torch at start-up


def format_human(summary: dict, max_rows: int = 20) -> str:
    total = summary["total"]
    lines = [
        f"checkpoint : {summary['checkpoint']}",
        f"base       : {summary['base']}",
        f"groups     : {summary['num_groups']} by {summary['group_by']} ({summary['switch']}), "
        f"{summary['num_samples']} samples",
        f"total      : log-ratio {format_number(total['log_ratio'])} (inflation {100 * total['inflation']:+.2f} % "
        f"[{100 * total['ci_low']:+.2f}, {100 * total['ci_high']:+.2f}] %)",
        f"sums       : leave-one-out {format_number(summary['sum_loo_effects'])} (interaction {format_number(summary['interaction_loo'])})"
        + (f", single {format_number(summary['sum_single_effects'])} (interaction {format_number(summary['interaction_single'])})"
           if "sum_single_effects" in summary else ""),
        "",
        f"{'rank':>4}  {'loo effect':>11} {'CI low':>11} {'CI high':>11} {'share':>7}  group",
    ]
    for row in summary["groups"][:max_rows]:
        share = row.get("loo_share")
        lines.append(f"{row['rank']:>4}  {format_number(row['loo_effect']):>11} {format_number(row['loo_ci_low']):>11} "
                     f"{format_number(row['loo_ci_high']):>11} {format_number(share, '.3f'):>7}  {row['group']}")
    if len(summary["groups"]) > max_rows:
        lines.append(f"      ... {len(summary['groups']) - max_rows} more groups in attribution.csv")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    command = RunCommand(
        kind="attribution", what="attribution", execute="ngdiag.workflows.attribution:run_attribution",
        merge="ngdiag.workflows.attribution:merge_attributions", merge_name="merge-attribution", merge_doc=MERGE_HELP,
        summary_file="summary.json", batch_size=4, format_human=format_human)

    @command.register(app)
    def attribute(
        options: RunOptions,
        group: Annotated[str, typer.Option(help="block (one transformer block's modules together) or module.")] = "block",
        single: Annotated[bool, typer.Option(
            "--single/--no-single", help="Also measure each group alone (one more velocity per group and step).")] = True,
        confidence: Annotated[float, typer.Option(parser=finite_float, help="Confidence level of the intervals.")] = 0.95,
    ):
        """Which adapted modules or blocks make the velocity norm inflate (per-layer attribution).

        On theta's own trajectories, every group of a LoRA checkpoint is switched off in turn
        (leave-one-out: effect = total - without the group) and, with --single, switched on alone;
        a full fine-tune's groups are swapped back to the base's weights instead. Every variant sees
        the same states, prompts and seeds. Writes attribution.csv, samples.csv, report.html and
        summary.json into --out; resumable and shardable like ngdiag audit.

        Cost: about 2 + G velocity evaluations per step for G groups (2 + 2G with --single), against
        the audit's 2.

        Example: ngdiag attribute runs/nft/checkpoint-200 --base models/sd35m --group block --num-samples 16
        """
        check_choice("--group", group, GROUPINGS)

        def make_config(prompts, sampling):
            from ngdiag.workflows.attribution import AttributionConfig

            return AttributionConfig(prompts=prompts, num_samples=options.num_samples, sampling=sampling,
                                     seed=options.seed, batch_size=options.batch_size, group=group, single=single,
                                     confidence=confidence)

        command.run(options, reward=None, make_config=make_config, needs_ref=True)
        return 0
