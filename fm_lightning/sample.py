"""``fm-sample CKPT --num-samples N --out FILE.npz``: sample from a checkpoint alone.

Image checkpoints also get a PNG grid (``--grid``, default ``--out`` with ``.png``). Class-
conditional checkpoints need ``--class K``, ``--class all`` (balanced, one class per grid
column) or ``--class null`` (unconditional), and take a guidance scale ``--guidance s``. The EMA
weights are used when the checkpoint has them (``--raw-weights`` for the others). Existing
files are never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import numpy as np
import torch

from .flow.solve import SOLVERS
from .progress import track

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fm-sample", description="Draw samples from a trained fm-lightning checkpoint.")
    p.add_argument("ckpt", help="path of a .ckpt file written by fm-train")
    p.add_argument("--num-samples", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--out", default="samples.npz", help="output .npz file (default samples.npz)")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="ODE solver (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="steps for euler/midpoint/rk4")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance for dopri5/tsit5")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance for dopri5/tsit5")
    p.add_argument("--seed", type=int, default=0, help="seed of the source draw (default 0)")
    p.add_argument("--source-file", default=None, help="points file to draw x0 from (overrides the recorded source)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--class", dest="label", default=None,
                   help="class-conditional checkpoints: a label K, 'all' (0,1,..,K-1,0,..) or 'null' (unconditional)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 1)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--batch-size", type=int, default=500, help="samples integrated at once (default 500)")
    p.add_argument("--grid", default=None, help="PNG grid of the first 256 images (default: --out with .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on terminals)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --grid) if they exist")
    return p


def _labels(label: str | None, n: int, num_classes: int) -> torch.Tensor | str | None:
    """Labels for ``--class``: ``None``, ``"null"``, or a (n,) tensor."""
    if label is None or not num_classes:
        return label
    if label in ("null", "all"):
        return "null" if label == "null" else torch.arange(n) % num_classes
    try:
        k = int(label)
    except ValueError:
        raise ValueError(f"--class must be a label 0..{num_classes - 1}, 'all' or 'null', got {label!r}") from None
    if not 0 <= k < num_classes:
        raise ValueError(f"--class must be a label 0..{num_classes - 1}, 'all' or 'null', got {k}")
    return torch.full((n,), k)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    if not args.out.endswith(".npz"):
        args.out += ".npz"  # what np.savez writes
    from datamodules.toy import Points

    from .module import load_checkpoint

    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise ValueError(f"output directory {out_dir} does not exist; create it or choose another --out")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        source = None if args.source_file is None else Points(args.source_file)
        model = load_checkpoint(args.ckpt, map_location=args.device, ema=not args.raw_weights, source=source)
        if args.label is not None and not model.num_classes:
            raise ValueError("--class needs a class-conditional checkpoint; this one is unconditional")
        dim = getattr(model.net, "dim", None)
        if source is not None and source.dim != dim:
            raise ValueError(
                f"--source-file {args.source_file!r} holds {source.dim}-dimensional points but the model takes "
                + (f"{dim}-dimensional ones; give a file of shape (N, {dim})" if dim else "images; leave it out")
            )
        gen = torch.Generator().manual_seed(args.seed)
        x0 = model.source.sample(args.num_samples, gen)
        grid = (args.grid or os.path.splitext(args.out)[0] + ".png") if x0.dim() == 4 else None
        taken = [f for f in (args.out, grid) if f is not None and os.path.exists(f)]
        if taken and not args.overwrite:
            raise ValueError(f"{taken[0]} already exists; choose another --out (or --grid), or pass --overwrite")
        labels = _labels(args.label, args.num_samples, model.num_classes)
        chunks, nfe = [], 0
        starts = track(range(0, args.num_samples, args.batch_size), "samples", args.num_samples,
                       advance=lambda s: min(args.batch_size, args.num_samples - s), unit="sample",
                       enabled=not args.no_progress)
        for start in starts:
            part = slice(start, start + args.batch_size)
            cond = labels[part] if isinstance(labels, torch.Tensor) else labels
            sol = model.sample(x0=x0[part], cond=cond, solver=args.solver, steps=args.steps, atol=args.atol,
                               rtol=args.rtol, guidance=args.guidance)
            chunks.append(sol.x.cpu())
            nfe = max(nfe, sol.nfe)
        samples = torch.cat(chunks)
    except (ValueError, FileNotFoundError) as err:
        print(f"fm-sample: error: {err}", file=sys.stderr)
        return 2
    extra = {"labels": labels.numpy()} if isinstance(labels, torch.Tensor) else {}
    np.savez(args.out, samples=samples.numpy(), nfe=nfe, **extra)
    print(f"wrote {args.num_samples} samples (NFE {nfe}) to {args.out}")
    if grid is not None:
        from .callbacks import save_image_grid

        nrow = model.num_classes if args.label == "all" else math.ceil(math.sqrt(min(len(samples), 256)))
        save_image_grid(samples[:256], grid, nrow)
        print(f"wrote an image grid to {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
