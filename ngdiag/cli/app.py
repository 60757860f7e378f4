"""The ``ngdiag`` command line. Commands only parse arguments and call the library.

Data goes to stdout, progress and notes to stderr. Every :class:`~ngdiag.core.errors.NgdiagError`
and every usage error becomes one line ``error: ...`` on stderr and exit code 2; a failed check
(``--fail-on-...``) exits 1; Ctrl-C prints ``error: interrupted`` on a fresh line and exits 130;
an unexpected internal error is one line and exit code 3 (``NGDIAG_DEBUG=1`` shows the traceback).

Start-up imports neither torch nor diffusers (``ngdiag --help`` stays fast): the commands import
what they need when they run. The log lines and warnings of diffusers, transformers and peft are
kept off stderr (``NGDIAG_DEBUG=1`` shows them); ngdiag's own warnings are printed as one line
``warning: ...``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, List, Optional

import typer

import ngdiag
from ngdiag.core.errors import ConfigError, NgdiagError

app = typer.Typer(
    name="ngdiag",
    help="Diagnostics for RL post-trained flow-matching models: velocity-norm inflation audits, "
    "reward-adjoint sensitivity and NormGuard training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

#: CPU threads of torch when neither ``--threads`` nor ``OMP_NUM_THREADS`` is given.
DEFAULT_THREADS = 1
_THIRD_PARTY = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "torch", "safetensors", "tqdm")


def _version_callback(value: bool):
    if value:
        typer.echo(f"ngdiag {ngdiag.__version__}")
        raise typer.Exit()


def set_threads(threads: Optional[int]) -> int:
    """Set torch's CPU threads: ``threads``, else ``OMP_NUM_THREADS``, else :data:`DEFAULT_THREADS`.

    ``0`` keeps torch's own default (one thread per core). Before torch is imported this sets
    ``OMP_NUM_THREADS`` (which torch reads when it starts); afterwards it calls
    ``torch.set_num_threads``. Returns the number set (0 for torch's default).
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise ConfigError(f"OMP_NUM_THREADS must be a positive integer, got {env!r}") from None
        else:
            threads = DEFAULT_THREADS
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (torch's default) or a positive number, got {threads}")
    if threads == 0:
        return 0
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", help="CPU threads of torch [default: $OMP_NUM_THREADS, else 1; 0: torch's default, one per core]. "
        "Tiny models run fastest on 1 thread, above all on a busy machine.")] = None,
):
    """ngdiag: is your RL fine-tune's velocity norm inflated?

    Example: ngdiag --threads 4 audit runs/nft/checkpoint-200 --base models/sd35m
    """
    set_threads(threads)


@app.command()
def inspect(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint path (pipeline, transformer, PEFT adapter, LoRA file) or cached hub id.")],
    base: Annotated[Optional[str], typer.Option(help="Pretrained base pipeline folder.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Also load pickle (.bin/.pt) weights.")] = False,
    output_format: Annotated[str, typer.Option("--format", help="human or json.")] = "human",
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha of a diffusers LoRA file that records none (default: alpha = r, with a warning).")] = None,
):
    """Load a checkpoint and tell what it is (format, family, reference).

    Example: ngdiag inspect runs/nft/checkpoint-200 --base models/sd35m
    """
    from ngdiag.cli.common import FORMATS, check_choice, print_checkpoint_notes

    check_choice("--format", output_format, FORMATS)
    from ngdiag.models.loading import load_checkpoint

    ckpt = load_checkpoint(checkpoint, base, allow_pickle=allow_pickle, lora_alpha=lora_alpha)
    print_checkpoint_notes(ckpt)
    info = ckpt.describe()
    info["has_reference"] = ckpt.ref is not None
    info["parameters"] = int(sum(p.numel() for p in ckpt.pipeline.transformer.parameters()))
    if output_format == "json":
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            typer.echo(f"{key:>14}: {value}")


def _register_commands():
    """Commands living in their own modules register themselves here."""
    from ngdiag.cli import attribution, audit, demo, sensitivity, sweep, train

    for module in (audit, sensitivity, attribution, train, sweep, demo):
        module.register(app)


_register_commands()


# ----------------------------------------------------------------------------- stderr discipline
_NGDIAG_DIR = str(Path(ngdiag.__file__).resolve().parent)


def _is_ngdiag_file(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_NGDIAG_DIR)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _stderr_discipline(debug: bool):
    """Keep third-party log lines and warnings off stderr; ngdiag's warnings become ``warning: ...``.

    diffusers, transformers and peft log through ``logging`` and ``warnings`` while loading
    (missing torchvision, unexpected keys), while encoding prompts (truncation) and while injecting
    adapters; none of that is for the user of a one-line-error tool. Environment variables cover
    the libraries not imported yet; the loggers of those already imported are raised to ERROR.
    Everything is restored on exit (the CLI also runs in-process, from tests).
    """
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    show = warnings.showwarning
    levels = {}
    if not debug:
        for key, value in env.items():
            os.environ.setdefault(key, value)
        for name in _THIRD_PARTY:
            logger = logging.getLogger(name)
            levels[name] = logger.level
            logger.setLevel(logging.ERROR)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_ngdiag_file(filename):
            text = str(message).strip().splitlines()
            typer.echo(f"warning: {text[0] if text else category.__name__}", err=True)
        elif debug:
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = showwarning
        try:
            yield
        finally:
            warnings.showwarning = show
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _library_verbosity_error() -> None:
    """Raise the diffusers / transformers loggers to ERROR when those libraries are already imported.

    Their loggers are configured by their own ``logging`` modules, which reset the level when they
    are first used; once imported, their ``set_verbosity_error`` is what sticks.
    """
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        log = sys.modules.get(module)
        if log is not None:
            log.set_verbosity_error()
            log.disable_progress_bar()


def quiet_third_party() -> None:
    """Silence the progress bars, log lines and warnings of diffusers, transformers and peft for good.

    For scripts that build models before calling :func:`main` (``python -m ngdiag.demo``); it
    imports diffusers. :func:`main` itself keeps them off stderr only while it runs.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging  # noqa: F401
    import transformers.utils.logging  # noqa: F401

    _library_verbosity_error()
    for name in _THIRD_PARTY:
        warnings.filterwarnings("ignore", module=name)


def _interrupted() -> int:
    typer.echo("error: interrupted", err=True)
    return 130


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: runs the app and turns every failure into one line on stderr and an exit code."""
    debug = bool(os.environ.get("NGDIAG_DEBUG"))
    try:
        with _stderr_discipline(debug):
            if not debug:
                _library_verbosity_error()
            rc = app(args=argv, standalone_mode=False)
    except NgdiagError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return _interrupted() if exc.exit_code == 130 else exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted()
    except Exception as exc:  # click usage errors (typer vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 2
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            first = exc.format_message().strip().splitlines()
            typer.echo(f"error: {first[0] if first else type(exc).__name__}", err=True)
            return 2
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: internal error {type(exc).__name__}: {first} (set NGDIAG_DEBUG=1 for the traceback)", err=True)
        return 3
    if rc == 130:  # typer turns KeyboardInterrupt into Exit(130) and returns it without standalone mode
        return _interrupted()
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
