"""Callbacks: sample the learned ODE during training, plot it and log quality metrics.

- :class:`EMA`: Lightning's ``EMAWeightAveraging``, changed to keep the raw weights when fit
  ends and to record which weights the module holds, so that sampling callbacks use the EMA
  weights whatever the callback order.
- :class:`SampleCallback`: 2-D scatter/trajectory plots and W2, or image grids and x_t strips.
- :class:`FIDCallback`: FID of generated images against cached reference statistics.
- :class:`FinalValidation`: validation after the last training step, also off ``val_check_interval``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn

from .flow.solve import Solver, check_solver
from .metrics import FID, check_reference_path, wasserstein2
from .progress import num_examples, track

__all__ = ["SampleCallback", "FIDCallback", "EMA", "FinalValidation", "model_weights", "save_image_grid", "log_image"]

log = logging.getLogger(__name__)


def _log_step(trainer: L.Trainer) -> int:
    """The step Lightning logs the metrics of the last finished batch at (``global_step - 1``:
    validation after step k logs at k - 1); plots and fit-end metrics go there too, so they sit
    beside them, and before the step of a checkpoint written after them."""
    return max(trainer.global_step - 1, 0)


def log_image(trainer: L.Trainer, key: str, path: str) -> None:
    """Hand a saved PNG to every logger that displays images (W&B, TensorBoard)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[path], step=_log_step(trainer))
        elif isinstance(logger, TensorBoardLogger):
            import matplotlib.image

            img = matplotlib.image.imread(path)[..., :3]
            logger.experiment.add_image(key, img, _log_step(trainer), dataformats="HWC")


def _scatter_figure(samples: Tensor, target: Tensor, source: Tensor) -> Figure:
    """Points (N, d): dims 0 and 1 against each other, or histograms of 1-D data."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    for points, color, label, alpha in ((target, "tab:gray", "target", 0.4), (source, "tab:blue", "source", 0.4),
                                        (samples, "tab:orange", "samples", 0.6)):
        if points.shape[1] == 1:
            ax.hist(points[:, 0].numpy(), bins=60, density=True, histtype="step", color=color, label=label)
        else:
            ax.scatter(*points[:, :2].T, s=2, alpha=alpha, c=color, label=label)
    ax.legend(loc="upper right", markerscale=4)
    if samples.shape[1] > 1:
        ax.set_aspect("equal")
    return fig


def _trajectory_figure(traj: Tensor) -> Figure:
    """``traj``: (T, B, d) states at evenly spaced times; plots dim 1 against dim 0 (1-D data:
    the state against t)."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    if traj.shape[-1] == 1:
        t = torch.linspace(0, 1, traj.shape[0])
        ax.plot(t.numpy(), traj[:, :, 0].numpy(), c="olive", alpha=0.15, lw=0.6)
        ax.set_xlabel("t")
        return fig
    ax.plot(traj[:, :, 0].numpy(), traj[:, :, 1].numpy(), c="olive", alpha=0.15, lw=0.6)
    ax.scatter(*traj[0, :, :2].T, s=3, c="black", label="x0")
    ax.scatter(*traj[-1, :, :2].T, s=3, c="tab:blue", label="x1")
    ax.legend(loc="upper right", markerscale=3)
    ax.set_aspect("equal")
    return fig


def save_image_grid(images: Tensor, path: str, nrow: int, min_size: int = 32) -> None:
    """Save images (B, C, H, W) in [-1, 1] as one RGB PNG grid with ``nrow`` images per row;
    images smaller than ``min_size`` pixels are enlarged (nearest neighbour) to stay visible."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(-1, 1)
    scale = max(1, math.ceil(min_size / images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=1, normalize=True, value_range=(-1, 1), pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array, mode="RGB").save(path)


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights, on Lightning's ``EMAWeightAveraging``.

    Lightning's callback keeps the average in an ``AveragedModel``, swaps it into the module for
    validation, writes it to the checkpoint's ``state_dict`` (raw weights under
    ``current_model_state``, both restored on resume) and copies it into the module when fit
    ends. This subclass keeps all of that but the last step, and records which weights the
    module holds (:attr:`swapped`, :meth:`weights`), because:

    - the copy at fit end destroys the raw weights, and ``ModelCheckpoint(save_last=True)``
      writes ``last.ckpt`` after it (checkpoint callbacks run last), so that file's
      ``current_model_state`` held the EMA weights and a resume from it continued training from
      the average. Here the weights are *swapped* at fit end: the module still ends with the EMA
      weights, and checkpoints written while swapped keep both sets in their proper places;
    - sampling callbacks must know which weights are loaded at a given hook, which otherwise
      depends on the callback order.

    Args:
        decay: EMA decay, ``ema = decay*ema + (1 - decay)*w`` after every update.
        update_every_n_steps: update every n optimizer steps.
        update_starting_at_step: first optimizer step (0-based) that updates; before it the EMA
            copies the weights.
        device: keep the EMA copy on this device (``"cpu"`` saves accelerator memory); default
            the module's.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
    ) -> None:
        if not 0 < decay < 1 or update_every_n_steps < 1:
            raise ValueError(f"EMA needs 0 < decay < 1 and update_every_n_steps >= 1, got {decay}, {update_every_n_steps}")
        super().__init__(
            device=device, decay=decay, update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay, self.device = decay, device
        self.swapped = False  # the module holds the EMA weights (the average model the raw ones)
        self._swapped_for_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        start = self.update_starting_at_step
        if start is not None and trainer.global_step - 1 < start and self._average_model is not None:
            self._average_model.n_averaged.zero_()  # the next update copies the weights
            self._average_model.update_parameters(pl_module)
            return
        super().on_train_batch_end(trainer, pl_module, *args)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # a fresh average, copied from the module's current weights
            self.swapped = False

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        super()._swap_models(pl_module)
        self.swapped = not self.swapped

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped_for_validation = self._average_model is not None and not self.swapped
        if self._swapped_for_validation:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped_for_validation:
            self._swap_models(pl_module)
            self._swapped_for_validation = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and not self.swapped:
            self._swap_models(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.swapped and "current_model_state" in checkpoint:
            # The module holds the EMA weights and the average model the raw ones: trade places.
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"], checkpoint["state_dict"]
            )

    @contextlib.contextmanager
    def weights(self, pl_module: L.LightningModule, ema: bool = True) -> Iterator[None]:
        """Within the block, ``pl_module`` holds the EMA (``ema=True``) or raw weights."""
        if self._average_model is None or self.swapped == ema:
            yield
            return
        self._swap_models(pl_module)
        try:
            yield
        finally:
            self._swap_models(pl_module)


class FinalValidation(L.Callback):
    """Validates after the last training step (``max_steps``, or the last batch of ``max_epochs``)
    when it is not on ``val_check_interval``, so that a run always ends with its validation
    metrics (a 300-step run validating every 1000 steps had no ``val/loss``). It asks Lightning to
    stop there (``trainer.should_stop``), and Lightning validates before a requested stop."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        epochs = trainer.max_epochs
        last_batch = (epochs is not None and 0 <= epochs <= trainer.current_epoch + 1
                      and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if 0 <= trainer.max_steps <= trainer.global_step or last_batch:
            trainer.should_stop = True


_warned_weight_averaging = False


@contextlib.contextmanager
def model_weights(trainer: L.Trainer, pl_module: L.LightningModule, ema: bool = True) -> Iterator[None]:
    """Within the block, ``pl_module`` holds the EMA weights (if an :class:`EMA` callback is
    training them and ``ema``) or the raw ones."""
    global _warned_weight_averaging
    callback = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
    if callback is None:
        if not _warned_weight_averaging and any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks):
            _warned_weight_averaging = True
            rank_zero_warn(
                "a WeightAveraging callback other than fm_lightning.callbacks.EMA is in use; sampling callbacks "
                "cannot tell which weights the module holds and use whatever is loaded"
            )
        yield
        return
    with callback.weights(pl_module, ema):
        yield


def _check_guidance(pl_module: Any, guidance: float | None, callback: str) -> None:
    """Refuse, before training, a guidance scale the module cannot sample with. ``callback``
    names the callback in the message (it does not know its config key)."""
    try:
        pl_module._sampling_labels(_fixed_labels(pl_module, 1), 1, guidance)
    except ValueError as err:
        raise ValueError(f"{callback}: {err} (set this callback's guidance to null)") from None


def _nth_validation(callback: Any) -> bool:
    """Count a validation of fit on ``callback``; whether it is an ``every_n_validations``-th one."""
    callback._validations += 1
    return callback._validations % callback.every_n_validations == 0


def _fixed_labels(pl_module: Any, n: int) -> Tensor | None:
    """``0, 1, ..., K-1, 0, 1, ...`` (n,) for a conditional model with K classes, else ``None``."""
    k = int(getattr(pl_module, "num_classes", 0) or 0)
    return torch.arange(n) % k if k else None


class SampleCallback(L.Callback):
    """Integrates the learned ODE from fixed source points after validation and at fit end.
    ``trainer.validate`` logs the same metrics, but writes no plots (they stay those of fit).

    Logs ``val/nfe`` and, for 2-D data, ``val/w2`` (exact OT against fresh target samples, when
    the datamodule has a ``target`` distribution) and the straightness of the learned flow:
    ``val/path_energy`` (``PE = mean int_0^1 ||v(x_t, t)||^2 dt`` from the fixed source points) and
    ``val/npe`` (``|PE - W2^2| / W2^2``, W2 between the source points and the target samples;
    Tong et al.). In ``dirpath`` it saves, and hands to the loggers:

    - 2-D data: ``samples.png`` and ``trajectories.png`` (``samples/samples``, ``samples/trajectories``);
    - images: ``grid.png`` (``samples/grid``), and with ``num_trajectories > 0`` a strip of
      ``x_t`` along the trajectory, one row per sample (``trajectory.png``, ``samples/trajectory``).

    Class-conditional models get fixed labels ``0, 1, ..., K-1, 0, ...`` (one class per grid
    column). Sampling uses the EMA weights when an :class:`EMA` callback trains them.

    Args:
        num_samples: number of fixed source points (and fresh target points for W2).
        num_trajectories: how many of them to draw as trajectories.
        every_n_validations: evaluate after every n-th validation run.
        solver: ODE solver (default: the module's).
        steps: fixed-step solver steps (default: the module's).
        atol: adaptive-solver tolerance (default: the module's).
        rtol: adaptive-solver tolerance (default: the module's).
        seed: seed of the fixed source points and the fresh target draws.
        guidance: classifier-free guidance scale for conditional models (default 1).
        num_saves: trajectory points (2-D plot; default 50) or strip frames (images; default 8).
        use_ema: sample with the EMA weights when there are any (else the raw ones).
        straightness: log ``val/path_energy`` and ``val/npe`` (unconditional 2-D models).
        nfe_sweep: when fit ends, sweep quality (W2) against NFE over euler / midpoint / rk4 /
            dopri5 settings (:func:`fm_lightning.evaluate.sweep_grid`) from the fixed source points;
            writes ``nfe_sweep.csv`` and ``nfe_sweep.png`` into the run directory and logs the
            plot (``samples/nfe_sweep_plot``) and a table (``samples/nfe_sweep``; W&B). Unconditional point data only; image
            models are swept by ``fm-eval --sweep``.
        dirpath: folder of the plots (``fm-train``: the run directory). Default, as Lightning's
            ``ModelCheckpoint``: the logger's version folder (``trainer.log_dir``), so that runs
            sharing a ``default_root_dir`` keep their own plots.

    Attributes:
        metric_keys: the keys of the metrics it logs (known after ``setup``).
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
        guidance: float | None = None,
        num_saves: int | None = None,
        use_ema: bool = True,
        straightness: bool = True,
        nfe_sweep: bool = False,
        dirpath: str | None = None,
    ) -> None:
        if num_samples < 2 or every_n_validations < 1:
            raise ValueError("SampleCallback needs num_samples >= 2 and every_n_validations >= 1")
        if num_saves is not None and num_saves < 2:
            raise ValueError(f"SampleCallback num_saves must be >= 2, got {num_saves}")
        self.num_samples, self.num_trajectories = num_samples, num_trajectories
        self.every_n_validations, self.seed = every_n_validations, seed
        self.solver_kwargs = {"solver": solver, "steps": steps, "atol": atol, "rtol": rtol}
        self.guidance, self.num_saves, self.use_ema = guidance, num_saves, use_ema
        self.straightness, self.nfe_sweep, self.dirpath = straightness, nfe_sweep, dirpath
        self._x0: Tensor | None = None
        self._cond: Tensor | None = None
        self._validations = 0
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}
        self.metric_keys: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        # bad solver settings fail here, before training, not at the first validation
        check_solver(**{k: pl_module.hparams[k] if v is None else v for k, v in self.solver_kwargs.items()})
        self._x0 = pl_module.source.sample(self.num_samples, torch.Generator().manual_seed(self.seed))
        self._cond = _fixed_labels(pl_module, self.num_samples)
        _check_guidance(pl_module, self.guidance, "SampleCallback")
        target = self._x0.dim() != 4 and getattr(trainer.datamodule, "target", None) is not None
        straight = target and self.straightness and self._cond is None and self._x0.dim() == 2
        self.metric_keys = {"val/nfe"} | ({"val/w2"} if target else set()) | (
            {"val/path_energy", "val/npe"} if straight else set())
        # trainer.log_dir is collective (a broadcast): read it here, on every rank.
        self._dir = self.dirpath or trainer.log_dir or trainer.default_root_dir
        self._checkpoint_step: int | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # trainer.validate(ckpt_path=...) restores no loops (global_step is 0): keep the step that
        # seeds the target draw, so that it gives fit's val/w2 of that checkpoint.
        self._checkpoint_step = checkpoint.get("global_step")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":  # trainer.validate: the metrics of fit's validations, no plots
            metrics = self.evaluate(trainer, pl_module, plots=False)
        elif _nth_validation(self):
            metrics = self.evaluate(trainer, pl_module)
        else:
            return
        for key, value in metrics.items():
            pl_module.log(key, value, prog_bar=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._last_step != trainer.global_step:
            metrics = self.evaluate(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=_log_step(trainer))
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.nfe_sweep:
            self._nfe_sweep(trainer, pl_module)

    @torch.no_grad()
    def _nfe_sweep(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Quality (W2) vs NFE at fit end; see the ``nfe_sweep`` argument."""
        from .evaluate import log_sweep_table, nfe_sweep, write_sweep

        target_dist = getattr(trainer.datamodule, "target", None)
        if self._x0.dim() != 2 or target_dist is None or self._cond is not None:
            rank_zero_warn("SampleCallback(nfe_sweep=True) needs unconditional point data with a target "
                           "distribution; skipping the sweep (use fm-eval --sweep for images)")
            return
        if not trainer.is_global_zero:
            return
        target = target_dist.sample(self.num_samples, torch.Generator().manual_seed(self.seed + 1))

        def sample(setting: Any) -> tuple[Tensor, float]:
            sol = pl_module.sample(x0=self._x0, **setting.kwargs())
            return sol.x.cpu(), float(sol.nfe)

        with model_weights(trainer, pl_module, self.use_ema):
            rows = nfe_sweep(sample, lambda x: {"w2": wasserstein2(x, target)},
                             progress=trainer.progress_bar_callback is not None)
        _, png = write_sweep(rows, self._out_dir(), "w2")
        log_image(trainer, "samples/nfe_sweep_plot", png)
        log_sweep_table(trainer.loggers, rows, key="samples/nfe_sweep")

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: Any, plots: bool = True) -> dict[str, float]:
        """Sample and compute the metrics; with ``plots``, rank zero also saves and logs the plots."""
        self._last_step = trainer.global_step
        plots = plots and trainer.is_global_zero
        with model_weights(trainer, pl_module, self.use_ema):
            if self._x0.dim() == 4:
                return self._evaluate_images(trainer, pl_module, plots)
            return self._evaluate_points(trainer, pl_module, plots)

    def _sample(self, pl_module: Any, n: int | None = None, **kwargs: Any):
        cond = None if self._cond is None else self._cond[:n]
        return pl_module.sample(x0=self._x0[:n], cond=cond, guidance=self.guidance, **self.solver_kwargs, **kwargs)

    def _out_dir(self) -> str:
        os.makedirs(self._dir, exist_ok=True)
        return self._dir

    def _save(self, trainer: L.Trainer, name: str, key: str, write: Any) -> None:
        out_dir = self._out_dir()
        path = os.path.join(out_dir, name)
        write(path)
        log_image(trainer, key, path)

    def _evaluate_images(self, trainer: L.Trainer, pl_module: Any, plots: bool) -> dict[str, float]:
        sol = self._sample(pl_module)
        metrics = {"val/nfe": float(sol.nfe)}
        self.last_metrics = metrics
        if plots:
            k = int(getattr(pl_module, "num_classes", 0) or 0)
            nrow = k if k else math.ceil(math.sqrt(self.num_samples))
            self._save(trainer, "grid.png", "samples/grid", lambda p: save_image_grid(sol.x, p, nrow))
            if self.num_trajectories > 0:
                frames = self.num_saves or 8
                traj = self._sample(pl_module, self.num_trajectories, num_saves=frames).trajectory
                strip = traj.transpose(0, 1).flatten(0, 1)  # (n * frames, C, H, W), one row per sample
                self._save(trainer, "trajectory.png", "samples/trajectory",
                           lambda p: save_image_grid(strip, p, traj.shape[0]))
        return metrics

    def _straightness(self, pl_module: Any, target: Tensor) -> dict[str, float]:
        """``val/path_energy`` of the flow from the fixed source points, and ``val/npe``."""
        from .flow.likelihood import normalized_path_energy, path_energy

        kwargs = {k: pl_module.hparams[k] if v is None else v for k, v in self.solver_kwargs.items()}
        was_training = pl_module.net.training
        pl_module.net.eval()
        try:
            energy = path_energy(pl_module.net, self._x0.to(pl_module.device), **kwargs).mean
        finally:
            pl_module.net.train(was_training)
        w2_squared = wasserstein2(self._x0, target) ** 2
        return {"val/path_energy": energy, "val/npe": normalized_path_energy(energy, w2_squared)}

    def _evaluate_points(self, trainer: L.Trainer, pl_module: Any, plots: bool) -> dict[str, float]:
        sol = self._sample(pl_module)
        samples = sol.x.cpu()
        metrics = {"val/nfe": float(sol.nfe)}
        target_dist = getattr(trainer.datamodule, "target", None)
        target = None
        if target_dist is not None:
            fit = trainer.state.fn == "fit" or self._checkpoint_step is None
            gen = torch.Generator().manual_seed(self.seed + 1 + (trainer.global_step if fit else self._checkpoint_step))
            target = target_dist.sample(self.num_samples, gen)
            from datamodules.toy import in_data_units  # (a points file's own units)

            metrics["val/w2"] = wasserstein2(in_data_units(target_dist, samples), in_data_units(target_dist, target))
            if "val/npe" in self.metric_keys:
                metrics.update(self._straightness(pl_module, target))
        self.last_metrics = metrics
        if plots and samples.dim() == 2:
            traj = self._sample(pl_module, self.num_trajectories, num_saves=self.num_saves or 50)
            figures = {
                "samples": _scatter_figure(samples, target if target is not None else samples, self._x0),
                "trajectories": _trajectory_figure(traj.trajectory.cpu()),
            }
            for name, fig in figures.items():
                self._save(trainer, f"{name}.png", f"samples/{name}", lambda p, fig=fig: fig.savefig(p, bbox_inches="tight"))
        return metrics


class FIDCallback(L.Callback):
    """FID of generated images against reference statistics of real ones (:class:`~fm_lightning.metrics.FID`).

    Reference statistics come from ``reference`` (an ``.npz`` with ``mu`` and ``sigma``) when
    that file exists. Otherwise they are computed once, in ``setup``, from the datamodule's
    ``reference_dataloader()`` (for :class:`~datamodules.images.ImageDataModule`, the whole
    training split without flips) and, if ``reference`` is a path, cached there for later runs.

    Under DDP every rank generates its share of ``num_samples`` (different noise per rank) and
    the feature statistics are summed over ranks before the distance is taken. Sampling uses
    the EMA weights when an :class:`EMA` callback trains them (``use_ema``), in fp32.

    Args:
        num_samples: generated images (over all ranks).
        batch_size: images integrated at once per rank.
        reference: cache file of the reference statistics, or ``None`` to compute them each run.
        num_reference: use only the first n reference images (``None``: all of them).
        feature: ``2048`` for the standard Inception-v3 pool features, or an injected
            ``nn.Module`` (see :class:`~fm_lightning.metrics.FID`).
        weights_path: local Inception weights file for offline machines.
        solver, steps, atol, rtol: ODE solver settings (default: the module's).
        guidance: classifier-free guidance scale for conditional models (labels are balanced:
            image ``i`` gets class ``i % K``).
        every_n_validations: also evaluate after every n-th validation of fit, and in every
            ``trainer.validate`` (0: only at fit end).
        at_train_end: evaluate when fit ends.
        key: metric name; the mean NFE per sample batch goes to ``{key}_nfe``.
        seed: seed of the noise (rank r uses ``seed + r``).
        use_ema: sample with the EMA weights when there are any.
        progress: show progress bars for the reference statistics and the samples (rank zero,
            interactive consoles, and only when the trainer has a progress bar).

    Attributes:
        metric_keys: the keys of the metrics it logs.
    """

    def __init__(
        self,
        num_samples: int = 50_000,
        batch_size: int = 500,
        reference: str | None = None,
        num_reference: int | None = None,
        feature: int | nn.Module = 2048,
        weights_path: str | None = None,
        solver: Solver | None = None,
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        guidance: float | None = None,
        every_n_validations: int = 0,
        at_train_end: bool = True,
        key: str = "val/fid",
        seed: int = 0,
        use_ema: bool = True,
        progress: bool = True,
    ) -> None:
        if num_samples < 2 or batch_size < 1 or every_n_validations < 0:
            raise ValueError("FIDCallback needs num_samples >= 2, batch_size >= 1 and every_n_validations >= 0")
        if num_reference is not None and num_reference < 2:
            raise ValueError(f"num_reference must be >= 2 or null, got {num_reference}")
        self.num_samples, self.batch_size, self.reference, self.num_reference = num_samples, batch_size, reference, num_reference
        self.feature, self.weights_path = feature, weights_path
        self.solver_kwargs = {"solver": solver, "steps": steps, "atol": atol, "rtol": rtol}
        self.guidance, self.every_n_validations, self.at_train_end = guidance, every_n_validations, at_train_end
        self.key, self.seed, self.use_ema, self.progress = key, seed, use_ema, progress
        self.fid: FID | None = None
        self._validations = 0
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}
        self.metric_keys = {key, f"{key}_nfe"}

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.fid is not None:
            return
        _check_guidance(pl_module, self.guidance, f"FIDCallback (key {self.key})")
        check_reference_path(self.reference)
        datamodule = trainer.datamodule
        # Rank zero decides, so that every rank takes the same (collective) path.
        cached = self.reference is not None and trainer.strategy.broadcast(os.path.isfile(self.reference))
        can_compute = hasattr(datamodule, "reference_dataloader")
        if not cached and not can_compute:
            where = f"reference file {self.reference!r} does not exist" if self.reference else "no reference file is set"
            raise ValueError(
                f"FID needs reference statistics, but {where} and the datamodule ({type(datamodule).__name__}) "
                "cannot provide real images to compute them; set the FID callback's reference to an .npz "
                "with mu and sigma, or train on image data (e.g. experiment=digits)"
            )
        fid = FID(self.feature, self.weights_path).to(pl_module.device)
        source = getattr(datamodule, "reference_name", None)
        if cached:
            num_images = num_examples(datamodule.reference_dataloader(limit=self.num_reference)) if can_compute else None
            fid.load_reference(self.reference, source, num_images, rank=trainer.global_rank)
            rank_zero_info(f"FID reference statistics: {self.reference}")
        else:
            self._compute_reference(fid, trainer, datamodule)
            if self.reference is not None:
                fid.save_reference(self.reference, source or type(datamodule).__name__, rank=trainer.global_rank)
                trainer.strategy.barrier("fid_reference_saved")
                rank_zero_info(f"FID reference statistics cached in {self.reference}")
        self.fid = fid

    def _compute_reference(self, fid: FID, trainer: L.Trainer, datamodule: Any) -> None:
        loader = datamodule.reference_dataloader(
            batch_size=self.batch_size, rank=trainer.global_rank, world_size=trainer.world_size, limit=self.num_reference
        )
        fid.update_reference(loader, progress=self._show_progress(trainer))

    def _show_progress(self, trainer: L.Trainer) -> bool:
        return self.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not self.every_n_validations:
            return
        # trainer.validate always evaluates (the FID that fit's validations log)
        if trainer.state.fn == "fit" and not _nth_validation(self):
            return
        for key, value in self.evaluate(trainer, pl_module).items():
            pl_module.log(key, value)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.at_train_end and self._last_step != trainer.global_step:
            metrics = self.evaluate(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=_log_step(trainer))
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, float]:
        """Generate this rank's share of ``num_samples``, then the FID over all ranks."""
        self._last_step = trainer.global_step
        self.fid.to(pl_module.device)
        rank, world = trainer.global_rank, trainer.world_size
        ids = torch.arange(rank, self.num_samples, world)
        gen = torch.Generator().manual_seed(self.seed + rank)
        labels = _fixed_labels(pl_module, self.num_samples)
        nfes = []
        with model_weights(trainer, pl_module, self.use_ema):
            chunks = track(ids.split(self.batch_size), "FID samples", len(ids), advance=len, unit="img",
                           enabled=self._show_progress(trainer))
            for chunk in chunks:
                x0 = pl_module.source.sample(len(chunk), gen)
                cond = None if labels is None else labels[chunk]
                sol = pl_module.sample(x0=x0, cond=cond, guidance=self.guidance, **self.solver_kwargs)
                self.fid.update(sol.x, real=False)
                nfes.append(sol.nfe)
        self.last_metrics = {self.key: self.fid.compute(), f"{self.key}_nfe": float(sum(nfes) / max(len(nfes), 1))}
        return self.last_metrics
