"""The durable run engine: every workflow's batches, parts, resume, shards and merge, done one way.

A run is a fixed plan: its config (a :class:`~ngdiag.models.generation.SampleSet`) splits the samples into
``num_batches`` batches of fixed sample ids, and its fingerprint hashes everything that determines
the results. With an output folder the engine writes the run state (:mod:`ngdiag.runs.state`),
then one *part* per batch, atomically, as soon as the batch is computed. A rerun with the same
arguments resumes: it reuses the batches whose part is complete and says how many
(:class:`~ngdiag.runs.progress.RunProgress`). ``shard=(i, n)`` runs only the batches ``b`` with
``b % n == i``; :func:`merge_workflow` joins the finished shards, after checking every one (kind,
arguments, split, each shard exactly once, finished, every part present), into exactly the files
of a single run: batches have fixed boundaries, so every batched forward is the same.

A workflow supplies only what is its own: the kind and config type, the files of a part, how to
write and read a part, and how to join the parts into a result (which saves itself). For example,
a workflow that records one number per sample::

    class MeanWorkflow(Workflow):
        kind, title, merge_command = "mean", "a mean run", "ngdiag merge-mean"
        config_type = MeanConfig                       # a SampleSet subclass
        part_files = ("values.json",)                  # stored as parts/values-bNNNNN.json

        def write_part(self, folder, b, part):
            folder.write_text(self.part_paths(b)["values"], json.dumps(part))

        def read_part(self, path, b):
            return json.loads((path / self.part_paths(b)["values"]).read_text())

        def finalize(self, parts):                     # parts of every batch, in batch order
            values = [v for part in parts for v in part]
            return MeanResult(sum(values) / len(values), self.config)  # has .save(folder, report=)

    def run_mean(checkpoint, config, *, out_dir=None, shard=(0, 1), overwrite=False, progress=None):
        workflow = MeanWorkflow(config, checkpoint.describe())
        compute = lambda b: [score(checkpoint, i) for i in config.batch_ids(b)]
        return run_workflow(workflow, compute, out_dir=out_dir, shard=shard, overwrite=overwrite, progress=progress)

    def merge_mean(shard_dirs, out_dir, *, overwrite=False):
        return merge_workflow(MeanWorkflow, shard_dirs, out_dir, overwrite=overwrite)
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ngdiag.core.errors import ConfigError
from ngdiag.runs.folder import RunFolder, use_output
from ngdiag.runs.progress import as_progress
from ngdiag.runs.shards import shard_batches
from ngdiag.runs.state import STATE_FILE, load_state, read_state

__all__ = ["Workflow", "run_workflow", "merge_workflow", "load_shards", "load_finished"]

#: What reading a damaged part may raise (parquet, JSON, ``np.load`` of a cut or altered file).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)
_WORKFLOWS: dict = {}


class Workflow:
    """One kind of durable run, for :func:`run_workflow` and :func:`merge_workflow` (see the module docstring).

    Class attributes:
        kind: the run kind recorded in ``run_state.json`` (``"audit"``).
        title: the run in messages (``"an audit"``).
        merge_command: the command that joins its shards (``"ngdiag merge"``), named when the
            shards of this kind are given to another kind's merge.
        config_type: its config class, rebuilt from a shard's state by a merge.
        part_files: the files of one batch's part, ``name.ext`` each, stored as
            ``parts/name-bNNNNN.ext`` (:meth:`part_paths`); the LAST one marks the batch done:
            :meth:`write_part` writes it last.

    An instance holds the run's ``config`` and ``checkpoint`` (the checkpoint's ``describe()``).
    """

    kind: ClassVar[str] = ""
    title: ClassVar[str] = ""
    merge_command: ClassVar[str] = ""
    config_type: ClassVar[type]
    part_files: ClassVar[tuple] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _WORKFLOWS[cls.kind] = cls

    def __init__(self, config, checkpoint: dict):
        self.config = config
        self.checkpoint = checkpoint

    # -- what a workflow supplies
    def write_part(self, folder: RunFolder, b: int, part) -> None:
        """Write the part of batch ``b`` with ``folder.write`` / ``folder.write_text``, the last of :attr:`part_files` last."""
        raise NotImplementedError

    def read_part(self, path: Path, b: int):
        """The part of batch ``b`` from the folder ``path``, in the form the batch computation returns."""
        raise NotImplementedError

    def finalize(self, parts: list):
        """The result, from the parts of every batch in batch order."""
        raise NotImplementedError

    def save(self, result, folder: RunFolder, *, report: bool = True) -> None:
        """Write the result into the run's folder (default: ``result.save(folder, report=report)``)."""
        result.save(folder, report=report)

    # -- provided
    def part_paths(self, b: int) -> dict:
        """``{name: "parts/name-bNNNNN.ext"}`` for the :attr:`part_files` of batch ``b``, in their order."""
        out = {}
        for file in self.part_files:
            name, _, ext = file.partition(".")
            out[name] = f"parts/{name}-b{b:05d}.{ext}"
        return out

    def done_file(self, b: int) -> str:
        """The file whose presence marks batch ``b`` as done: the last of :attr:`part_files`."""
        return list(self.part_paths(b).values())[-1]

    def batches(self, shard: tuple = (0, 1)) -> list:
        """The batches of ``shard`` (``(i, n)``) of the run's fixed plan, in order."""
        return shard_batches(self.config.num_batches, shard)

    def state(self, shard: tuple, **extra) -> dict:
        """The run state (``run_state.json``) of ``shard``, unfinished."""
        return {"kind": self.kind, "fingerprint": self.config.fingerprint(self.checkpoint), "shard": list(shard),
                "complete": False, **extra, "config": self.config.to_dict(), "checkpoint": self.checkpoint,
                "num_batches": self.config.num_batches}

    def inputs(self) -> list:
        """The run's inputs (``(label, path)``), which its output folder must stay clear of."""
        return [("checkpoint", self.checkpoint.get("path")), ("base", self.checkpoint.get("base"))]

    def _read(self, path, b: int):
        path = Path(path)
        done = path / self.done_file(b)
        if not done.is_file():
            raise ConfigError(f"{done} is missing: rerun the run in {path} with --overwrite to redo it")
        try:
            return self.read_part(path, b)
        except _UNREADABLE as exc:
            # a finished run does not resume, so deleting the part would not redo it: --overwrite does
            raise ConfigError(f"cannot read the part of batch {b} in {path} ({type(exc).__name__}); "
                              f"rerun the run in {path} with --overwrite to redo it") from None


def run_workflow(
    workflow: Workflow,
    compute: Callable[[int], Any],
    *,
    out_dir=None,
    shard: tuple = (0, 1),
    overwrite: bool = False,
    progress=None,
    report: bool = True,
):
    """Run ``workflow``: ``compute(b)`` gives the part of batch ``b``; returns the result.

    Args:
        workflow: the run (its config and checkpoint).
        compute: the batch computation, ``b -> part`` (the form :meth:`Workflow.read_part` returns).
        out_dir: ``None`` keeps everything in memory; else a folder path or an open
            :class:`~ngdiag.runs.folder.RunFolder` (locked for the run), which must not be, contain
            or lie inside the checkpoint or the base. Its parts are written as they are computed,
            an unfinished run of the same arguments and shard is resumed, and the result is saved
            into it (``summary`` files last, the complete run state after them).
        shard: ``(i, n)``: only batches ``b % n == i``. With ``n > 1`` the shard's parts are
            written and ``None`` is returned: join the shards with :func:`merge_workflow`.
        overwrite: replace ngdiag's own output in a non-resumable ``out_dir`` (files ngdiag did not
            write are never touched).
        progress: a :class:`~ngdiag.runs.progress.RunProgress`, a function ``f(done, total)`` or ``None``.
        report: passed to the result's ``save``.
    """
    i, n = shard
    progress = as_progress(progress)
    batches = workflow.batches(shard)
    if out_dir is None:
        if n > 1:
            raise ConfigError(f"a sharded {workflow.title.split(' ', 1)[-1]} needs an output folder")
        progress.start(len(batches), 0)
        parts = []
        for b in batches:
            parts.append(compute(b))
            progress.advance()
        progress.finish()
        return workflow.finalize(parts)

    state = workflow.state((i, n))
    with use_output(out_dir, kind=workflow.kind, inputs=workflow.inputs(), overwrite=overwrite) as folder:
        folder.begin(state)
        reused = {b for b in batches if folder.exists(workflow.done_file(b))}
        progress.start(len(batches), len(reused))
        for b in batches:
            if b not in reused:
                workflow.write_part(folder, b, compute(b))
                progress.advance()
        progress.finish()
        state["complete"] = True
        if n > 1:
            folder.write_text(STATE_FILE, json.dumps(state, indent=2))
            return None
        result = workflow.finalize([workflow._read(folder.path, b) for b in batches])
        workflow.save(result, folder, report=report)
        folder.write_text(STATE_FILE, json.dumps(state, indent=2))
    return result


def load_finished(workflow: Workflow, path):
    """The result of a finished single run of ``workflow`` (same kind and fingerprint) in ``path``, else ``None``.

    Nothing is computed or written: the parts are read and joined as the run joined them. Callers that
    run many workflows (``ngdiag sweep``) use it so that a rerun does not redo what is done.
    """
    path = Path(path)
    state = read_state(path)
    if (state is None or state.get("kind") != workflow.kind or not state.get("complete")
            or list(state.get("shard", ())) != [0, 1] or "merged_from" in state):
        return None
    if state.get("fingerprint") != workflow.config.fingerprint(workflow.checkpoint):
        return None
    return workflow.finalize([workflow._read(path, b) for b in workflow.batches((0, 1))])


def merge_workflow(workflow_type: type, shard_dirs: Sequence, out_dir, *, overwrite: bool = False, report: bool = True):
    """Join the shards of one run of ``workflow_type`` into the result (and files) of a single run.

    Every shard folder is checked (:func:`load_shards`, and every part of every batch must be
    there and readable) before anything is written. ``out_dir`` is a folder path or an open
    :class:`~ngdiag.runs.folder.RunFolder`; it must not be, contain or lie inside a shard folder.
    """
    states, n = load_shards(shard_dirs, workflow_type.kind)
    first_dir, first = states[0]
    try:
        config = workflow_type.config_type(**first["config"])
    except TypeError as exc:
        raise ConfigError(f"{first_dir / STATE_FILE} is corrupt (its config does not fit this ngdiag: {exc})") from None
    for d, state in states:
        if state.get("num_batches", config.num_batches) != config.num_batches:
            raise ConfigError(f"{d / STATE_FILE} is corrupt (it records {state['num_batches']} batches, "
                              f"its config makes {config.num_batches})")
    workflow = workflow_type(config, first["checkpoint"])
    with use_output(out_dir, kind=workflow.kind, inputs=[("shard folder", d) for d, _ in states], overwrite=overwrite) as folder:
        owner = {b: d for d, s in states for b in workflow.batches((s["shard"][0], n))}
        result = workflow.finalize([workflow._read(owner[b], b) for b in sorted(owner)])
        state = workflow.state((0, 1), merged_from=[str(d) for d, _ in states])
        state["fingerprint"] = first["fingerprint"]
        folder.begin({**state, "fingerprint": "merge-" + first["fingerprint"]})
        workflow.save(result, folder, report=report)
        folder.write_text(STATE_FILE, json.dumps({**state, "complete": True}, indent=2))
    return result


def load_shards(shard_dirs: Sequence, kind: str) -> tuple[list, int]:
    """Check the finished shards of one ``kind`` run: ``([(folder, state)] by shard index, n)``.

    Every folder must hold a finished ``kind`` run with the same fingerprint and the same ``n``, and
    the shards must be ``0 .. n-1``, each exactly once.
    """
    if not shard_dirs:
        raise ConfigError("no shard folders given")
    title = _WORKFLOWS[kind].title if kind in _WORKFLOWS else f"a {kind} run"
    states = []
    for d in shard_dirs:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"shard folder {d} does not exist" if not d.exists() else f"{d} is not a folder")
        state = load_state(d)
        if state["kind"] != kind:
            other = _WORKFLOWS.get(state["kind"])
            hint = f"; join it with {other.merge_command}" if other is not None and other.merge_command else ""
            raise ConfigError(f"{d} holds an ngdiag {state['kind']} run, not {title}{hint}")
        if not state["complete"]:
            raise ConfigError(f"the {kind} run in {d} is not finished; rerun it with the same arguments to resume")
        states.append((d, state))
    if len({s["fingerprint"] for _, s in states}) != 1:
        raise ConfigError(f"these folders hold {kind} runs with different arguments; merge the shards of one run only")
    ns = sorted({s["shard"][1] for _, s in states})
    if len(ns) != 1:
        raise ConfigError(f"these folders hold shards of different splits (n = {', '.join(map(str, ns))}); merge the shards of one split")
    n = ns[0]
    real = [os.path.realpath(d) for d, _ in states]
    shards = sorted(s["shard"][0] for _, s in states)
    if shards != list(range(n)) or len(set(real)) != len(real):
        raise ConfigError(f"incomplete or repeated shards {shards} of {n}; merge all of 0..{n - 1} exactly once")
    return sorted(states, key=lambda ds: ds[1]["shard"][0]), n


