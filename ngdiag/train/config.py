"""The training configuration: typed dataclasses, loaded from YAML and validated.

A run is fully described by one :class:`TrainConfig`. :func:`load_config` reads a YAML file,
applies ``--set key.sub=value`` overrides and validates everything before any model is loaded:
an unknown key, a negative NormGuard weight, a misspelled method, a missing prompt file or reward
weights path each raise :class:`~ngdiag.errors.ConfigError` with a one-line message (the CLI
prints it and exits with code 2).

Relative paths (``model.base``, ``rollouts.prompts_file``, ``output_dir``) are resolved against
the working directory when the config is loaded, and the resolved config is what a run writes to
``OUTPUT_DIR/config.yaml``. Every field is documented in ``docs/training.md``.

Example:
    >>> cfg = TrainConfig.from_dict({"model": {"base": "."}, "reward": "brightness",
    ...                              "rollouts": {"prompts": ["a cat"]}, "normguard": {"lam": 0.5}})
    >>> cfg.method, cfg.normguard.lam, cfg.lora.target_modules
    ('nft', 0.5, ['to_q', 'to_k', 'to_v', 'to_out.0'])
    >>> TrainConfig.from_dict({"lora": {"rnak": 4}})
    Traceback (most recent call last):
    ...
    ngdiag.errors.ConfigError: unknown config key 'lora.rnak' (did you mean 'lora.rank'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml

from ngdiag.errors import ConfigError
from ngdiag.train.advantages import ADVANTAGE_NORMALIZATIONS
from ngdiag.train.timesteps import TIMESTEP_KINDS

__all__ = [
    "METHODS",
    "TrainConfig",
    "ModelConfig",
    "LoraSettings",
    "NFTConfig",
    "AWMConfig",
    "DPOConfig",
    "FMConfig",
    "NormGuardConfig",
    "SamplingSettings",
    "TimestepConfig",
    "OptimizerConfig",
    "RolloutConfig",
    "AdvantageConfig",
    "MonitorConfig",
    "load_config",
    "apply_overrides",
    "config_diff",
    "RESUMABLE_CHANGES",
]

METHODS = ("nft", "awm", "dpo", "fm")
"""Training methods: DiffusionNFT, Advantage Weighted Matching, Diffusion-DPO, flow matching."""

FM_WEIGHTINGS = ("positive", "exp", "uniform")
MIXED_PRECISION = ("auto", "no", "bf16")
DTYPES = ("float32", "bfloat16", "float16")
AWM_WEIGHTINGS = ("Uniform", "t", "t**2", "huber", "ghuber")

RESUMABLE_CHANGES = ("iterations", "checkpoint_every")
"""Config keys a rerun may change and still resume the run in its output folder."""

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
MAX_SEED = 2**63 - 1


# ----------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The pretrained model and where it runs.

    Attributes:
        base: diffusers pipeline folder (SD3/SD3.5, FLUX.1, FLUX.2-klein) or a cached hub id.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cpu"`` or ``"cuda"``.
        dtype: dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``); LoRA
            weights and optimizer state are always float32.
        mixed_precision: ``"auto"`` (``bf16`` autocast on GPU, none on CPU), ``"no"`` or ``"bf16"``
            (GPU only).
        gradient_checkpointing: recompute activations in the backward pass (saves GPU memory).
    """

    base: str = ""
    device: str = "auto"
    dtype: str = "float32"
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False


@dataclass
class LoraSettings:
    """LoRA on the transformer (PEFT ``LoraConfig``): ``W + (alpha / rank) B A``, ``B = 0`` at start."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class NFTConfig:
    """DiffusionNFT (:func:`ngdiag.train.losses.nft_loss`).

    Attributes:
        beta: mixing strength of the implicit positive / negative policies (``> 0``).
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]``.
        kl_beta: weight of the velocity KL to the reference (needs a reference forward when ``> 0``).
        old_decay: the old policy is an EMA of the LoRA weights, updated after every iteration:
            ``old <- d old + (1 - d) theta``; ``0`` makes it the policy that sampled the rollouts.
    """

    beta: float = 1.0
    adv_clip_max: float = 5.0
    kl_beta: float = 0.0
    old_decay: float = 0.0


@dataclass
class AWMConfig:
    """Advantage Weighted Matching (:func:`ngdiag.train.losses.awm_loss`); ``old_decay`` as for NFT.

    The old policy supplies both the PPO ratio's denominator and, when ``ema_kl_beta > 0``, the
    EMA velocity of the EMA KL term.
    """

    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    weighting: str = "Uniform"
    ghuber_power: float = 0.25
    kl_beta: float = 0.0
    ema_kl_beta: float = 0.0
    old_decay: float = 0.0


@dataclass
class DPOConfig:
    """Online Diffusion-DPO (:func:`ngdiag.train.losses.dpo_loss`).

    Pairs are formed in each prompt group: the j-th best rollout against the j-th worst, for
    ``j < pairs_per_group`` (1: best against worst, as Flow-Factory; at most ``group_size // 2``).
    Both arms of a pair share the noise and ``t``.
    """

    beta: float = 2000.0
    pairs_per_group: int = 1


@dataclass
class FMConfig:
    """Reward-weighted flow matching on the rollouts (:func:`ngdiag.train.losses.flow_matching_loss`).

    ``weighting``: ``"positive"`` trains on rollouts with a positive advantage (weight 1, else 0);
    ``"exp"`` uses ``w_i = exp(A_i / temperature)`` normalized to mean 1 over the iteration's
    rollouts; ``"uniform"`` is plain flow matching on the model's own samples (a control).
    """

    weighting: str = "positive"
    temperature: float = 1.0


@dataclass
class NormGuardConfig:
    """The NormGuard hinge (paper eq. 7-8): ``lam * max(0, (||v_theta||^2 - ||v_ref||^2) / ||v_ref||^2)``."""

    lam: float = 0.0


@dataclass
class SamplingSettings:
    """How rollouts are sampled (Euler, the family's own schedule). Unset sizes use the pipeline's defaults."""

    steps: int = 10
    guidance: float = 4.5
    height: Optional[int] = None
    width: Optional[int] = None
    max_sequence_length: Optional[int] = None
    negative_prompt: Optional[str] = None


@dataclass
class TimestepConfig:
    """Training timesteps (:func:`ngdiag.train.timesteps.sample_timesteps`).

    ``num`` times are drawn per optimizer step and shared by its rollouts (each rollout gets its own
    noise at each of them).
    """

    kind: str = "uniform"
    num: int = 2
    shift: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class OptimizerConfig:
    """AdamW on the LoRA weights only, with gradient-norm clipping (``max_grad_norm: null`` disables it).

    ``steps_per_iteration`` optimizer steps split each iteration's rollouts into equal chunks;
    ``micro_batch_size`` is the per-process forward batch (gradients are accumulated over micro
    batches and timesteps, so it does not change the result).
    """

    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    steps_per_iteration: int = 1
    micro_batch_size: int = 4


@dataclass
class RolloutConfig:
    """Online rollouts: ``prompts_per_iteration`` prompts, ``group_size`` samples each.

    Prompts come from ``prompts`` and/or ``prompts_file`` (one per line, blank lines ignored), in a
    seeded random order per pass (``shuffle``). ``batch_size`` is the per-process sampling batch.
    """

    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None
    group_size: int = 4
    prompts_per_iteration: int = 2
    batch_size: int = 4
    shuffle: bool = True

    @property
    def samples_per_iteration(self) -> int:
        return int(self.group_size) * int(self.prompts_per_iteration)

    def load_prompts(self) -> List[str]:
        """The prompt list (file first, then the inline prompts)."""
        out: List[str] = []
        if self.prompts_file:
            path = Path(self.prompts_file)
            out += [line.strip() for line in _read_text(path, "prompt file").splitlines() if line.strip()]
            if not out:
                raise ConfigError(f"prompt file {path} has no prompts (it is empty or blank)")
        out += [str(p) for p in self.prompts]
        return out


@dataclass
class AdvantageConfig:
    """Advantages (:func:`ngdiag.train.advantages.group_advantages`)."""

    normalize: str = "group"
    eps: float = 1e-4


@dataclass
class MonitorConfig:
    """Diagnostics logged every iteration.

    ``ratio``: evaluate the reference at the training points even when no loss term needs it
    (``lam = 0``, no KL, not DPO), so that ``ratio_mean``, ``inflation`` and ``hinge_active_fraction``
    are logged for unregularized runs too. It costs one no-grad forward per training forward;
    set it to ``false`` to skip the reference entirely when nothing else needs it.
    """

    ratio: bool = True


@dataclass
class TrainConfig:
    """Everything a training run needs; see ``docs/training.md`` for every field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    method: str = "nft"
    nft: NFTConfig = field(default_factory=NFTConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    fm: FMConfig = field(default_factory=FMConfig)
    normguard: NormGuardConfig = field(default_factory=NormGuardConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    reward: str = ""
    iterations: int = 100
    checkpoint_every: int = 10
    seed: int = 0
    output_dir: str = "runs/ngdiag"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Optional[dict], *, validate: bool = False) -> "TrainConfig":
        """Build from nested dicts (unknown keys and wrong types raise :class:`ConfigError`)."""
        config = _build(cls, data or {}, "")
        if validate:
            config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    # ------------------------------------------------------------------ derived
    @property
    def needs_reference(self) -> bool:
        """Whether a loss term needs ``v_ref`` (NormGuard, a KL to the reference, DPO)."""
        if self.method == "dpo" or self.normguard.lam > 0:
            return True
        if self.method == "nft":
            return self.nft.kl_beta > 0
        if self.method == "awm":
            return self.awm.kl_beta > 0
        return False

    @property
    def needs_old_policy(self) -> bool:
        return self.method in ("nft", "awm")

    @property
    def old_decay(self) -> float:
        return {"nft": self.nft.old_decay, "awm": self.awm.old_decay}.get(self.method, 0.0)

    @property
    def training_units(self) -> int:
        """Units per iteration: rollouts, or winner / loser pairs for DPO."""
        if self.method == "dpo":
            return int(self.rollouts.prompts_per_iteration) * int(self.dpo.pairs_per_group)
        return self.rollouts.samples_per_iteration

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check every value; raises :class:`ConfigError` with a one-line message. Returns ``self``."""
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown method {self.method!r}{hint} (choose one of {', '.join(METHODS)})")
        if not self.model.base:
            raise ConfigError("model.base is required: the pretrained diffusers pipeline folder")
        _choice("model.mixed_precision", self.model.mixed_precision, MIXED_PRECISION)
        _choice("model.dtype", self.model.dtype, DTYPES)
        if not (self.model.device == "auto" or self.model.device == "cpu" or self.model.device.startswith("cuda")):
            raise ConfigError(f"model.device must be auto, cpu or cuda[:N], got {self.model.device!r}")
        lam = float(self.normguard.lam)
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"normguard.lam must be a finite number >= 0, got {self.normguard.lam}")
        _at_least("lora.rank", self.lora.rank, 1)
        _positive("lora.alpha", self.lora.alpha)
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.lora.dropout}")
        if not self.lora.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")
        _positive("nft.beta", self.nft.beta)
        _positive("nft.adv_clip_max", self.nft.adv_clip_max)
        _nonneg("nft.kl_beta", self.nft.kl_beta)
        _positive("awm.adv_clip_max", self.awm.adv_clip_max)
        _nonneg("awm.clip_range", self.awm.clip_range)
        if self.awm.clip_range >= 1:
            raise ConfigError(f"awm.clip_range must be < 1, got {self.awm.clip_range}")
        _choice("awm.weighting", self.awm.weighting, AWM_WEIGHTINGS)
        _positive("awm.ghuber_power", self.awm.ghuber_power)
        _nonneg("awm.kl_beta", self.awm.kl_beta)
        _nonneg("awm.ema_kl_beta", self.awm.ema_kl_beta)
        for name, decay in (("nft.old_decay", self.nft.old_decay), ("awm.old_decay", self.awm.old_decay)):
            if not 0 <= decay < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {decay}")
        _positive("dpo.beta", self.dpo.beta)
        _at_least("dpo.pairs_per_group", self.dpo.pairs_per_group, 1)
        _choice("fm.weighting", self.fm.weighting, FM_WEIGHTINGS)
        _positive("fm.temperature", self.fm.temperature)
        _at_least("sampling.steps", self.sampling.steps, 1)
        _nonneg("sampling.guidance", self.sampling.guidance)
        for name in ("height", "width", "max_sequence_length"):
            value = getattr(self.sampling, name)
            if value is not None:
                _at_least(f"sampling.{name}", value, 1)
        _choice("timesteps.kind", self.timesteps.kind, TIMESTEP_KINDS)
        _at_least("timesteps.num", self.timesteps.num, 1)
        _positive("timesteps.shift", self.timesteps.shift)
        if not 0 <= self.timesteps.t_min < self.timesteps.t_max <= 1:
            raise ConfigError(
                f"timesteps need 0 <= t_min < t_max <= 1, got t_min={self.timesteps.t_min}, t_max={self.timesteps.t_max}"
            )
        _positive("timesteps.logit_std", self.timesteps.logit_std)
        _positive("optimizer.lr", self.optimizer.lr)
        _nonneg("optimizer.weight_decay", self.optimizer.weight_decay)
        if len(self.optimizer.betas) != 2 or not all(0 <= b < 1 for b in self.optimizer.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.optimizer.betas}")
        _positive("optimizer.eps", self.optimizer.eps)
        if self.optimizer.max_grad_norm is not None:
            _nonneg("optimizer.max_grad_norm", self.optimizer.max_grad_norm)
        _at_least("optimizer.steps_per_iteration", self.optimizer.steps_per_iteration, 1)
        _at_least("optimizer.micro_batch_size", self.optimizer.micro_batch_size, 1)
        _at_least("rollouts.group_size", self.rollouts.group_size, 2 if self.method == "dpo" else 1)
        _at_least("rollouts.prompts_per_iteration", self.rollouts.prompts_per_iteration, 1)
        _at_least("rollouts.batch_size", self.rollouts.batch_size, 1)
        if self.method == "dpo" and self.dpo.pairs_per_group > self.rollouts.group_size // 2:
            raise ConfigError(
                f"dpo.pairs_per_group must be at most group_size // 2 = {self.rollouts.group_size // 2}, "
                f"got {self.dpo.pairs_per_group}"
            )
        if not self.rollouts.prompts and not self.rollouts.prompts_file:
            raise ConfigError("no prompts: set rollouts.prompts (a list) or rollouts.prompts_file")
        if any(not str(p).strip() for p in self.rollouts.prompts):
            raise ConfigError("rollouts.prompts must not contain empty prompts")
        self.rollouts.load_prompts()
        _choice("advantages.normalize", self.advantages.normalize, ADVANTAGE_NORMALIZATIONS)
        _nonneg("advantages.eps", self.advantages.eps)
        if self.training_units % int(self.optimizer.steps_per_iteration):
            what = "pairs" if self.method == "dpo" else "rollouts"
            raise ConfigError(
                f"the {self.training_units} {what} per iteration do not split into "
                f"optimizer.steps_per_iteration={self.optimizer.steps_per_iteration} equal chunks"
            )
        check_reward_spec(self.reward)
        _at_least("iterations", self.iterations, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        if not 0 <= int(self.seed) <= MAX_SEED:
            raise ConfigError(f"seed must lie in [0, 2**63 - 1], got {self.seed}")
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        check_lora_fits(self.model.base, self.lora)
        return self

    def resolve_paths(self, root: Optional[Path] = None) -> "TrainConfig":
        """Make ``model.base`` (when it is a local path), ``rollouts.prompts_file`` and ``output_dir`` absolute."""
        root = Path.cwd() if root is None else Path(root)

        def absolute(p: str) -> str:
            path = Path(p).expanduser()
            return str(path if path.is_absolute() else (root / path).resolve())

        base = Path(self.model.base).expanduser()
        if self.model.base and (base.is_absolute() or (root / base).exists() or self.model.base.startswith(".")):
            self.model.base = absolute(self.model.base)
        if self.rollouts.prompts_file:
            self.rollouts.prompts_file = absolute(self.rollouts.prompts_file)
        if self.output_dir:
            self.output_dir = absolute(self.output_dir)
        return self


def _targeted_layer_shapes(base: str, target_modules) -> dict:
    """``{layer: (out_features, in_features)}`` of the base transformer's linear layers that
    ``target_modules`` selects (PEFT's rule: the name, or a name ending in ``.`` + it), read from
    the safetensors headers of ``BASE/transformer`` without loading any weight. Empty when the
    base is not a local pipeline folder with safetensors weights."""
    folder = Path(base).expanduser() / "transformer"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return {}
    from safetensors import safe_open

    targets = [str(t) for t in target_modules]
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as handle:
                for key in handle.keys():
                    if not key.endswith(".weight"):
                        continue
                    layer = key[: -len(".weight")]
                    if any(layer == t or layer.endswith("." + t) for t in targets):
                        shape = handle.get_slice(key).get_shape()
                        if len(shape) == 2:
                            shapes[layer] = (int(shape[0]), int(shape[1]))
        except Exception:  # an unreadable file is the loader's to report
            return {}
    return shapes


def check_lora_fits(base: str, lora: "LoraSettings") -> None:
    """Refuse a LoRA rank above ``min(in, out)`` of the smallest targeted layer, before anything is allocated.

    A rank-r update of an ``out x in`` layer has rank at most ``min(in, out)``; a larger r adds
    only parameters (``r (in + out)`` per layer), and a huge one exhausts memory.
    """
    shapes = _targeted_layer_shapes(base, lora.target_modules)
    if not shapes:
        return
    layer, (rows, cols) = min(shapes.items(), key=lambda kv: min(kv[1]))
    if int(lora.rank) > min(rows, cols):
        raise ConfigError(
            f"lora.rank={lora.rank} exceeds the targeted layers' dimensions: the smallest, {layer}, is "
            f"{rows} x {cols}, so a rank above {min(rows, cols)} adds nothing; choose lora.rank <= {min(rows, cols)}"
        )


def check_reward_spec(spec: str) -> None:
    """A reward spec ``KIND[:PATH[,key=value...]]`` whose kind is known and whose weights exist."""
    from ngdiag.sensitivity.specs import REWARD_KINDS, parse_reward_spec

    if not spec or not str(spec).strip():
        raise ConfigError(f"reward is required, e.g. 'brightness' or 'pickscore:/path/to/weights' ({', '.join(REWARD_KINDS)})")
    kind = str(spec).strip().partition(":")[0].strip().lower()
    if kind not in REWARD_KINDS:
        close = difflib.get_close_matches(kind, REWARD_KINDS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown reward kind {kind!r}{hint} (known: {', '.join(REWARD_KINDS)})")
    parse_reward_spec(str(spec))  # options, and whether the weights exist (nothing is loaded)


# ----------------------------------------------------------------------------------------- helpers
def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a one-line :class:`ConfigError` when it is missing or not UTF-8."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (undecodable byte at position {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")


def _at_least(name: str, value, low: int) -> None:
    if int(value) < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


def _positive(name: str, value) -> None:
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _nonneg(name: str, value) -> None:
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")


def _unknown_key(key: str, known, prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        if key not in names:
            raise _unknown_key(key, names, prefix)
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp, value, name: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, name)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return _build(tp, value, name + ".")
    if origin in (list, List):
        (item,) = args or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(item, v, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def config_diff(old: dict, new: dict, *, skip=(), prefix: str = "") -> List[str]:
    """The keys whose values differ between two nested config dicts, as ``"key: old -> new"`` lines.

    Keys in ``skip`` (dotted names, e.g. ``"iterations"``) are ignored.
    """
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in skip:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, skip=skip, prefix=name + ".")
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``"key.sub=value"`` overrides to nested dicts (values parsed as YAML scalars)."""
    data = dict(data)
    for item in overrides or []:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"invalid override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section; cannot set '{key}'")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def load_config(path, overrides=None) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, validate it and resolve its paths.

    Args:
        path: the YAML file.
        overrides: strings ``"key.sub=value"``, e.g. ``["normguard.lam=0.5", "lora.rank=8"]``.

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, unknown key, bad value.
    """
    path = Path(path)
    text = _read_text(path, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"cannot parse {path}{where}: invalid YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    data = apply_overrides(data, overrides)
    config = TrainConfig.from_dict(data)
    config.resolve_paths()
    return config.validate()
