"""``ngdiag audit`` and ``ngdiag merge``: parse, call :mod:`ngdiag.workflows.audit`, print.

Every argument is checked before anything is written or any model is loaded; the sampling
settings are checked against the pipeline as soon as it is loaded, before the run starts.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ngdiag.cli.common import finite_float
from ngdiag.cli.runs import RunCommand, RunOptions
from ngdiag.core.errors import ConfigError
from ngdiag.rewards.specs import reward_kinds_help


MERGE_HELP = """Join the shards of an audit (run with --shard i/n) into one result.

Example: ngdiag merge out-0 out-1 out-2 out-3 --out audit
"""


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
        f"({100 * inf['confidence']:.0f} % CI"
        + (f" over {inf['num_clusters']} prompts" if inf.get("interval_unit") == "prompts" else "")
        + f", tolerance ±{100 * inf['tolerance']:.1f} %)",
    ]
    tw = inf.get("t_weighted") or {}
    if tw.get("value") is not None:
        lines.append(f"t-weighted : {pct(tw['value'])}  [{pct(tw['ci_low'])}, {pct(tw['ci_high'])}] "
                     "(log-ratio weighted by step size |dt|)")
    lines.append(f"verdict    : {summary['verdict']}")
    spatial = summary.get("spatial")
    if spatial and spatial.get("top_share") is not None:
        held = spatial.get("held_out_top_share")
        if held is not None:
            reading = (f"by the held-out share: the top-10 % positions chosen on half of the samples hold {100 * held:.1f} % "
                       f"of the other half's excess; {100 * spatial['top_share']:.1f} % in sample")
        else:
            reading = f"the top-10 % positions hold {100 * spatial['top_share']:.1f} % of the excess"
        lines.append(f"spatial    : {spatial['locality']} ({reading}; mean map {spatial['mean_map_min']:.4f} to "
                     f"{spatial['mean_map_max']:.4f})")
    if "reward" in summary:
        lines.append(f"reward     : {summary['reward'].get('name')}")
        for row in summary["reward"]["rows"]:
            lines.append(f"  {row['model']:<10}: {row['mean']:.4f} ± {row['std']:.4f} (n={row['n']})")
        for name, scale in (summary["reward"].get("scales") or {}).items():
            lines.append(f"  on the {name} scale (x{scale['factor']:.6g}): " + ", ".join(
                f"{row['model']} {row['mean']:.4f} ± {row['std']:.4f}" for row in scale["rows"]))
    if "renorm" in summary:
        r = summary["renorm"]
        for key in ("rl_relative_distance_to_base_mean", "rl_renorm_relative_distance_to_base_mean"):
            if key in r:
                lines.append(f"{key.replace('_', ' ')}: {r[key]:.4f}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    command = RunCommand(
        kind="audit", what="audit", execute="ngdiag.workflows.audit:run_audit", merge="ngdiag.workflows.audit:merge_audits", merge_name="merge",
        merge_doc=MERGE_HELP, summary_file="summary.json", batch_size=4, format_human=format_human)

    @command.register(app)
    def audit(
        options: RunOptions,
        trajectory: Annotated[str, typer.Option(help="theta (the fine-tune's own trajectory) or ref.")] = "theta",
        renorm: Annotated[bool, typer.Option("--renorm", help="Also sample RL+renorm (paper eq. 3) and the base.")] = False,
        reward: Annotated[Optional[str], typer.Option(help=f"Reward spec: {reward_kinds_help()}.")] = None,
        tolerance: Annotated[float, typer.Option(parser=finite_float, help="Verdict tolerance as a fraction (0.01 = 1 %).")] = 0.01,
        confidence: Annotated[float, typer.Option(parser=finite_float, help="Confidence level of the interval.")] = 0.95,
        fd_encoder: Annotated[Optional[str], typer.Option(
            help="Image encoder for a Fréchet distance of each model to the base (needs --reward): clip:DIR, "
                 "pickscore:DIR, world:DIR, hpsv2:FILE or a CLIP folder.")] = None,
        spatial_maps: Annotated[bool, typer.Option(
            "--spatial-maps", help="Keep every sample's spatial ratio map in spatial.npz (default: the image grid's).")] = False,
        fail_on_inflation: Annotated[Optional[float], typer.Option(
            parser=finite_float, help="Exit 1 when the CI's lower end exceeds this inflation in percent.")] = None,
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
        if fail_on_inflation is not None and fail_on_inflation < 0:
            raise ConfigError("--fail-on-inflation must be a non-negative percentage")

        if fd_encoder is not None:
            from ngdiag.quality import check_encoder_spec

            check_encoder_spec(fd_encoder, option="--fd-encoder")

        def make_config(prompts, sampling):
            from ngdiag.workflows.audit import AuditConfig

            return AuditConfig(prompts=prompts, num_samples=options.num_samples, sampling=sampling, seed=options.seed,
                               batch_size=options.batch_size, trajectory=trajectory, renorm=renorm, reward=reward,
                               tolerance=tolerance, confidence=confidence, fd_encoder=fd_encoder,
                               spatial_maps=spatial_maps)

        summary = command.run(options, reward=reward, make_config=make_config, needs_ref=True)
        if summary is not None and fail_on_inflation is not None and summary["inflation"]["ci_low"] * 100 > fail_on_inflation:
            typer.echo(
                f"inflation check failed: CI low {100 * summary['inflation']['ci_low']:.2f} % > {fail_on_inflation} %",
                err=True,
            )
            return 1
        return 0
