"""``fm-cli``: the Lightning CLI over the same classes as ``fm-train``.

Subcommands ``fit``, ``validate``, ``test`` and ``predict``; the datamodule is chosen by class
path (``--data datamodules.toy.ToyDataModule`` or ``datamodules.images.ImageDataModule``).
What data and model share is stated once, on the data, and linked with ``link_arguments``
when the datamodule is built: the net's ``dim`` (MLP) or ``in_channels``/``image_size`` (UNet),
its ``num_classes``, and the module's ``source`` (the datamodule's source, or N(0, I) of the
image shape). A link whose target the chosen net does not take is ignored; a value given for a
linked key that differs from the data's is refused.

Every run writes into a new folder: the first logger's version folder (TensorBoard, the
default, or CSV), else a new ``<default_root_dir>/lightning_logs/version_N``. ``--ckpt_path``
is read safely and must fit the configured model; the config is used as given (Lightning would
write the checkpoint's hyperparameters over it). ``predict`` saves ``samples.npz``.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .distributed import check_devices
from .module import FlowMatchingModule
from .reliability import NonFiniteError, check_weights_fit, find_last_checkpoint, read_checkpoint

__all__ = ["FlowMatchingCLI", "main"]


def _source_of(datamodule: Any) -> Any:
    """The datamodule's source distribution, or N(0, I) of its sample shape (images)."""
    from datamodules.toy import Gaussian

    source = getattr(datamodule, "source", None)
    return source if source is not None else Gaussian(dim=list(datamodule.shape))


def _new_version_dir(root: str) -> str:
    """``root/version_N``, N one above the highest there (numbered as TensorBoard's logger does)."""
    taken = [int(p.name[8:]) for p in Path(root).glob("version_*") if p.name[8:].isdigit()]
    return os.path.join(root, f"version_{max(taken, default=-1) + 1}")


class _LoggerSaveConfigCallback(SaveConfigCallback):
    """Also hands the full resolved config to every logger (e.g. the W&B run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class _RunTrainer(Trainer):
    """Lightning's ``Trainer`` whose ``log_dir`` is ``run_dir`` once ``fm-cli`` has chosen one."""

    run_dir: str | None = None

    @property
    def log_dir(self) -> str | None:
        return super().log_dir if self.run_dir is None else self.strategy.broadcast(self.run_dir)


class _SampleWriter(BasePredictionWriter):
    """Saves what ``predict`` samples to ``samples.npz`` in the run folder: ``samples`` (N, *shape),
    and ``labels`` (N,) for labelled data (one file per rank under DDP)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._samples: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        self._samples.append(prediction.cpu())
        if batch.get("cond") is not None:
            self._labels.append(batch["cond"].cpu())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        name = "samples.npz" if trainer.world_size == 1 else f"samples_rank{trainer.global_rank}.npz"
        path = os.path.join(trainer.log_dir, name)
        samples = torch.cat(self._samples).numpy()
        np.savez(path, samples=samples, **({"labels": torch.cat(self._labels).numpy()} if self._labels else {}))
        print(f"wrote {len(samples)} samples to {path}")
        self._samples, self._labels = [], []


_LINKS = {  # target: (its value from the datamodule, the data's argument that sets it)
    "model.net.init_args.dim": (lambda dm: getattr(dm, "dim", None), "dim"),
    "model.net.init_args.in_channels": (lambda dm: dm.shape[0] if hasattr(dm, "shape") else None, "channels"),
    "model.net.init_args.image_size": (lambda dm: dm.shape[-1] if hasattr(dm, "shape") else None, "image_size"),
    "model.net.init_args.num_classes": (lambda dm: getattr(dm, "num_classes", 0), "num_classes"),
    "model.source": (_source_of, "source"),
}


class FlowMatchingCLI(LightningCLI):
    """LightningCLI with the data-model links, run folders and checkpoint checks described in the
    module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", _RunTrainer)
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Parse, then read ``--ckpt_path`` with :func:`read_checkpoint`: a missing, unreadable,
        unsafe or foreign file is refused before anything is built. ``last`` is the newest
        ``checkpoints/last.ckpt`` under ``<default_root_dir>/lightning_logs`` (a run's own folder is new)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        parse = parser.parse_object if isinstance(args, (dict, Namespace)) else parser.parse_args
        given = parse(args, defaults=False)  # only what config files and flags set
        self._given = given[subcommand] if subcommand else given
        config = self.config[subcommand] if subcommand else {}
        path = config.get("ckpt_path")
        if path == "last":
            runs = os.path.join(config["trainer"]["default_root_dir"] or os.getcwd(), "lightning_logs")
            path = config["ckpt_path"] = str(find_last_checkpoint(runs))
        lightning_name = path in ("best", "hpc") or str(path).lower().split(":")[0] == "registry"
        self._ckpt_weights = None if path is None or lightning_name else read_checkpoint(path)["state_dict"]

    def _parse_ckpt_path(self) -> None:
        """Keep the config as given: Lightning's version writes the checkpoint's model
        hyperparameters over it, silently replacing what the user set."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer", {})
        check_devices(trainer.get("accelerator"), trainer.get("devices"), trainer.get("precision"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer; without a versioned first logger (TensorBoard, CSV) the run gets a new
        ``<default_root_dir>/lightning_logs/version_N``, for ``log_dir`` and the checkpoints."""
        trainer = super().instantiate_trainer(**kwargs)
        if not (trainer.loggers and isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger))):
            trainer.run_dir = _new_version_dir(os.path.join(trainer.default_root_dir, "lightning_logs"))
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = os.path.join(trainer.run_dir, "checkpoints")
        return trainer

    def _before_run(self) -> None:
        """Refuse, before anything is written, a checkpoint that does not fit the model, and a run
        folder that holds an earlier run or cannot be created."""
        if self._ckpt_weights is not None:
            check_weights_fit(self.model, self._ckpt_weights, self.config_init[self.subcommand]["ckpt_path"])
            self._ckpt_weights = None
        log_dir = self.trainer.log_dir
        if os.path.exists(os.path.join(log_dir, "config.yaml")):
            raise ValueError(
                f"{log_dir} already holds a run (its config.yaml); leave the logger's version unset, or give "
                "a new one, so that this run gets a folder of its own"
            )
        if self.trainer.is_global_zero:
            try:
                os.makedirs(log_dir, exist_ok=True)
            except OSError as err:
                raise ValueError(
                    f"cannot create the run folder {log_dir} ({err.strerror}); set --trainer.default_root_dir "
                    "(or the logger's save_dir) to a writable folder"
                ) from None

    before_fit = before_validate = before_test = before_predict = _before_run

    def after_predict(self) -> None:
        if not sum(self.trainer.num_predict_batches):
            raise ValueError(
                "predict ran on no batches, so it saved no samples; it samples the data's validation split, so give "
                "the data one (e.g. --data.init_args.val_fraction=0.1) and keep trainer.limit_predict_batches > 0"
            )

    def instantiate_classes(self) -> None:
        """Instantiate, then refuse a value given for a linked key that is not the data's (the link
        would silently replace it)."""
        super().instantiate_classes()
        for target, (compute, data_key) in _LINKS.items():
            given = self._given.get(target)
            if given is not None and given != (linked := compute(self.datamodule)):
                settable = data_key in inspect.signature(type(self.datamodule)).parameters
                remedy = f"set data.init_args.{data_key} instead" if settable else "this data has no such setting"
                raise ValueError(
                    f"{target}={given} differs from {linked}, the value linked from the data; leave it out ({remedy})"
                )

    def add_arguments_to_parser(self, parser) -> None:
        for target, (compute, _) in _LINKS.items():
            parser.link_arguments("data", target, compute_fn=compute, apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    """Console entry point ``fm-cli``; bad input exits with status 2 and one message."""
    try:
        FlowMatchingCLI(
            FlowMatchingModule,
            subclass_mode_data=True,
            save_config_callback=_LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": False},
            trainer_defaults={"callbacks": [_SampleWriter()]},
            args=args,
        )
    except (ValueError, FileNotFoundError, NonFiniteError, MisconfigurationException) as err:
        print(f"fm-cli: error: {_cause(str(err))}", file=sys.stderr)
        sys.exit(2)


def _cause(message: str) -> str:
    """The class's own error out of jsonargparse's report on a subclass argument (``--data``),
    which lists it among the failed alternatives of ``Optional[LightningDataModule]``."""
    if not message.startswith("Does not validate against any of the Union subtypes"):
        return message
    causes = [line[4:] for line in message.splitlines() if line.startswith("  - ") and "NoneType" not in line]
    named = re.search(r"class_path='([^']+)'", message)
    return f"{named[1] if named else 'data'}: {causes[0]}" if causes else message


if __name__ == "__main__":
    main()
