"""A 2-process check of medtl.distributed.all_gather_with_grad, kept apart from the engine tests.

``torch.multiprocessing.spawn`` imports this module in each child; it imports only
torch and medtl.distributed, so that the children start quickly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as torch_dist

    from medtl.distributed import all_gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    rows = 2 + rank  # ranks hold different numbers of rows
    local = torch.full((rows, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(local)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": local.grad}, Path(out_dir) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()
