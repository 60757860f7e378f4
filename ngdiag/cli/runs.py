"""The command side of durable runs (``audit``, ``sensitivity`` and the workflows after them).

A workflow's commands are described once by a :class:`RunCommand`: its kind, its library run and
merge, its summary file. ``@command.register(app)`` turns a function that takes only the
command's own options into ``ngdiag KIND`` with the options every run command shares
(:class:`RunOptions`: checkpoint, base, prompts, sampling settings, seed, batch size, output
folder, device, dtype, format, shard, ...), and registers ``ngdiag MERGE`` for its shards.
:meth:`RunCommand.run` then does the rest the same way for all: checks every argument before
anything is written or loaded, locks the output folders (one shard per process under torchrun),
loads the checkpoint, prints the notes and the progress bar (with what a resumed run reuses, as
the run engine reports it), runs, lets rank 0 merge, and prints the summary.

Like the rest of the command line this imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from ngdiag.cli.common import (
    FORMATS,
    Device,
    Guidance,
    Height,
    MaxSequenceLength,
    NegativePrompt,
    Progress,
    SamplingFrom,
    Steps,
    TextEncoderOutLayers,
    Width,
    check_choice,
    check_device,
    check_dtype,
    describe_sampling,
    finite_float,
    print_checkpoint_notes,
    print_notes,
    read_prompts,
    resolve_device,
    sampling_config,
    sampling_options,
    torch_dtype,
)

__all__ = ["RunCommand", "RunOptions", "print_summary", "run_inputs", "resume_note"]

_KW = inspect.Parameter.KEYWORD_ONLY
_MERGE_MODULES: list = []  # the modules of every registered merge, imported before a merge (RunCommand.merge)


@dataclass
class RunOptions:
    """The options every run command shares (see :func:`run_command`)."""

    checkpoint: str
    base: Optional[str]
    prompts_file: Optional[Path]
    prompt: Optional[List[str]]
    num_samples: Optional[int]
    steps: Optional[int]
    guidance_scale: Optional[float]
    height: Optional[int]
    width: Optional[int]
    max_sequence_length: Optional[int]
    negative_prompt: Optional[str]
    text_encoder_out_layers: Optional[str]
    sampling_from: Optional[Path]
    seed: int
    batch_size: int
    out: Path
    device: str
    dtype: str
    output_format: str
    shard: Optional[str]
    allow_pickle: bool
    quiet: bool
    overwrite: bool
    lora_alpha: Optional[float]


def _shared_options(kind: str, batch_size: int, merge: str) -> tuple[list, list]:
    """The shared options of a ``kind`` run command: those listed before its own, and those after."""
    def opt(name, annotation, default=inspect.Parameter.empty):
        return inspect.Parameter(name, _KW, default=default, annotation=annotation)

    head = [
        opt("checkpoint", Annotated[str, typer.Argument(
            help="Checkpoint: pipeline folder, transformer folder, PEFT adapter or LoRA file.")]),
        opt("base", Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder (the reference).")], None),
        opt("prompts_file", Annotated[Optional[Path], typer.Option(
            "--prompts", help="Text file with one prompt per line [default: 8 built-in prompts].")], None),
        opt("prompt", Annotated[Optional[List[str]], typer.Option(
            "--prompt", metavar="<str>", help="A prompt (repeatable).")], None),
        opt("num_samples", Annotated[Optional[int], typer.Option(help="Number of samples [default: one per prompt].")], None),
        opt("steps", Steps, None),
        opt("guidance_scale", Guidance, None),
        opt("height", Height, None),
        opt("width", Width, None),
        opt("max_sequence_length", MaxSequenceLength, None),
        opt("negative_prompt", NegativePrompt, None),
        opt("text_encoder_out_layers", TextEncoderOutLayers, None),
        opt("sampling_from", SamplingFrom, None),
        opt("seed", Annotated[int, typer.Option(help="Sample i uses seed + i (0 <= seed, seed + samples - 1 < 2**63).")], 0),
        opt("batch_size", Annotated[int, typer.Option(help="Samples per batch.")], batch_size),
    ]
    tail = [
        opt("out", Annotated[Path, typer.Option(help="Output folder.")], Path(f"{kind}-out")),
        opt("device", Device, "auto"),
        opt("dtype", Annotated[str, typer.Option(help="float32, bfloat16 or float16.")], "float32"),
        opt("output_format", Annotated[str, typer.Option("--format", help="human or json (the summary to stdout).")], "human"),
        opt("shard", Annotated[Optional[str], typer.Option(help=f"Run shard i/n of the batches; join with {merge}.")], None),
        opt("allow_pickle", Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle weights.")], False),
        opt("quiet", Annotated[bool, typer.Option("--quiet", help="No progress bar and no notes on stderr (errors only).")], False),
        opt("overwrite", Annotated[bool, typer.Option(
            "--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")], False),
        opt("lora_alpha", Annotated[Optional[float], typer.Option(
            parser=finite_float,
            help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")], None),
    ]
    return head, tail


def _typer_command(name: str, doc: Optional[str], params: list, call: Callable) -> Callable:
    """A command function for typer: named ``name``, documented by ``doc``, taking ``params`` (keyword
    arguments, read by typer from its signature) and running ``call(**kwargs)``."""
    def command(**kwargs):
        return call(**kwargs)

    command.__name__ = command.__qualname__ = name
    command.__doc__ = doc
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _function(path: str) -> Callable:
    """The function named ``"module:function"``, imported now (so that the command line starts fast)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run_inputs(checkpoint, base, prompts_file, reward) -> list:
    """The local inputs of a run, which its output folder must stay clear of."""
    inputs = [("checkpoint", checkpoint), ("base", base), ("prompts file", prompts_file)]
    if reward is not None:
        from ngdiag.rewards.specs import parse_reward_spec

        inputs.append(("reward weights", parse_reward_spec(reward)[1]))
    return inputs


def resume_note(what: str, out: Path, reused: int, total: int) -> str:
    return f"{what}: resuming the unfinished run in {out}: {reused} of {total} batches already done are reused"


def print_summary(summary: dict, out: Path, output_format: str, quiet: bool, format_human: Callable[[dict], str]) -> None:
    """The summary on stdout (JSON or ``format_human``), the report's path on stderr."""
    typer.echo(json.dumps(summary, indent=2) if output_format == "json" else format_human(summary))
    if not quiet:
        typer.echo(f"report: {out / 'report.html'}", err=True)


@dataclass
class RunCommand:
    """The command line of one durable workflow: ``ngdiag KIND`` and the command that merges its shards.

    Attributes:
        kind: the run kind (``"audit"``): the output folder's, the notes' and the progress bar's name;
            ``--out`` defaults to ``KIND-out`` and the merge's ``--out`` to ``KIND-merged``.
        what: the run in help texts (``"sensitivity run"``).
        execute: the library run, ``"module:function"`` taking ``(checkpoint, config, out_dir=, shard=,
            overwrite=, progress=)``; imported once the arguments are checked.
        merge: the library merge, ``"module:function"`` taking ``(shard_dirs, out_dir, overwrite=)``.
        merge_name, merge_doc: the merge command's name and help text (with its example).
        summary_file: the summary the run writes into ``--out`` (printed at the end).
        batch_size: the default of ``--batch-size``.
        format_human: the human form of the summary.
    """

    kind: str
    what: str
    execute: str
    merge: str
    merge_name: str
    merge_doc: str
    summary_file: str
    batch_size: int
    format_human: Callable[[dict], str]

    def register(self, app: typer.Typer) -> Callable:
        """Decorate ``f(run: RunOptions, **own_options)``: register it as ``ngdiag KIND`` (named like ``f``)
        with the shared options, its own between ``--batch-size`` and ``--out``; register the merge."""
        def decorate(fn: Callable) -> Callable:
            own = [p.replace(kind=_KW) for p in list(inspect.signature(fn, eval_str=True).parameters.values())[1:]]
            head, tail = _shared_options(self.kind, self.batch_size, f"ngdiag {self.merge_name}")
            shared = [p.name for p in head + tail]

            def call(**kwargs):
                return fn(RunOptions(**{name: kwargs.pop(name) for name in shared}), **kwargs)

            app.command()(_typer_command(fn.__name__, fn.__doc__, head + own + tail, call))
            self._register_merge(app)
            return fn

        return decorate

    def _register_merge(self, app: typer.Typer) -> None:
        """``ngdiag MERGE SHARD... --out OUT``. Before merging, every registered merge's module is
        imported, so that a shard folder of another kind is refused naming the command that joins it."""
        _MERGE_MODULES.append(self.merge.split(":")[0])

        def call(shards, out, output_format, overwrite, quiet):
            check_choice("--format", output_format, FORMATS)
            for module in _MERGE_MODULES:
                importlib.import_module(module)
            result = _function(self.merge)(shards, out, overwrite=overwrite)
            print_summary(result.summary(), out, output_format, quiet, self.format_human)
            return 0

        params = [
            inspect.Parameter("shards", _KW, annotation=Annotated[List[Path], typer.Argument(
                help=f"Output folders of the shards of one {self.what}.")]),
            inspect.Parameter("out", _KW, default=Path(f"{self.kind}-merged"), annotation=Annotated[Path, typer.Option(
                help=f"Output folder of the merged {self.what}.")]),
            inspect.Parameter("output_format", _KW, default="human", annotation=Annotated[str, typer.Option(
                "--format", help="human or json (the summary to stdout).")]),
            inspect.Parameter("overwrite", _KW, default=False, annotation=Annotated[bool, typer.Option(
                "--overwrite", help="Replace ngdiag's output in an existing output folder (other files are kept).")]),
            inspect.Parameter("quiet", _KW, default=False, annotation=Annotated[bool, typer.Option(
                "--quiet", help="No notes on stderr (errors only).")]),
        ]
        app.command(self.merge_name)(_typer_command(self.merge_name.replace("-", "_"), self.merge_doc, params, call))

    def run(self, options: RunOptions, *, reward: Optional[str], make_config: Callable,
            needs_ref: bool = False) -> Optional[dict]:
        """Run the workflow from the command line; returns the printed summary (``None``: a shard).

        Args:
            options: the shared options.
            reward: the command's reward spec, checked here and listed among the inputs.
            make_config: ``(prompts, sampling) -> config``: the workflow's config (checks its values).
            needs_ref: refuse a checkpoint without a reference before the run starts.
        """
        from ngdiag.runs import launcher_world, merge_launched, output_folders, parse_shard

        notes: list = []
        check_choice("--format", options.output_format, FORMATS)
        check_device(options.device)
        check_dtype(options.dtype)
        shard = parse_shard(options.shard)
        prompts = read_prompts(options.prompts_file, options.prompt, notes)
        if reward is not None:
            from ngdiag.rewards.specs import parse_reward_spec

            parse_reward_spec(reward)
        o = options
        given = sampling_options(o.steps, o.guidance_scale, o.height, o.width, o.max_sequence_length, o.negative_prompt,
                                 o.text_encoder_out_layers)
        config = make_config(prompts, sampling_config(options.checkpoint, given, options.sampling_from, notes))

        from ngdiag.models.loading import load_checkpoint

        launched = launcher_world() if options.shard is None else None
        local_rank = None
        if launched is not None:
            # Under torchrun / accelerate launch: one shard per process, rank 0 merges into --out.
            shard, local_rank = launched[:2], launched[2]
        main_process = launched is None or launched[0] == 0
        inputs = run_inputs(options.checkpoint, options.base, options.prompts_file, reward)
        with output_folders(options.out, launched, kind=self.kind, inputs=inputs, overwrite=options.overwrite,
                            shard=shard) as (folder, merge_target):
            ckpt = load_checkpoint(o.checkpoint, o.base, device=resolve_device(o.device, local_rank), dtype=torch_dtype(o.dtype),
                                   allow_pickle=o.allow_pickle, lora_alpha=o.lora_alpha)
            if main_process:
                print_checkpoint_notes(ckpt)
            if needs_ref:
                ckpt.require_ref()
            config = config.resolved(ckpt)
            notes.append(describe_sampling(config.sampling))
            print_notes(notes if main_process else [], options.quiet)

            def on_start(total: int, reused: int) -> None:
                """The notes that need the run's batches: how processes share them, what a resumed run reuses."""
                later = []
                if launched is not None:
                    later.append(f"{self.kind}: {launched[1]} processes; the progress bar follows process 0 "
                                 f"({total} of the {config.num_batches} batches)")
                if reused:
                    later.append(resume_note(self.kind, folder.path, reused, total))
                print_notes(later if main_process else [], options.quiet)

            desc = self.kind if launched is None else f"{self.kind} (process 0 of {launched[1]})"
            with Progress(desc, "batch", enabled=not options.quiet and main_process, on_start=on_start) as bar:
                execute = _function(self.execute)
                result = execute(ckpt, config, out_dir=folder, shard=shard, overwrite=options.overwrite, progress=bar)
            if launched is not None:
                result = merge_launched(merge_target, shard, options.overwrite, _function(self.merge))
        if result is None:
            if launched is None and not options.quiet:
                typer.echo(f"shard {shard[0]}/{shard[1]} done: {options.out}", err=True)
            return None
        summary = json.loads((options.out / self.summary_file).read_text())
        print_summary(summary, options.out, options.output_format, options.quiet, self.format_human)
        return summary
