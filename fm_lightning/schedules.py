"""Learning-rate schedules, stepped every optimizer step.

Configure them as factories of the optimizer: Hydra ``_partial_: true``, or a Lightning CLI
``class_path`` with ``init_args`` (without ``optimizer``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupConstant", "WarmupCosine"]


class WarmupConstant(LambdaLR):
    """Linear warmup from ``base_lr/warmup_steps`` to the base LR over ``warmup_steps``, then constant."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.warmup_steps))


class WarmupCosine(LambdaLR):
    """Linear warmup, then cosine decay to ``final_lr_ratio * base_lr`` at ``total_steps``."""

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 10_000, final_lr_ratio: float = 0.0
    ) -> None:
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"WarmupCosine needs 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}; "
                "lower model.lr_scheduler.warmup_steps or raise trainer.max_steps"
            )
        self.warmup_steps, self.total_steps, self.final_lr_ratio = warmup_steps, total_steps, final_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
