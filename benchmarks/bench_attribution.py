"""Timing: ``run_attribution`` against one ``run_audit`` of the same samples.

Attribution over ``G`` groups evaluates ``2 + G`` velocities per step (``2 + 2G`` with single-group
effects) against the audit's 2. This reports the median wall time of each over ``--repeats`` runs and
their ratio, for block and module grouping, with and without single-group effects. Usage:

    python benchmarks/bench_attribution.py --family sd3 --samples 4 --steps 4 --repeats 3 [--device cuda]

On the tiny built-in models (CPU) this mostly measures overheads; pass ``--base`` and ``--lora`` to
time a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ngdiag
from ngdiag.models.loading import load_checkpoint
from ngdiag.testing import save_lora_adapter, save_planted_base
from ngdiag.workflows.attribution import AttributionConfig, run_attribution
from ngdiag.workflows.audit import AuditConfig, run_audit

PROMPTS = ["a red cube", "a cat on a hill", "a lighthouse at dusk", "a bowl of fruit"]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3")
    parser.add_argument("--base")
    parser.add_argument("--lora")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or save_planted_base(Path(tmp) / "base", args.family)
        lora = args.lora or save_lora_adapter(base, Path(tmp) / "lora", init_scale=0.3)
        ckpt = load_checkpoint(lora, base, device=args.device)
        common = dict(prompts=PROMPTS, num_samples=args.samples, sampling=ngdiag.SamplingConfig(num_steps=args.steps),
                      batch_size=args.samples)
        audit = _median_time(lambda: run_audit(ckpt, AuditConfig(**common, fuse_lora=False)), args.repeats)
        rows = []
        for group in ("block", "module"):
            for single in (False, True):
                config = AttributionConfig(**common, group=group, single=single)
                groups = len(run_attribution(ckpt, config).table)
                t = _median_time(lambda: run_attribution(ckpt, config), args.repeats)
                rows.append({"group": group, "single": single, "groups": groups, "seconds": t, "ratio": t / audit,
                             "evaluations_per_step": 2 + groups * (2 if single else 1)})
        report = {"family": args.family, "device": args.device, "samples": args.samples, "steps": args.steps,
                  "audit_seconds": audit, "attribution": rows}
        print(json.dumps(report, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
