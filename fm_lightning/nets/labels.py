"""Class labels of conditional velocity nets."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def add_label_embedding(h: Tensor, label_emb: nn.Embedding | None, cond: Tensor | None, net: str) -> Tensor:
    """``h`` (B, width) plus the embedding of labels ``cond`` (B,); ``cond=None`` is the null
    class (the embedding's last row, label ``num_classes``). An unconditional net
    (``label_emb=None``) returns ``h`` and refuses labels; ``net`` names it in the message."""
    if label_emb is None:
        if cond is not None:
            raise ValueError(f"this {net} is unconditional (num_classes=0) but got cond labels; set "
                             "model.net.num_classes (e.g. ${data.num_classes}) to train a class-conditional model")
        return h
    if cond is None:
        cond = torch.full((h.shape[0],), label_emb.num_embeddings - 1, dtype=torch.long, device=h.device)
    return h + label_emb(cond.long())
