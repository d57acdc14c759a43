"""A two-process (gloo) fit that records each rank's global-RNG draws at every step, for the
per-rank RNG resume test. Lightning's DDP launcher starts rank 1 by running this script again.

Usage: ``python rng_ddp.py OUT_DIR MAX_STEPS [CKPT_PATH]``; writes ``OUT_DIR/draws-{rank}.pt``
({step: float64 tensor of torch, numpy and python draws}) and checkpoints every 3 steps under
``OUT_DIR/ckpt``.
"""

import random
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from fm_lightning.distributed import seed_rank
from fm_lightning.reliability import ModelCheckpoint, RNGStateCallback


class Noisy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.draws: dict[int, torch.Tensor] = {}

    def on_fit_start(self) -> None:
        seed_rank(self.global_rank)  # as FlowMatchingModule: each rank its own streams

    def training_step(self, batch, batch_idx):
        noise = torch.rand(4)
        self.draws[self.global_step] = torch.cat([noise.double(), torch.tensor([np.random.rand(), random.random()],
                                                                                 dtype=torch.float64)])
        return ((self.w - noise) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=1)  # 32 batches per rank: no epoch end in the test


def main(out_dir: str, max_steps: int, ckpt_path: str | None = None) -> None:
    L.seed_everything(0, verbose=False)
    model = Noisy()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=out_dir,
        callbacks=[RNGStateCallback(), ModelCheckpoint(dirpath=Path(out_dir) / "ckpt", every_n_train_steps=3,
                                                        save_top_k=-1, save_last=True)],
    )
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    torch.save(model.draws, Path(out_dir) / f"draws-{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
