"""Callbacks: sample the learned ODE during training, plot it and log quality metrics."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor

from .flow.solve import Solver
from .metrics import wasserstein2

__all__ = ["SampleCallback", "log_image"]

log = logging.getLogger(__name__)


def log_image(trainer: L.Trainer, key: str, path: str) -> None:
    """Hand a saved PNG to every logger that displays images (W&B, TensorBoard)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[path], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            import matplotlib.image

            img = matplotlib.image.imread(path)[..., :3]
            logger.experiment.add_image(key, img, trainer.global_step, dataformats="HWC")


def _scatter_figure(samples: Tensor, target: Tensor, source: Tensor) -> Figure:
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.scatter(*target[:, :2].T, s=2, alpha=0.4, c="tab:gray", label="target")
    ax.scatter(*source[:, :2].T, s=2, alpha=0.4, c="tab:blue", label="source")
    ax.scatter(*samples[:, :2].T, s=2, alpha=0.6, c="tab:orange", label="samples")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_aspect("equal")
    return fig


def _trajectory_figure(traj: Tensor) -> Figure:
    """``traj``: (T, B, d) states; plots dims 0 and 1."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(traj[:, :, 0].numpy(), traj[:, :, 1].numpy(), c="olive", alpha=0.15, lw=0.6)
    ax.scatter(*traj[0, :, :2].T, s=3, c="black", label="x0")
    ax.scatter(*traj[-1, :, :2].T, s=3, c="tab:blue", label="x1")
    ax.legend(loc="upper right", markerscale=3)
    ax.set_aspect("equal")
    return fig


class SampleCallback(L.Callback):
    """Integrates the learned ODE from fixed source points after validation and at fit end.

    Logs ``val/w2`` (exact OT against fresh target samples, when the datamodule has a
    ``target`` distribution) and ``val/nfe``; saves ``samples.png`` and ``trajectories.png`` in
    the run directory (``trainer.default_root_dir``) and hands them to the loggers.

    Args:
        num_samples: number of fixed source points (and fresh target points for W2).
        num_trajectories: how many of them to draw as trajectories.
        every_n_validations: evaluate after every n-th validation run.
        solver: ODE solver (default: the module's).
        steps: fixed-step solver steps (default: the module's).
        atol: adaptive-solver tolerance (default: the module's).
        rtol: adaptive-solver tolerance (default: the module's).
        seed: seed of the fixed source points and the fresh target draws.
    """

    def __init__(
        self,
        num_samples: int = 2000,
        num_trajectories: int = 256,
        every_n_validations: int = 1,
        solver: Solver | None = None,
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        seed: int = 0,
    ) -> None:
        if num_samples < 2 or every_n_validations < 1:
            raise ValueError("SampleCallback needs num_samples >= 2 and every_n_validations >= 1")
        self.num_samples, self.num_trajectories = num_samples, num_trajectories
        self.every_n_validations, self.seed = every_n_validations, seed
        self.solver_kwargs = {"solver": solver, "steps": steps, "atol": atol, "rtol": rtol}
        self._x0: Tensor | None = None
        self._validations = 0
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._x0 = pl_module.source.sample(self.num_samples, torch.Generator().manual_seed(self.seed))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            for key, value in self.evaluate(trainer, pl_module).items():
                pl_module.log(key, value, prog_bar=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._last_step != trainer.global_step:
            metrics = self.evaluate(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        """Sample, compute metrics, and (on rank zero) save and log the plots."""
        self._last_step = trainer.global_step
        sol = pl_module.sample(x0=self._x0, **self.solver_kwargs)
        samples = sol.x.cpu()
        metrics = {"val/nfe": float(sol.nfe)}
        target_dist = getattr(trainer.datamodule, "target", None)
        target = None
        if target_dist is not None:
            gen = torch.Generator().manual_seed(self.seed + 1 + trainer.global_step)
            target = target_dist.sample(self.num_samples, gen)
            metrics["val/w2"] = wasserstein2(samples, target)
        self.last_metrics = metrics
        if trainer.is_global_zero and samples.dim() == 2:
            traj = pl_module.sample(x0=self._x0[: self.num_trajectories], num_saves=50, **self.solver_kwargs)
            out_dir = trainer.default_root_dir
            os.makedirs(out_dir, exist_ok=True)
            figures = {
                "samples": _scatter_figure(samples, target if target is not None else samples, self._x0),
                "trajectories": _trajectory_figure(traj.trajectory.cpu()),
            }
            for name, fig in figures.items():
                path = os.path.join(out_dir, f"{name}.png")
                fig.savefig(path, bbox_inches="tight")
                log_image(trainer, f"samples/{name}", path)
        return metrics
