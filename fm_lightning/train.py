"""``fm-train``: the Hydra entry point.

Composes ``configs/train.yaml``, instantiates the datamodule, module, callbacks, loggers and
trainer, fits, and writes ``metrics.json`` into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import InterpolationKeyError

from datamodules.toy import frame_of, same_points

from .callbacks import FinalValidation
from .distributed import check_devices, check_num_nodes, per_device_batch_size
from .loggers import WandbLogger
from .reliability import NonFiniteError, check_weights_fit, find_last_checkpoint, read_checkpoint

__all__ = ["main", "run", "CONFIG_DIR", "KeepFinishedRuns", "finished_run_error", "exit_with_error"]

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
#: The run directory's record of its W&B run id, which a resume of the run continues.
WANDB_ID_FILE = "wandb-run-id.txt"


class UserError(Exception):
    """An error in the user's configuration or input, reported without a traceback."""


class SweepError(UserError):
    """Bad input that every job of a sweep shares: it ends the whole sweep, not just one job."""


class JobFailed(CompactHydraException):
    """A sweep job stopped by bad input or a non-finite loss (already reported): Hydra marks the
    job failed and goes on with the sweep's other jobs; at the end it names the first failed
    job and prints this message, without a traceback."""


def _instantiate_all(cfg: DictConfig, name: str) -> list[Any]:
    """Instantiate every entry of the callbacks/logger group ``cfg[name]`` (``null`` entries are
    off). An entry without ``_target_`` is an error, unless the group is off (``callbacks=none``;
    outside a Hydra run: no entry has one): what presets (``debug=fast``...) set for its
    entries is then moot."""
    entries = {key: entry for key, entry in (cfg.get(name) or {}).items() if entry is not None}
    untargeted = [key for key, entry in entries.items() if not isinstance(entry, DictConfig) or "_target_" not in entry]
    group_off = (HydraConfig.get().runtime.choices.get(name) == "none" if HydraConfig.initialized()
                 else len(untargeted) == len(entries))
    if untargeted and not group_off:
        key = untargeted[0]
        raise UserError(f"{name}.{key} has no _target_, so nothing would be built from it; give it one (e.g. "
                        f"+{name}.{key}._target_=<class path>), or set {name}.{key}=null to turn it off")
    return [hydra.utils.instantiate(entry) for key, entry in entries.items() if key not in untargeted]


#: Files that only a run writes: a run directory holding one is an earlier run's.
RUN_OUTPUTS = ("metrics.json", f"csv/{ExperimentWriter.NAME_METRICS_FILE}")  # csv: configs/logger/csv.yaml


def finished_run_error(output_dir: str | os.PathLike, ckpt_path: str | os.PathLike | None) -> str | None:
    """Why training must not write into ``output_dir``: it holds the checkpoints (or the
    :data:`RUN_OUTPUTS`) of an earlier run, and ``ckpt_path`` is not one of its checkpoints
    (resuming a run in place is allowed). ``None`` if it may."""
    ckpt_dir = Path(output_dir) / "checkpoints"
    if ckpt_path is not None and Path(ckpt_path).resolve().parent == ckpt_dir.resolve():
        return None
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        return (
            f"{output_dir} already holds checkpoints from an earlier run; refusing to overwrite them. "
            f"Use a new hydra.run.dir, or resume that run with ckpt_path={ckpt_dir / 'last.ckpt'}"
        )
    found = [name for name in RUN_OUTPUTS if (Path(output_dir) / name).exists()]
    if found:
        return (f"{output_dir} already holds the outputs of an earlier run ({', '.join(found)}); refusing to "
                "overwrite them. Use a new hydra.run.dir")
    return None


def _check_output_dir(output_dir: str, ckpt_path: str | None) -> None:
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {out} ({err}); set paths.log_dir (or FM_ROOT) elsewhere")
    if not os.access(out, os.W_OK):
        raise UserError(f"output directory {out} is not writable; set paths.log_dir (or FM_ROOT) to a writable place")
    error = finished_run_error(out, ckpt_path)
    if error:
        raise UserError(error)


class KeepFinishedRuns(Callback):
    """Hydra callback: refuses a run directory that holds an earlier run's checkpoints (unless
    resuming that run), or a sweep directory that holds any, *before* Hydra rewrites the
    directory's ``.hydra/`` files and appends to its log. ``ckpt_path=last`` resumes the newest
    run in its own directory; a session that resumes in a run directory (that way, or with
    ``hydra.run.dir``) keeps the earlier sessions' ``.hydra/`` files and writes its own to
    ``.hydra/resume-N/``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._prepare_run_dir(config)
        except (OSError, ValueError) as err:  # Hydra would only warn about a callback's error
            exit_with_error(f"cannot prepare the run directory {config.hydra.run.dir}: {err}")

    @staticmethod
    def _prepare_run_dir(config: DictConfig) -> None:
        ckpt_path = config.get("ckpt_path")
        if str(ckpt_path) == "last":
            try:
                ckpt_path = _last_checkpoint(config)
            except FileNotFoundError:
                ckpt_path = None  # run() reports it
            else:  # resume that very file, in its run's directory
                with read_write(config), read_write(config.hydra):
                    config.ckpt_path = str(ckpt_path)
                    config.hydra.run.dir = str(ckpt_path.parents[1])
        exit_with_error(finished_run_error(config.hydra.run.dir, ckpt_path))
        earlier = Path(config.hydra.run.dir) / str(config.hydra.output_subdir)
        if config.hydra.output_subdir is not None and (earlier / "config.yaml").exists():
            n = 1
            while (earlier / f"resume-{n}").exists():
                n += 1
            with read_write(config.hydra):
                config.hydra.output_subdir = f"{config.hydra.output_subdir}/resume-{n}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept = [o for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
                 if o.key_or_group == "ckpt_path" and o.is_choice_sweep()]
        if str(config.get("ckpt_path")) == "last" or any("last" in o.sweep_string_iterator() for o in swept):
            exit_with_error("ckpt_path=last resumes one run in its own directory, so every job of a sweep (-m) would "
                            "train that same run; resume it without -m, or give the jobs ckpt_path=<file> to start "
                            "each from that checkpoint in a directory of its own")
        sweep_dir = Path(config.hydra.sweep.dir)
        if any(finished_run_error(job, None) for job in sweep_dir.glob("*/")):
            exit_with_error(
                f"{sweep_dir} already holds runs with checkpoints or metrics; refusing to overwrite them. Use a new "
                "hydra.sweep.dir"
            )


def _report_error(error: object) -> None:
    """One message on stderr (and in the run's log file, if one is open, but not again on the console)."""
    print(f"fm-train: error: {error}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def exit_with_error(error: object) -> None:
    """If there is an ``error``: report it (:func:`_report_error`), then exit with status 2."""
    if error:
        _report_error(error)
        sys.exit(2)


def _instantiation_error(err: InstantiationException) -> str:
    """Hydra's error, led by the config key of the object that failed; a type error (a word
    where a number belongs, say) also says where to look."""
    cause = err.__cause__ or err
    key = re.search(r"full_key: (\S+)", str(err))
    if key is None:
        return f"{cause}"
    if isinstance(cause, TypeError):
        return f"{key[1]}: {cause}; check the types of the values set under {key[1]} (a word where a number belongs?)"
    return f"{key[1]}: {cause}"


def _fill_native_shape(cfg: DictConfig, datamodule: Any) -> None:
    """``data.channels`` / ``data.image_size: null`` mean the dataset's own; the net and the source
    read them from ``data``, so they get the numbers."""
    shape = getattr(datamodule, "shape", None)
    if shape is None or len(shape) != 3:
        return
    for key, value in (("channels", shape[0]), ("image_size", shape[-1])):
        if key in cfg.data and cfg.data[key] is None:
            cfg.data[key] = value


def _check_shapes(datamodule: Any, model: Any) -> None:
    """The model's source and net take samples of the data's shape: (d,) points or (C, H, W)
    images, and a conditional net has the data's number of classes."""
    shape = tuple(datamodule.shape) if hasattr(datamodule, "shape") else (datamodule.dim,)
    drawn = tuple(model.source.sample(1, torch.Generator().manual_seed(0)).shape[1:])
    if drawn != shape:
        raise UserError(f"the model's source draws samples of shape {drawn} but the data are {shape}; "
                        f"set model.source.dim={list(shape) if len(shape) > 1 else shape[0]}")
    net = model.net
    wanted = {"dim": shape[0]} if len(shape) == 1 else {"in_channels": shape[0], "image_size": shape[-1]}
    for attr, value in wanted.items():
        if getattr(net, attr, value) != value:
            raise UserError(f"model.net.{attr}={getattr(net, attr)} does not fit data of shape {shape}; "
                            f"set model.net.{attr}={value}")
    classes, net_classes = getattr(datamodule, "num_classes", 0) or 0, getattr(net, "num_classes", 0) or 0
    if net_classes != classes:
        raise UserError(f"model.net.num_classes={net_classes} does not fit data with "
                        f"{f'{classes} classes' if classes else 'no labels (data.num_classes=0)'}; set "
                        f"model.net.num_classes={classes}" + (" (or data.num_classes=0 for an unconditional model)"
                                                              if classes else ""))


def _final_metrics(trainer: L.Trainer) -> dict[str, float]:
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        value = float(value)
        metrics[key] = value if math.isfinite(value) else str(value)
    metrics["global_step"] = trainer.global_step
    return metrics


def _read_metrics(output_dir: str) -> dict[str, Any]:
    """The ``metrics.json`` an earlier session of the run in ``output_dir`` wrote (``{}`` if none)."""
    path = Path(output_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _continue_wandb(cfg: DictConfig, ckpt_path: str | None) -> None:
    """W&B conventions for the ``wandb`` logger, unless set: the jobs of one sweep share the
    group ``<task_name>_<sweep folder name>``, and a run resumed from ``ckpt_path`` continues
    the W&B run that the checkpoint's run directory (``<run>/checkpoints/*.ckpt``; not for sweep
    jobs, which each get a run of their own) recorded in its :data:`WANDB_ID_FILE`, with the same
    ``id`` (W&B cannot resume an offline run: an offline session starts a new one under it)."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg:
        return
    sweep = _in_sweep()
    with open_dict(wandb_cfg):
        if wandb_cfg.get("group") is None and sweep:
            wandb_cfg.group = f"{cfg.task_name}_{Path(HydraConfig.get().sweep.dir).name}"
        if ckpt_path is None or wandb_cfg.get("id") is not None or sweep:
            return
        checkpoint_dir = Path(ckpt_path).resolve().parent
        id_file = checkpoint_dir.parent / WANDB_ID_FILE
        if checkpoint_dir.name == "checkpoints" and id_file.is_file():
            wandb_cfg.id = id_file.read_text().strip()  # Lightning's logger resumes it ("allow")


def _flat(value: Any, key: str) -> dict[str, Any]:
    """A recorded ``{"class_path", "init_args"}`` spec as config keys: ``{"model.net.width": 256,
    "model.net._target_": "fm_lightning.nets.mlp.MLP", ...}``."""
    if not isinstance(value, dict):
        return {key: value}
    flat: dict[str, Any] = {}
    for name, item in value.items():
        sub = key if name == "init_args" else f"{key}.{'_target_' if name == 'class_path' else name}"
        flat.update(_flat(item, sub))
    return flat


def _brief(value: Any) -> str:
    """``repr(value)``, or for a list of more than 4 numbers its length (a frame of 784 dims)."""
    return f"[{len(value)} numbers]" if isinstance(value, list) and len(value) > 4 else repr(value)


def _check_same_run(model: Any, datamodule: Any, ckpt: dict, ckpt_path: str) -> None:
    """A resume continues the checkpoint's run: refuse a config whose model (net, flow, source)
    or data differ from those the checkpoint records, naming the keys and the run's overrides."""
    parts = ("net", "flow", "source")
    recorded = _flat({k: ckpt["hyper_parameters"][k] for k in parts}, "model")
    current = _flat({k: model.hparams[k] for k in parts}, "model")
    specs = {"model.source": (ckpt["hyper_parameters"]["source"], model.hparams["source"])}
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})  # not recorded by older checkpoints
    if data:
        own = dict(getattr(datamodule, "hparams", None) or {})
        recorded.update(_flat(data, "data"))
        current.update(_flat(own, "data"))
        specs["data.target"] = (data.get("target"), own.get("target"))
    for prefix, (theirs, mine) in specs.items():  # on both sides: a record from before frames has none
        keys = (f"{prefix}.loc", f"{prefix}.scale")
        recorded.update(zip(keys, frame_of(theirs)))
        current.update(zip(keys, frame_of(mine)))
    # Points files holding the same data are the same, wherever they are now (moved since).
    same = tuple(f"{prefix}." for prefix, (theirs, mine) in specs.items() if same_points(theirs, mine))
    # A key on one side only is an argument the code added or dropped since (another class
    # differs in its _target_, on both sides).
    differ = sorted(k for k in recorded.keys() & current.keys() if recorded[k] != current[k] and not k.startswith(same))
    frames = [k for k in differ if k.endswith((".loc", ".scale"))]
    if any(k.startswith(("model.source.", "data.target.")) for k in set(differ) - set(frames)):
        differ = [k for k in differ if k not in frames]  # a frame follows its points and the other side: name those
    if not differ:
        return
    classes = [k[: -len("_target_")] for k in differ if k.endswith("._target_")]  # their arguments differ too
    shown = [k for k in differ if k.endswith("._target_") or not any(k.startswith(c) for c in classes)]
    diffs = "; ".join(f"{k}: {_brief(recorded[k])} there, {_brief(current[k])} here" for k in shown)
    if any(k.endswith(".fingerprint") for k in shown):
        diffs += "; another fingerprint means other points than the run trained on: restore the file it used"
    standardize = None
    if any(k.endswith((".loc", ".scale")) for k in shown):
        standardize = f"data.standardize={str(any(frame_of(theirs)[0] is not None for theirs, _ in specs.values())).lower()}"
        diffs += f"; another loc/scale is another standard frame of the points: the run was trained with {standardize}"
    overrides_file = Path(ckpt_path).resolve().parent.parent / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        own = [o for o in OmegaConf.load(overrides_file) if not o.startswith(("ckpt_path=", "hydra."))]
        if standardize:  # the frame the run was trained in, whatever its overrides said
            own = [o for o in own if not o.startswith("data.standardize=")] + [standardize]
        again = f"pass its overrides again ({' '.join(own) or 'none'}, from {overrides_file})"
    else:
        again = "use the config it was trained with" + (f" and {standardize}" if standardize else "")
    raise UserError(f"{ckpt_path} holds another model or data than this config ({diffs}); a resume continues "
                    f"that run, so {again}, with ckpt_path and a larger trainer.max_steps to train on")


def _last_checkpoint(cfg: DictConfig) -> Path:
    """What ``ckpt_path=last`` means: the newest run of this ``task_name``'s ``last.ckpt``."""
    return find_last_checkpoint(Path(cfg.paths.log_dir) / cfg.task_name / "runs")


def _resolve_resume(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """Validate ``ckpt_path`` and read it; ``last`` means the newest run's last.ckpt, resumed in
    that run's directory. Returns ``(path, checkpoint)``, or ``(None, None)``."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None, None
    if str(ckpt_path) == "last":
        ckpt_path = str(_last_checkpoint(cfg))
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(ckpt_path).parents[1])
        log.info("resuming %s in place", cfg.paths.output_dir)
    # refuses missing, foreign or unsafe files before anything starts
    return str(ckpt_path), read_checkpoint(ckpt_path)


def _in_sweep() -> bool:
    """Whether this is a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _optimizing_sweep() -> bool:
    """Whether a sweeper optimises the value fm-train returns: Optuna (or Ax, Nevergrad...),
    any but Hydra's basic one."""
    return _in_sweep() and not str(HydraConfig.get().sweeper.get("_target_")).endswith(".BasicSweeper")


def _metric_not_logged(key: str | None, logged: set[str]) -> SweepError:
    """The error for an ``optimized_metric`` that is not among the ``logged`` keys."""
    return SweepError(f"optimized_metric={key} is not a metric this run logs, so the sweeper has nothing to "
                      f"optimise; set optimized_metric to one of: {', '.join(sorted(logged))}")


class _CheckOptimizedMetric(L.Callback):
    """Ends a search at the first validation when the run does not log its ``optimized_metric``
    (now, or later from a sampling callback's ``metric_keys``, such as FID at fit end)."""

    def __init__(self, key: str) -> None:
        self.key, self.checked = key, False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.checked:
            return
        self.checked = True
        logged = set(trainer.callback_metrics).union(*(getattr(c, "metric_keys", ()) for c in trainer.callbacks))
        if self.key not in logged:
            raise _metric_not_logged(self.key, logged)


def _set_threads(cfg: DictConfig) -> None:
    """Give this process ``cfg.threads`` torch threads; by default (``null``, and no
    ``OMP_NUM_THREADS`` set) the CPU cores it has, shared by the local training processes and
    minus its loader workers, at least 1. More threads than free cores make OpenMP spin
    against the workers: a default 2-D run on 2 cores took 2.7x longer with 2 threads."""
    threads = cfg.get("threads")
    if threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        devices = cfg.trainer.get("devices")
        processes = devices if isinstance(devices, int) and devices > 0 else 1
        threads = max(1, cores // processes - int(cfg.data.get("num_workers") or 0))
    if not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a whole number >= 1 (or null for automatic), got {threads!r}")
    torch.set_num_threads(threads)


def _check_launch(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Refuse, before any training process starts, several nodes without a cluster launcher, a
    sweep whose jobs Lightning would start more processes for, and a batch that does not split."""
    check_num_nodes(trainer.num_nodes, getattr(trainer.strategy, "cluster_environment", None))
    launcher = getattr(trainer.strategy, "launcher", None)
    if (_in_sweep() and type(launcher).__name__ == "_SubprocessScriptLauncher" and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally):
        raise SweepError(f"a sweep (-m) cannot run jobs with {launcher.num_processes} training processes per node: "
                         "Lightning starts the extra processes by running the whole command again, sweep "
                         "included; run the jobs one by one without -m")
    if "batch_size" in cfg.data:  # each process's datamodule checks it again in setup, after they start
        per_device_batch_size(cfg.data.batch_size, trainer.world_size, trainer.accumulate_grad_batches)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train as configured by ``cfg``; return the final metrics (also saved as metrics.json)."""
    ckpt_path, ckpt = _resolve_resume(cfg)
    output_dir = cfg.paths.output_dir
    _check_output_dir(output_dir, ckpt_path)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        hint = " (interpolations such as oc.env give strings: decode them, seed='${oc.decode:${oc.env:SEED}}')"
        raise UserError(f"seed must be a whole number, got {cfg.seed!r}; set seed=0 (or another integer)"
                        f"{hint if isinstance(cfg.seed, str) and cfg.seed.strip().lstrip('-').isdigit() else ''}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _set_threads(cfg)
    check_devices(cfg.trainer.get("accelerator"), cfg.trainer.get("devices"), cfg.trainer.get("precision"))
    if cfg.get("matmul_precision") and torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.matmul_precision)  # TF32 on Ampere and newer
    _continue_wandb(cfg, ckpt_path)
    try:
        datamodule = hydra.utils.instantiate(cfg.data)
        _fill_native_shape(cfg, datamodule)
        model = hydra.utils.instantiate(cfg.model)
        callbacks = [*_instantiate_all(cfg, "callbacks"), FinalValidation()]
        if _optimizing_sweep():
            callbacks.append(_CheckOptimizedMetric(cfg.get("optimized_metric")))
        loggers = _instantiate_all(cfg, "logger")
        if not loggers:  # nothing to monitor into; Lightning would refuse the callback
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        # no ModelCheckpoint callback: no checkpoints (Lightning would add its own)
        off = {} if any(isinstance(c, ModelCheckpoint) for c in callbacks) else {"enable_checkpointing": False}
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **off)
    except InstantiationException as err:
        raise UserError(_instantiation_error(err)) from err
    except InterpolationKeyError as err:
        if "'data." not in str(err):
            raise
        raise UserError(f"{err}: the data config does not define it. Image data need an image model and "
                        "source: start from an image preset (experiment=digits, mnist, mnist_cond or cifar10_otcfm) "
                        "and override from there") from None
    _check_shapes(datamodule, model)
    _check_launch(cfg, trainer)
    start_step = None
    if ckpt is not None:
        _check_same_run(model, datamodule, ckpt, ckpt_path)
        check_weights_fit(model, ckpt["state_dict"], ckpt_path)
        start_step = ckpt.get("global_step")
        del ckpt  # Lightning reads the file again to restore everything
        for logger in loggers:
            if hasattr(logger, "drop_steps_from"):
                logger.drop_steps_from(start_step)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if isinstance(logger, WandbLogger):
            logger.save_run_id(Path(output_dir) / WANDB_ID_FILE)
    failed = True
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        failed = False
    finally:
        for logger in loggers:
            if hasattr(logger, "finish"):
                logger.finish(exit_code=int(failed))
    if ckpt_path is not None and trainer.global_step == start_step:
        log.warning("nothing to train: %s is at step %d, where this run's trainer stops; raise "
                    "trainer.max_steps (or max_epochs) to train on. metrics.json is kept as it was.",
                    ckpt_path, start_step)
        return _read_metrics(output_dir)
    metrics = _final_metrics(trainer)
    if trainer.is_global_zero:
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        log.info("run directory: %s", output_dir)
        log.info("final metrics: %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Train; to a sweeper that optimises it, return the ``optimized_metric``."""
    try:
        metrics = run(cfg)
        if not _optimizing_sweep():
            return None
        key = cfg.get("optimized_metric")
        if key not in metrics:  # a run without validation
            raise _metric_not_logged(key, set(metrics) - {"global_step"})
        if isinstance(metrics[key], str):
            raise UserError(f"optimized_metric {key} is {metrics[key]}; the trial is marked failed")
    except (UserError, ValueError, FileNotFoundError, NonFiniteError) as err:
        if _in_sweep() and not isinstance(err, SweepError):
            _report_error(err)  # one failed job must not end the sweep
            raise JobFailed(f"fm-train: error: {err}") from None
        exit_with_error(err)
    return metrics[key]


def main() -> None:
    """Console entry point ``fm-train``."""
    _hydra_main()


if __name__ == "__main__":
    main()
