"""A training run's output folder: what it holds, how it is written, read and resumed.

``OUTPUT_DIR/`` holds

- ``config.yaml``: the resolved config (rewritten on resume, to record ``iterations`` and
  ``checkpoint_every``, the only keys a resumed run may change: :data:`RESUMABLE_CHANGES`);
- ``run.json``: the ngdiag version, base, family, the prompts' SHA-256 and the LoRA size;
- ``metrics.jsonl`` (one JSON object per iteration, appended) and ``metrics.csv`` (rewritten at
  every checkpoint);
- ``checkpoint-N/``: a PEFT adapter folder plus the trainer state (``trainer_state.json``: iteration,
  parameter names, optimizer settings; ``trainer_state.safetensors``: LoRA weights, old policy,
  optimizer state and RNG), written to a temporary folder and renamed, so a folder with both state
  files is complete (:func:`latest_checkpoint`).

Only rank 0 writes; it holds the folder's lock for the whole run (:func:`lock_output_dir`).
Rerunning the same config resumes from the last complete checkpoint; a folder with another
config, other prompts or foreign files is refused before any model is loaded (:func:`check_output_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ngdiag.core.configs import config_diff
from ngdiag.core.io import atomic_write, atomic_write_text, json_safe
from ngdiag.core.errors import CheckpointError, ConfigError
from ngdiag.train.config import RESUMABLE_CHANGES, TrainConfig

__all__ = [
    "CONFIG_FILE", "RUN_FILE", "METRICS_FILE", "METRICS_CSV", "STATE_FILE", "STATE_TENSORS", "STATE_VERSION",
    "latest_checkpoint", "read_metrics", "prompts_hash", "lock_output_dir", "check_output_dir", "start_run",
    "append_metrics", "write_metrics_csv", "state_tensors", "state_meta", "write_checkpoint", "restore_state",
]

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
STATE_FILE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_VERSION = 1


# ============================================================================ reading
def latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete ``checkpoint-N`` folder with the largest ``N`` in a run folder, or ``None``."""
    best, best_n = None, -1
    out = Path(output_dir)
    if not out.is_dir():
        return None
    for child in out.iterdir():
        if not child.is_dir() or not child.name.startswith("checkpoint-"):
            continue
        try:
            n = int(child.name.split("-", 1)[1])
        except ValueError:
            continue
        if (child / STATE_FILE).is_file() and (child / "adapter_model.safetensors").is_file() and n > best_n:
            best, best_n = child, n
    return best


def read_metrics(output_dir) -> list:
    """The metrics log of a run folder (``metrics.jsonl``) as a list of dicts."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: the log ends before it
    return rows


def prompts_hash(prompts: Sequence[str]) -> str:
    """The SHA-256 of the prompt list that ``run.json`` records."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


# ============================================================================ the folder before a run
def _train_inputs(config: TrainConfig) -> list:
    inputs = [("model.base", config.model.base), ("rollouts.prompts_file", config.rollouts.prompts_file)]
    if config.reward:
        from ngdiag.rewards.scorers import parse_reward_spec

        inputs.append(("reward weights", parse_reward_spec(config.reward)[1]))
    return inputs


def lock_output_dir(config: TrainConfig):
    """Check ``output_dir`` (not a link or a file, writable, clear of the base, prompts file and reward
    weights), create and lock it: the returned :class:`~ngdiag.runs.RunFolder` closes the lock."""
    from ngdiag.runs import lock_output

    return lock_output(config.output_dir, inputs=_train_inputs(config), what="output_dir")


def check_output_dir(config: TrainConfig, prompts: Sequence[str]) -> Optional[Path]:
    """What ``output_dir`` holds: nothing, or a run of this config (returns its newest checkpoint to
    resume from, or ``None``). Anything else is a :class:`ConfigError`. Needs no model."""
    out = Path(config.output_dir)
    saved = out / CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    if not saved.is_file():
        if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise ConfigError(f"output_dir {out} is not empty and holds no ngdiag run ({CONFIG_FILE} missing)")
        return None
    import yaml

    try:
        previous = yaml.safe_load(saved.read_bytes().decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{saved} is not readable YAML; remove the folder or choose another output_dir") from None
    if not isinstance(previous, dict):
        raise ConfigError(f"{saved} is not a training config; remove the folder or choose another output_dir")
    diffs = config_diff(previous, config.to_dict(), skip=RESUMABLE_CHANGES)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(
            f"output_dir {out} holds a run with a different config ({diffs[0]}{more}); "
            "rerun with the same config to resume, or choose another output_dir"
        )
    run = out / RUN_FILE
    if run.is_file():
        try:
            info = json.loads(run.read_bytes().decode("utf-8"))
        except (ValueError, OSError):
            raise ConfigError(f"{run} is corrupt; remove the folder or choose another output_dir") from None
        if not isinstance(info, dict):
            raise ConfigError(f"{run} is corrupt; remove the folder or choose another output_dir")
        if info.get("prompts_sha256") not in (None, prompts_hash(prompts)):
            raise ConfigError(f"the prompts changed since the run in {out} started; resume needs the same prompts")
    return latest_checkpoint(out)


# ============================================================================ writing (rank 0)
def start_run(output_dir, config: TrainConfig, info: dict, resumed_from: Optional[int]) -> None:
    """Write ``config.yaml`` and ``run.json`` and cut the metrics log to the iterations before ``resumed_from``.

    ``info``: the run's facts for ``run.json`` (base, family, prompts' hash, LoRA size); the ngdiag
    version is added first.
    """
    import ngdiag

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # rewritten on resume too, to record the resumable changes (iterations, checkpoint_every)
    atomic_write_text(out / CONFIG_FILE, config.to_yaml())
    atomic_write_text(out / RUN_FILE, json.dumps({"ngdiag": ngdiag.__version__, **info}, indent=2))
    keep = [r for r in read_metrics(out) if int(r.get("iteration", -1)) < (resumed_from or 0)]
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in keep))


def append_metrics(output_dir, row: dict) -> None:
    """Append one iteration's metrics to ``metrics.jsonl`` (non-finite numbers as ``null``)."""
    with open(Path(output_dir) / METRICS_FILE, "a") as fh:
        fh.write(json.dumps({k: json_safe(v) for k, v in row.items()}) + "\n")


def write_metrics_csv(output_dir) -> None:
    """Rewrite ``metrics.csv`` from ``metrics.jsonl`` (nothing when the log is empty)."""
    out = Path(output_dir)
    rows = read_metrics(out)
    if not rows:
        return
    import pandas as pd

    atomic_write(out / METRICS_CSV, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


# ============================================================================ checkpoints
def state_tensors(params: Sequence[torch.Tensor], old_state: Optional[Sequence[torch.Tensor]],
                  optimizer: torch.optim.Optimizer, device: torch.device) -> Dict[str, torch.Tensor]:
    """Everything to resume, as named tensors: ``param.i``, ``old.i``, ``optim.i.key`` and ``rng.*``."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    if old_state is not None:
        tensors.update({f"old.{i}": o.detach().cpu().contiguous() for i, o in enumerate(old_state)})
    opt_state = optimizer.state_dict()
    for i, st in opt_state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                tensors[f"optim.{i}.{key}"] = torch.tensor(float(value))
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def state_meta(iteration: int, param_names: List[str], optimizer: torch.optim.Optimizer, old_is_current: bool,
               world_size: int) -> dict:
    """The JSON half of the trainer state (``trainer_state.json``)."""
    groups = optimizer.state_dict()["param_groups"]
    return {
        "version": STATE_VERSION,
        "iteration": iteration,
        "param_names": param_names,
        "param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups],
        "old_is_current": old_is_current,
        "world_size": world_size,
    }


def write_checkpoint(output_dir, iteration: int, save_adapter: Callable[[str], None],
                     tensors: Dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``checkpoint-N`` atomically (``save_adapter(folder)`` writes the PEFT adapter) and ``metrics.csv``."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    final = out / f"checkpoint-{iteration}"
    tmp = out / f".checkpoint-{iteration}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(str(tmp))
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_metrics_csv(out)
    return final


def restore_state(folder, params: Sequence[torch.Tensor], param_names: List[str],
                  old_state: Optional[Sequence[torch.Tensor]], optimizer: torch.optim.Optimizer,
                  device: torch.device) -> Tuple[int, bool]:
    """Restore LoRA weights, old policy, optimizer state and RNG from ``checkpoint-N``.

    Returns ``(iteration, old_is_current)``. Raises :class:`CheckpointError` for unreadable state
    files and :class:`ConfigError` when the LoRA parameters differ from ``param_names``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the trainer state in {folder}: {exc.__class__.__name__}") from None
    if meta.get("param_names") != param_names:
        raise ConfigError(f"the LoRA parameters in {folder} do not match this config's LoRA")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
        if old_state is not None:
            for i, o in enumerate(old_state):
                o.copy_(tensors[f"old.{i}"].to(o.device, o.dtype))
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return int(meta["iteration"]), bool(meta.get("old_is_current", False))
