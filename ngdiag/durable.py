"""Durable, resumable, shardable runs: atomic files, run state, output folders and shards.

A long run (an audit, a sensitivity analysis) writes one part file per batch, atomically, and a
state file with the fingerprint of its arguments. Rerunning with the same arguments skips the
batches whose part exists; ``--shard i/n`` runs batches ``b`` with ``b % n == i``. Batches have
fixed boundaries, so resumed and sharded runs compute exactly what a single run computes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ngdiag.errors import ConfigError

__all__ = [
    "parse_shard", "atomic_write", "atomic_write_text", "read_state", "precheck_output", "prepare_output", "shard_batches",
    "STATE_FILE",
]

STATE_FILE = "run_state.json"


def parse_shard(spec: Optional[str]) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if spec is None:
        return 0, 1
    try:
        i_text, n_text = str(spec).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"invalid shard {spec!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"invalid shard {spec!r}: need 0 <= i < n")
    return i, n


def shard_batches(num_batches: int, shard: tuple) -> list:
    i, n = shard
    return [b for b in range(num_batches) if b % n == i]


def atomic_write(path, writer: Callable[[str], None]) -> None:
    """Write ``path`` through ``writer(tmp_path)`` and rename: readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_state(out) -> Optional[dict]:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def precheck_output(out, *, overwrite: bool, kind: str) -> None:
    """Cheap early check, before any model is loaded: ``out`` is absent, empty, an unfinished ``kind``
    run (resumable; :func:`prepare_output` compares its arguments later), or ``overwrite`` is set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder")
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    state = read_state(out)
    if state is None or state.get("kind") != kind or state.get("complete"):
        raise ConfigError(f"output folder {out} already exists; pass --overwrite to replace it or choose another --out")


def prepare_output(out, fingerprint: str, shard, *, overwrite: bool, kind: str) -> None:
    """Create ``out``, or check that it holds an unfinished ``kind`` run with the same arguments.

    Raises :class:`ConfigError` for a folder holding anything else, unless ``overwrite``; nothing
    is deleted before that check passes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        state = read_state(out)
        resumable = (
            state is not None
            and state.get("kind") == kind
            and state.get("fingerprint") == fingerprint
            and list(state.get("shard", [])) == list(shard)
            and not state.get("complete")
        )
        if not resumable and not overwrite:
            if state is not None and not state.get("complete"):
                raise ConfigError(f"output folder {out} holds an unfinished run with other arguments; pass --overwrite to start over")
            raise ConfigError(f"output folder {out} already exists; pass --overwrite to replace it or choose another --out")
        if not resumable:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
