"""A callback that puts a NaN into the training batch at a chosen step."""

import lightning as L
import torch


class NaNBatchAtStep(L.Callback):
    """Overwrite the first entry of every floating-point tensor of the batch with NaN when
    ``trainer.global_step`` equals ``step`` (whatever the batch holds: ``x0``/``x1``, or a
    regression problem drawn in the loader)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            for value in batch.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    value[(0,) * value.dim()] = float("nan")
