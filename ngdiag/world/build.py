"""Build the miniature world from its seed: data, VAE, text encoders, judge and base model.

Every stage is a pure function of :data:`WORLD_SEED` and the settings below, run on CPU with a fixed
number of threads, so a rebuild gives the same weights:

1. :func:`train_vae`: a diffusers ``AutoencoderKL`` (4 latent channels, factor 2: 16x16 latents for
   32x32 scenes) trained to reconstruct rendered scenes; its ``shift_factor`` / ``scaling_factor``
   normalise the latents of the data to mean 0, std 1, as SD3's VAE config does for its data.
2. :func:`train_judge`: the :class:`~ngdiag.world.judge.WorldJudge` on rendered scenes (plus their
   VAE reconstructions, so that it judges decoded samples as well as renders).
3. :func:`text_encoders`: two random-weight CLIP text encoders with projection over a word-level
   tokenizer of the world's vocabulary (frozen: the transformer learns to read them).
4. :func:`train_transformer`: an ``SD3Transformer2DModel`` trained by rectified-flow matching on the
   captions (logit-normal t, 10 % caption dropout for classifier-free guidance, EMA weights).
5. :func:`assemble`: a ``StableDiffusion3Pipeline`` folder (safetensors), loadable by diffusers alone.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ngdiag.world.judge import WorldJudge, save_judge
from ngdiag.world.scene import FACTORS, HELD_OUT_SEED, SIZE, all_captions, render_seeds, scene_params

__all__ = [
    "WORLD_SEED", "CALL_KWARGS", "world_tokenizer", "text_encoders", "new_vae", "new_transformer", "train_vae",
    "train_judge", "encode_captions", "train_transformer", "assemble", "recognisability",
]

WORLD_SEED = 20261202
#: The pipeline call that fits the world (also written to the folder's ngdiag_defaults.json).
CALL_KWARGS = {"height": SIZE, "width": SIZE, "max_sequence_length": 1}
#: Tokens per caption for the CLIP encoders (the longest caption has 12 words, plus start and end).
TEXT_LENGTH = 16
CLIP_HIDDEN = 32

Progress = Optional[Callable[[str], None]]


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _vocabulary() -> list[str]:
    words = {"a", "an", "on", "background", ",", "lit", "from", "the", "above", "left", "right"}
    for values in FACTORS.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def world_tokenizer():
    """A word-level CLIP-style tokenizer of the world's vocabulary (``<|startoftext|> ... <|endoftext|>``,
    padded with ``<|endoftext|>`` to :data:`TEXT_LENGTH`); other words map to ``<|unk|>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {tok: i for i, tok in enumerate(specials + _vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|unk|>", model_max_length=TEXT_LENGTH,
    )


def text_encoders(seed: int = WORLD_SEED):
    """Two seeded random-weight ``CLIPTextModelWithProjection`` over :func:`world_tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab_size = len(world_tokenizer())
    encoders = []
    for k in range(2):
        config = CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CLIP_HIDDEN, intermediate_size=64,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, projection_dim=CLIP_HIDDEN,
            max_position_embeddings=TEXT_LENGTH, hidden_act="gelu",
        )
        torch.manual_seed(seed + 11 + k)
        encoders.append(CLIPTextModelWithProjection(config).eval().requires_grad_(False))
    return encoders


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=SIZE, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def new_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=2 * CLIP_HIDDEN, caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_HIDDEN, pos_embed_max_size=SIZE // 4,
    )


def training_seeds(count: int, offset: int = 0) -> range:
    if offset + count > HELD_OUT_SEED:
        raise ValueError("training seeds must stay below HELD_OUT_SEED")
    return range(offset, offset + count)


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(images: torch.Tensor, *, steps: int = 1500, batch: int = 32, lr: float = 1e-3, seed: int = WORLD_SEED,
              progress: Progress = None):
    """A VAE trained on ``images`` (``(N, 3, 32, 32)`` in [0, 1]); returns it with its latent
    ``shift_factor`` / ``scaling_factor`` set from the data."""
    torch.manual_seed(seed)
    vae = new_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    x_all = images * 2 - 1
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, 100)
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            _say(progress, f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, min(len(x_all), 4096), 256)])
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    return vae


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch] * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def train_judge(images: torch.Tensor, labels: dict[str, torch.Tensor], *, steps: int = 1500, batch: int = 64,
                lr: float = 2e-3, seed: int = WORLD_SEED, progress: Progress = None) -> WorldJudge:
    """The judge trained on ``images`` with factor ``labels``; noise augmentation."""
    torch.manual_seed(seed + 2)
    judge = WorldJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 3)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, 100)
        idx = torch.randint(len(images), (batch,), generator=g)
        x = images[idx]
        noise = 0.05 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        logits = judge((x + noise).clamp(0, 1))
        loss = sum(torch.nn.functional.cross_entropy(logits[k], labels[k][idx]) for k in FACTORS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            _say(progress, f"judge step {step}: loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


def scene_labels(scenes) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([s.labels[k] for s in scenes]) for k in FACTORS}


@torch.no_grad()
def judge_accuracy(judge: WorldJudge, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = {k: torch.cat([judge(images[i : i + 256])[k] for i in range(0, len(images), 256)]) for k in FACTORS}
    return {k: (logits[k].argmax(1) == labels[k]).float().mean().item() for k in FACTORS}


def sd3_pipeline(transformer, vae, *, shift: float = 3.0, seed: int = WORLD_SEED):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te1, te2 = text_encoders(seed)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder=te1, text_encoder_2=te2,
        text_encoder_3=None, tokenizer=world_tokenizer(), tokenizer_2=world_tokenizer(), tokenizer_3=None,
        transformer=transformer, vae=vae,
    )


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled)`` of each caption, as the pipeline encodes them."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=CALL_KWARGS["max_sequence_length"],
    )
    return embeds, pooled


def train_transformer(pipe, latents: torch.Tensor, captions: list[str], *, steps: int, batch: int = 64,
                      lr: float = 1e-3, warmup: int = 200, ema: float = 0.999, dropout: float = 0.1, seed: int = WORLD_SEED, state: Optional[dict] = None, on_step=None,
                      progress: Progress = None):
    """Rectified-flow matching of ``pipe.transformer`` on normalised ``latents`` and their ``captions``.

    ``x_t = (1 - t) x_0 + t eps``, target ``eps - x_0``, ``t`` logit-normal(0, 1), timestep ``1000 t``.
    Trains from step 0 (or the step of ``state``) to step ``steps``, the learning rate following a cosine
    from ``lr`` to 0 after ``warmup`` linear steps. Returns the EMA transformer.
    ``on_step(step, ema_transformer, get_state)`` is called after each step; ``get_state()`` returns the
    state to resume from (model, EMA, optimizer, generator, step).
    """
    transformer = pipe.transformer.train()
    names = sorted(set(captions))
    index = {c: i for i, c in enumerate(names)}
    caption_ids = torch.tensor([index[c] for c in captions])
    embeds, pooled = encode_captions(pipe, names + [""])
    null = len(names)
    torch.manual_seed(seed + 4)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    averaged = copy.deepcopy(transformer).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 5)
    start = 0
    if state is not None:
        transformer.load_state_dict(state["model"])
        averaged.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        start = state["step"]
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, warmup)
        idx = torch.randint(len(latents), (batch,), generator=g)
        x0 = latents[idx]
        ids = caption_ids[idx].clone()
        ids[torch.rand(batch, generator=g) < dropout] = null
        t = torch.sigmoid(torch.randn(batch, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        pred = transformer(
            hidden_states=xt, timestep=1000 * t, encoder_hidden_states=embeds[ids], pooled_projections=pooled[ids],
        ).sample
        loss = (pred - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_avg, p in zip(averaged.parameters(), transformer.parameters()):
                p_avg.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            _say(progress, f"transformer step {step}: loss {loss.item():.4f}")
        if on_step is not None:
            on_step(step + 1, averaged, lambda step=step + 1: {
                "model": transformer.state_dict(), "ema": averaged.state_dict(), "opt": opt.state_dict(),
                "rng": g.get_state(), "step": step})
    return averaged


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int = 28, guidance: float = 4.5,
                  batch: int = 64) -> torch.Tensor:
    """Images in [0, 1] from a plain diffusers pipeline call (one generator per sample)."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        result = pipe(
            prompt=prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
            output_type="pt", **CALL_KWARGS,
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def held_out(count: int) -> tuple[list[str], list[int], dict[str, torch.Tensor]]:
    """``(prompts, seeds, labels)`` of ``count`` held-out scenes (seeds from :data:`HELD_OUT_SEED`)."""
    from ngdiag.world.scene import caption

    seeds = list(range(HELD_OUT_SEED, HELD_OUT_SEED + count))
    scenes = scene_params(seeds)
    return [caption(s) for s in scenes], seeds, scene_labels(scenes)


def recognisability(pipe, judge: WorldJudge, count: int = 64, **sampling) -> dict[str, float]:
    """Share of ``count`` held-out samples whose judged factor is the one their prompt names."""
    prompts, seeds, labels = held_out(count)
    images = sample_images(pipe, prompts, seeds, **sampling)
    return judge_accuracy(judge, images, labels)


def assemble(pipe, path, *, half: bool = True) -> Path:
    """Save ``pipe`` as a pipeline folder (transformer weights in float16 when ``half``)."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    if half:
        from safetensors.torch import load_file, save_file

        weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
        save_file({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    (path / "ngdiag_defaults.json").write_text(json.dumps({"family": "sd3", "call_kwargs": CALL_KWARGS}, indent=2) + "\n")
    return path


#: How many rendered scenes each stage trains on, and its steps.
DATA_SIZE = 32768
STAGE_STEPS = {"vae": 1500, "judge": 1500, "transformer": 6000}


def build_base(work, *, transformer_steps: int = STAGE_STEPS["transformer"], threads: int = 2, eval_every: int = 1000, progress: Progress = None) -> dict:
    """Run stages 1-4 into folder ``work`` (each stage's result is cached there and reused by a rerun;
    the transformer stage resumes from its last state). Returns the timings and evaluations."""
    from safetensors.torch import load_file, save_file

    from ngdiag.world.judge import load_judge

    torch.set_num_threads(threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "build_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {"seconds": {}, "evaluations": []}

    def save_log():
        log_path.write_text(json.dumps(log, indent=2) + "\n")

    t0 = time.time()
    images, captions, scenes = render_seeds(training_seeds(DATA_SIZE))
    log["seconds"]["render"] = round(time.time() - t0, 1)

    vae_dir = work / "vae"
    if not (vae_dir / "config.json").exists():
        t0 = time.time()
        vae = train_vae(images[: DATA_SIZE // 2], steps=STAGE_STEPS["vae"], progress=progress)
        vae.save_pretrained(vae_dir, safe_serialization=True)
        log["seconds"]["vae"] = round(time.time() - t0, 1)
        save_log()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)

    judge_dir = work / "judge"
    if not (judge_dir / "model.safetensors").exists():
        t0 = time.time()
        half = DATA_SIZE // 2
        recon = reconstruct(vae, images[:half])
        psnr = (10 * torch.log10(1 / (recon - images[:half]).pow(2).mean((1, 2, 3)))).mean().item()
        log["vae_psnr_db"] = round(psnr, 2)
        labels = scene_labels(scenes[:half])
        both = torch.cat([images[:half], recon])
        judge = train_judge(both, {k: torch.cat([v, v]) for k, v in labels.items()}, steps=STAGE_STEPS["judge"],
                            progress=progress)
        save_judge(judge, judge_dir)
        test_images, _, test_scenes = render_seeds(range(HELD_OUT_SEED, HELD_OUT_SEED + 1024))
        log["judge_held_out_accuracy"] = judge_accuracy(judge, test_images, scene_labels(test_scenes))
        log["judge_held_out_accuracy_reconstructed"] = judge_accuracy(judge, reconstruct(vae, test_images),
                                                                      scene_labels(test_scenes))
        log["seconds"]["judge"] = round(time.time() - t0, 1)
        save_log()
    judge = load_judge(judge_dir)

    latents_file = work / "latents.safetensors"
    if not latents_file.exists():
        with torch.no_grad():
            z = torch.cat([vae.encode(images[i : i + 512] * 2 - 1).latent_dist.mean for i in range(0, len(images), 512)])
        save_file({"latents": (z - vae.config.shift_factor) * vae.config.scaling_factor}, str(latents_file))
    latents = load_file(str(latents_file))["latents"]

    torch.manual_seed(WORLD_SEED + 6)
    pipe = sd3_pipeline(new_transformer(), vae)
    state_file = work / "transformer_state.pt"
    state = torch.load(state_file, weights_only=False) if state_file.exists() else None
    t_start = time.time()

    def on_step(step, averaged, get_state):
        if step % 250 == 0 or step == transformer_steps:
            torch.save(get_state(), state_file)
            log["seconds"]["transformer"] = round(seconds_before + time.time() - t_start, 1)
            save_log()
        if step % eval_every == 0 or step == transformer_steps:
            live = pipe.transformer
            pipe.transformer = averaged
            t_eval = time.time()
            acc = recognisability(pipe, judge, 64)
            pipe.transformer = live
            log["evaluations"].append({"step": step, "held_out_samples": 64, **acc, "seconds": round(time.time() - t_eval, 1)})
            save_log()
            _say(progress, f"step {step}: recognisability {acc}")

    seconds_before = log["seconds"].get("transformer", 0)  # of the earlier runs of a resumed build
    averaged = train_transformer(pipe, latents, captions, steps=transformer_steps, state=state, on_step=on_step,
                                 progress=progress)

    pipe.transformer = averaged.eval()
    assemble(pipe, work / "base")
    return log


#: The RL fine-tunes of the world: DiffusionNFT on the world reward, without and with NormGuard.
RUNS = {"nft-plain": {"lam": 0.0}, "nft-normguard": {"lam": 1.0}}
#: What both fine-tunes share (the arguments of :func:`run_config` besides the paths and ``lam``).
RUN_SETTINGS = {"iterations": 60, "checkpoint_every": 15, "lr": 3e-3, "vivid": 20.0}
#: CPU threads of the fine-tunes (the stages before them use ``threads``, 2): the shipped ones were
#: trained side by side, one thread each, and torch gives the same bits only for the same thread count.
RUN_THREADS = 1


def run_config(base, judge, output_dir, *, lam: float, iterations: int = 60, checkpoint_every: int = 15,
               lr: float = 1e-3, vivid: float = 1.0, seed: int = 0) -> dict:
    """The ``ngdiag train`` config (as a dict) of one world fine-tune; paths are made absolute (so that
    :func:`ship` can replace the work folder in every one of them)."""
    base, judge, output_dir = (Path(p).resolve() for p in (base, judge, output_dir))
    return {
        "model": {"base": str(base), "device": "cpu", "dtype": "float32"},
        "lora": {"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "method": "nft",
        "nft": {"beta": 1.0, "adv_clip_max": 5.0, "kl_beta": 0.0, "old_decay": 0.0},
        "normguard": {"lam": lam},
        "sampling": {"steps": 10, "guidance": 4.5},
        "timesteps": {"kind": "uniform", "num": 2},
        "optimizer": {"lr": lr, "weight_decay": 0.0, "max_grad_norm": 1.0, "steps_per_iteration": 1, "micro_batch_size": 32},
        "rollouts": {"prompts": all_captions(), "group_size": 8, "prompts_per_iteration": 4, "batch_size": 32},
        "reward": f"world:{judge},vivid={vivid:g}",
        "iterations": iterations,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
        "output_dir": str(output_dir),
    }


# ----------------------------------------------------------------------------- the shipped world
#: Where the shipped world lives inside the package.
ASSETS = Path(__file__).resolve().parent / "assets"
#: Stands for the world folder's absolute path in the shipped run folders' text files (configs, adapter
#: configs): :func:`install_world` writes the real path in their place.
PLACEHOLDER = "<NGDIAG_WORLD>"
_TEXT_FILES = ("config.yaml", "run.json", "adapter_config.json", "README.md")
#: Files of a run folder that are not shipped: the optimizer state (only needed to resume the run).
_NOT_SHIPPED = ("trainer_state.safetensors",)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_run(work, name: str, *, progress: Progress = None, **settings) -> float:
    """Train the fine-tune ``name`` of :data:`RUNS` on ``work/base`` into ``work/runs/name`` with ``ngdiag
    train`` (settings: those of :data:`RUN_SETTINGS`, which they override); returns its seconds."""
    from ngdiag.train.config import TrainConfig
    from ngdiag.train.trainer import train

    work = Path(work)
    t0 = time.time()
    config = run_config(work / "base", work / "judge", work / "runs" / name, lam=RUNS[name]["lam"],
                        **{**RUN_SETTINGS, **settings})
    train(TrainConfig.from_dict(config, validate=True),
          progress=lambda done, total, row: _say(progress, f"{name}: iteration {done}/{total}"))
    return round(time.time() - t0, 1)


def train_runs(work, *, progress: Progress = None, **settings) -> dict:
    """:func:`train_run` for every run of :data:`RUNS`, one after the other; returns seconds per run."""
    return {name: train_run(work, name, progress=progress, **settings) for name in RUNS}


def ship(work, dest=ASSETS) -> dict:
    """Copy the world built in ``work`` (base, judge, run folders) to ``dest`` with paths replaced by
    :data:`PLACEHOLDER`, and write ``dest/world.json`` (the build log and each file's SHA-256)."""
    import shutil

    work, dest = Path(work).resolve(), Path(dest)
    if dest.exists():
        manifest = dest / "world.json"
        if not manifest.is_file():
            raise FileExistsError(f"{dest} exists and is not a shipped world (no world.json); not replacing it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(work / "base", dest / "base")
    shutil.copytree(work / "judge", dest / "judge")
    for run in sorted((work / "runs").iterdir()):
        shutil.copytree(run, dest / "runs" / run.name, ignore=shutil.ignore_patterns(*_NOT_SHIPPED, "*.lock", ".ngdiag*"))
    for path in dest.rglob("*"):
        if path.is_file() and path.name in _TEXT_FILES:
            path.write_text(path.read_text(encoding="utf-8").replace(str(work), PLACEHOLDER), encoding="utf-8")
    log = json.loads((work / "build_log.json").read_text())
    files = {str(p.relative_to(dest)): _sha256(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest = {"world_seed": WORLD_SEED, "build": log, "files": files,
                "bytes": sum((dest / f).stat().st_size for f in files)}
    (dest / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def install_world(dest, source=ASSETS) -> Path:
    """Copy the shipped world to folder ``dest`` (created; it must not exist or be empty) with its paths
    pointing there; returns ``dest``. The copy's run folders are ordinary ``ngdiag train`` run folders."""
    import shutil

    source, dest = Path(source), Path(dest)
    if not (source / "world.json").is_file():
        raise FileNotFoundError(f"no shipped world at {source} (world.json missing)")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    shutil.copytree(source, dest, dirs_exist_ok=True)
    real = str(dest.resolve())
    for path in dest.rglob("*"):
        if path.is_file() and path.name in _TEXT_FILES:
            text = path.read_text(encoding="utf-8")
            if PLACEHOLDER in text:
                path.write_text(text.replace(PLACEHOLDER, real), encoding="utf-8")
    return dest


def regenerate(work, *, dest=None, threads: int = 2, progress: Progress = None, compare_with=ASSETS) -> dict:
    """Rebuild the whole world from :data:`WORLD_SEED` in ``work`` (stages 1-4 and the fine-tunes), ship it
    to ``dest`` when given, and compare each weight file with the manifest of the world at ``compare_with``
    (by default the shipped one). Returns the report: seconds per stage, ``weights_identical`` (file ->
    whether its SHA-256 equals the shipped one) and ``other_files_differing`` (text files whose content
    carries times or paths, e.g. metrics)."""
    import tempfile

    from ngdiag.core.errors import ConfigError

    work = Path(work)
    if work.exists() and not work.is_dir():
        raise ConfigError(f"{work} is a file; world-build needs a folder to build in")
    if work.is_dir() and any(work.iterdir()) and not (work / "build_log.json").is_file():
        raise ConfigError(f"{work} is not empty and holds no earlier world build (build_log.json); choose another folder")
    t0 = time.time()
    log = build_base(work, threads=threads, progress=progress)
    torch.set_num_threads(RUN_THREADS)
    log["seconds"]["runs"] = train_runs(work, progress=progress)
    log["seconds"]["total"] = round(time.time() - t0, 1)
    Path(work, "build_log.json").write_text(json.dumps(log, indent=2) + "\n")
    report: dict = {"seconds": log["seconds"], "threads": threads}
    reference = Path(compare_with) / "world.json" if compare_with is not None else None
    shipped = json.loads(reference.read_text())["files"] if reference is not None and reference.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = ship(work, Path(tmp) / "world")
    if shipped:
        weights = {f: shipped.get(f) == h for f, h in manifest["files"].items() if f.endswith(".safetensors")}
        report["weights_identical"] = weights
        report["all_weights_identical"] = bool(weights) and all(weights.values())
        report["other_files_differing"] = sorted(
            f for f, h in manifest["files"].items() if not f.endswith(".safetensors") and shipped.get(f) != h)
    if dest is not None:
        ship(work, dest)
    return report
