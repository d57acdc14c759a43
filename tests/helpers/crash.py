"""A callback that fails on purpose, for tests of multi-process failure handling."""

import lightning as L


class CrashOnRank(L.Callback):
    """Raise ``RuntimeError`` on ``rank`` at training step ``step``."""

    def __init__(self, rank: int = 1, step: int = 5) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")
