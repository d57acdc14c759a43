"""``fm-sample CKPT --num-samples N --out FILE.npz``: sample from a checkpoint alone."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np
import torch

from .flow.solve import SOLVERS

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    from datamodules.toy import Points

    from .module import load_checkpoint

    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise ValueError(f"output directory {out_dir} does not exist; create it or choose another --out")
        model = load_checkpoint(args.ckpt, map_location=args.device)
        if args.source_file is not None:
            model.source = Points(args.source_file)
        gen = torch.Generator().manual_seed(args.seed)
        x0 = model.source.sample(args.num_samples, gen)
        sol = model.sample(x0=x0, solver=args.solver, steps=args.steps, atol=args.atol, rtol=args.rtol)
    except (ValueError, FileNotFoundError) as err:
        print(f"fm-sample: error: {err}", file=sys.stderr)
        return 2
    np.savez(args.out, samples=sol.x.cpu().numpy(), nfe=sol.nfe)
    print(f"wrote {args.num_samples} samples (NFE {sol.nfe}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
