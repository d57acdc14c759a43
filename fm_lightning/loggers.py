"""Loggers: a W&B logger that keeps global state out of the process."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["CSVLogger", "TensorBoardLogger", "WandbLogger", "wandb_has_credentials"]

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True if W&B can log in: ``WANDB_API_KEY`` is set or ``~/.netrc`` has the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, with these changes.

    * ``offline=True`` is passed to ``wandb.init(mode="offline")`` instead of exporting
      ``WANDB_MODE`` into the process environment, so it cannot leak into later runs or tests.
      The run is written under ``save_dir`` (``<run dir>/wandb/offline-run-*``); sync it later
      with ``wandb sync``.
    * Online logging without credentials (no ``WANDB_API_KEY``, no ``wandb login``) falls
      back to offline with a warning, so a training run is never lost to a login prompt.
    * ``WANDB_MODE=offline`` in the environment is respected as usual; ``WANDB_MODE=disabled``
      (or ``WANDB_DISABLED=true``) turns W&B off whatever ``offline`` says.
    * ``log_model`` (checkpoints as artifacts) is refused for any offline run.
    * ``tags="toy"`` is one tag; settings ``wandb.init`` refuses are one ``ValueError``.

    Args: as :class:`lightning.pytorch.loggers.WandbLogger` (``project``, ``entity``, ``name``,
    ``group``, ``tags``, ``offline``, ``log_model``, ``save_dir``, ...).
    """

    def __init__(self, *args, offline: bool = False, log_model: bool | str = False, **kwargs) -> None:
        env_mode = os.environ.get("WANDB_MODE", "").lower()
        why = "; set log_model=false, or log online (offline=false, and WANDB_MODE not offline)"
        if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
            offline, log_model, kwargs["mode"] = False, False, "disabled"  # nothing is written
        elif not offline and env_mode not in ("offline", "dryrun") and not wandb_has_credentials():
            why = ", but W&B has no credentials; run `wandb login` (or set WANDB_API_KEY), or set log_model=false"
            if not log_model:
                log.warning(
                    "W&B has no credentials (set WANDB_API_KEY or run `wandb login`); logging OFFLINE to the run "
                    "directory instead. Sync later with `wandb sync <run dir>/wandb/offline-run-*`."
                )
            offline = True
        if log_model and (offline or env_mode in ("offline", "dryrun")):
            raise ValueError(f"logger.wandb.log_model needs an online W&B run{why}")
        if offline:
            kwargs["mode"] = "offline"
        if isinstance(kwargs.get("tags"), str):  # tags=toy: one tag, not the letters t, o, y
            kwargs["tags"] = [kwargs["tags"]]
        super().__init__(*args, offline=False, log_model=log_model, **kwargs)
        self.offline_mode, self.disabled = offline, kwargs.get("mode") == "disabled"

    @property
    def experiment(self):
        """The W&B run, started on first use; settings W&B refuses (a project name with ``/``) are
        one ``ValueError``, not a traceback from inside ``wandb.init``."""
        try:
            return super().experiment
        except Exception as err:
            from wandb.errors import UsageError  # imported only on failure: this runs at every log call

            if not isinstance(err, UsageError):
                raise
            raise ValueError(f"logger.wandb: {err}; fix the logger.wandb settings") from None

    @rank_zero_only
    def save_run_id(self, path: str | os.PathLike) -> None:
        """Start the W&B run and write its id to ``path``, from where a resume of the run reads it
        (unless W&B is disabled: then there is no run to resume)."""
        if self.disabled:
            return
        Path(path).write_text(self.experiment.id)

    def finish(self, exit_code: int = 0) -> None:
        """Close this run so that the next run in the process (a sweep) starts a new one; a
        non-zero ``exit_code`` marks it failed."""
        if self._experiment is not None:
            self._experiment.finish(exit_code=exit_code)
            self._experiment = None


class _AppendingExperimentWriter(ExperimentWriter):
    """Keeps the rows of an existing ``metrics.csv`` (Lightning's writer deletes them)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger``, but a resumed run appends to ``metrics.csv`` instead of
    deleting what the interrupted run wrote. Args as :class:`lightning.pytorch.loggers.CSVLogger`."""

    @rank_zero_only
    def drop_steps_from(self, step: int) -> None:
        """Drop the rows of ``step`` and later from ``metrics.csv``: a run resumed from a
        checkpoint at ``step`` logs them again."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not self._fs.isfile(path):
            return
        with self._fs.open(path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if int(row["step"]) < step]
            fields = reader.fieldnames
        with self._fs.open(path, "w", newline="") as f:  # as Lightning's writer
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` with two changes.

    * The HParams tab's ``hp_metric`` follows the metric ``hp_metric_key`` (fm-train: its
      ``optimized_metric``, ``val/w2``) each time it is logged, instead of staying at Lightning's
      placeholder -1, so runs and sweep trials compare by it.
    * :meth:`drop_steps_from` hides what an interrupted session logged from a step on (the
      writer's ``purge_step``), as a resumed run logs those steps again; the resumed run keeps
      the ``hp_metric`` logged so far.

    Args: as :class:`lightning.pytorch.loggers.TensorBoardLogger`, and ``hp_metric_key``.
    """

    def __init__(self, *args, hp_metric_key: str | None = None, **kwargs) -> None:
        if hp_metric_key is not None and not isinstance(hp_metric_key, str):
            raise ValueError(f"hp_metric_key must be a metric name such as 'val/w2' (or null), got {hp_metric_key!r}")
        super().__init__(*args, **kwargs)
        self.hp_metric_key, self._resumed, self._hp_metric_logged = hp_metric_key, False, False

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, float] | None = None) -> None:
        # a resumed run keeps the hp_metric its earlier sessions logged (Lightning would log -1 again)
        super().log_hyperparams(params, {} if metrics is None and self._resumed else metrics)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.hp_metric_key in metrics:
            metrics = {**metrics, "hp_metric": metrics[self.hp_metric_key]}
            self._hp_metric_logged = True
        super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status == "success" and self.hp_metric_key and not self._hp_metric_logged and not self._resumed:
            log.warning("the run never logged %r, so TensorBoard's hp_metric stays -1; set optimized_metric "
                        "(fm-train) to a metric the run logs, such as val/loss", self.hp_metric_key)
        super().finalize(status)

    def drop_steps_from(self, step: int) -> None:
        """Call before anything is logged: the event writer then purges ``step`` and later."""
        if self._experiment is not None:
            raise RuntimeError("drop_steps_from must come before the first write")
        self._kwargs["purge_step"] = step  # Lightning passes these to its SummaryWriter
        self._resumed = True
