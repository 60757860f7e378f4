"""Side-by-side timing: a LoRA pair evaluated as two passes versus one mixed-adapter forward.

Runs both variants of the audit's paired step, interleaved, on the same batch, and reports the
median time of each and their ratio (fused / separate), plus the largest difference of the
recorded ratios (the two must agree). Usage:

    python benchmarks/bench_lora_pair.py --family sd3 --batch 4 --repeats 7 [--device cuda] [--out r.json]

On the tiny built-in models this measures overheads only; pass ``--base`` and ``--lora`` to time a
real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from ngdiag.models.generation import SamplingConfig, prepare_batch
from ngdiag.models.loading import ADAPTER_NAME, load_checkpoint
from ngdiag.models.pair import FusedLoraPair
from ngdiag.probes.paired import PairedVelocity, PairRecorder
from ngdiag.core.sampling import sample


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sd3")
    parser.add_argument("--base")
    parser.add_argument("--lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.base is None:
        from ngdiag.testing import save_lora_adapter, save_planted_base

        tmp = tempfile.mkdtemp()
        args.base = str(save_planted_base(f"{tmp}/base", args.family))
        args.lora = str(save_lora_adapter(args.base, f"{tmp}/lora", rank=8, alpha=16))
    ckpt = load_checkpoint(args.lora, args.base, device=args.device, dtype=dtype)
    prompts = [f"prompt number {i}" for i in range(args.batch)]
    batch = prepare_batch(ckpt, prompts, list(range(args.batch)),
                          SamplingConfig(num_steps=args.steps, guidance_scale=4.0, height=args.height, width=args.width))
    theta, ref = batch.conditioning.guided(ckpt.theta), batch.conditioning.guided(ckpt.ref)

    def run(fused: bool):
        f = FusedLoraPair(batch.conditioning, ckpt.theta, ADAPTER_NAME) if fused else None
        recorder = PairRecorder(list(range(args.batch)))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(PairedVelocity(theta, ref, fused=f), batch.x_init, batch.sigmas, callback=recorder)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, recorder.record()

    run(False), run(True)  # warm-up
    times = {"separate": [], "fused": []}
    for _ in range(args.repeats):
        for name in ("separate", "fused"):
            t, rec = run(name == "fused")
            times[name].append(t)
            if name == "separate":
                sep = rec
            else:
                fus = rec
    result = {
        "family": ckpt.family,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "steps": args.steps,
        "separate_median_s": statistics.median(times["separate"]),
        "fused_median_s": statistics.median(times["fused"]),
        "ratio_fused_over_separate": statistics.median(times["fused"]) / statistics.median(times["separate"]),
        "max_abs_ratio_difference": float((sep.ratio - fus.ratio).abs().max()),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
