"""``fm-cli``: the Lightning CLI over the same classes as ``fm-train``.

Subcommands ``fit``, ``validate``, ``test`` and ``predict``; the datamodule is chosen by class
path (``--data datamodules.toy.ToyDataModule`` or ``datamodules.images.ImageDataModule``).
What data and model share is stated once, on the data, and linked with ``link_arguments``
when the datamodule is built: the net's ``dim`` (MLP) or ``in_channels``/``image_size`` (UNet),
its ``num_classes``, and the module's ``source`` (the datamodule's source, or N(0, I) of the
image shape). A link whose target the chosen net does not take is ignored.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .distributed import check_devices
from .module import FlowMatchingModule
from .reliability import NonFiniteError, check_weights_fit, read_checkpoint

__all__ = ["FlowMatchingCLI", "main"]


def _source_of(datamodule: Any) -> Any:
    """The datamodule's source distribution, or N(0, I) of its sample shape (images)."""
    from datamodules.toy import Gaussian

    source = getattr(datamodule, "source", None)
    return source if source is not None else Gaussian(dim=list(datamodule.shape))


class _LoggerSaveConfigCallback(SaveConfigCallback):
    """Also hands the full resolved config to every logger (e.g. the W&B run config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class FlowMatchingCLI(LightningCLI):
    """LightningCLI with the data-model links described in the module docstring."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer", {})
        check_devices(trainer.get("accelerator"), trainer.get("devices"), trainer.get("precision"))

    def _check_ckpt_path(self) -> None:
        """Refuse a missing, unsafe, foreign or mismatched ``--ckpt_path`` before the run starts."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path is not None and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_weights_fit(self.model, read_checkpoint(ckpt_path)["state_dict"], ckpt_path)

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path

    def add_arguments_to_parser(self, parser) -> None:
        links = {
            "model.net.init_args.dim": lambda dm: getattr(dm, "dim", None),
            "model.net.init_args.in_channels": lambda dm: dm.shape[0] if hasattr(dm, "shape") else None,
            "model.net.init_args.image_size": lambda dm: dm.shape[-1] if hasattr(dm, "shape") else None,
            "model.net.init_args.num_classes": lambda dm: getattr(dm, "num_classes", 0),
            "model.source": _source_of,
        }
        for target, compute in links.items():
            parser.link_arguments("data", target, compute_fn=compute, apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    """Console entry point ``fm-cli``; bad input exits with status 2 and one message."""
    try:
        FlowMatchingCLI(
            FlowMatchingModule,
            subclass_mode_data=True,
            save_config_callback=_LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": False},
            args=args,
        )
    except (ValueError, FileNotFoundError, NonFiniteError) as err:
        print(f"fm-cli: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
