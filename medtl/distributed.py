"""Helpers for runs under ``torchrun``: process group setup and collectives.

medtl runs on PyTorch's own distributed engine. ``torchrun`` sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in each process; :func:`init_process_group`
reads them and starts a gloo (CPU) or nccl (CUDA) process group. Every helper here
also works in a plain single process, where the collectives are no-ops, so
strategies can call them unconditionally.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "launched_by_torchrun",
    "init_process_group",
    "destroy_process_group",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_gather_with_grad",
    "all_gather_objects",
    "broadcast_object",
    "broadcast_module_state",
    "any_rank",
]

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """Return whether the environment of ``torchrun`` is present (``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_process_group(device: torch.device) -> bool:
    """Start the default process group when launched by ``torchrun`` with more than one process.

    The backend is nccl for a CUDA device and gloo otherwise. Returns whether a
    process group is active afterwards.
    """
    if dist.is_initialized():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    logger.info("process group started: backend %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sends each rank the gradient of its own rows.

    The gradient of the gathered tensor is summed over ranks with all_reduce and
    sliced, so the backward pass needs only all_reduce, which gloo and nccl both
    support (gloo lacks reduce_scatter).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        local_size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(local_size) for _ in range(world)]
        dist.all_gather(sizes, local_size)
        counts = [int(s.item()) for s in sizes]
        largest = max(counts)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        rank = dist.get_rank()
        ctx.counts = counts
        ctx.start = sum(counts[:rank])
        return torch.cat([g[:n] for g, n in zip(gathered, counts)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank = dist.get_rank()
        return grad[ctx.start: ctx.start + ctx.counts[rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the gradient path.

    Rank order is kept, so this rank's rows sit at offset ``sum(sizes of lower
    ranks)``. The first dimension may differ between ranks; the other dimensions
    must match. In a single process the tensor is returned unchanged.

    The backward pass sums the gradients that every rank's loss sends to this rank's
    rows. Under DistributedDataParallel, which averages parameter gradients, this
    gives the gradient of the mean of the per-rank losses, as in a single process
    that sees the whole global batch. Contrastive losses use it so that negatives
    come from the global batch.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_objects(obj: Any) -> list[Any]:
    """Return the list of ``obj`` from every rank (picklable objects), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """Return whether ``flag`` is true on at least one rank."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], device=device or torch.device("cpu"))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
