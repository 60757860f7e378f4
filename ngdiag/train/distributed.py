"""The process group of a training run: one process, or ``torch.distributed`` under torchrun.

Launch the same command with ``torchrun`` or ``accelerate launch``: :class:`Processes` reads
``WORLD_SIZE`` / ``RANK`` and uses ``torch.distributed`` (gloo on CPU, NCCL on GPU), creating the
process group when it does not exist yet; :func:`resolve_device` puts each process on
``cuda:LOCAL_RANK``. With one process every collective is the identity.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch

from ngdiag.core.errors import ConfigError

__all__ = ["Processes", "resolve_device"]

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {name!r} but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


class Processes:
    """The process group: one process, or ``torch.distributed`` under torchrun / accelerate launch.

    Attributes:
        world: the number of processes; rank: this one's (0 writes the files).
        device: this process's device; comm_device: where collectives run (the GPU under NCCL, else CPU).
    """

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available")
            if not dist.is_initialized():
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend)
                self.owns_group = True
            self.world = dist.get_world_size()
            self.rank = dist.get_rank()
        self.comm_device = device if (self.world > 1 and device.type == "cuda") else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, n: int) -> range:
        """This process's contiguous share of ``n`` items (``n`` divides evenly)."""
        per = n // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from all ranks along dim 0, in rank order."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        local = tensor.contiguous().to(self.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average a tensor over ranks (in place for one process: returned unchanged)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        buf = tensor.to(self.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return (buf / self.world).to(tensor.device)

    def mean_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks, in one flat all-reduce (a missing one counts as 0)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 and its result broadcast; its :class:`ConfigError` is raised on every rank."""
        status = None
        if self.is_main:
            try:
                status = ("ok", fn())
            except ConfigError as exc:
                self.broadcast_object(("error", str(exc)))
                raise
        status = self.broadcast_object(status)
        if status[0] == "error":
            raise ConfigError(status[1])
        return status[1]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False
