"""The ``ngdiag`` command line. Commands only parse arguments and call the library.

Data goes to stdout, progress and warnings to stderr. Every :class:`~ngdiag.errors.NgdiagError`
becomes one line ``error: ...`` on stderr and exit code 2; a failed check (``--fail-on-...``)
exits 1; an unexpected internal error is one line and exit code 3 (``NGDIAG_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, List, Optional

import typer

import ngdiag
from ngdiag.errors import ConfigError, NgdiagError

app = typer.Typer(
    name="ngdiag",
    help="Diagnostics for RL post-trained flow-matching models: velocity-norm inflation audits, "
    "reward-adjoint sensitivity and NormGuard training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool):
    if value:
        typer.echo(f"ngdiag {ngdiag.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """ngdiag: is your RL fine-tune's velocity norm inflated?"""


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; choose float32, bfloat16 or float16")
    return table[name]


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return name


@app.command()
def inspect(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint path (pipeline, transformer, PEFT adapter, LoRA file) or cached hub id.")],
    base: Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle (.bin/.pt) weights.")] = False,
    output_format: Annotated[str, typer.Option("--format", help="human or json.")] = "human",
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")] = None,
):
    """Load a checkpoint and tell what it is (format, family, reference).

    Example: ngdiag inspect runs/nft/checkpoint-200/lora --base models/sd35m
    """
    from ngdiag.models.loading import load_checkpoint

    ckpt = load_checkpoint(checkpoint, base, allow_pickle=allow_pickle, lora_alpha=lora_alpha)
    print_notes(ckpt)
    info = ckpt.describe()
    info["has_reference"] = ckpt.ref is not None
    info["parameters"] = int(sum(p.numel() for p in ckpt.pipeline.transformer.parameters()))
    if output_format == "json":
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            typer.echo(f"{key:>14}: {value}")


def print_notes(ckpt) -> None:
    """The checkpoint's warnings (e.g. an assumed LoRA alpha), one line each on stderr."""
    for note in ckpt.notes:
        typer.echo(f"warning: {note}", err=True)


def _register_optional_commands():
    """Commands living in their own modules register themselves here."""
    import importlib

    for module in ("ngdiag.commands.audit", "ngdiag.commands.sensitivity", "ngdiag.commands.train"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.register(app)


_register_optional_commands()


def _quiet_third_party() -> None:
    """The CLI owns stderr: silence diffusers/transformers progress bars and info logs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        for log in (dlog, tlog):
            log.disable_progress_bar()
            log.set_verbosity_error()
    except ImportError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: runs the app, turning ngdiag errors into one line and exit code 2."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_third_party()
    try:
        rc = app(args=argv, standalone_mode=False)
    except NgdiagError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:  # click usage errors (typer vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            typer.echo(f"error: {exc.format_message()}", err=True)
            return 2
        if os.environ.get("NGDIAG_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: internal error {type(exc).__name__}: {first} (set NGDIAG_DEBUG=1 for the traceback)", err=True)
        return 3
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
