"""The GPU suite: ngdiag's costs on real-size transformers, in one command (docs/performance.md).

Builds random-weight transformers from the published configs of SD3.5-Medium, FLUX.1-dev and
FLUX.2-klein-4B (:data:`MODELS`; nothing is downloaded) in bfloat16 on one GPU, gives each a random
LoRA adapter (rank 32 on the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; theta is
the model with it, ref the same model with it switched off, as for a LoRA fine-tune), and measures on
random prompt embeddings of the real shapes at 1024x1024:

- ``audit``: ngdiag's paired sampling (``sample`` with ``PairedVelocity`` and ``PairRecorder``, what
  ``run_audit`` runs per batch) / plain ``sample`` of theta, both 28 steps, interleaved (floor 2);
- ``lora_pair``: the same paired sampling with theta and ref in one mixed-adapter forward
  (``FusedLoraPair``, ``AuditConfig(fuse_lora=True)``) / two passes, and the largest difference of
  the recorded ratios (this decides whether ``fuse_lora`` should be on by default on CUDA);
- ``sensitivity``: ``norm_sensitivity`` (discrete adjoint, ``checkpoint=True``) at 28 steps, its time /
  plain sampling and its peak memory, ``torch.cuda.max_memory_allocated`` above the memory in use
  before the call (weights), for a reward on the latents (``-mean(x^2)``: no VAE, which would add the
  same to both arms); on out-of-memory it is retried with diffusers' gradient checkpointing on;
- ``normguard``: one flow-matching training step of the LoRA (theta forward with autograd, ref
  forward without, backward) with / without the NormGuard penalty, and its peak memory.

Every model has a time budget (``--budget-s``, default 150 s, model construction included): the
time of one guided forward is measured first, each measure's cost is estimated from it, and a
measure that would not fit in what is left is skipped and reported as skipped. With the default
budget the three models take under 8 minutes on one H200. Writes ``gpu_results.json`` and
``gpu_results.md`` into ``--out``.

``--smoke`` runs the same code paths on CPU in float32 with tiny configs of the same three
families, 64x64 images, 3 steps and one repetition (tests/test_benchmarks_smoke.py runs it).

Usage::

    PYTHONPATH=. python benchmarks/gpu/run.py --out results/
    PYTHONPATH=. python benchmarks/gpu/run.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- the published configs
# Each dict is the model's ``transformer/config.json`` without the diffusers bookkeeping keys
# (``_class_name``, ``_diffusers_version``, ``_name_or_path``).
MODELS = {
    # huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/transformer/config.json
    # (cross-checked against the copies of that file in public code: 24 layers, dual attention in
    # layers 0-12, RMS QK-norm, pos_embed_max_size 384).
    "sd35-medium": dict(
        family="sd3",
        cls="SD3Transformer2DModel",
        config={
            "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
            "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
            "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
            "qk_norm": "rms_norm", "sample_size": 128,
        },
        text_tokens=333,  # 77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline, max_sequence_length=256)
        guidance=4.5,  # CFG on the doubled batch, as the pipeline runs it
    ),
    # huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json
    # (19 double-stream and 38 single-stream blocks, 24 heads of 128, guidance embedding).
    "flux1-dev": dict(
        family="flux",
        cls="FluxTransformer2DModel",
        config={
            "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
            "patch_size": 1, "pooled_projection_dim": 768,
        },
        text_tokens=512,  # T5 max_sequence_length 512 (FluxPipeline's default)
        guidance=3.5,  # embedded guidance, no CFG
    ),
    # huggingface.co/black-forest-labs/FLUX.2-klein-4B/blob/main/transformer/config.json (the same as
    # FLUX.2-klein-base-4B's; the values also appear in diffusers' scripts/convert_flux2_to_diffusers.py,
    # "klein-4b"): 5 double-stream and 20 single-stream blocks, 24 heads of 128, Qwen3-4B's 3 x 2560 features.
    "flux2-klein-4b": dict(
        family="flux2-klein",
        cls="Flux2Transformer2DModel",
        config={
            "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": False,
            "in_channels": 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0, "num_attention_heads": 24,
            "num_layers": 5, "num_single_layers": 20, "out_channels": None, "patch_size": 1, "rope_theta": 2000,
            "timestep_guidance_channels": 256,
        },
        text_tokens=512,  # Flux2KleinPipeline's max_sequence_length 512
        guidance=4.0,  # CFG with separate calls, as the base (undistilled) klein is sampled
    ),
}

# The same families at toy size (ngdiag.testing's tiny transformers) for --smoke.
SMOKE_MODELS = {
    "sd35-medium": dict(MODELS["sd35-medium"], config={
        "attention_head_dim": 8, "caption_projection_dim": 32, "dual_attention_layers": [0], "in_channels": 4,
        "joint_attention_dim": 32, "num_attention_heads": 4, "num_layers": 2, "out_channels": 4, "patch_size": 2,
        "pooled_projection_dim": 64, "pos_embed_max_size": 16, "qk_norm": "rms_norm", "sample_size": 16,
    }, text_tokens=8),
    "flux1-dev": dict(MODELS["flux1-dev"], config={
        "attention_head_dim": 16, "axes_dims_rope": [4, 4, 8], "guidance_embeds": True, "in_channels": 16,
        "joint_attention_dim": 32, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1, "patch_size": 1,
        "pooled_projection_dim": 32,
    }, text_tokens=8),
    "flux2-klein-4b": dict(MODELS["flux2-klein-4b"], config={
        "attention_head_dim": 16, "axes_dims_rope": [4, 4, 4, 4], "guidance_embeds": False, "in_channels": 16,
        "joint_attention_dim": 32, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1, "patch_size": 1,
        "timestep_guidance_channels": 256,
    }, text_tokens=8),
}

LORA_RANK = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VAE_FACTOR = 8  # SD3, FLUX.1 and FLUX.2 VAEs downsample by 8


# ----------------------------------------------------------------------------- helpers
class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def interleaved(clock: Clock, arms: dict, repeats: int) -> dict:
    """Median seconds per arm over ``repeats`` interleaved rounds (alternating order), and the median
    per-round ratio of every arm to the first."""
    names = list(arms)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(clock.time(arms[n]))
    out = {"median_s": {n: statistics.median(t) for n, t in times.items()}, "ratio": {}}
    for n in names[1:]:
        out["ratio"][f"{n} / {names[0]}"] = statistics.median(a / b for a, b in zip(times[n], times[names[0]]))
    return out


def schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """A shifted flow-matching schedule ``(steps + 1,)`` from 1 to 0, float32 (SD3's static shift)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def build(spec: dict, device: torch.device, dtype: torch.dtype):
    """The random-weight transformer with a random LoRA adapter, as theta's velocity model, and ref."""
    import diffusers
    from peft import LoraConfig

    from ngdiag.models.families import FamilyVelocity
    from ngdiag.models.loading import ADAPTER_NAME
    from ngdiag.models.pair import AdapterDisabled
    from ngdiag.testing import fill_lora_weights

    cls = getattr(diffusers, spec["cls"])
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)  # build in the working dtype directly: no float32 copy of 12 B weights
        with torch.device(device):
            transformer = cls(**spec["config"])
    finally:
        torch.set_default_dtype(previous)
    transformer.requires_grad_(False).eval()
    transformer.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS),
                            adapter_name=ADAPTER_NAME)
    fill_lora_weights(transformer, seed=0, init_scale=0.02)
    transformer.to(dtype)
    transformer.requires_grad_(False)
    theta = FamilyVelocity(transformer, spec["family"])
    return transformer, theta, AdapterDisabled(theta)


def conditioning(spec: dict, batch: int, resolution: int, device: torch.device, dtype: torch.dtype):
    """Random prompt embeddings of the real shapes, the initial noise and the family's position ids."""
    from diffusers import Flux2KleinPipeline, FluxPipeline

    from ngdiag.models.families import Conditioning

    cfg, family, L = spec["config"], spec["family"], spec["text_tokens"]
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    size = resolution // VAE_FACTOR
    if family == "sd3":
        x = randn(batch, cfg["in_channels"], size, size)

        def embeds():
            return {"encoder_hidden_states": randn(batch, L, cfg["joint_attention_dim"]),
                    "pooled_projections": randn(batch, cfg["pooled_projection_dim"])}

        return Conditioning(embeds(), embeds(), spec["guidance"], True), x
    side = size // 2  # FLUX packs 2x2 latent patches into one token
    x = randn(batch, side * side, cfg["in_channels"])
    if family == "flux":
        cond = {"encoder_hidden_states": randn(batch, L, cfg["joint_attention_dim"]),
                "pooled_projections": randn(batch, cfg["pooled_projection_dim"]),
                "txt_ids": torch.zeros(L, 3, device=device, dtype=dtype),
                "img_ids": FluxPipeline._prepare_latent_image_ids(batch, side, side, device, dtype)}
        if cfg.get("guidance_embeds"):
            cond["guidance"] = torch.full([batch], spec["guidance"], device=device, dtype=torch.float32)
        return Conditioning(cond, None, 1.0, False, shared_keys=("txt_ids", "img_ids")), x
    img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(batch, 1, side, side)).to(device)

    def embeds():
        e = randn(batch, L, cfg["joint_attention_dim"])
        return {"encoder_hidden_states": e, "txt_ids": Flux2KleinPipeline._prepare_text_ids(e).to(device), "img_ids": img_ids}

    return Conditioning(embeds(), embeds(), spec["guidance"], False), x


def peak_above(device, fn):
    """``fn()``'s peak allocated bytes above what was allocated before it (CUDA), or None on CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ----------------------------------------------------------------------------- one model
def run_model(name: str, spec: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    from ngdiag.core.sampling import sample
    from ngdiag.models.loading import ADAPTER_NAME
    from ngdiag.models.pair import FusedLoraPair
    from ngdiag.probes.paired import PairedVelocity, PairRecorder
    from ngdiag.sensitivity import norm_sensitivity
    from ngdiag.train.losses import LossTerms, flow_matching_loss, with_normguard

    started = time.perf_counter()
    clock = Clock(device)
    row: dict = {"model": name, "family": spec["family"], "resolution": args.resolution, "steps": args.steps,
                 "batch": args.batch, "skipped": {}}
    transformer, theta, ref = build(spec, device, dtype)
    row["parameters"] = sum(p.numel() for p in transformer.parameters())
    row["weights_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    cond, x0 = conditioning(spec, args.batch, args.resolution, device, dtype)
    theta_g, ref_g = cond.guided(theta), cond.guided(ref)
    sigmas = schedule(args.steps)
    ids = list(range(args.batch))
    row["build_s"] = time.perf_counter() - started

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def fits(measure: str, forwards: float) -> bool:
        need = forwards * row["guided_forward_s"]
        if need > left():
            row["skipped"][measure] = f"estimated {need:.0f} s, {max(left(), 0):.0f} s of the budget left"
            return False
        return True

    with torch.no_grad():
        theta_g(x0, sigmas[:1].expand(args.batch).to(device, x0.dtype))  # warm-up (kernels, allocator)
        row["guided_forward_s"] = statistics.median(
            clock.time(lambda: theta_g(x0, sigmas[:1].expand(args.batch).to(device, x0.dtype))) for _ in range(3))
    S, R = args.steps, args.repeats

    def plain():
        sample(theta_g, x0, sigmas)

    def paired(fused=None):
        def run():
            recorder = PairRecorder(ids)
            sample(PairedVelocity(theta_g, ref_g, fused=fused), x0, sigmas, callback=recorder)
            return recorder.record()
        return run

    if fits("audit", R * 3 * S):
        timing = interleaved(clock, {"sample theta": plain, "paired sample + records": paired()}, R)
        row["audit"] = timing
        row["sample_s"] = timing["median_s"]["sample theta"]

    if fits("lora_pair", R * 4 * S):
        fused = FusedLoraPair(cond, theta, ADAPTER_NAME)
        separate_rec, fused_rec = paired()(), paired(fused)()
        timing = interleaved(clock, {"separate": paired(), "fused": paired(fused)}, R)
        timing["max_abs_ratio_difference"] = float((separate_rec.ratio - fused_rec.ratio).abs().max())
        row["lora_pair"] = timing

    if fits("normguard", 2 * R * 4 + 8):
        lora = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        gen = torch.Generator().manual_seed(2)
        data = torch.randn(x0.shape, generator=gen).to(device, dtype)
        noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
        t = torch.full([args.batch], 0.6, device=device, dtype=dtype)
        x_t = (1 - 0.6) * data + 0.6 * noise

        def step(penalty: bool):
            def run():
                for p in lora:
                    p.grad = None
                v_theta = theta(x_t, t, **cond.cond)
                with torch.no_grad():
                    v_ref = ref(x_t, t, **cond.cond)
                loss = LossTerms(total=flow_matching_loss(v_theta.float(), data.float(), noise.float()))
                if penalty:
                    loss = with_normguard(loss, v_theta.float(), v_ref.float(), 0.1)
                loss.total.backward()
            return run

        step(True)()  # warm-up
        timing = interleaved(clock, {"step": step(False), "step + normguard": step(True)}, max(R, 3))
        timing["peak_bytes"] = peak_above(device, step(True))
        row["normguard"] = timing
        for p in lora:
            p.requires_grad_(False)
            p.grad = None

    if fits("sensitivity", 5 * S):
        def reward(x):
            return -(x.float() ** 2).mean(dim=tuple(range(1, x.dim())))

        def adjoint():
            norm_sensitivity(lambda x, t: theta_g(x, t).guided, x0, sigmas, reward)

        out = {"gradient_checkpointing": False}
        try:
            out["seconds"] = clock.time(lambda: out.__setitem__("peak_bytes", peak_above(device, adjoint)))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            out = {"gradient_checkpointing": True, "first_try": "out of memory without gradient checkpointing"}
            transformer.enable_gradient_checkpointing()
            try:
                out["seconds"] = clock.time(lambda: out.__setitem__("peak_bytes", peak_above(device, adjoint)))
            finally:
                transformer.disable_gradient_checkpointing()
        if "sample_s" in row:
            out["ratio_to_sampling"] = out["seconds"] / row["sample_s"]
        row["sensitivity"] = out

    row["seconds"] = time.perf_counter() - started
    del transformer, theta, ref, theta_g, ref_g
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- output
def _gib(b):
    return "" if b is None else f"{b / 2**30:.1f}"


def markdown(result: dict) -> str:
    lines = [
        f"# ngdiag GPU suite ({result['device_name']}, {result['dtype']}, {result['resolution']}x{result['resolution']}, "
        f"{result['steps']} steps, batch {result['batch']})", "",
        "| model | params (B) | guided forward (s) | audit / sampling (floor 2) | fused / separate LoRA pair | "
        "max ratio diff fused vs separate | sensitivity / sampling | sensitivity peak (GiB) | NormGuard step ratio | "
        "training step peak (GiB) | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        audit = r.get("audit", {}).get("ratio", {}).get("paired sample + records / sample theta")
        pair = r.get("lora_pair", {})
        sens = r.get("sensitivity", {})
        ng = r.get("normguard", {})

        def f(v, fmt="{:.3f}"):
            return "" if v is None else fmt.format(v)

        sens_note = " (gradient checkpointing)" if sens.get("gradient_checkpointing") else ""
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e9:.2f} | {f(r.get('guided_forward_s'))} | {f(audit)} | "
            f"{f(pair.get('ratio', {}).get('fused / separate'))} | {f(pair.get('max_abs_ratio_difference'), '{:.1e}')} | "
            f"{f(sens.get('ratio_to_sampling'))}{sens_note} | {_gib(sens.get('peak_bytes'))} | "
            f"{f(ng.get('ratio', {}).get('step + normguard / step'))} | {_gib(ng.get('peak_bytes'))} | "
            f"{'; '.join(f'{k}: {v}' for k, v in r['skipped'].items())} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_results.json and gpu_results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU, float32: the same code paths in seconds")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 28; --smoke 3)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; --smoke 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per timing (default 2; --smoke 1)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds per model (default 150; --smoke 60)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="default bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    smoke = args.smoke
    args.steps = args.steps or (3 if smoke else 28)
    args.resolution = args.resolution or (64 if smoke else 1024)
    args.repeats = args.repeats or (1 if smoke else 2)
    args.budget_s = args.budget_s or (60.0 if smoke else 150.0)
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke on a machine without a GPU")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    specs = SMOKE_MODELS if smoke else MODELS
    import ngdiag

    result = {
        "ngdiag": str(Path(ngdiag.__file__).parent),
        "smoke": smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "resolution": args.resolution, "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
        "budget_s_per_model": args.budget_s, "lora": {"rank": LORA_RANK, "targets": LORA_TARGETS},
        "models": [],
    }
    start = time.perf_counter()
    for name in args.models:
        print(f"{name}...", file=sys.stderr, flush=True)
        row = run_model(name, specs[name], args, device, dtype)
        result["models"].append(row)
        print(f"{name}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    table = markdown(result)
    (args.out / "gpu_results.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
