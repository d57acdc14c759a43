"""Time-conditioned MLP for low-dimensional data."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ACTIVATIONS"]

Activation = Literal["selu", "silu", "relu", "gelu", "tanh", "elu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "selu": nn.SELU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU,
}


class MLP(nn.Module):
    """``v = MLP([x, t])``: ``depth`` hidden layers of ``width`` units.

    Args:
        dim: data dimension ``d``; input (B, d) and output (B, d).
        width: hidden units per layer.
        depth: number of hidden layers (>= 1).
        activation: nonlinearity between layers.
        num_classes: if > 0, a learned embedding of ``cond`` (B,) labels is added to the
            first hidden layer; label ``num_classes`` is the null (unconditional) class.
    """

    def __init__(
        self, dim: int = 2, width: int = 256, depth: int = 3, activation: Activation = "selu", num_classes: int = 0
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP needs dim, width and depth >= 1, got {dim}, {width}, {depth}")
        self.dim, self.width, self.depth, self.activation, self.num_classes = dim, width, depth, activation, num_classes
        act = ACTIVATIONS[activation]
        self.inp = nn.Linear(dim + 1, width)
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        layers: list[nn.Module] = [act()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), act()]
        layers.append(nn.Linear(width, dim))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP(dim={self.dim}) expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        h = self.inp(torch.cat([x, t.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)], 1))
        if cond is not None:
            if self.label_emb is None:
                raise ValueError("this MLP is unconditional (num_classes=0) but got cond labels")
            h = h + self.label_emb(cond)
        return self.body(h)
