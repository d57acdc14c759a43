"""Sample quality of the CPU ``experiment=digits`` model, in figures a reviewer can check.

1. Train a small CNN classifier on the *training* split of scikit-learn's digits (the same
   split the flow model trained on: ``data.val_fraction`` and ``seed`` of the run's config).
2. Frechet distance in the classifier's penultimate (128-d) feature space between generated
   digits and the *held-out* real digits, beside the floor: real training digits vs the same
   held-out digits, with the same number of images on each side (FD is biased by sample size).
   A noise ceiling (uniform pixels) is printed too.
3. The classifier's accuracy on class-conditional samples (the label asked for is the truth),
   beside its accuracy on held-out real digits.

Without ``--run-dir`` it first runs ``fm-train experiment=digits`` (a few minutes on CPU).

    python benchmarks/digits_quality.py                       # train, then evaluate
    python benchmarks/digits_quality.py --run-dir RUN_DIR     # evaluate an existing run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from datamodules.images import ImageDataModule
from fm_lightning.module import load_checkpoint


class Classifier(nn.Module):
    """A small CNN for 8x8 digits; ``features`` is the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 40, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = x[idx] + 0.05 * torch.randn_like(x[idx])  # a little noise: robustness to sample artefacts
            loss = nn.functional.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) from the eigenvalues of S_a S_b (real, >= 0 up to round-off), as torchmetrics does.
    tr_covmean = np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


@torch.no_grad()
def feats(clf: Classifier, x: torch.Tensor) -> np.ndarray:
    return clf.features(x).double().numpy()


@torch.no_grad()
def accuracy(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((clf(x).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default=None, help="an fm-train experiment=digits run directory")
    p.add_argument("--num-per-class", type=int, default=100, help="generated images per class")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--solver", default="dopri5")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results/digits_quality.json")
    args = p.parse_args()

    results: dict = {}
    if args.run_dir is None:
        run_dir = Path("benchmarks/results/digits_run").resolve()
        if (run_dir / "checkpoints").exists():
            p.error(f"{run_dir} holds an earlier run: evaluate it with --run-dir {run_dir}, or move it away to train again")
        cmd = ["fm-train", "experiment=digits", "logger=csv", f"hydra.run.dir={run_dir}"]
        print("running:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        results["train_seconds"] = time.perf_counter() - t0
        print(f"trained in {results['train_seconds'] / 60:.1f} min", flush=True)
    else:
        run_dir = Path(args.run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dm = ImageDataModule("digits", num_classes=10, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)
    dm.setup()
    every = next(iter(dm.reference_dataloader(batch_size=len(dm.data_train) + len(dm.data_val))))  # in index order
    x_all, y_all = every["x1"], every["cond"]
    train_idx, val_idx = dm.data_train.indices, dm.data_val.indices
    x_tr, y_tr, x_val, y_val = x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]

    clf = train_classifier(x_tr, y_tr)
    n = 10 * args.num_per_class
    results.update(run_dir=str(run_dir), n_train=len(x_tr), n_heldout=len(x_val), n_generated=n,
                   classifier_heldout_accuracy=accuracy(clf, x_val, y_val))
    f_val = feats(clf, x_val)
    # Floor: real training digits (n of them, several draws) vs the held-out ones.
    floors = []
    for seed in range(5):
        idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))[:n]
        floors.append(frechet(feats(clf, x_tr[idx]), f_val))
    results["fd_real_vs_heldout"] = float(np.mean(floors))
    results["fd_real_vs_heldout_std"] = float(np.std(floors))
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results["fd_noise_vs_heldout"] = frechet(feats(clf, noise), f_val)

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    labels = torch.arange(n) % 10
    x0 = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for weights in ("ema", "raw"):
        model = load_checkpoint(ckpt, ema=weights == "ema")
        for s in args.guidance:
            sol = model.sample(x0=x0, cond=labels, guidance=s, solver=args.solver, steps=args.steps)
            x = sol.x.clamp(-1, 1)
            key = f"{weights}_s{s:g}"
            results[f"fd_generated_{key}"] = frechet(feats(clf, x), f_val)
            results[f"accuracy_generated_{key}"] = accuracy(clf, x, labels)
            results[f"nfe_{key}"] = sol.nfe
        sol = model.sample(x0=x0, cond="null", solver=args.solver, steps=args.steps)
        results[f"fd_generated_{weights}_unconditional"] = frechet(feats(clf, sol.x.clamp(-1, 1)), f_val)

    print(f"classifier: {results['classifier_heldout_accuracy']:.3f} accuracy on {len(x_val)} held-out real digits")
    print(f"Frechet distance in classifier features, vs {len(x_val)} held-out real digits ({n} images on the other side):")
    print(f"  real train digits (floor) {results['fd_real_vs_heldout']:8.3f} +- {results['fd_real_vs_heldout_std']:.3f}")
    for weights in ("ema", "raw"):
        for s in args.guidance:
            key = f"{weights}_s{s:g}"
            print(f"  generated {weights:>3}, s={s:<4g}   {results['fd_generated_' + key]:8.3f}   "
                  f"classifier accuracy {results['accuracy_generated_' + key]:.3f}  (NFE {results['nfe_' + key]})")
        print(f"  generated {weights:>3}, null     {results[f'fd_generated_{weights}_unconditional']:8.3f}")
    print(f"  uniform noise (ceiling)   {results['fd_noise_vs_heldout']:8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
