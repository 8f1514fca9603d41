"""Reusable adaptation primitives: the gradient reversal layer and its lambda schedule.

From "Domain-Adversarial Training of Neural Networks" (Ganin et al., JMLR 2016,
https://jmlr.org/papers/v17/15-239.html).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["GradientReversal", "GradientReverseLayer", "dann_lambda"]


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-coeff`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.coeff, None


class GradientReverseLayer(nn.Module):
    """A module wrapper of :class:`GradientReversal` whose coefficient the caller sets per step.

    Args:
        coeff: the initial scale lambda of the reversed gradient (default 1).
    """

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor, coeff: float | None = None) -> torch.Tensor:
        return GradientReversal.apply(x, self.coeff if coeff is None else coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def dann_lambda(progress: float, gamma: float = 10.0, max_value: float = 1.0) -> float:
    """Return the adaptation weight ``lambda_p = 2 / (1 + exp(-gamma * p)) - 1``, scaled by ``max_value``.

    ``progress`` p runs from 0 to 1 over training, so lambda rises from 0 to almost
    ``max_value``; the slow start suppresses noisy discriminator gradients early on.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return max_value * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)

