"""Learning-rate schedules as factories ``schedule(optimizer, ...) -> LRScheduler``.

Configure them as partials (Hydra ``_partial_: true``); the module steps them every
optimizer step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_constant", "warmup_cosine"]


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup from ~0 to the base LR over ``warmup_steps``, then constant."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 10_000, final_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup, then cosine decay to ``final_lr_ratio * base_lr`` at ``total_steps``."""
    if total_steps <= warmup_steps:
        raise ValueError(f"warmup_cosine needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
