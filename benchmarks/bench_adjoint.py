"""Memory and time of the reward adjoint (``ngdiag.sensitivity.norm_sensitivity``).

Runs a small convolutional velocity on ``(B, C, H, W)`` latents and measures, in one run:

- activation memory of the discrete adjoint at 4 and at 28 steps, with ``checkpoint=True``
  (states stored, one velocity VJP recomputed per step) and ``checkpoint=False`` (one graph
  through the whole sampler). Memory is the peak of the bytes autograd keeps saved for the
  backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks``, unique storages,
  parameters excluded), plus the stored states; on CUDA also ``torch.cuda.max_memory_allocated``
  above the memory in use before the call;
- wall time of the adjoint as a ratio to plain no-grad Euler sampling with the same steps.

Usage::

    python benchmarks/bench_adjoint.py --out reports/bench_adjoint.json
    python benchmarks/bench_adjoint.py --device cuda --size 64 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from ngdiag.sensitivity import norm_sensitivity


class ConvVelocity(nn.Module):
    """``v(x, t)``: three 3x3 convolutions with SiLU, ``t`` fed as an extra input channel."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )

    def forward(self, x, t):
        t_map = t[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, t_map], dim=1))


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward (unique storages, no parameters)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._storages: dict = {}

    def reset(self):
        self.live = self.peak = 0
        self._storages.clear()

    def _release(self, key):
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def pack(self, tensor):
        holder = _Saved(tensor)
        if isinstance(tensor, nn.Parameter):
            return holder
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def plain_sampling(velocity, x, times):
    with torch.no_grad():
        for k in range(times.numel() - 1):
            x = x + (times[k + 1] - times[k]).item() * velocity(x, times[k].to(x).expand(x.shape[0]))
    return x


def schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 28), metavar=("FEW", "MANY"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    velocity = ConvVelocity(args.channels, args.hidden).to(device).requires_grad_(False)
    x_init = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    target = torch.randn_like(x_init)

    def reward(x):
        return -((x - target) ** 2).mean(dim=(1, 2, 3))

    meter = SavedTensorMeter()
    latent_bytes = x_init.numel() * x_init.element_size()
    memory = []
    for checkpoint in (True, False):
        for steps in args.steps:
            times = schedule(steps)
            meter.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                norm_sensitivity(velocity, x_init, times, reward, checkpoint=checkpoint)
            row = {
                "mode": "checkpoint" if checkpoint else "full-graph",
                "steps": steps,
                "peak_saved_bytes": meter.peak,
                "states_bytes": (steps + 1) * latent_bytes,
                "total_bytes": meter.peak + (steps + 1) * latent_bytes,
            }
            if device.type == "cuda":
                sync(device)
                row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            memory.append(row)

    def ratio(mode, key):
        few, many = (r[key] for s in args.steps for r in memory if r["mode"] == mode and r["steps"] == s)
        return many / few

    many = args.steps[1]
    times = schedule(many)
    base_time = timed(lambda: plain_sampling(velocity, x_init, times), device, args.repeats)
    runs = {
        "discrete checkpoint": dict(checkpoint=True),
        "discrete full-graph": dict(checkpoint=False),
        "continuous rk4 x1": dict(method="continuous", solver="rk4", continuous_substeps=1),
    }
    timing = {"steps": many, "plain_sampling_s": base_time}
    for name, kwargs in runs.items():
        seconds = timed(lambda: norm_sensitivity(velocity, x_init, times, reward, **kwargs), device, args.repeats)
        timing[name] = {"seconds": seconds, "ratio_to_sampling": seconds / base_time}

    result = {
        "device": str(device),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "latent_bytes": latent_bytes,
        "memory": memory,
        "memory_ratio_many_over_few": {
            mode: {
                "peak_saved_bytes": ratio(mode, "peak_saved_bytes"),
                "total_bytes": ratio(mode, "total_bytes"),
                **({"cuda_peak_bytes": ratio(mode, "cuda_peak_bytes")} if device.type == "cuda" else {}),
            }
            for mode in ("checkpoint", "full-graph")
        },
        "time": timing,
    }

    cuda = device.type == "cuda"
    print(f"device {device}, latents {tuple(x_init.shape)}, conv velocity hidden={args.hidden}")
    print(f"{'mode':<12} {'steps':>5} {'saved MiB':>10} {'states MiB':>11}" + (f" {'cuda MiB':>9}" if cuda else ""))
    for r in memory:
        saved, states = r["peak_saved_bytes"] / 2**20, r["states_bytes"] / 2**20
        line = f"{r['mode']:<12} {r['steps']:>5} {saved:>10.2f} {states:>11.2f}"
        print(line + (f" {r['cuda_peak_bytes'] / 2**20:>9.2f}" if cuda else ""))
    for mode, ratios in result["memory_ratio_many_over_few"].items():
        text = ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items())
        print(f"memory {many} vs {args.steps[0]} steps, {mode}: {text}")
    print(f"time at {many} steps: plain no-grad sampling {base_time * 1e3:.1f} ms")
    for name in runs:
        print(f"  {name:<22} {timing[name]['seconds'] * 1e3:8.1f} ms  x{timing[name]['ratio_to_sampling']:.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
