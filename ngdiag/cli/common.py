"""What the commands share: option checks, devices and dtypes, prompts, sampling settings, notes, progress bars.

Nothing here imports torch or diffusers at module level, so that ``ngdiag --help`` stays fast;
the functions that need torch import it when called. Everything printed goes to stderr: notes
(one line each, suppressed by ``--quiet``) and progress bars.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional, Sequence

import typer

from ngdiag.core.configs import read_text
from ngdiag.core.errors import ConfigError

FORMATS = ("human", "json")

DEFAULT_PROMPTS = [
    "a photo of a red fox in a snowy forest",
    "a bowl of fresh fruit on a wooden table",
    "a lighthouse on a rocky coast at sunset",
    "a portrait of an elderly man with a grey beard",
    "a city street in the rain at night",
    "a watercolor painting of a mountain lake",
    "a cup of coffee next to an open book",
    "a golden retriever running on a beach",
]

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N."
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


# ----------------------------------------------------------------------------- option values
def check_choice(option: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`ConfigError` naming the option."""
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def finite_float(text) -> float:
    """Parser of every float option: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text!r} is not a finite number")
    return value


def int_list(text) -> tuple:
    """Parser of comma-separated integer options, e.g. ``--text-encoder-out-layers 9,18,27``."""
    if isinstance(text, tuple):
        return text
    try:
        values = tuple(int(item) for item in str(text).replace(" ", "").split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 9,18,27") from None
    return values


def check_device(name: str) -> str:
    """The device option's syntax (no torch import): auto, cpu, cuda or cuda:N."""
    if not _DEVICE.match(str(name)):
        raise ConfigError(f"unknown device {name!r}; choose {DEVICE_HELP}")
    return name


def resolve_device(name: str, local_rank: Optional[int] = None) -> str:
    """The torch device for ``name``: ``auto`` is cuda when available, else cpu.

    Under a launcher (``local_rank`` given) a bare ``cuda`` becomes ``cuda:LOCAL_RANK``.
    """
    import torch

    check_device(name)
    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


def check_dtype(name: str) -> str:
    """The canonical dtype name (float32, bfloat16, float16) of a dtype option."""
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return _DTYPES[name]


def torch_dtype(name: str):
    import torch

    return getattr(torch, check_dtype(name))


def read_prompts(prompts_file: Optional[Path], prompts: Optional[List[str]], notes: Optional[list] = None) -> list:
    """Prompts from ``--prompts FILE`` (one per line, blank lines ignored) and/or ``--prompt``.

    Without either, the built-in prompts, with a note appended to ``notes``.
    """
    out = []
    if prompts_file is not None:
        lines = [line.strip() for line in read_text(prompts_file, "prompt file").splitlines()]
        file_prompts = [line for line in lines if line]
        if not file_prompts:
            raise ConfigError(f"prompt file {prompts_file} has no prompts (it is empty or blank)")
        out += file_prompts
    if prompts:
        if any(not p.strip() for p in prompts):
            raise ConfigError("--prompt must not be empty")
        out += list(prompts)
    if out:
        return out
    if notes is not None:
        notes.append(f"no --prompts or --prompt given: using the {len(DEFAULT_PROMPTS)} built-in prompts")
    return list(DEFAULT_PROMPTS)


# ----------------------------------------------------------------------------- sampling settings
# The sampling options of audit and sensitivity.
Steps = Annotated[Optional[int], typer.Option(help="Sampling steps [default: the checkpoint's training run's, else 28].")]
Guidance = Annotated[Optional[float], typer.Option(
    parser=finite_float, help="CFG scale (embedded guidance for FLUX.1) [default: the checkpoint's training run's, else 4.5].")]
Height = Annotated[Optional[int], typer.Option(help="Image height [default: the pipeline's].")]
Width = Annotated[Optional[int], typer.Option(help="Image width [default: the pipeline's].")]
MaxSequenceLength = Annotated[Optional[int], typer.Option(
    help="Pipeline call argument max_sequence_length: text tokens per prompt [default: the pipeline's].")]
NegativePrompt = Annotated[Optional[str], typer.Option(
    help="Pipeline call argument negative_prompt, for the unconditional branch of CFG [default: the family's].")]
TextEncoderOutLayers = Annotated[Optional[str], typer.Option(
    help="Pipeline call argument text_encoder_out_layers of FLUX.2-klein, e.g. 9,18,27 [default: the pipeline's].")]
SamplingFrom = Annotated[Optional[Path], typer.Option(
    help="Take the sampling settings not given here from a training config: an ngdiag run's config.yaml or a "
    "Flow-Factory YAML (train.num_inference_steps, guidance_scale, resolution).")]
Device = Annotated[str, typer.Option(help=f"Device: {DEVICE_HELP}")]


def sampling_options(steps, guidance_scale, height, width, max_sequence_length, negative_prompt, text_encoder_out_layers) -> dict:
    """The command line's sampling settings as :class:`~ngdiag.models.generation.SamplingConfig` fields (``None``: unset)."""
    layers = None
    if text_encoder_out_layers is not None:
        try:
            layers = int_list(text_encoder_out_layers)
        except typer.BadParameter as exc:
            raise ConfigError(f"--text-encoder-out-layers: {exc.message}") from None
    return {"num_steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
            "max_sequence_length": max_sequence_length, "negative_prompt": negative_prompt,
            "text_encoder_out_layers": layers}


_FLAGS = {"num_steps": "--steps", "guidance_scale": "--guidance-scale", "height": "--height", "width": "--width",
          "max_sequence_length": "--max-sequence-length", "negative_prompt": "--negative-prompt",
          "text_encoder_out_layers": "--text-encoder-out-layers"}
NGDIAG_DEFAULT = "ngdiag's default"


def sampling_config(checkpoint: str, given: dict, sampling_from: Optional[Path], notes: list):
    """The :class:`~ngdiag.models.generation.SamplingConfig` of a command, with where each value came from.

    Precedence: the command line (``given``, values ``None`` when unset), then the file passed
    with ``--sampling-from``, else the settings recorded by the ngdiag training run that wrote
    ``checkpoint``, then ngdiag's defaults (28 steps, guidance 4.5). Sizes and call arguments left
    unset are filled from the pipeline once it is loaded (:meth:`SampleSet.resolved`).
    """
    from ngdiag.models.generation import SamplingConfig, recorded_sampling, sampling_settings_from_file

    values, origin = {}, {}
    for name, value in given.items():
        if value is not None:
            values[name] = value
            origin[name] = "command line"
    if sampling_from is not None:
        recorded, source = sampling_settings_from_file(sampling_from), Path(sampling_from)
    else:
        found = recorded_sampling(checkpoint)
        recorded, source = found if found is not None else ({}, None)
    used = [name for name in recorded if name not in values]
    for name in used:
        values[name] = recorded[name]
        origin[name] = str(source)
    if used and sampling_from is None:
        flags = ", ".join(_FLAGS[n] for n in used)
        notes.append(f"using the sampling settings recorded by the run that trained this checkpoint ({source}): "
                     f"{flags}; give them on the command line to override")
    defaults = SamplingConfig()
    for name in ("num_steps", "guidance_scale"):
        if name not in values:
            values[name] = getattr(defaults, name)
            origin[name] = NGDIAG_DEFAULT
    return SamplingConfig(**values, origin=origin)


def describe_sampling(sampling) -> str:
    """``sampling: 10 steps, guidance 1, 32x32 (steps, guidance: FILE; size: the pipeline's default size)``."""
    groups: dict = {}
    names = {"num_steps": "steps", "guidance_scale": "guidance", "height": "size", "width": "size",
             "max_sequence_length": "max_sequence_length", "text_encoder_out_layers": "text_encoder_out_layers",
             "negative_prompt": "negative prompt"}
    for field_name, where in (sampling.origin or {}).items():
        label = names.get(field_name, field_name)
        groups.setdefault(where, [])
        if label not in groups[where]:
            groups[where].append(label)
    sources = "; ".join(f"{', '.join(labels)}: {where}" for where, labels in groups.items())
    return f"sampling: {sampling.describe()}" + (f" ({sources})" if sources else "")


def format_number(x, fmt: str = "+.4g") -> str:
    """``x`` formatted with ``fmt``, or ``"n/a"`` when it is not a number (a missing value in a summary)."""
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def print_notes(notes: Sequence[str], quiet: bool) -> None:
    """The commands' informational lines on stderr (nothing with ``--quiet``)."""
    if quiet:
        return
    for line in notes:
        typer.echo(line, err=True)


def print_checkpoint_notes(checkpoint) -> None:
    """The checkpoint's warnings (e.g. an assumed LoRA alpha), one ``warning:`` line each on stderr.

    Printed also with ``--quiet``: they qualify the numbers the command reports.
    """
    for note in checkpoint.notes:
        typer.echo(f"warning: {note}", err=True)


# ----------------------------------------------------------------------------- progress
class Progress:
    """One progress bar on stderr, counting the work this process does.

    ``total`` units, of which ``done`` are finished before the start (a resumed run): the bar
    starts there, and its rate and remaining time count only the work done now. Advance it with
    :meth:`advance` (never by setting the count). Use it as a context manager: on exit, also on
    Ctrl-C, the bar is closed and the cursor left at the start of a fresh line.

    It implements the progress protocol of durable runs (:class:`ngdiag.runs.RunProgress`): without
    ``total`` the bar appears at :meth:`start`, after ``on_start(total, reused)`` (which prints the
    notes that belong before it, such as what a resumed run reuses).
    """

    def __init__(self, desc: str, unit: str, total: Optional[int] = None, *, done: int = 0, enabled: bool = True,
                 on_start: Optional[Callable[[int, int], None]] = None):
        self.bar = None
        self.desc, self.unit, self.enabled, self.on_start = desc, unit, enabled, on_start
        if total is not None:
            self._open(total, done)

    def _open(self, total: int, done: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=int(total), initial=int(done), desc=self.desc, unit=self.unit, file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def start(self, total: int, reused: int = 0) -> None:
        """``total`` units to go through, ``reused`` of them done already: show the bar from there."""
        if self.on_start is not None:
            self.on_start(total, reused)
        self.close()
        self._open(total, reused)

    def advance(self, n: int = 1) -> None:
        """``n`` more units done; the bar closes when it is full, so that its time is the work's."""
        if self.bar is not None and n:
            self.bar.update(n)
            if self.bar.total is not None and self.bar.n >= self.bar.total:
                self.close()

    def advance_to(self, done: int) -> None:
        """Advance to ``done`` units finished (a count that only grows)."""
        if self.bar is not None and done > self.bar.n:
            self.advance(done - self.bar.n)

    def set_postfix(self, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def finish(self) -> None:
        """All the work is done: close the bar."""
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
