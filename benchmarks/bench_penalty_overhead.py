"""Time overhead of the NormGuard penalty on one training step, when ``v_ref`` is already computed.

One training step of a small DiT-like velocity model (patchify, pre-norm transformer blocks,
unpatchify) is timed in two arms, interleaved in one run (ABBA order, so drift and cache effects hit
both arms alike):

- ``base``: forward of the trained model (``v_theta``, with autograd), no-grad forwards of the
  old policy (``v_old``) and of the reference (``v_ref``), DiffusionNFT loss with its KL to the
  reference (``kl_beta > 0``, which is why ``v_ref`` exists), ``backward()``.
- ``normguard``: the same step plus ``with_normguard(base, v_theta, v_ref, lam)``.

The trained model's output is scaled by ``--inflation`` so that the hinge is active on every sample
(its backward runs: the worst case). Both arms read the same batch; the garbage collector is off
while timing. The JSON reports the median step time of each arm, their ratio (the target is
<= 1.02) with a bootstrap 95 % interval over the pairs, the ratio of the fastest steps, the median
of the per-pair ratios, and the penalty's own forward + backward time measured alone (the direct
estimate of the overhead, free of the step-to-step noise of a shared machine). The relative
overhead shrinks as the model grows: the penalty costs a few passes over the velocity tensor and a
fixed number of small kernels, while the step costs grow with the model.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_penalty_overhead.py --out bench.json
    python benchmarks/bench_penalty_overhead.py --device cuda --width 1024 --depth 8 --out bench.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ngdiag.train.losses import LossTerms, nft_loss, with_normguard


class TinyDiT(nn.Module):
    """A small DiT-like velocity model ``v(x_t, t)`` on ``(B, C, H, W)`` latents."""

    def __init__(self, channels: int, patch: int, width: int, depth: int, heads: int):
        super().__init__()
        self.patch = patch
        d_in = channels * patch * patch
        self.inp = nn.Linear(d_in, width)
        self.t_embed = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_in)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        z = self.inp(tokens) + self.t_embed(t.reshape(b, 1, 1).to(x.dtype))
        for block in self.blocks:
            z = block(z)
        out = self.out(self.norm(z))
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here (also printed)")
    ap.add_argument("--repeats", type=int, default=300, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per arm first")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--inflation", type=float, default=1.2, help="output scale of the trained model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ref = TinyDiT(args.channels, args.patch, args.width, args.depth, args.heads).to(device)
    old = copy.deepcopy(ref)
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.out.weight.mul_(args.inflation)
        model.out.bias.mul_(args.inflation)
    for m in (ref, old):
        m.requires_grad_(False).eval()
    model.train()

    shape = (args.batch, args.channels, args.size, args.size)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    x0 = torch.randn(shape, generator=gen).to(device)
    eps = torch.randn(shape, generator=gen).to(device)
    t = torch.rand(args.batch, generator=gen).mul(0.8).add(0.1).to(device)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    adv = torch.randn(args.batch, generator=gen).to(device)

    def step(penalty: bool) -> float:
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        v_theta = model(x_t, t)
        with torch.no_grad():
            v_old = old(x_t, t)
            v_ref = ref(x_t, t)
        loss = nft_loss(v_theta, v_old, x_t, x0, t, adv, beta=1.0, adv_clip_max=5.0, kl_beta=1e-4, v_ref=v_ref)
        if penalty:
            loss = with_normguard(loss, v_theta, v_ref, args.lam)
        loss.total.backward()
        _sync(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(False)
        step(True)
    base_times, pen_times = [], []
    gc.collect()
    gc.disable()  # a collection inside one arm's step would land on that arm only
    try:
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            for penalty in order:
                (pen_times if penalty else base_times).append(step(penalty))

        # The penalty alone, forward and backward, on a leaf of v_theta's shape (v_ref precomputed).
        with torch.no_grad():
            v_ref = ref(x_t, t)
            v_fixed = model(x_t, t)
        alone = []
        for _ in range(args.repeats):
            v_theta = v_fixed.clone().requires_grad_(True)
            zero = LossTerms(total=v_theta.new_zeros(()), terms={"loss": 0.0})
            _sync(device)
            start = time.perf_counter()
            with_normguard(zero, v_theta, v_ref, args.lam).total.backward()
            _sync(device)
            alone.append(time.perf_counter() - start)
    finally:
        gc.enable()
    check = with_normguard(LossTerms(total=v_fixed.new_zeros(())), v_fixed, v_ref, args.lam)

    med_base = statistics.median(base_times)
    med_pen = statistics.median(pen_times)
    paired = [p / b for p, b in zip(pen_times, base_times)]
    q = statistics.quantiles(paired, n=4)
    rng = random.Random(args.seed)
    boot = []
    for _ in range(2000):  # percentile bootstrap of the ratio of medians, resampling pairs
        idx = [rng.randrange(args.repeats) for _ in range(args.repeats)]
        boot.append(statistics.median(pen_times[j] for j in idx) / statistics.median(base_times[j] for j in idx))
    boot.sort()
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {
            "kind": "TinyDiT",
            "width": args.width,
            "depth": args.depth,
            "heads": args.heads,
            "patch": args.patch,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "latent_shape": list(shape),
        "step": "forward theta + no-grad forwards of old and ref + nft_loss(kl_beta>0) + backward",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "lam": args.lam,
        "normguard_active_fraction": check.terms["normguard_active_fraction"],
        "normguard_mean_ratio": check.terms["normguard_mean_ratio"],
        "median_step_ms_base": med_base * 1e3,
        "median_step_ms_normguard": med_pen * 1e3,
        "ratio_of_medians": med_pen / med_base,
        "median_paired_ratio": statistics.median(paired),
        "paired_ratio_quartiles": [q[0], q[2]],
        "ratio_of_medians_ci95": [boot[49], boot[1949]],
        "ratio_of_minimums": min(pen_times) / min(base_times),
        "median_penalty_fwd_bwd_ms": statistics.median(alone) * 1e3,
        "penalty_fwd_bwd_share_of_step": statistics.median(alone) / med_base,
        "target_ratio": 1.02,
        "meets_target": med_pen / med_base <= 1.02,
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
