"""A callback that saves the module's weights when fit ends, for tests of what last.ckpt holds."""

import lightning as L
import torch


class SaveFinalWeights(L.Callback):
    """``torch.save`` the module's ``state_dict`` to ``path`` in ``on_fit_end``: after every
    ``on_train_end`` (the EMA swap and the checkpoint callbacks' saves included)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.state_dict(), self.path)
