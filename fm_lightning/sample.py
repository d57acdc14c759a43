"""``fm-sample CKPT --num-samples N --out FILE.npz``: sample from a checkpoint alone.

Image checkpoints also get a PNG grid (``--grid``, default ``--out`` with ``.png``). Class-
conditional checkpoints need ``--class K``, ``--class all`` (balanced, one class per grid
column) or ``--class null`` (unconditional), and take a guidance scale ``--guidance s``. The EMA
weights are used when the checkpoint has them (``--raw-weights`` for the others). Existing
files are never replaced without ``--overwrite``; the output files and the device are checked
before the checkpoint is read. Points are written in the units of the run's target file when
the run put it in a standard frame (``data.standardize``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Any, Sequence

import numpy as np
import torch

from .flow.solve import SOLVERS, check_solver_options
from .progress import track

__all__ = ["SOURCE_FILE_HELP", "load_model", "in_target_units", "main"]


#: ``--source-file``'s help, the same in every tool that takes it.
SOURCE_FILE_HELP = "points file to draw x0 from (overrides the recorded source, e.g. one that has moved)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fm-sample", description="Draw samples from a trained fm-lightning checkpoint.")
    p.add_argument("ckpt", help="path of a .ckpt file written by fm-train")
    p.add_argument("--num-samples", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--out", default="samples.npz", help="output .npz file (default samples.npz); points are in "
                   "the units of the run's target file")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="ODE solver (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="steps for euler/midpoint/rk4")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance for dopri5/tsit5")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance for dopri5/tsit5")
    p.add_argument("--seed", type=int, default=0, help="seed of the source draw (default 0)")
    p.add_argument("--source-file", default=None, help=SOURCE_FILE_HELP)
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


#: Extensions that name another file type: refused for --out / --grid rather than appended to.
_FILE_TYPES = (".npz", ".npy", ".png", ".jpg", ".jpeg", ".pdf", ".svg", ".csv", ".txt", ".json", ".pt", ".ckpt")


def _target(path: str, ext: str, flag: str, overwrite: bool) -> str:
    """``path`` (``ext`` added if missing), once it names a file that can be written there;
    ``ValueError`` otherwise, also for an existing file without ``overwrite``."""
    if not os.path.basename(path) or os.path.isdir(path):
        example = os.path.join(path, "samples" + ext)
        raise ValueError(f"{flag} {path!r} names a folder; give a file name, such as {example}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _FILE_TYPES and suffix != ext:
        raise ValueError(f"{flag} {path!r}: fm-sample writes a {ext} file here; give a name ending in {ext}")
    path = path if suffix == ext else path + ext
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} names a folder; give another file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"output directory {folder} does not exist; create it or choose another {flag}")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # leaves nothing behind
    except OSError as err:
        raise ValueError(f"cannot write into {folder} ({err.strerror}); choose another {flag}") from None
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; choose another {flag}, or pass --overwrite")
    return path


def _check_device(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and not count:
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def load_model(ckpt: str | os.PathLike, source_file: str | None = None, map_location: Any = "cpu",
               ema: bool = True) -> Any:
    """The checkpoint's model (:func:`~fm_lightning.module.load_checkpoint`), drawing x0 from the
    points in ``source_file`` if given. Shared by ``fm-sample``, ``fm-eval`` and
    ``python -m fm_lightning.reflow``: a recorded points source that has moved, and a
    ``--source-file`` the model cannot take, get one message each, naming ``--source-file``."""
    from datamodules.toy import Points

    from .module import load_checkpoint
    from .reliability import read_checkpoint
    from .spec import from_spec

    try:
        source = None if source_file is None else Points(source_file)
    except (ValueError, FileNotFoundError) as err:
        if _takes_images(read_checkpoint(ckpt)["hyper_parameters"]):
            raise ValueError("--source-file draws x0 points, but this model takes images; leave --source-file out") \
                from None
        raise ValueError(f"--source-file: {err}") from None
    try:
        model = load_checkpoint(ckpt, map_location=map_location, ema=ema, source=source)
    except (ValueError, FileNotFoundError) as err:
        hparams = read_checkpoint(ckpt)["hyper_parameters"]  # raises again if reading it was what failed
        if source is None and isinstance(err, FileNotFoundError):  # its recorded source is the only file opened
            raise ValueError(
                f"the source points file {hparams['source']['init_args']['file']!r} recorded in the checkpoint does "
                "not exist (moved since training?); pass --source-file with the points to draw x0 from"
            ) from None
        try:
            path = None if source is None else from_spec(hparams["flow"]).path
        except (TypeError, ValueError, AttributeError):  # a flow this version cannot rebuild: err says so
            path = None
        if getattr(path, "requires_gaussian_source", False):
            raise ValueError(
                f"this checkpoint's path ({type(path).__name__}) assumes a standard Gaussian source: it maps "
                "x0 ~ N(0, I) only, so --source-file cannot be used with it; leave --source-file out"
            ) from None
        raise
    dim = getattr(model.net, "dim", None)
    if source is not None and source.dim != dim:
        raise ValueError(
            f"--source-file {source_file!r} holds {source.dim}-dimensional points but the model takes "
            + (f"{dim}-dimensional ones; give a file of shape (N, {dim})" if dim else "images; leave it out")
        )
    return model


def in_target_units(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Points ``x`` (n, d) sampled from a model of :func:`~fm_lightning.module.load_checkpoint`, in
    the units of its target points file when the run trained in a standard frame
    (``data.standardize``); else as they are."""
    from datamodules.toy import frame_of, to_data_units

    return to_data_units(x, *frame_of(getattr(model, "data_hparams", {}).get("target")))


def _takes_images(hparams: dict) -> bool:
    """Whether the checkpoint's recorded source (``hparams["source"]``) draws images."""
    from .spec import from_spec

    try:
        return from_spec(hparams["source"]).sample(1).dim() == 4
    except (FileNotFoundError, ValueError, TypeError):  # a points file that has moved, or a source this
        return False  # version cannot rebuild (load_checkpoint says so)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        args.out = _target(args.out, ".npz", "--out", args.overwrite)
        _check_device(args.device)
        model = load_model(args.ckpt, args.source_file, args.device, ema=not args.raw_weights)
        check_solver_options(args.solver or model.hparams["solver"], args.steps, args.atol, args.rtol)
        if args.label is not None and not model.num_classes:
            raise ValueError("--class needs a class-conditional checkpoint; this one is unconditional")
        if args.label is None and model.num_classes:
            raise ValueError(f"this checkpoint is class-conditional ({model.num_classes} classes): pass --class K "
                             f"(0..{model.num_classes - 1}), --class all or --class null")
        gen = torch.Generator().manual_seed(args.seed)
        x0 = model.source.sample(args.num_samples, gen)
        grid = None
        if x0.dim() == 4:
            grid = _target(args.grid or os.path.splitext(args.out)[0] + ".png", ".png", "--grid", args.overwrite)
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
        if grid is None:
            samples = in_target_units(model, samples)
        extra = {"labels": labels.numpy()} if isinstance(labels, torch.Tensor) else {}
        part = args.out + ".part"  # renamed into place: a failed write keeps an older --out
        try:
            with open(part, "wb") as f:
                np.savez(f, samples=samples.numpy(), nfe=nfe, **extra)
            os.replace(part, args.out)
        finally:
            if os.path.exists(part):
                os.remove(part)
        print(f"wrote {args.num_samples} samples (NFE {nfe}) to {args.out}")
        if grid is not None:
            from .callbacks import save_image_grid

            nrow = model.num_classes if args.label == "all" else math.ceil(math.sqrt(min(len(samples), 256)))
            save_image_grid(samples[:256], grid, nrow)
            print(f"wrote an image grid to {grid}")
    except (ValueError, OSError) as err:
        print(f"fm-sample: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
