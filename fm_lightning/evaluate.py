"""``fm-eval CKPT``: evaluate a checkpoint; writes ``eval.json`` and ``eval.md`` (and, with
``--sweep``, the quality-vs-NFE sweep as ``nfe_sweep.csv`` and ``nfe_sweep.png``).

Metrics (keys in the JSON):

- 2-D / point data: ``eval/w2`` (exact OT between generated and fresh target samples),
  ``eval/mmd2`` (unbiased multi-scale RBF MMD^2), ``eval/nfe``; ``eval/nll`` in nats/dim from the
  exact divergence (instantaneous change of variables, integrated backwards from data to the
  source, whose ``log_prob`` must be known) with ``eval/nll_nfe``; and the straightness of the
  flow, ``eval/path_energy`` and ``eval/npe`` (``|PE - W2^2| / W2^2``, Tong et al.). For a
  target points file in a standard frame (``data.standardize``), W2, MMD and NLL are in the
  file's units, the straightness in the frame the flow runs in.
- images: ``eval/fid`` (Inception-v3 features, or an injected extractor, see
  :class:`~fm_lightning.metrics.FID`; reference: the train split) with ``eval/nfe``, and
  ``eval/bpd`` (bits/dim of uniformly dequantised held-out images, the validation or test split,
  Hutchinson trace estimator; ``log p(x|y)`` given their labels for class-conditional models)
  with ``eval/bpd_nfe``.

The target of a 2-D checkpoint is ``--target`` (a distribution name or a points file, as
``data.target``), else ``data.target`` of ``--data-config``, else the one recorded in the checkpoint
(``datamodule_hyper_parameters``), else ``data.target`` of the run directory's ``.hydra/config.yaml``. Its source is the recorded
one, or ``--source-file`` (as in ``fm-sample``: for a points file that has moved). Image
checkpoints read their data from that config (or ``--data-config``); its relative paths are taken
from the directory ``fm-train`` was launched from (``hydra.runtime.cwd`` in ``.hydra/hydra.yaml``).

The NFE sweep (:func:`sweep_grid`): euler with 1, 2, 4, 8, 16, 32, 64 and 100 steps; midpoint
and rk4 at the same NFE (2 and 4 evaluations per step); dopri5 at atol=rtol in {1e-3, 1e-4, 1e-5}.
The same sweep runs at the end of training with ``callbacks.samples.nfe_sweep=true``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .flow.likelihood import bits_per_dim, dequantize, log_likelihood, normalized_path_energy, path_energy
from .flow.solve import SOLVERS, check_solver, check_solver_options
from .metrics import check_reference_path, rbf_mmd2, wasserstein2
from .progress import num_examples, track
from .sample import SOURCE_FILE_HELP, load_model

__all__ = [
    "POINT_METRICS", "IMAGE_METRICS", "SweepSetting", "sweep_grid", "nfe_sweep", "write_sweep",
    "log_sweep_table", "evaluate_points", "evaluate_images", "evaluate_checkpoint", "main",
]

log = logging.getLogger(__name__)

#: Metrics by data kind; ``fm-eval`` computes all that apply unless ``--metrics`` names some.
POINT_METRICS = ("w2", "mmd", "nll")
IMAGE_METRICS = ("fid", "bpd")
EULER_STEPS = (1, 2, 4, 8, 16, 32, 64, 100)
DOPRI5_TOLERANCES = (1e-3, 1e-4, 1e-5)
_LABELS = {"eval/w2": "W2", "eval/mmd2": "RBF-MMD²", "eval/nll": "NLL (nats/dim)", "eval/fid": "FID",
           "eval/bpd": "bits/dim", "eval/path_energy": "path energy PE (flow's frame)", "eval/npe": "NPE",
           "eval/w2_source_target": "W2(source, target) (flow's frame)"}


# -- the NFE sweep -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepSetting:
    """One solver setting of the sweep: a fixed-step solver with ``steps``, or an adaptive one
    with ``atol = rtol = tol``."""

    solver: str
    steps: int | None = None
    tol: float | None = None

    @property
    def label(self) -> str:
        return f"{self.solver}-{self.steps}" if self.tol is None else f"{self.solver}-{self.tol:g}"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`FlowMatchingModule.sample`."""
        if self.tol is None:
            return {"solver": self.solver, "steps": self.steps}
        return {"solver": self.solver, "atol": self.tol, "rtol": self.tol}


def sweep_grid(
    euler_steps: Sequence[int] = EULER_STEPS, tolerances: Sequence[float] = DOPRI5_TOLERANCES
) -> list[SweepSetting]:
    """Euler at ``euler_steps``; midpoint and rk4 at every one of those NFEs they can reach
    (NFE divisible by 2 and 4); dopri5 at each tolerance."""
    grid = [SweepSetting("euler", int(n)) for n in euler_steps]
    for solver, per_step in (("midpoint", 2), ("rk4", 4)):
        grid += [SweepSetting(solver, int(n) // per_step) for n in euler_steps if n % per_step == 0]
    grid += [SweepSetting("dopri5", tol=float(tol)) for tol in tolerances]
    return grid


def nfe_sweep(
    sample: Callable[[SweepSetting], tuple[Tensor, float]],
    quality: Callable[[Tensor], dict[str, float]],
    grid: Sequence[SweepSetting] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Quality versus NFE over ``grid`` (default :func:`sweep_grid`).

    Args:
        sample: ``sample(setting) -> (x, nfe)``: samples (B, *shape) drawn with that setting
            from fixed noise, and the NFE per sample.
        quality: ``quality(x) -> {name: value}``, e.g. ``{"w2": ...}`` or ``{"fid": ...}``.
        grid: the settings.
        progress: show a progress bar over the settings.

    Returns:
        One row per setting: ``solver``, ``steps``, ``tol``, ``nfe`` and the quality values.
    """
    rows = []
    grid = sweep_grid() if grid is None else grid
    for setting in track(grid, "NFE sweep", unit="setting", enabled=progress):
        x, nfe = sample(setting)
        row = {"solver": setting.solver, "steps": setting.steps, "tol": setting.tol, "nfe": float(nfe), **quality(x)}
        log.info("NFE sweep %s: %s", setting.label, row)
        rows.append(row)
    return rows


def write_sweep(rows: list[dict[str, Any]], out_dir: str | os.PathLike, metric: str,
                name: str = "nfe_sweep") -> tuple[str, str]:
    """Write ``rows`` as ``<name>.csv`` and a plot of ``metric`` against NFE as ``<name>.png``
    (log NFE axis, one line per solver). Returns the two paths."""
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, f"{name}.csv"), os.path.join(out_dir, f"{name}.png")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for solver in dict.fromkeys(r["solver"] for r in rows):
        pts = sorted(((r["nfe"], r[metric], r) for r in rows if r["solver"] == solver and metric in r),
                     key=lambda p: (p[0], p[1]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=solver)
        if solver not in ("euler", "midpoint", "rk4"):
            for i, (nfe, value, r) in enumerate(pts):
                ax.annotate(f"tol {r['tol']:g}", (nfe, value), textcoords="offset points", xytext=(4, 4 + 9 * i),
                            fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs NFE")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(png_path, bbox_inches="tight")
    return csv_path, png_path


def log_sweep_table(loggers: Sequence[Any], rows: list[dict[str, Any]], key: str = "eval/nfe_sweep") -> None:
    """Log ``rows`` as a table to every logger that takes tables (W&B)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key=key, columns=columns, data=[[row.get(c) for c in columns] for row in rows])


# -- helpers -----------------------------------------------------------------------------------
def data_kind(model: Any) -> str:
    """``points`` for (B, d) data, ``images`` for (B, C, H, W)."""
    return "images" if model.source.sample(1).dim() == 4 else "points"


def _check_metrics(metrics: Sequence[str] | None, kind: str) -> tuple[list[str], bool]:
    """The metrics to compute, and whether the user named them (then every one must apply)."""
    allowed = POINT_METRICS if kind == "points" else IMAGE_METRICS
    if not metrics:
        return list(allowed), False
    for name in metrics:
        if name not in allowed:
            what = "2-D (point) data" if kind == "points" else "image data"
            other = "image data" if name in IMAGE_METRICS else "2-D (point) data" if name in POINT_METRICS else None
            fits = f"it needs {other}" if other else f"it is not a metric ({', '.join(POINT_METRICS + IMAGE_METRICS)})"
            raise ValueError(
                f"metric {name!r} does not fit this checkpoint: the model is trained on {what}, and {fits}; "
                f"choose from {', '.join(allowed)}"
            )
    return list(dict.fromkeys(metrics)), True


def _density_problem(model: Any) -> str | None:
    """Why the model's likelihood cannot be computed, or ``None``."""
    if not callable(getattr(model.source, "log_prob", None)):
        return (
            f"likelihood needs a source with a known density (log_prob), but this model's source is "
            f"{model.source}, whose density is unknown; train with a Gaussian source (data.source=gaussian) "
            "to get likelihoods"
        )
    if model.num_classes:
        return "likelihood of class-conditional models is not supported; evaluate an unconditional model"
    return None


class _EvalVelocity:
    """``v(x, t)`` of the model's net (optionally with labels), in eval mode."""

    def __init__(self, model: Any, cond: Tensor | None = None) -> None:
        self.net, self.cond = model.net, cond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t) if self.cond is None else self.net(x, t, self.cond)


# -- 2-D / point data --------------------------------------------------------------------------
def evaluate_points(
    model: Any,
    target: Any,
    metrics: Sequence[str] | None = None,
    num_samples: int = 2000,
    num_likelihood: int = 1000,
    seed: int = 0,
    solver: str | None = None,
    steps: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    likelihood_tol: float = 1e-5,
    sweep: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on point data against a ``target`` distribution.

    Args:
        model: a :class:`~fm_lightning.module.FlowMatchingModule` (eval mode).
        target: a distribution with ``sample(n, generator)``.
        metrics: subset of :data:`POINT_METRICS`; ``None`` computes all that apply (``nll`` is
            skipped, with the reason, when the source density is unknown; naming it is an error).
        num_samples: generated and target samples for W2 / MMD / path energy.
        num_likelihood: target samples whose NLL is averaged.
        seed: seed of the source and target draws.
        solver, steps, atol, rtol: sampling solver (default: the checkpoint's).
        likelihood_tol: atol = rtol of the dopri5 likelihood integration.
        sweep: also run the NFE sweep (W2 and MMD at every setting).
        progress: show a progress bar over the sweep's settings.

    Returns:
        ``{"metrics": {...}, "skipped": {name: reason}, "sweep": [rows]}``.
    """
    from datamodules.toy import Points, in_data_units

    names, explicit = _check_metrics(metrics, "points")
    if model.num_classes:
        raise ValueError("fm-eval evaluates unconditional 2-D models; this one is class-conditional")
    problem = _density_problem(model) if "nll" in names else None
    if problem and explicit:
        raise ValueError(problem)
    gen = torch.Generator().manual_seed(seed)
    x0 = model.source.sample(num_samples, gen)
    reference = target.sample(num_samples, gen)
    if reference.shape[1:] != x0.shape[1:]:
        raise ValueError(
            f"the target {target} gives points of shape {tuple(reference.shape[1:])} but the model's are "
            f"{tuple(x0.shape[1:])}; pass a --target of the model's dimension"
        )
    kw = {"solver": solver, "steps": steps, "atol": atol, "rtol": rtol}
    sol = model.sample(x0=x0, **kw)
    out: dict[str, float] = {"eval/nfe": float(sol.nfe)}
    skipped: dict[str, str] = {}
    to_data = functools.partial(in_data_units, target)  # a points file's own units
    reference_data = to_data(reference)
    if "w2" in names:
        out["eval/w2"] = wasserstein2(to_data(sol.x), reference_data)
    if "mmd" in names:
        out["eval/mmd2"] = rbf_mmd2(to_data(sol.x), reference_data)
    hp = model.hparams
    solver_kw = {k: hp[k] if v is None else v for k, v in kw.items()}
    pe = path_energy(_EvalVelocity(model), x0.to(model.device), **solver_kw).mean
    w2_st = wasserstein2(x0, reference)
    out.update({"eval/path_energy": pe, "eval/w2_source_target": w2_st,
                "eval/npe": normalized_path_energy(pe, w2_st**2)})
    if "nll" in names:
        if problem:
            skipped["nll"] = problem
        else:
            x1 = target.sample(num_likelihood, gen).to(model.device)
            res = log_likelihood(_EvalVelocity(model), x1, model.source.log_prob, solver="dopri5",
                                 atol=likelihood_tol, rtol=likelihood_tol, divergence="exact")
            # in the file's units: log p(x) = log p(z) - sum(log scale) for z = (x - loc) / scale
            log_scale = sum(map(math.log, target.scale or ())) if isinstance(target, Points) else 0.0
            out["eval/nll"] = (float(-res.log_prob.mean()) + log_scale) / x1[0].numel()
            out["eval/nll_nfe"] = float(res.nfe)
    rows = []
    if sweep:
        def sample(setting: SweepSetting) -> tuple[Tensor, float]:
            s = model.sample(x0=x0, **setting.kwargs())
            return s.x, float(s.nfe)

        rows = nfe_sweep(sample, lambda x: {"w2": wasserstein2(to_data(x), reference_data),
                                            "mmd2": rbf_mmd2(to_data(x), reference_data)},
                         progress=progress)
    return {"metrics": out, "skipped": skipped, "sweep": rows}


# -- images ------------------------------------------------------------------------------------
def _fixed_labels(model: Any, n: int) -> Tensor | None:
    return torch.arange(n) % model.num_classes if model.num_classes else None


def _check_data_fits(model: Any, datamodule: Any) -> None:
    """Refuse image data whose shape (C, H, W) is not the model's, or whose labels do not fit a
    class-conditional model."""
    drawn = tuple(model.source.sample(1, torch.Generator()).shape[1:])
    if getattr(datamodule, "shape", None) is None:
        raise ValueError(f"the data ({type(datamodule).__name__}) are not images but the model's are images of "
                         f"shape {drawn}; evaluate it on the data it was trained on (--data-config "
                         "<its run>/.hydra/config.yaml)")
    shape = tuple(datamodule.shape)
    if shape != drawn:
        raise ValueError(f"the data are images of shape {shape} but the model's are {drawn}; evaluate it on "
                         "the data it was trained on (--data-config <its run>/.hydra/config.yaml)")
    if model.num_classes and datamodule.num_classes != model.num_classes:
        raise ValueError(f"the model is class-conditional ({model.num_classes} classes) but the data have "
                         f"num_classes={datamodule.num_classes}; evaluate it on data labelled with its "
                         f"{model.num_classes} classes")


def _check_guidance(model: Any, guidance: float | None, samples: bool) -> None:
    """Refuse a guidance scale that would be ignored: on an unconditional model, or when no
    images are generated (``samples`` false: bits/dim only)."""
    if guidance is None:
        return
    if not math.isfinite(guidance):
        raise ValueError(f"guidance={guidance} is not a finite number; give a finite --guidance (1: none)")
    if not model.num_classes:
        raise ValueError(f"guidance={guidance:g} needs a class-conditional model, but this one is unconditional; "
                         "drop --guidance")
    if not samples:
        raise ValueError(f"guidance={guidance:g} applies to generated images (fid, --sweep); bits/dim is "
                         "log p(x|y) of the unguided model; drop --guidance")


def _heldout_split(datamodule: Any, trained: Any = None) -> tuple[str | None, str | None]:
    """The name of the datamodule's held-out split (``data_val``: validation or test) and ``None``,
    or ``None`` and why there is none to measure bits/dim on: it holds none out, or its validation
    images were not held out of the training data ``trained`` (the datamodule the model was
    trained on, ``None``: not known)."""
    datamodule.setup("fit")
    if datamodule.data_val is None:
        return None, ("bits/dim needs held-out images, but the data hold none out (val_fraction=0); pass a "
                      "--data-config with val_split: test (a dataset with a test split)")
    if datamodule.val_split == "test":
        return "test split", None
    if trained is not None and trained.dataset == datamodule.dataset and not (
            trained.val_split == "holdout" and trained.seed == datamodule.seed
            and datamodule.val_fraction <= trained.val_fraction):
        return None, (
            f"bits/dim needs held-out images, but the validation split of the data (val_fraction="
            f"{datamodule.val_fraction:g}, seed {datamodule.seed}) was trained on (training: val_split="
            f"{trained.val_split}, val_fraction={trained.val_fraction:g}, seed {trained.seed}); pass a --data-config "
            "with val_split: test (a dataset with a test split), or the val_fraction and seed of training"
        )
    return (f"validation split (val_fraction={datamodule.val_fraction:g} of the train split held out, "
            f"seed {datamodule.seed})"), None


def evaluate_images(
    model: Any,
    datamodule: Any,
    metrics: Sequence[str] | None = None,
    num_samples: int = 10_000,
    num_likelihood: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    solver: str | None = None,
    steps: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    guidance: float | None = None,
    fid_feature: int | torch.nn.Module = 2048,
    fid_weights: str | None = None,
    fid_reference: str | None = None,
    num_reference: int | None = None,
    likelihood_tol: float = 1e-5,
    sweep: bool = False,
    progress: bool = True,
    trained_data: Any = None,
) -> dict[str, Any]:
    """Evaluate an image model: FID of generated images against the train split, bits/dim of
    held-out real ones.

    Args:
        model: a :class:`~fm_lightning.module.FlowMatchingModule` on images (eval mode).
        datamodule: an :class:`~datamodules.images.ImageDataModule` (real images in [-1, 1]) of
            the model's image shape (and classes, for a class-conditional model).
        metrics: subset of :data:`IMAGE_METRICS` (``None``: all that apply).
        num_samples: generated images for FID.
        num_likelihood: held-out images (validation or test split) whose bits/dim are averaged;
            for class-conditional models ``-log p(x|y)`` given their labels.
        batch_size: images integrated at once.
        seed: seed of the noise, the dequantisation and the Hutchinson probes.
        solver, steps, atol, rtol: sampling solver (default: the checkpoint's).
        guidance: classifier-free guidance scale of the FID samples (conditional models,
            balanced labels; default 1).
        fid_feature: 2048 for Inception-v3, or an injected ``nn.Module`` extractor.
        fid_weights: local Inception weights file.
        fid_reference: ``.npz`` of reference statistics (``mu``, ``sigma``); computed from the
            datamodule's reference images when not given (and cached there if it is a new path).
        num_reference: use only the first n reference images.
        likelihood_tol: atol = rtol of the dopri5 likelihood integration.
        sweep: also run the NFE sweep (FID at every setting; costly).
        progress: show progress bars (reference statistics, samples, bits/dim, sweep).
        trained_data: the datamodule the model was trained on (not set up), when ``datamodule``
            is another: bits/dim refuse validation images that were not held out of it.

    Returns:
        ``{"metrics": {...}, "skipped": {name: reason}, "sweep": [rows]}``, with ``bpd_data``
        (split, images, likelihood) when bits/dim were measured.
    """
    from torch.utils.data import DataLoader, Subset

    from .metrics import FID

    names, explicit = _check_metrics(metrics, "images")
    _check_guidance(model, guidance, "fid" in names or sweep)
    fid_options = {"--fid-weights": fid_weights, "--fid-reference": fid_reference, "--num-reference": num_reference}
    ignored = [flag for flag, value in fid_options.items() if value is not None]
    if ignored and not ("fid" in names or sweep):
        raise ValueError(f"{', '.join(ignored)} apply to FID (fid, --sweep), which bits/dim alone does not compute; "
                         "drop them, or add fid to --metrics")
    _check_data_fits(model, datamodule)
    check_reference_path(fid_reference)
    out: dict[str, float] = {}
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    kw = {"solver": solver, "steps": steps, "atol": atol, "rtol": rtol}
    fid = None
    if "fid" in names or sweep:
        fid = FID(fid_feature, fid_weights).to(model.device)
        source = getattr(datamodule, "reference_name", None)
        if fid_reference and os.path.isfile(fid_reference):
            fid.load_reference(fid_reference, source, num_examples(datamodule.reference_dataloader(limit=num_reference)))
        else:
            fid.update_reference(datamodule.reference_dataloader(batch_size=batch_size, limit=num_reference), progress)
            if fid_reference:
                fid.save_reference(fid_reference, source or type(datamodule).__name__)

    def generate(setting_kw: dict[str, Any]) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(seed)
        labels = _fixed_labels(model, num_samples)
        nfes = []
        chunks = torch.arange(num_samples).split(batch_size)
        for chunk in track(chunks, "FID samples", num_samples, advance=len, unit="img", enabled=progress):
            x0 = model.source.sample(len(chunk), gen)
            cond = None if labels is None else labels[chunk]
            sol = model.sample(x0=x0, cond=cond, guidance=guidance, **setting_kw)
            fid.update(sol.x, real=False)
            nfes.append(sol.nfe)
        return fid.compute(), sum(nfes) / len(nfes)

    if "fid" in names:
        out["eval/fid"], out["eval/nfe"] = generate(kw)
    if "bpd" in names:
        split, no_split = _heldout_split(datamodule, trained_data)
        problem = (_density_problem(model) if not model.num_classes else None) or no_split
        if problem and explicit:
            raise ValueError(problem)
        if problem:
            skipped["bpd"] = problem
        else:
            heldout = Subset(datamodule.data_val, range(min(num_likelihood, len(datamodule.data_val))))
            loader = DataLoader(heldout, batch_size=batch_size, shuffle=False, num_workers=datamodule.num_workers)
            gen = torch.Generator().manual_seed(seed + 1)
            bpds, nfes = [], []
            for batch in track(loader, "bits/dim", num_examples(loader), advance=lambda b: len(b["x1"]), unit="img",
                               enabled=progress):
                x, cond = batch["x1"], batch.get("cond")
                cond = None if cond is None or not model.num_classes else cond.to(model.device)
                y = dequantize(x, gen).to(model.device)
                res = log_likelihood(_EvalVelocity(model, cond), y, model.source.log_prob, solver="dopri5",
                                     atol=likelihood_tol, rtol=likelihood_tol, divergence="hutchinson", generator=gen)
                bpds.append(bits_per_dim(res.log_prob, y[0].numel()).cpu())
                nfes.append(res.nfe)
            out["eval/bpd"] = float(torch.cat(bpds).mean())
            out["eval/bpd_nfe"] = float(sum(nfes) / len(nfes))
            result["bpd_data"] = {"split": split, "images": len(heldout),
                                  "likelihood": "log p(x|y)" if model.num_classes else "log p(x)"}
    if sweep:
        def sample(setting: SweepSetting) -> tuple[Tensor, float]:
            value, nfe = generate(setting.kwargs())
            return torch.tensor(value), nfe

        rows = nfe_sweep(sample, lambda value: {"fid": float(value)}, progress=progress)
    return {"metrics": out, "skipped": skipped, "sweep": rows, **result}


# -- checkpoints -------------------------------------------------------------------------------
def _from_launch_dir(data: dict, hydra_yaml: Path) -> dict:
    """``data`` with its relative paths (``root``, a points-file ``target``) taken from the
    directory fm-train was launched from, ``hydra.runtime.cwd`` of the run's ``hydra.yaml``
    (unchanged without that file)."""
    from omegaconf import OmegaConf

    cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    if not cwd:
        return data

    def is_relative_path(key: str, value: Any) -> bool:
        path_like = key == "root" or (key == "target" and str(value).lower().endswith((".npy", ".npz", ".csv")))
        return path_like and isinstance(value, str) and not os.path.isabs(value)

    def from_launch_dir(key: str, value: Any) -> Any:
        joined = os.path.join(cwd, value) if is_relative_path(key, value) else None
        return joined if joined and os.path.exists(joined) else value  # a moved project: as given

    return {k: from_launch_dir(k, v) for k, v in data.items()}


def _run_config(ckpt: Path, data_config: str | None) -> Any:
    """The ``data`` node of ``--data-config``, else of the run's config beside the checkpoint
    (``fm-train``: ``.hydra/config.yaml``; ``fm-cli``: the version folder's ``config.yaml``), in
    Hydra's ``_target_`` form, relative paths taken from fm-train's launch directory."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    run_dir = ckpt.resolve().parents[1]
    path = Path(data_config) if data_config else next(
        (p for p in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml") if p.is_file()), None)
    if data_config and path.is_dir():
        raise ValueError(f"--data-config {data_config!r} is a folder; give a run's config file, "
                         f"such as {path / '.hydra' / 'config.yaml'}")
    if data_config and not path.is_file():
        raise FileNotFoundError(f"--data-config {data_config!r} does not exist")
    if path is None:
        return None
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ValueError(f"the config {str(path)!r} is not valid YAML ({' '.join(str(err).split())}); "
                         "give a run's .hydra/config.yaml") from None
    if not isinstance(cfg, DictConfig) or cfg.get("data") is None:
        return None
    if not isinstance(cfg.data, DictConfig):
        raise ValueError(f"the config {str(path)!r} has data: {OmegaConf.to_yaml(cfg.data).strip()!r}, not a "
                         "mapping of data settings; give a run's .hydra/config.yaml")
    try:  # resolve ${seed}, ${paths...} against the whole run config
        data = OmegaConf.to_container(cfg.data, resolve=True)
    except Exception as err:  # noqa: BLE001 - e.g. a ${hydra:...} resolver outside a Hydra run
        raise ValueError(f"cannot resolve the data config of {str(path)!r}: {err}") from err
    if "class_path" in data:  # the Lightning CLI's form
        data = {"_target_": data["class_path"], **(data.get("init_args") or {})}
    return OmegaConf.create(_from_launch_dir(data, path.parent / "hydra.yaml"))


def _target_of(ckpt: Path, model: Any, target: str | None, data_config: str | None) -> Any:
    """The target distribution, in the standard frame the checkpoint records for its points."""
    from datamodules.toy import Points, frame_of, make_distribution

    from .spec import from_spec

    dim = int(model.source.sample(1).shape[1])
    recorded = getattr(model, "data_hparams", {}).get("target")
    if target is not None:
        try:
            dist = make_distribution(target, dim=dim)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--target: {err}") from None
    elif recorded is not None and not data_config:  # a given --data-config wins, as --target does
        try:
            return from_spec(recorded)
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise ValueError(f"cannot rebuild the target recorded in the checkpoint ({err}); pass --target") from err
    else:
        dist = _config_target(ckpt, data_config, dim, standardize=recorded is None)
    loc, scale = frame_of(recorded)  # the model's samples are in that frame
    return dist.in_frame(loc, scale) if isinstance(dist, Points) and len(loc or ()) == dist.dim else dist


def _config_target(ckpt: Path, data_config: str | None, dim: int, standardize: bool) -> Any:
    """``data.target`` of ``--data-config`` (else the run's config), in that config's standard
    frame if ``standardize`` (a config from before frames has none)."""
    from datamodules.toy import make_distribution

    data = _run_config(ckpt, data_config)
    if data is not None and "target" in data:
        try:
            return make_distribution(data.target, dim=dim, source=data.get("source"),
                                     standardize=standardize and data.get("standardize", False))
        except (ValueError, FileNotFoundError) as err:
            where = f"--data-config {data_config!r}" if data_config else "the run's config"
            raise ValueError(f"data.target of {where}: {err} (a relative path is read from the current folder "
                             "unless the config is a Hydra run's); pass --target") from None
    if data_config:
        raise ValueError(f"--data-config {data_config!r} has no data.target; pass --target NAME or FILE.npy")
    raise ValueError(
        "this checkpoint does not record its target distribution and there is no run config beside it; "
        "pass --target NAME (e.g. moons) or --target FILE.npy"
    )


def _build_data(ckpt: Path, data_config: str | None) -> Any:
    """The datamodule of the run's config (or ``data_config``), built but not set up; ``None``
    without a config."""
    import hydra
    from hydra.errors import InstantiationException

    data = _run_config(ckpt, data_config)
    if data is None:
        return None
    try:
        return hydra.utils.instantiate(data)
    except InstantiationException as err:
        where = f"--data-config {data_config!r}" if data_config else "the run's config"
        raise ValueError(f"cannot build the data of {where}: {' '.join(str(err.__cause__ or err).split())}; fix its "
                         "data settings") from None


def _datamodule_of(ckpt: Path, data_config: str | None, model: Any) -> Any:
    """The image datamodule of the run's config (or ``data_config``), checked against ``model``
    before it loads any data."""
    datamodule = _build_data(ckpt, data_config)
    if datamodule is None:
        raise ValueError(
            "image evaluation needs the training data; put the checkpoint in its fm-train run directory "
            "(with .hydra/config.yaml) or pass --data-config <run>/.hydra/config.yaml"
        )
    _check_data_fits(model, datamodule)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. fm-eval: pass --data-config with a config whose data.root holds the data (or whose "
            "data.download is true), or set FM_ROOT to the folder that holds data/"
        ) from err
    return datamodule


_IMAGE_ONLY = ("batch_size", "guidance", "fid_feature", "fid_weights", "fid_reference", "num_reference")


def _default_out(ckpt: Path) -> Path:
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "eval"


def evaluate_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    target: str | None = None,
    data_config: str | None = None,
    ema: bool = True,
    device: str = "cpu",
    wandb_project: str | None = None,
    overwrite: bool = False,
    source_file: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a checkpoint and write ``eval.json``, ``eval.md`` (and the sweep files).

    Args:
        ckpt: checkpoint path.
        out_dir: output folder (default: ``<run>/eval`` beside ``<run>/checkpoints``).
        metrics: names from :data:`POINT_METRICS` or :data:`IMAGE_METRICS` (``None``: all that apply).
        target: 2-D target (distribution name or points file); default: the recorded one.
        data_config: a run's ``.hydra/config.yaml`` whose ``data`` node builds the image data.
        ema: use the EMA weights when the checkpoint has them.
        device: torch device.
        wandb_project: also log the metrics, the sweep table (``eval/nfe_sweep``) and its plot
            to a W&B run of this project (offline under ``out_dir/wandb`` without credentials).
        overwrite: write into an ``out_dir`` that holds files already (else refused, before any work).
        source_file: 2-D: points file to draw x0 from instead of the recorded source (which may
            have moved).
        **kwargs: passed to :func:`evaluate_points` or :func:`evaluate_images`.

    Returns:
        The report written to ``eval.json``.
    """
    ckpt = Path(ckpt)
    image_only = {k: kwargs.pop(k) for k in _IMAGE_ONLY if k in kwargs}
    if metrics:
        unknown = [m for m in metrics if m not in POINT_METRICS + IMAGE_METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(POINT_METRICS + IMAGE_METRICS)}")
    out = Path(out_dir) if out_dir is not None else _default_out(ckpt)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; pass another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already holds an evaluation; pass another --out, or --overwrite to write over it")
    check_reference_path(image_only.get("fid_reference"))
    model = load_model(ckpt, source_file, map_location=device, ema=ema)
    kind = data_kind(model)
    _check_metrics(metrics, kind)  # a metric of the wrong kind fails before any work
    report: dict[str, Any] = {"checkpoint": str(ckpt), "weights": model.loaded_weights, "kind": kind,
                              "source": repr(model.source), "seed": kwargs.get("seed", 0)}
    hp = model.hparams
    report["sampling"] = {k: kwargs.get(k) if kwargs.get(k) is not None else hp[k]
                          for k in ("solver", "steps", "atol", "rtol")}
    check_solver_options(report["sampling"]["solver"], kwargs.get("steps"), kwargs.get("atol"), kwargs.get("rtol"))
    guidance = image_only.get("guidance")
    if kind == "images" and model.num_classes:
        report["sampling"]["guidance"] = 1.0 if guidance is None else float(guidance)
    if kind == "points":
        given = [k for k, v in image_only.items() if v is not None and k != "batch_size"]
        if given:
            raise ValueError(f"{', '.join(given)} apply to image checkpoints only; this one is 2-D")
        dist = _target_of(ckpt, model, target, data_config)
        report["target"] = repr(dist)
        result = evaluate_points(model, dist, metrics, **kwargs)
    else:
        if target is not None:
            raise ValueError(f"--target {target} applies to 2-D checkpoints only; this one is on images (their data "
                             "come from the run's config, or --data-config)")
        datamodule = _datamodule_of(ckpt, data_config, model)
        report["data"] = getattr(datamodule, "reference_name", type(datamodule).__name__)
        trained = None
        if data_config and "bpd" in (metrics or ["bpd"]):  # which images training held out
            try:
                trained = _build_data(ckpt, None)
            except ValueError as err:
                log.warning("cannot check which images the run held out for bits/dim: %s", err)
        result = evaluate_images(model, datamodule, metrics, **image_only, **kwargs, trained_data=trained)
    report.update(result)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("nfe_sweep.csv", "nfe_sweep.png"):  # an earlier --sweep's, when overwriting without one
        (out / stale).unlink(missing_ok=True)
    if result["sweep"]:
        metric = "w2" if kind == "points" else "fid"
        csv_path, png_path = write_sweep(result["sweep"], out, metric)
        report["sweep_files"] = {"csv": csv_path, "png": png_path}
    if wandb_project:
        _log_to_wandb(wandb_project, out, ckpt, report)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(markdown(report))
    report["files"] = {"json": str(out / "eval.json"), "markdown": str(out / "eval.md")}
    return report


def _log_to_wandb(project: str, out: Path, ckpt: Path, report: dict[str, Any]) -> None:
    from .loggers import WandbLogger

    logger = WandbLogger(project=project, save_dir=str(out), name=f"eval-{ckpt.parent.parent.name}-{ckpt.stem}",
                         job_type="eval")
    try:
        logger.log_hyperparams({k: report[k] for k in ("checkpoint", "weights", "kind", "sampling")})
        logger.log_metrics(report["metrics"])
        if report["sweep"]:
            log_sweep_table([logger], report["sweep"])
            logger.log_image(key="eval/nfe_sweep_plot", images=[report["sweep_files"]["png"]])
        report["wandb_dir"] = str(logger.experiment.dir)
    finally:
        logger.finish()


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """A Markdown summary of an :func:`evaluate_checkpoint` report."""
    m = report["metrics"]
    s = report["sampling"]
    fixed = s["solver"] in ("euler", "midpoint", "rk4")
    tol = f"steps={s['steps']}" if fixed else f"atol={s['atol']:g}, rtol={s['rtol']:g}"
    guidance = f"; guidance {s['guidance']:g}" if "guidance" in s else ""
    lines = [f"# fm-eval: `{report['checkpoint']}`", "",
             f"- data: {report['kind']}; source {report['source']}; "
             + (f"target {report['target']}" if "target" in report else f"images {report.get('data')}"),
             f"- weights: {report['weights']}; sampling: {s['solver']} ({tol}){guidance}; seed {report['seed']}"]
    if "bpd_data" in report:
        b = report["bpd_data"]
        lines.append(f"- bits/dim: from {b['likelihood']} on {b['images']} images of the {b['split']}"
                     + (", given their labels y, without guidance" if b["likelihood"] == "log p(x|y)" else ""))
    lines += ["", "| metric | value | NFE |", "| --- | --- | --- |"]
    nfe_of = {"eval/nll": "eval/nll_nfe", "eval/bpd": "eval/bpd_nfe"}
    for key in ("eval/w2", "eval/mmd2", "eval/fid", "eval/nll", "eval/bpd", "eval/path_energy", "eval/npe",
                "eval/w2_source_target"):
        if key in m:
            nfe = m.get(nfe_of.get(key, "eval/nfe")) if key not in ("eval/w2_source_target",) else None
            lines.append(f"| {_LABELS[key]} | {_num(m[key])} | {_num(nfe)} |")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"\n*{name} skipped:* {reason}")
    if report.get("sweep"):
        rows = report["sweep"]
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", "## Quality vs NFE", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_num(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# -- the command line --------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fm-eval", description="Evaluate a trained fm-lightning checkpoint.")
    p.add_argument("ckpt", help="path of a .ckpt file written by fm-train or fm-cli")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds files already")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated subset of {','.join(POINT_METRICS)} (2-D) or {','.join(IMAGE_METRICS)} "
                        "(images); default: all that apply")
    p.add_argument("--target", default=None,
                   help="2-D target: a distribution name or a points file (default: recorded)")
    p.add_argument("--source-file", default=None, help=f"2-D: {SOURCE_FILE_HELP}")
    p.add_argument("--data-config", default=None,
                   help="a run's .hydra/config.yaml: the image data, or a 2-D target (default: the checkpoint's run)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="generated samples (default 2000 points, 10000 images)")
    p.add_argument("--num-likelihood", type=int, default=1000, help="data points whose NLL / bits/dim are averaged")
    p.add_argument("--likelihood-tol", type=float, default=1e-5, help="dopri5 atol=rtol of the likelihood ODE")
    p.add_argument("--sweep", action="store_true", help="also run the quality-vs-NFE sweep (CSV + PNG)")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="sampling solver (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="steps for euler/midpoint/rk4")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance for dopri5/tsit5")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance for dopri5/tsit5")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    p.add_argument("--batch-size", type=int, default=250, help="images integrated at once")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (conditional image models)")
    p.add_argument("--fid-weights", default=None,
                   help="local copy of torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--fid-reference", default=None, help=".npz of FID reference statistics (read, or written if new)")
    p.add_argument("--num-reference", type=int, default=None,
                   help="FID reference statistics from the first n training images (default: all of them)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--wandb-project", default=None, help="also log metrics and the sweep table to this W&B project")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on terminals)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``fm-eval``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        for name, value, least in (("--num-samples", args.num_samples, 2), ("--num-likelihood", args.num_likelihood, 1),
                                   ("--batch-size", args.batch_size, 1), ("--num-reference", args.num_reference, 2)):
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        try:
            check_solver("dopri5", atol=args.likelihood_tol, rtol=args.likelihood_tol)
        except ValueError as err:
            raise ValueError(f"--likelihood-tol {args.likelihood_tol:g} (atol = rtol of the likelihood ODE): "
                             f"{err}") from None
        kwargs: dict[str, Any] = {"num_likelihood": args.num_likelihood, "seed": args.seed, "solver": args.solver,
                                  "steps": args.steps, "atol": args.atol, "rtol": args.rtol,
                                  "likelihood_tol": args.likelihood_tol, "sweep": args.sweep,
                                  "batch_size": args.batch_size, "guidance": args.guidance,
                                  "fid_weights": args.fid_weights, "fid_reference": args.fid_reference,
                                  "num_reference": args.num_reference,
                                  "progress": not args.no_progress}
        if args.num_samples is not None:
            kwargs["num_samples"] = args.num_samples
        report = evaluate_checkpoint(args.ckpt, args.out, metrics, target=args.target, source_file=args.source_file,
                                     data_config=args.data_config,
                                     ema=not args.raw_weights, device=args.device,
                                     wandb_project=args.wandb_project, overwrite=args.overwrite, **kwargs)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        hint = " (fm-eval: --fid-weights PATH)" if "weights_path=" in str(err) else ""
        print(f"fm-eval: error: {err}{hint}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"wrote {report['files']['json']} and {report['files']['markdown']}")
    if "sweep_files" in report:
        print(f"wrote {report['sweep_files']['csv']} and {report['sweep_files']['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
