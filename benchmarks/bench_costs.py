"""What ngdiag's analyses cost, as ratios measured side by side in one run (docs/performance.md).

Every measure times two or more arms on the same inputs, interleaved (round ``r`` runs every arm
once, in an order that alternates between rounds), and reports the median time of each arm and
the median of the per-round ratios, so that load from other jobs hits all arms alike. Models: the
miniature world that ships with ngdiag (``ngdiag/world/assets``: its SD3-family base and the
``nft-plain`` DiffusionNFT LoRA fine-tune, docs/world.md), installed into a temporary folder; for
the resolution column a pipeline of the world's shape whose transformer accepts larger latents
(``pos_embed_max_size=32``, random weights under ``torch.manual_seed(0)``) with a random LoRA.

Measures (``--measure``, default all):

- ``audit``: ``run_audit`` (no output folder, no image grid) / the diffusers pipeline called on the
  same prompts, seeds and settings with ``output_type="latent"`` (floor 2: theta and ref per step);
  also the audit's paired sampling alone (``sample`` with ``PairedVelocity`` and ``PairRecorder``) /
  ``sample`` of theta alone, the same loop without the reference (floor 2).
- ``probe``: the pipeline call inside ``ngdiag.probe(pipe)`` (LoRA: the reference is the adapter
  switched off) / the plain call (floor 2), and inside a probe whose reference costs nothing (it
  returns theta's output, cached by a hook: the probe's own hooks, guidance solve and records;
  floor 1).
- ``sensitivity``: ``norm_sensitivity`` (discrete adjoint, ``checkpoint=True``) of the world reward on
  decoded images / plain no-grad ``sample`` of the same velocity, with and without diffusers' gradient
  checkpointing (``SensitivityConfig.gradient_checkpointing``, on by default in ``ngdiag sensitivity``);
  ngdiag's continuous method (torchdiffeq ``odeint_adjoint`` per interval, euler and rk4, one substep);
  and torchdiffeq's ``odeint_adjoint`` alone on the same grid (euler), which gives ``dR/dx_0`` only.
- ``memory``: peak memory at 4 and at 28 steps, each in a fresh subprocess: the increase of the
  process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over a 2-step
  warm-up of the same call, for the audit and the sensitivity (``checkpoint=True``, and
  ``checkpoint=False`` as the control that grows), plus the peak bytes autograd keeps saved for
  backward during the sensitivity (``bench_adjoint.SavedTensorMeter``).
- ``normguard``: ``bench_penalty_overhead.py`` (one training step with / without the penalty).
- ``sweep``: ``run_sweep`` over the world run's checkpoints with the world reward (the base sampled
  once) / the same audits run one by one (each sampling the base); and ``compare_runs`` of the two
  world runs / their audits run one by one.

- ``removed``: the work removed while writing docs/performance.md, before / after in one run: the
  audit with the reference finding its adapter layers at every call (as before) / once; the
  sensitivity with diffusers' gradient checkpointing (the old default) / without.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_costs.py --out bench_costs.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_costs.py --measure audit probe --repeats 5 --out a.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MEASURES = ("audit", "probe", "sensitivity", "memory", "normguard", "sweep", "removed")


# ----------------------------------------------------------------------------- timing
def interleaved(arms: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per arm and the median of per-round ratios of every arm to the first one."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    first = names[0]
    out = {"repeats": repeats, "median_s": {n: statistics.median(t) for n, t in times.items()}, "ratio": {}}
    for name in names[1:]:
        per_round = [a / b for a, b in zip(times[name], times[first])]
        out["ratio"][f"{name} / {first}"] = statistics.median(per_round)
    return out


# ----------------------------------------------------------------------------- the models
class World:
    """The shipped world installed in a temporary folder, and a world-shaped pipeline for larger images."""

    def __init__(self, root: Path):
        from ngdiag.world.build import ASSETS, held_out, install_world

        self.root = install_world(root / "world", ASSETS)
        self.base = self.root / "base"
        self.run = self.root / "runs" / "nft-plain"
        self.runs = [self.root / "runs" / "nft-plain", self.root / "runs" / "nft-normguard"]
        self.final = max((p for p in self.run.iterdir() if p.name.startswith("checkpoint-")),
                         key=lambda p: int(p.name.split("-")[1]))
        self.reward = f"world:{self.root}"
        self.prompts = held_out(64)[0]
        self._scratch = root
        self._wide = None

    def wide(self) -> tuple:
        """(base, lora) of the world's shape with ``pos_embed_max_size=32`` (images up to 128x128)."""
        if self._wide is None:
            from diffusers import SD3Transformer2DModel

            from peft import LoraConfig, get_peft_model

            from ngdiag.testing import fill_lora_weights

            import shutil

            config = SD3Transformer2DModel.load_config(self.base / "transformer")
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            config.update(pos_embed_max_size=32, sample_size=64)
            folder = self._scratch / "wide-base"
            shutil.copytree(self.base, folder)
            shutil.rmtree(folder / "transformer")
            torch.manual_seed(0)
            transformer = SD3Transformer2DModel(**config)
            transformer.save_pretrained(folder / "transformer")
            # a random LoRA as ngdiag.testing.save_lora_adapter writes one (which needs a full SD3 folder)
            peft_model = get_peft_model(transformer, LoraConfig(r=8, lora_alpha=16,
                                                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            fill_lora_weights(peft_model, seed=0, init_scale=0.05)
            lora = self._scratch / "wide-lora"
            peft_model.save_pretrained(lora)
            self._wide = (folder, lora)
        return self._wide

    def checkpoint(self, resolution: int):
        from ngdiag.models.loading import load_checkpoint

        if resolution == 32:
            return load_checkpoint(self.final, self.base)
        base, lora = self.wide()
        return load_checkpoint(lora, base)


def call_kwargs(steps: int, resolution: int) -> dict:
    return dict(num_inference_steps=steps, guidance_scale=4.5, height=resolution, width=resolution,
                max_sequence_length=1)


def sampling_config(steps: int, resolution: int):
    from ngdiag.models.generation import SamplingConfig

    return SamplingConfig(num_steps=steps, guidance_scale=4.5, height=resolution, width=resolution,
                          max_sequence_length=1)


def grid(args) -> list:
    """(steps, batch, resolution) settings: the reference point, then one axis changed at a time."""
    ref = (28, 2, 32)
    rows = [ref, (4, 2, 32), (28, 8, 32)]
    if not args.quick:
        rows += [(28, 2, 64), (28, 2, 128)]
    return rows


# ----------------------------------------------------------------------------- audit
def measure_audit(world: World, args) -> list:
    from ngdiag.core.sampling import sample
    from ngdiag.models.generation import prepare_batch
    from ngdiag.probes.paired import PairedVelocity, PairRecorder
    from ngdiag.workflows.audit import AuditConfig, run_audit

    rows = []
    for steps, batch, res in grid(args):
        ckpt = world.checkpoint(res)
        prompts = world.prompts[:batch]
        cfg = AuditConfig(prompts=prompts, num_samples=batch, batch_size=batch, grid_size=0,
                          sampling=sampling_config(steps, res))
        pipe = ckpt.pipeline
        prepared = prepare_batch(ckpt, prompts, list(range(batch)), cfg.sampling, sample_ids=list(range(batch)))
        theta = prepared.conditioning.guided(ckpt.theta)
        ref = prepared.conditioning.guided(ckpt.require_ref())

        def pipeline():
            with torch.no_grad():
                pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="latent",
                     **call_kwargs(steps, res))

        def paired():
            sample(PairedVelocity(theta, ref), prepared.x_init, prepared.sigmas, callback=PairRecorder(list(range(batch))))

        arms = {
            "pipeline": pipeline,
            "audit": lambda: run_audit(ckpt, cfg, report=False),
            "sample theta": lambda: sample(theta, prepared.x_init, prepared.sigmas),
            "paired sample + records": paired,
        }
        timing = interleaved(arms, args.repeats)
        rows.append({"steps": steps, "batch": batch, "resolution": res, **timing})
        _say(f"audit steps={steps} batch={batch} {res}x{res}: {_fmt(timing)}")
    return rows


# ----------------------------------------------------------------------------- probe
def measure_probe(world: World, args) -> list:
    import ngdiag

    rows = []
    for steps, batch, res in grid(args):
        ckpt = world.checkpoint(res)
        pipe = ckpt.pipeline
        prompts = world.prompts[:batch]
        holder = {}

        def keep(module, inputs, output):
            holder["out"] = output

        def free_ref(*args, **kwargs):
            return holder["out"]

        def call():
            with torch.no_grad():
                pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="latent",
                     **call_kwargs(steps, res))

        def probed():
            with ngdiag.probe(pipe):
                call()

        handle = pipe.transformer.register_forward_hook(keep)  # runs before the probe's hook

        def probed_free():
            with ngdiag.probe(pipe, ref=free_ref):
                call()

        try:
            timing = interleaved({"pipeline": call, "probe (LoRA off as ref)": probed,
                                  "probe (free ref)": probed_free}, args.repeats)
        finally:
            handle.remove()
        rows.append({"steps": steps, "batch": batch, "resolution": res, **timing})
        _say(f"probe steps={steps} batch={batch} {res}x{res}: {_fmt(timing)}")
    return rows


# ----------------------------------------------------------------------------- sensitivity
def _sensitivity_setup(world: World, steps: int, batch: int, res: int):
    from ngdiag.models.generation import prepare_batch
    from ngdiag.rewards.scorers import load_reward
    from ngdiag.workflows.sensitivity import checkpoint_velocity

    ckpt = world.checkpoint(res)
    prompts = world.prompts[:batch]
    prepared = prepare_batch(ckpt, prompts, list(range(batch)), sampling_config(steps, res), sample_ids=list(range(batch)))
    velocity = checkpoint_velocity(ckpt, prepared.conditioning)
    reward = load_reward(world.reward)
    adapter, h, w = ckpt.adapter, prepared.config.height, prepared.config.width

    def reward_of_latents(x):
        return reward(adapter.decode(x, h, w), prompts)

    modules = [ckpt.pipeline.transformer, ckpt.pipeline.vae]
    return ckpt, prepared, velocity, reward_of_latents, modules


def measure_sensitivity(world: World, args) -> list:
    from torchdiffeq import odeint_adjoint

    from ngdiag.core.sampling import sample
    from ngdiag.sensitivity import norm_sensitivity
    from ngdiag.workflows.sensitivity import _gradient_checkpointing

    rows = []
    settings = [(28, 2, 32), (4, 2, 32), (28, 8, 32)] + ([] if args.quick else [(28, 2, 64)])
    for steps, batch, res in settings:
        ckpt, prepared, velocity, reward, modules = _sensitivity_setup(world, steps, batch, res)
        x0, sigmas = prepared.x_init, prepared.sigmas

        class Field(torch.nn.Module):  # torchdiffeq's func(t, y)
            def forward(self, t, x):
                return velocity(x, t.reshape(()).expand(x.shape[0]).to(x))

        field = Field()

        def torchdiffeq_alone():
            x = x0.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                end = odeint_adjoint(field, x, sigmas.to(x), method="euler", adjoint_params=())[-1]
                (grad,) = torch.autograd.grad(reward(end).sum(), x)
            return grad

        def discrete(gc: bool):
            def run():
                with _gradient_checkpointing(modules, gc):
                    norm_sensitivity(velocity, x0, sigmas, reward)
            return run

        arms = {
            "sample": lambda: sample(velocity, x0, sigmas),
            "discrete adjoint": discrete(False),
            "discrete adjoint + diffusers gradient checkpointing": discrete(True),
            "torchdiffeq odeint_adjoint alone (euler, dR/dx0 only)": torchdiffeq_alone,
            "continuous euler x1 (odeint_adjoint per step)": lambda: norm_sensitivity(
                velocity, x0, sigmas, reward, method="continuous", solver="euler", continuous_substeps=1),
        }
        if steps == 28 and batch == 2 and res == 32:
            arms["continuous rk4 x1 (odeint_adjoint per step)"] = lambda: norm_sensitivity(
                velocity, x0, sigmas, reward, method="continuous", solver="rk4", continuous_substeps=1)
        timing = interleaved(arms, max(3, args.repeats // 2))
        base = timing["median_s"]["discrete adjoint"]
        timing["discrete adjoint over"] = {n: base / s for n, s in timing["median_s"].items() if n != "discrete adjoint"}
        rows.append({"steps": steps, "batch": batch, "resolution": res, **timing})
        _say(f"sensitivity steps={steps} batch={batch} {res}x{res}: {_fmt(timing)}")
    return rows


# ----------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, {here!r})
import bench_costs as bc
from bench_adjoint import SavedTensorMeter
what, steps, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
world = bc.World.__new__(bc.World)
world.root = root; world.base = root / "base"; world.run = root / "runs" / "nft-plain"
world.final = max((p for p in world.run.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name.split("-")[1]))
world.reward = f"world:{{root}}"
from ngdiag.world.build import held_out
world.prompts = held_out(8)[0]
batch = 4
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
def run(n):
    if what == "audit":
        from ngdiag.workflows.audit import AuditConfig, run_audit
        ckpt = world.checkpoint(32)
        run_audit(ckpt, AuditConfig(prompts=world.prompts[:batch], num_samples=batch, batch_size=batch, grid_size=0,
                                    sampling=bc.sampling_config(n, 32)), report=False)
        return None
    from ngdiag.sensitivity import norm_sensitivity
    ckpt, prepared, velocity, reward, modules = bc._sensitivity_setup(world, n, batch, 32)
    meter = SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        norm_sensitivity(velocity, prepared.x_init, prepared.sigmas, reward, checkpoint=(what == "sensitivity"))
    return meter.peak
run(2)
before = maxrss()
saved = run(steps)
print(json.dumps({{"peak_rss_increase_bytes": maxrss() - before, "peak_rss_bytes": maxrss(), "peak_saved_bytes": saved}}))
"""


def measure_memory(world: World, args) -> list:
    rows = []
    code = _MEMORY_CHILD.format(here=str(HERE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for what in ("audit", "sensitivity", "sensitivity full-graph"):
        for steps in (4, 28):
            done = subprocess.run([sys.executable, "-c", code, what.replace(" full-graph", "-full"), str(steps), str(world.root)],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory child failed: {done.stderr[-2000:]}")
            row = {"what": what, "steps": steps, "batch": 4, "resolution": 32,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            _say(f"memory {what} steps={steps}: rss +{row['peak_rss_increase_bytes'] / 2**20:.1f} MiB, saved "
                 f"{(row['peak_saved_bytes'] or 0) / 2**20:.2f} MiB")
    return rows


# ----------------------------------------------------------------------------- normguard
def measure_normguard(world: World, args) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_penalty_overhead

    out = bench_penalty_overhead.main(["--repeats", str(150 if args.quick else 300)])
    keys = ("median_step_ms_base", "median_step_ms_normguard", "ratio_of_medians", "ratio_of_medians_ci95",
            "median_paired_ratio", "median_penalty_fwd_bwd_ms", "penalty_fwd_bwd_share_of_step", "model", "latent_shape")
    return {k: out[k] for k in keys}


# ----------------------------------------------------------------------------- sweep and compare
def measure_sweep(world: World, args) -> dict:
    import dataclasses

    from ngdiag.models.loading import load_checkpoint
    from ngdiag.workflows.audit import AuditConfig, run_audit
    from ngdiag.workflows.compare import compare_runs
    from ngdiag.workflows.sweep import find_checkpoints, run_sweep

    steps, n = 8, 4
    cfg = AuditConfig(prompts=world.prompts[:n], num_samples=n, batch_size=n, reward=world.reward,
                      sampling=sampling_config(steps, 32))
    checkpoints = find_checkpoints(world.run)
    scratch = Path(tempfile.mkdtemp())
    counter = iter(range(10**6))

    def sweep():
        run_sweep(world.run, cfg, out_dir=scratch / f"sweep-{next(counter)}", base=str(world.base))

    def audits_one_by_one():
        for _, path in checkpoints:
            ckpt = load_checkpoint(path, world.base)
            run_audit(ckpt, cfg, out_dir=scratch / f"audit-{next(counter)}")

    sweep_timing = interleaved({"audits one by one": audits_one_by_one, "sweep": sweep}, max(3, args.repeats // 2), warmup=0)
    _say(f"sweep of {len(checkpoints)} checkpoints: {_fmt(sweep_timing)}")

    def compare():
        compare_runs(world.runs, steps=(steps,), num_samples=n, batch_size=n, prompts=world.prompts[:n])

    def compare_audits():
        for index, run in enumerate(world.runs):
            final = max((p for p in run.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name.split("-")[1]))
            ckpt = load_checkpoint(final, world.base)
            run_audit(ckpt, dataclasses.replace(cfg, grid_size=4), report=False)

    compare_timing = interleaved({"audits one by one": compare_audits, "compare": compare}, max(3, args.repeats // 2),
                                 warmup=0)
    _say(f"compare of 2 runs: {_fmt(compare_timing)}")
    return {"checkpoints": len(checkpoints), "samples": n, "steps": steps, "sweep": sweep_timing, "compare": compare_timing}


# ----------------------------------------------------------------------------- removed work, before / after
def measure_removed(world: World, args) -> dict:
    from ngdiag.models.generation import prepare_batch
    from ngdiag.models.pair import AdapterDisabled
    from ngdiag.sensitivity import norm_sensitivity
    from ngdiag.workflows.audit import AuditConfig, run_audit
    from ngdiag.workflows.sensitivity import _gradient_checkpointing

    class EveryCall(AdapterDisabled):  # the reference as it was: its adapter layers found at every call
        def forward(self, x, t, **cond):
            self._layers = None
            return super().forward(x, t, **cond)

    ckpt = world.checkpoint(32)
    cached, every_call = ckpt.ref, EveryCall(ckpt.theta)
    batch, steps = 2, 28
    prompts = world.prompts[:batch]
    cfg = AuditConfig(prompts=prompts, num_samples=batch, batch_size=batch, grid_size=0,
                      sampling=sampling_config(steps, 32))
    pipe = ckpt.pipeline

    def pipeline():
        with torch.no_grad():
            pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="latent",
                 **call_kwargs(steps, 32))

    def audit(ref):
        def run():
            ckpt.ref = ref
            try:
                return run_audit(ckpt, cfg, report=False)
            finally:
                ckpt.ref = cached
        return run

    # the reference's call alone, many times: a difference of a few percent of an audit is below the noise there
    prepared = prepare_batch(ckpt, prompts, list(range(batch)), cfg.sampling, sample_ids=list(range(batch)))
    t = prepared.sigmas[:1].expand(batch).to(prepared.x_init)

    def ref_call(ref):
        def run():
            with torch.no_grad():
                for _ in range(20):
                    ref(prepared.x_init, t, **prepared.conditioning.cond)
        return run

    call = interleaved({"reference call, layers found at every call (before)": ref_call(every_call),
                        "reference call, layers found once (after)": ref_call(cached)}, 4 * args.repeats)
    _say(f"removed, reference call alone: {_fmt(call)}")
    same = bool(torch.equal(audit(every_call)().record.ratio, audit(cached)().record.ratio))
    adapter = interleaved({"pipeline": pipeline, "audit, layers found at every call (before)": audit(every_call),
                           "audit, layers found once (after)": audit(cached)}, args.repeats)
    adapter["records_identical"] = same
    _say(f"removed, adapter layers: {_fmt(adapter)}")

    ckpt, prepared, velocity, reward, modules = _sensitivity_setup(world, steps, batch, 32)
    from ngdiag.core.sampling import sample

    def sens(gc):
        def run():
            with _gradient_checkpointing(modules, gc):
                return norm_sensitivity(velocity, prepared.x_init, prepared.sigmas, reward)
        return run

    a, b = sens(True)(), sens(False)()
    gc = interleaved({"sample": lambda: sample(velocity, prepared.x_init, prepared.sigmas),
                      "sensitivity, gradient checkpointing (before)": sens(True),
                      "sensitivity, no gradient checkpointing (after)": sens(False)}, max(3, args.repeats // 2))
    gc["S_identical"] = bool(torch.equal(a.S, b.S))
    _say(f"removed, gradient checkpointing: {_fmt(gc)}")
    return {"adapter_layers": adapter, "adapter_layers_reference_call": call, "gradient_checkpointing": gc}


# ----------------------------------------------------------------------------- tables for docs/performance.md
def tables(result: dict) -> str:
    """The markdown tables of docs/performance.md from a result JSON (``--tables FILE``)."""
    out = []

    def setting(r):
        return f"| {r['steps']} | {r['batch']} | {r['resolution']}x{r['resolution']} "

    if "audit" in result:
        out += ["| steps | batch | image | audit / pipeline | paired sampling / sampling theta | sampling theta / pipeline |",
                "|---|---|---|---|---|---|"]
        for r in result["audit"]:
            q = r["ratio"]
            paired = q["paired sample + records / pipeline"] / q["sample theta / pipeline"]  # both per-round medians
            out.append(setting(r) + f"| {q['audit / pipeline']:.3f} | {paired:.3f} "
                       f"| {q['sample theta / pipeline']:.3f} |")
        out.append("")
    if "probe" in result:
        out += ["| steps | batch | image | probe (LoRA off as ref) / pipeline | probe (free ref) / pipeline |", "|---|---|---|---|---|"]
        for r in result["probe"]:
            q = r["ratio"]
            out.append(setting(r) + f"| {q['probe (LoRA off as ref) / pipeline']:.3f} | {q['probe (free ref) / pipeline']:.3f} |")
        out.append("")
    if "sensitivity" in result:
        names = [n for n in result["sensitivity"][0]["median_s"] if n != "sample"]
        out += ["| steps | batch | image | " + " | ".join(f"{n} / sample" for n in names) + " |",
                "|---|---|---|" + "---|" * len(names)]
        for r in result["sensitivity"]:
            out.append(setting(r) + "| " + " | ".join(
                f"{r['ratio'][f'{n} / sample']:.2f}" if f"{n} / sample" in r["ratio"] else "" for n in names) + " |")
        out.append("")
    if "memory" in result:
        out += ["| what | steps | peak RSS above a 2-step warm-up (MiB) | peak autograd-saved (MiB) |", "|---|---|---|---|"]
        for r in result["memory"]:
            saved = "" if r["peak_saved_bytes"] is None else f"{r['peak_saved_bytes'] / 2**20:.1f}"
            out.append(f"| {r['what']} | {r['steps']} | {r['peak_rss_increase_bytes'] / 2**20:.1f} | {saved} |")
        out.append("")
    if "normguard" in result:
        n = result["normguard"]
        lo, hi = n["ratio_of_medians_ci95"]
        out += [f"NormGuard step / step: {n['ratio_of_medians']:.3f} (95 % interval {lo:.3f} - {hi:.3f}); median paired "
                f"ratio {n['median_paired_ratio']:.3f}; the penalty alone {n['median_penalty_fwd_bwd_ms']:.2f} ms = "
                f"{100 * n['penalty_fwd_bwd_share_of_step']:.1f} % of a {n['median_step_ms_base']:.1f} ms step.", ""]
    if "sweep" in result:
        w = result["sweep"]
        for key in ("sweep", "compare"):
            for name, value in w[key]["ratio"].items():
                out.append(f"{name}: {value:.3f} (medians {', '.join(f'{k} {v:.2f} s' for k, v in w[key]['median_s'].items())})")
        out.append("")
    if "removed" in result:
        for key, block in result["removed"].items():
            flags = {k: v for k, v in block.items() if k.endswith("identical")}
            out.append(f"{key}: " + "; ".join(f"{k} {v:.3f}" for k, v in block["ratio"].items()) + f"; {flags}")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- driver
def _fmt(timing: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in timing["ratio"].items())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", nargs="+", choices=MEASURES + ("all",), default=["all"])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per setting")
    ap.add_argument("--quick", action="store_true", help="fewer settings (no larger resolutions)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here (also printed)")
    ap.add_argument("--tables", type=Path, default=None, help="print the markdown tables of a result JSON and exit")
    args = ap.parse_args(argv)
    if args.tables is not None:
        print(tables(json.loads(args.tables.read_text())))
        return {}
    measures = MEASURES if "all" in args.measure else tuple(args.measure)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    scratch = Path(tempfile.mkdtemp(prefix="ngdiag-bench-"))
    world = World(scratch)
    import ngdiag

    result = {
        "ngdiag": str(Path(ngdiag.__file__).parent),  # the checkout measured (PYTHONPATH, or the installed one)
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg(),
        "repeats": args.repeats,
    }
    fns = {"audit": measure_audit, "probe": measure_probe, "sensitivity": measure_sensitivity, "memory": measure_memory,
           "normguard": measure_normguard, "sweep": measure_sweep,
           "removed": measure_removed}
    for name in measures:
        start = time.perf_counter()
        result[name] = fns[name](world, args)
        _say(f"{name}: {time.perf_counter() - start:.0f} s")
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2, default=float)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
