"""One DANN or contrastive step under DistributedDataParallel, for test_ddp.py.

``torch.multiprocessing.spawn`` imports this module in each child, so it imports
only torch and the strategy plugins. The same functions build the single-process
reference in the test itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

GLOBAL_BATCH = 8


class _Pool(nn.Module):
    out_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def build_strategy(name: str) -> Any:
    """Build a strategy on a small BatchNorm-free classifier, with the same weights on every call."""
    from medtl.model import Classifier
    from medtl.strategy import StrategyContext
    from medtl_plugins.contrastive import Contrastive
    from medtl_plugins.dann import DANN

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
    model = Classifier(backbone, _Pool(), num_classes=2)
    if name == "dann":
        strategy: Any = DANN(discriminator_width=16)
    else:
        strategy = Contrastive(projection_hidden=16, projection_dim=8)
        # Deterministic views, so that both runs see the same pixels. The random
        # views of real training draw from each process's own generator.
        strategy.views = lambda images: (images, images.flip(-1))
    context = StrategyContext(num_classes=2, epochs=1, steps_per_epoch=1, weight_decay=0.0, lr=0.1)
    strategy.setup(model, context)
    # Evaluation mode fixes BatchNorm (in the discriminator and the projection head)
    # to its running statistics, since SyncBatchNorm needs a GPU. Each process then
    # computes exactly the rows of the global batch that it holds.
    strategy.network.eval()
    return strategy


def global_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    source = {"image": torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=generator),
              "label": torch.tensor([0, 1] * (GLOBAL_BATCH // 2))}
    target = {"image": torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=generator) + 0.5}
    return source, target


def step(strategy: Any, net: nn.Module, source: dict[str, torch.Tensor],
         target: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """Run one train_step and its backward pass, and return the loss and the parameter gradients."""
    loss = strategy.train_step(net, source, target, progress=0.5)["loss"]
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in strategy.network.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def strategy_step_worker(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    strategy = build_strategy(name)
    source, target = global_batch()
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    local_source = {key: value[rows] for key, value in source.items()}
    local_target = {key: value[rows] for key, value in target.items()}
    net = DistributedDataParallel(strategy.network)
    loss, grads = step(strategy, net, local_source, local_target)
    torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"{name}-rank{rank}.pt")
    torch_dist.destroy_process_group()
