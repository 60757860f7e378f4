"""The run state: ``run_state.json``, what a durable run's folder says about the run it holds.

``{"kind", "fingerprint", "shard": [i, n], "complete", "config", "checkpoint", "num_batches"}``
(a merged run adds ``merged_from``). It is written when a run starts and again, with
``complete`` true, when it ends; a rerun with the same kind, fingerprint and shard resumes an
unfinished one. Folders written before ``num_batches`` was recorded (sensitivity runs) still read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ngdiag.core.errors import ConfigError

__all__ = ["STATE_FILE", "read_state", "load_state"]

STATE_FILE = "run_state.json"


def read_state(out) -> Optional[dict]:
    """The run state of ``out``, or ``None`` when it is missing or unreadable."""
    try:
        return load_state(out)
    except ConfigError:
        return None


def load_state(out) -> dict:
    """The run state of ``out``; :class:`ConfigError` when it is missing, unreadable or malformed."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{out} is not an ngdiag run folder (no {STATE_FILE})")
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is corrupt ({type(exc).__name__}); rerun that shard or remove the folder") from None
    problem = _state_problem(state)
    if problem:
        raise ConfigError(f"{path} is corrupt ({problem}); rerun that shard or remove the folder")
    return state


def _state_problem(state) -> Optional[str]:
    if not isinstance(state, dict):
        return "not a JSON object"
    for key, kind in (("kind", str), ("fingerprint", str), ("complete", bool), ("config", dict), ("checkpoint", dict)):
        if not isinstance(state.get(key), kind):
            return f"{key!r} missing or not a {kind.__name__}"
    shard = state.get("shard")
    if (not isinstance(shard, list) or len(shard) != 2 or not all(_is_int(v) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        return "'shard' is not [i, n] with 0 <= i < n"
    if "num_batches" in state and (not _is_int(state["num_batches"]) or state["num_batches"] < 1):
        return "'num_batches' is not a positive integer"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
