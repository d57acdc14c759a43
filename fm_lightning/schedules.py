"""Learning-rate schedules, stepped every optimizer step.

Configure them as factories of the optimizer: Hydra ``_partial_: true``, or a Lightning CLI
``class_path`` with ``init_args`` (without ``optimizer``).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupConstant", "WarmupCosine", "fit_to_max_steps"]


def _setting(name: str) -> str:
    """A scheduler setting as error messages name it, for fm-train and for fm-cli."""
    return f"model.lr_scheduler.{name} (fm-cli: --model.lr_scheduler.init_args.{name})"


class _Schedule(LambdaLR):
    """A ``LambdaLR`` whose settings (:attr:`settings`) come from the config, not the checkpoint:
    a run resumed with a longer ``trainer.max_steps`` follows the longer schedule."""

    settings: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self.settings})
        # the optimizer, restored first, holds the checkpoint's LR; set this schedule's at its step
        # (LambdaLR.get_lr's formula; calling it outside step() would warn)
        self._last_lr = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


class WarmupConstant(_Schedule):
    """Linear warmup from ``base_lr/warmup_steps`` to the base LR over ``warmup_steps``, then constant."""

    settings = ("warmup_steps",)

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.warmup_steps))


class WarmupCosine(_Schedule):
    """Linear warmup, then cosine decay to ``final_lr_ratio * base_lr`` at ``total_steps``
    (``None``: the trainer's ``max_steps``, set by the module when it builds the schedule)."""

    settings = ("warmup_steps", "total_steps", "final_lr_ratio")

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = 10_000, final_lr_ratio: float = 0.0
    ) -> None:
        if not (math.isfinite(final_lr_ratio) and 0 <= final_lr_ratio <= 1):
            raise ValueError(f"WarmupCosine needs 0 <= final_lr_ratio <= 1, got {final_lr_ratio}; "
                             f"set {_setting('final_lr_ratio')} (0.01: decay to 1% of the learning rate)")
        self.warmup_steps, self.final_lr_ratio = warmup_steps, final_lr_ratio
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps, _setting("total_steps"))
        super().__init__(optimizer, self.factor)

    def set_total_steps(self, total_steps: int, origin: str = "trainer.max_steps") -> None:
        """Set the schedule's length (checked against ``warmup_steps``); ``origin``: the setting it
        comes from, which the error names."""
        if not 0 <= self.warmup_steps < total_steps:
            raise ValueError(
                f"WarmupCosine needs 0 <= warmup_steps < total_steps, got {self.warmup_steps} and {total_steps}; "
                f"lower {_setting('warmup_steps')} or raise {origin}"
            )
        self.total_steps = total_steps

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:  # not set yet: the start of the decay
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_to_max_steps(scheduler: object, max_steps: int) -> None:
    """Give a schedule built with ``total_steps=None`` the trainer's ``max_steps`` (other
    schedulers are left as they are)."""
    if getattr(scheduler, "total_steps", 0) is not None:
        return
    if max_steps < 1:
        raise ValueError(f"{_setting('total_steps')} is null, so it follows trainer.max_steps, which is not set; "
                         "set trainer.max_steps (or total_steps)")
    scheduler.set_total_steps(max_steps)
