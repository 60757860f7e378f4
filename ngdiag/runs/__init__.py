"""The durable run engine that every workflow (audit, sensitivity analysis, ...) runs on.

- :mod:`~ngdiag.runs.engine`: :class:`Workflow` (what a workflow supplies), :func:`run_workflow`
  (plan, fingerprint, state, per-batch parts, resume, shards) and :func:`merge_workflow`;
- :mod:`~ngdiag.runs.folder`: output folders (checks, lock, manifest of ngdiag's own files);
- :mod:`~ngdiag.runs.state`: ``run_state.json``; :mod:`~ngdiag.runs.shards`: ``--shard i/n``;
- :mod:`~ngdiag.runs.launcher`: one shard per process under torchrun, rank 0 merges;
- :mod:`~ngdiag.runs.progress`: how a run reports its progress; :mod:`~ngdiag.runs.versions`:
  the library versions recorded with every result.

Nothing here imports torch at import time.
"""

from ngdiag.runs.engine import Workflow, load_finished, load_shards, merge_workflow, run_workflow
from ngdiag.runs.folder import (
    LOCK_FILE,
    MANIFEST_FILE,
    RunFolder,
    check_not_input,
    check_output_file,
    check_output_folder,
    lock_output,
    open_output,
    use_output,
)
from ngdiag.runs.launcher import launched_shard_dir, launcher_world, merge_launched, output_folders
from ngdiag.runs.progress import RunProgress, as_progress
from ngdiag.runs.shards import parse_shard, shard_batches
from ngdiag.runs.state import STATE_FILE, load_state, read_state
from ngdiag.runs.versions import versions

__all__ = [
    "Workflow", "run_workflow", "merge_workflow", "load_shards", "load_finished",
    "RunFolder", "check_not_input", "check_output_file", "check_output_folder", "lock_output", "open_output",
    "use_output", "LOCK_FILE", "MANIFEST_FILE",
    "launcher_world", "launched_shard_dir", "output_folders", "merge_launched",
    "RunProgress", "as_progress", "parse_shard", "shard_batches", "STATE_FILE", "load_state", "read_state", "versions",
]
