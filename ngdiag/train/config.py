"""The training configuration: typed dataclasses, loaded from YAML and validated.

A run is fully described by one :class:`TrainConfig`. :func:`load_config` reads a YAML file,
applies ``--set key.sub=value`` overrides and validates everything before any model is loaded:
an unknown key, a negative NormGuard weight, a misspelled method, a missing prompt file or reward
weights path each raise :class:`~ngdiag.core.errors.ConfigError` with a one-line message (the CLI
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
    ngdiag.core.errors.ConfigError: unknown config key 'lora.rnak' (did you mean 'lora.rank'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from ngdiag.core import configs
from ngdiag.core.configs import (
    CONFIG_KEYS,
    check_at_least,
    check_choice,
    check_nonneg,
    check_positive,
    read_text,
    read_yaml_mapping,
)
from ngdiag.core.errors import ConfigError
from ngdiag.models.generation import MAX_SEED, TRAINING_SAMPLING_KEYS, SamplingConfig
from ngdiag.train.advantages import ADVANTAGE_NORMALIZATIONS
from ngdiag.train.methods import METHODS as METHOD_CLASSES
from ngdiag.train.methods import AWMConfig, DPOConfig, FMConfig, Method, NFTConfig
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
    "TimestepConfig",
    "OptimizerConfig",
    "RolloutConfig",
    "AdvantageConfig",
    "MonitorConfig",
    "load_config",
    "check_lora_fits",
    "check_reward_spec",
    "RESUMABLE_CHANGES",
]

METHODS = tuple(METHOD_CLASSES)
"""Training methods: DiffusionNFT, Advantage Weighted Matching, Diffusion-DPO, flow matching."""

MIXED_PRECISION = ("auto", "no", "bf16")
DTYPES = ("float32", "bfloat16", "float16")

RESUMABLE_CHANGES = ("iterations", "checkpoint_every")
"""Config keys a rerun may change and still resume the run in its output folder."""

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


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
class NormGuardConfig:
    """The NormGuard hinge (paper eq. 7-8): ``lam * max(0, (||v_theta||^2 - ||v_ref||^2) / ||v_ref||^2)``."""

    lam: float = 0.0


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
            out += [line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip()]
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
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_steps=10),
                                     metadata={CONFIG_KEYS: TRAINING_SAMPLING_KEYS})
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
        config = configs.build(cls, data or {})
        if validate:
            config.validate()
        return config

    def to_dict(self) -> dict:
        """The nested dict of the config, with the YAML keys (``sampling.steps``, ``sampling.guidance``...)."""
        return configs.to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    # ------------------------------------------------------------------ derived
    def make_method(self) -> Method:
        """The :class:`~ngdiag.train.methods.base.Method` of ``method``, with its section and ``normguard.lam``."""
        return METHOD_CLASSES[self.method](getattr(self, self.method), self.normguard.lam)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check every value; raises :class:`ConfigError` with a one-line message. Returns ``self``."""
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown method {self.method!r}{hint} (choose one of {', '.join(METHODS)})")
        method = self.make_method()
        if not self.model.base:
            raise ConfigError("model.base is required: the pretrained diffusers pipeline folder")
        check_choice("model.mixed_precision", self.model.mixed_precision, MIXED_PRECISION)
        check_choice("model.dtype", self.model.dtype, DTYPES)
        if not (self.model.device == "auto" or self.model.device == "cpu" or self.model.device.startswith("cuda")):
            raise ConfigError(f"model.device must be auto, cpu or cuda[:N], got {self.model.device!r}")
        lam = float(self.normguard.lam)
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"normguard.lam must be a finite number >= 0, got {self.normguard.lam}")
        check_at_least("lora.rank", self.lora.rank, 1)
        check_positive("lora.alpha", self.lora.alpha)
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.lora.dropout}")
        if not self.lora.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")
        for name in METHODS:  # every method's section, whichever method runs
            getattr(self, name).validate()
        try:  # SamplingConfig checks its values when built; a value changed since is checked here
            dataclasses.replace(self.sampling)
        except ConfigError as exc:
            raise ConfigError(f"sampling: {exc}") from None
        check_choice("timesteps.kind", self.timesteps.kind, TIMESTEP_KINDS)
        check_at_least("timesteps.num", self.timesteps.num, 1)
        check_positive("timesteps.shift", self.timesteps.shift)
        if not 0 <= self.timesteps.t_min < self.timesteps.t_max <= 1:
            raise ConfigError(
                f"timesteps need 0 <= t_min < t_max <= 1, got t_min={self.timesteps.t_min}, t_max={self.timesteps.t_max}"
            )
        check_positive("timesteps.logit_std", self.timesteps.logit_std)
        check_positive("optimizer.lr", self.optimizer.lr)
        check_nonneg("optimizer.weight_decay", self.optimizer.weight_decay)
        if len(self.optimizer.betas) != 2 or not all(0 <= b < 1 for b in self.optimizer.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.optimizer.betas}")
        check_positive("optimizer.eps", self.optimizer.eps)
        if self.optimizer.max_grad_norm is not None:
            check_nonneg("optimizer.max_grad_norm", self.optimizer.max_grad_norm)
        check_at_least("optimizer.steps_per_iteration", self.optimizer.steps_per_iteration, 1)
        check_at_least("optimizer.micro_batch_size", self.optimizer.micro_batch_size, 1)
        check_at_least("rollouts.group_size", self.rollouts.group_size, method.min_group_size)
        check_at_least("rollouts.prompts_per_iteration", self.rollouts.prompts_per_iteration, 1)
        check_at_least("rollouts.batch_size", self.rollouts.batch_size, 1)
        method.check_rollouts(self.rollouts)
        if not self.rollouts.prompts and not self.rollouts.prompts_file:
            raise ConfigError("no prompts: set rollouts.prompts (a list) or rollouts.prompts_file")
        if any(not str(p).strip() for p in self.rollouts.prompts):
            raise ConfigError("rollouts.prompts must not contain empty prompts")
        self.rollouts.load_prompts()
        check_choice("advantages.normalize", self.advantages.normalize, ADVANTAGE_NORMALIZATIONS)
        check_nonneg("advantages.eps", self.advantages.eps)
        units = method.units_per_iteration(self.rollouts)
        if units % int(self.optimizer.steps_per_iteration):
            raise ConfigError(
                f"the {units} {method.unit} per iteration do not split into "
                f"optimizer.steps_per_iteration={self.optimizer.steps_per_iteration} equal chunks"
            )
        check_reward_spec(self.reward)
        check_at_least("iterations", self.iterations, 1)
        check_at_least("checkpoint_every", self.checkpoint_every, 1)
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
    from ngdiag.rewards.specs import REWARD_KINDS, parse_reward_spec

    if not spec or not str(spec).strip():
        raise ConfigError(f"reward is required, e.g. 'brightness' or 'pickscore:/path/to/weights' ({', '.join(REWARD_KINDS)})")
    kind = str(spec).strip().partition(":")[0].strip().lower()
    if kind not in REWARD_KINDS:
        close = difflib.get_close_matches(kind, REWARD_KINDS, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown reward kind {kind!r}{hint} (known: {', '.join(REWARD_KINDS)})")
    parse_reward_spec(str(spec))  # options, and whether the weights exist (nothing is loaded)


def load_config(path, overrides=None) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, validate it and resolve its paths.

    Args:
        path: the YAML file.
        overrides: strings ``"key.sub=value"``, e.g. ``["normguard.lam=0.5", "lora.rank=8"]``.

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, unknown key, bad value.
    """
    data = configs.apply_overrides(read_yaml_mapping(path, "config file"), overrides)
    config = TrainConfig.from_dict(data)
    config.resolve_paths()
    return config.validate()
