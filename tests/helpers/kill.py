"""A callback that SIGKILLs its own process at a chosen step, for crash-and-resume tests."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """``SIGKILL`` the training process when ``trainer.global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
