"""Durable runs under a launcher (``torchrun``, ``accelerate launch``): one shard per process, rank 0 merges.

Process ``i`` of ``n`` runs shard ``i/n`` of the run into its own folder ``OUT.shards/i-of-n``;
every process then meets the others at a gloo barrier, and rank 0 joins the shards into ``OUT``
(which it locked before any model was loaded) with the workflow's merge.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

from ngdiag.runs.folder import Inputs, check_output_folder, open_output

__all__ = ["launcher_world", "launched_shard_dir", "output_folders", "merge_launched"]


def launcher_world() -> Optional[tuple[int, int, int]]:
    """``(rank, world_size, local_rank)`` under torchrun / accelerate launch with several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def launched_shard_dir(out, shard: tuple) -> Path:
    """Where process ``i`` of ``n`` writes its shard under a launcher: ``OUT.shards/i-of-n``."""
    return Path(f"{out}.shards") / f"{shard[0]}-of-{shard[1]}"


@contextlib.contextmanager
def output_folders(out: Path, launched, *, kind: str, inputs: Inputs, overwrite: bool, shard: tuple):
    """Check and lock the output folders of a run before any model is loaded.

    ``launched`` is :func:`launcher_world` (``None``: a single process, which writes into ``out``).
    Yields ``(run_folder, merge_target)``: the :class:`~ngdiag.runs.folder.RunFolder` this process
    writes its run (or shard) into, and what rank 0 merges into under a launcher (``out``, locked by
    rank 0; ``None`` elsewhere). Whether an unfinished run in the folder is resumed is decided by
    the run itself, from the fingerprint of its resolved settings.
    """
    inputs = list(inputs)
    with contextlib.ExitStack() as stack:
        merge_target = None
        run_out = out
        if launched is not None:
            check_output_folder(out, kind=kind, inputs=inputs, overwrite=overwrite)
            if shard[0] == 0:
                merge_target = stack.enter_context(open_output(out, kind=kind, inputs=inputs, overwrite=overwrite))
            run_out = launched_shard_dir(out, shard)
        folder = stack.enter_context(open_output(run_out, kind=kind, inputs=inputs, overwrite=overwrite))
        yield folder, merge_target


def merge_launched(out, shard: tuple, overwrite: bool, merge: Callable):
    """Wait for every process (gloo barrier), then rank 0 joins the shards into ``out`` with ``merge``.

    ``out`` is rank 0's locked merge target (:func:`output_folders`) or the output path;
    ``merge(shard_dirs, out, overwrite=)`` is the workflow's merge. Returns its result on rank 0,
    ``None`` elsewhere.
    """
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
        result = None
        if shard[0] == 0:
            path = out.path if hasattr(out, "path") else out
            shards = [launched_shard_dir(path, (i, shard[1])) for i in range(shard[1])]
            result = merge(shards, out, overwrite=overwrite)
        dist.barrier()
        return result
    finally:
        if created:
            dist.destroy_process_group()
