"""Sample-quality metrics, computed in fp32/fp64 on CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["wasserstein2"]


def wasserstein2(x: Tensor, y: Tensor) -> float:
    """Exact 2-Wasserstein distance between two empirical sets (n, d) and (m, d) (POT ``emd2``).

    ``W2 = sqrt(min_pi sum_ij pi_ij ||x_i - y_j||^2)`` over couplings of uniform weights.
    """
    import ot

    x, y = x.detach().flatten(1).double().cpu(), y.detach().flatten(1).double().cpu()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"W2 needs equal dimensions, got {x.shape[1]} and {y.shape[1]}")
    cost = torch.cdist(x, y).square().numpy()
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=10_000_000), 0.0)))
