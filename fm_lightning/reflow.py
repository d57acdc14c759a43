"""Reflow (rectified flow, Liu et al. 2023): straighten a trained flow by retraining on its own
``(x0, x1 = ODE(x0))`` pairs.

Three pieces:

- :func:`generate_pairs` / :func:`save_pairs`: integrate a trained model from source draws, in
  batches, and save the pairs to an ``.npz`` (arrays ``x0``, ``x1``, and the specs of the source
  and target they connect, which training on them checks). From the shell:
  ``python -m fm_lightning.reflow CKPT --num-pairs 50000 --out pairs.npz``.
- the paired data source: ``ToyDataModule(pairs=...)`` (``+data.pairs=pairs.npz``) draws whole
  pairs; trained with the independent coupling and the straight path (``flow=icfm``), the new
  model (2-RF) regresses ``x1 - x0`` along straight lines between the old model's endpoints.
- :class:`ReflowChain`: a Hydra callback that chains the two stages inside one ``fm-train`` job
  (``fm-train experiment=toy_reflow``): after stage 1 (1-RF) ends it writes
  ``<run>/reflow/pairs.npz``, trains stage 2 (2-RF) in ``<run>/reflow/stage2`` via
  :func:`fm_lightning.train.run`, and compares both models (:func:`compare`) in
  ``<run>/reflow/reflow.json`` and ``reflow.md``: W2 to fresh target samples at 1, 2 and 4 Euler
  steps and with dopri5, and the path energy.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .progress import track

__all__ = ["generate_pairs", "save_pairs", "compare", "ReflowChain", "RECTIFIED_FLOW", "main"]

log = logging.getLogger(__name__)

#: The stage-2 objective: independent pairs (kept as drawn), straight path with sigma 0, uniform t.
RECTIFIED_FLOW = {
    "_target_": "fm_lightning.flow.objective.CFMObjective",
    "path": {"_target_": "fm_lightning.flow.paths.ICFMPath", "sigma": 0.0},
    "coupling": {"_target_": "fm_lightning.flow.couplings.IndependentCoupling"},
    "time_sampler": {"_target_": "fm_lightning.flow.timesteps.UniformTime"},
}


@torch.no_grad()
def generate_pairs(
    model: Any,
    num_pairs: int,
    batch_size: int = 10_000,
    solver: str = "dopri5",
    steps: int | None = 100,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor, float]:
    """Draw ``x0`` from the model's source and integrate ``x1 = ODE(x0)``, ``batch_size`` at a time.

    Args:
        model: a trained unconditional :class:`~fm_lightning.module.FlowMatchingModule`.
        num_pairs: number of pairs ``N``.
        batch_size: points integrated at once.
        solver, steps, atol, rtol: ODE solver of the pairs (accurate by default).
        seed: seed of the source draws.
        progress: show a progress bar counted in pairs.

    Returns:
        ``(x0, x1, nfe)``: (N, *shape) each, on the CPU in fp32, and the mean NFE per batch.
    """
    if num_pairs < 2 or batch_size < 1:
        raise ValueError(f"reflow needs num_pairs >= 2 and batch_size >= 1, got {num_pairs} and {batch_size}")
    if model.num_classes:
        raise ValueError("reflow pairs come from unconditional models; this one is class-conditional")
    gen = torch.Generator().manual_seed(seed)
    x0s, x1s, nfes = [], [], []
    starts = track(range(0, num_pairs, batch_size), "reflow pairs", num_pairs,
                   advance=lambda s: min(batch_size, num_pairs - s), unit="pair", enabled=progress)
    for start in starts:
        x0 = model.source.sample(min(batch_size, num_pairs - start), gen)
        sol = model.sample(x0=x0, solver=solver, steps=steps, atol=atol, rtol=rtol)
        x0s.append(x0.float().cpu())
        x1s.append(sol.x.cpu())
        nfes.append(sol.nfe)
        log.info("reflow pairs: %d / %d (NFE %d)", start + len(x0), num_pairs, sol.nfe)
    return torch.cat(x0s), torch.cat(x1s), sum(nfes) / len(nfes)


def earlier_reflow_error(out: Path) -> str | None:
    """Why a reflow must not write into ``out`` (``<run>/reflow``): it holds an earlier one."""
    if out.is_dir() and any(out.iterdir()):
        return f"{out} holds an earlier reflow (pairs, stage 2); move it away to redo the reflow stages"
    return None


def save_pairs(path: str | os.PathLike, x0: Tensor, x1: Tensor, **meta: Any) -> str:
    """Write pairs (N, *shape) to an ``.npz`` (``x0``, ``x1`` and scalar ``meta``) atomically."""
    if x0.shape != x1.shape:
        raise ValueError(f"reflow pairs must have one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, x0=x0.numpy().astype(np.float32), x1=x1.numpy().astype(np.float32),
                 **{k: np.asarray(v) for k, v in meta.items()})
    os.replace(tmp, path)
    return path


@torch.no_grad()
def compare(models: dict[str, Any], target: Any, num_samples: int = 2000, seed: int = 0,
            euler_steps: Sequence[int] = (1, 2, 4)) -> list[dict[str, Any]]:
    """W2 to fresh target samples (in a points file's own units) at a few Euler step counts and
    with dopri5 (atol=rtol=1e-5), and the path energy (dopri5, in the flow's frame), for each
    model, from the same source draws.

    Returns:
        One row per model: ``model``, ``w2_euler<n>`` for each n, ``w2_dopri5``, ``nfe_dopri5``,
        ``path_energy``.
    """
    from .flow.likelihood import path_energy
    from .metrics import wasserstein2

    from datamodules.toy import in_data_units

    gen = torch.Generator().manual_seed(seed)
    to_data = functools.partial(in_data_units, target)  # W2 in a points file's own units, as val/w2
    reference = to_data(target.sample(num_samples, gen))
    rows = []
    for name, model in models.items():
        x0 = model.source.sample(num_samples, torch.Generator().manual_seed(seed + 1))
        row: dict[str, Any] = {"model": name}
        for n in euler_steps:
            row[f"w2_euler{n}"] = wasserstein2(to_data(model.sample(x0=x0, solver="euler", steps=n).x), reference)
        sol = model.sample(x0=x0, solver="dopri5", atol=1e-5, rtol=1e-5)
        row["w2_dopri5"], row["nfe_dopri5"] = wasserstein2(to_data(sol.x), reference), sol.nfe
        row["path_energy"] = path_energy(model.net, x0, "dopri5", atol=1e-5, rtol=1e-5).mean
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


class ReflowChain(_HydraCallback):
    """Hydra callback that runs reflow's stage 2 after an ``fm-train`` job (stage 1) completes.

    Configured under ``hydra.callbacks`` (see ``configs/experiment/toy_reflow.yaml``). In the
    job's run directory it writes ``reflow/pairs.npz``, trains 2-RF in ``reflow/stage2`` with
    the same config except ``data.pairs`` (the pairs), ``model.flow`` (:data:`RECTIFIED_FLOW`),
    ``paths.output_dir`` and ``trainer.max_steps`` (``stage2_max_steps``), and writes the
    comparison of the two models to ``reflow/reflow.json`` and ``reflow/reflow.md``.

    Args:
        num_pairs: pairs drawn from the stage-1 model.
        batch_size: points integrated at once.
        solver, steps, atol, rtol: ODE solver of the pairs.
        stage2_max_steps: training steps of stage 2 (``None``: as stage 1).
        eval_samples: samples of the final comparison.
    """

    def __init__(self, num_pairs: int = 50_000, batch_size: int = 10_000, solver: str = "dopri5",
                 steps: int = 100, atol: float = 1e-5, rtol: float = 1e-5, stage2_max_steps: int | None = None,
                 eval_samples: int = 2000) -> None:
        self.num_pairs, self.batch_size = int(num_pairs), int(batch_size)
        self.solver, self.steps, self.atol, self.rtol = solver, int(steps), float(atol), float(rtol)
        self.stage2_max_steps, self.eval_samples = stage2_max_steps, int(eval_samples)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        """Refuse a run directory that holds an earlier reflow, before stage 1 (and before any
        DDP rank of this job could have written one)."""
        from .train import exit_with_error

        exit_with_error(earlier_reflow_error(Path(config.hydra.run.dir) / "reflow"))

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED:
            return
        from .reliability import NonFiniteError
        from .train import UserError, exit_with_error

        run_dir = Path(config.hydra.runtime.output_dir)
        try:
            self.run(job_return.cfg, run_dir)
        except (ValueError, FileNotFoundError, UserError, NonFiniteError) as err:
            exit_with_error(f"reflow: {err}")
        except Exception as err:  # Hydra would only warn about a callback's error, and exit 0
            log.exception("reflow failed")
            raise SystemExit(1) from err

    def run(self, cfg: Any, run_dir: str | os.PathLike) -> list[dict[str, Any]]:
        """Stage 2 after the stage-1 run in ``run_dir`` (config ``cfg``, as ``fm-train`` got it)."""
        from omegaconf import OmegaConf, open_dict

        from datamodules.toy import distribution_record, make_distribution

        from .module import load_checkpoint
        from .train import run

        run_dir = Path(run_dir)
        out = run_dir / "reflow"
        stage1 = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        target = make_distribution(cfg.data.target, dim=cfg.data.dim, standardize=cfg.data.get("standardize", False),
                                   source=cfg.data.source)
        x0, x1, nfe = generate_pairs(stage1, self.num_pairs, self.batch_size, self.solver, self.steps,
                                     self.atol, self.rtol, seed=int(cfg.seed))
        pairs = save_pairs(out / "pairs.npz", x0, x1, nfe=nfe, source=distribution_record(stage1.source),
                           target=distribution_record(target))
        log.info("reflow: %d pairs (NFE %.1f) in %s", len(x0), nfe, pairs)
        cfg2 = copy.deepcopy(cfg)
        with open_dict(cfg2):
            cfg2.pop("hydra", None)
            cfg2.paths.output_dir = str(out / "stage2")
            cfg2.data.pairs = pairs
            cfg2.model.flow = OmegaConf.create(RECTIFIED_FLOW)
            if self.stage2_max_steps is not None:
                cfg2.trainer.max_steps = int(self.stage2_max_steps)
            cfg2.ckpt_path = None
        os.makedirs(cfg2.paths.output_dir, exist_ok=True)
        OmegaConf.save(cfg2, out / "stage2_config.yaml")
        run(cfg2)
        stage2 = load_checkpoint(out / "stage2" / "checkpoints" / "last.ckpt")
        rows = compare({"1-RF": stage1, "2-RF": stage2}, target, self.eval_samples, seed=int(cfg.seed))
        (out / "reflow.json").write_text(json.dumps(rows, indent=2))
        units = "W2 to the target, in its own units; path energy in the flow's frame"
        (out / "reflow.md").write_text(f"{_markdown(rows)}\n({units}.)\n")
        log.info("reflow comparison (%s):\n%s", units, _markdown(rows))
        return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fm_lightning.reflow CKPT --out pairs.npz``: write reflow pairs of a checkpoint."""
    from .flow.solve import SOLVERS, check_solver_options
    from .sample import SOURCE_FILE_HELP

    p = argparse.ArgumentParser(prog="python -m fm_lightning.reflow", description=main.__doc__)
    p.add_argument("ckpt", help="checkpoint of the trained (stage-1) model")
    p.add_argument("--out", default="pairs.npz", help="output .npz (arrays x0, x1)")
    p.add_argument("--num-pairs", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--solver", choices=SOLVERS, default="dopri5")
    p.add_argument("--steps", type=int, default=None, help="steps of euler/midpoint/rk4 (default 100)")
    p.add_argument("--atol", type=float, default=None, help="dopri5/tsit5 absolute tolerance (default 1e-5)")
    p.add_argument("--rtol", type=float, default=None, help="dopri5/tsit5 relative tolerance (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source-file", default=None, help=SOURCE_FILE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from datamodules.toy import is_points_spec, as_override, distribution_record, frame_of

    from .reliability import read_checkpoint
    from .sample import load_model

    try:
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; give a file path, e.g. {os.path.join(args.out, 'pairs.npz')}")
        if os.path.exists(args.out) and not args.overwrite:
            raise ValueError(f"--out {args.out} already exists; choose another file, or pass --overwrite to replace it")
        check_solver_options(args.solver, args.steps, args.atol, args.rtol)
        model = load_model(args.ckpt, args.source_file)
        records = {"source": distribution_record(model.source)}
        target = (read_checkpoint(args.ckpt).get("datamodule_hyper_parameters") or {}).get("target")
        if target is not None:  # recorded by ToyDataModule
            records["target"] = distribution_record(target)
        given = {k: v for k, v in (("steps", args.steps), ("atol", args.atol), ("rtol", args.rtol)) if v is not None}
        x0, x1, nfe = generate_pairs(model, args.num_pairs, args.batch_size, args.solver, seed=args.seed,
                                     progress=not args.no_progress, **given)
        path = save_pairs(args.out, x0, x1, nfe=nfe, **records)
    except (ValueError, FileNotFoundError) as err:
        print(f"reflow: error: {err}", file=sys.stderr)
        return 2
    data = [as_override(role, record) for role, record in records.items()]
    if "target" not in records:
        data.append("data.target=<the target this checkpoint was trained on>")
    if x0.dim() == 2:
        data.append(f"data.dim={x0.shape[1]}")
    if any(is_points_spec(spec) and frame_of(spec)[0] is None for spec in map(json.loads, records.values())):
        data.append("data.standardize=false")  # points drawn as their files hold them
    print(f"wrote {len(x0)} pairs (NFE {nfe:.1f}) to {path}; train on them with "
          f"+data.pairs={shlex.quote(path)} flow=icfm {' '.join(data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
