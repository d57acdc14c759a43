"""A callback that puts a NaN into the training batch at a chosen step."""

import lightning as L


class NaNBatchAtStep(L.Callback):
    """Overwrite one target coordinate with NaN when ``trainer.global_step`` equals ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["x1"][0, 0] = float("nan")
