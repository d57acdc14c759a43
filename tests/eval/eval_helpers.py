"""Analytic flows for the evaluation tests.

The affine flow ``x_t = (1 - t + t*s) * x0 + t*mu`` (per-dimension scale ``s > 0``) carries
``N(0, I)`` to ``N(mu, diag(s^2))``. It is the straight, constant-speed optimal transport map
``T(x0) = s*x0 + mu``, so every density along it is Gaussian in closed form and its path energy
equals ``W2^2 = ||mu||^2 + sum_i (s_i - 1)^2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from datamodules.toy import Distribution, Gaussian
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.module import FlowMatchingModule


class AffineField(nn.Module):
    """``v(x, t) = (s - 1) / (1 - t + t*s) * (x - t*mu) + mu``: the velocity of the affine flow."""

    def __init__(self, mean: list[float], scale: list[float]) -> None:
        super().__init__()
        self.mean, self.scale, self.num_classes = list(mean), list(scale), 0
        self.register_buffer("_mu", torch.tensor(mean))
        self.register_buffer("_s", torch.tensor(scale))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        tb = t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        return (self._s - 1) / (1 - tb + tb * self._s) * (x - tb * self._mu) + self._mu


class AffineGaussian(Distribution):
    """``N(mu, diag(s^2))``, the target of :class:`AffineField`."""

    def __init__(self, mean: list[float], scale: list[float]) -> None:
        self.mean, self.scale = list(mean), list(scale)
        self.dim = len(mean)

    def sample(self, n, generator=None):
        return torch.tensor(self.mean) + torch.tensor(self.scale) * torch.randn(n, self.dim, generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        mu, s = torch.tensor(self.mean, dtype=x.dtype), torch.tensor(self.scale, dtype=x.dtype)
        z = (x - mu) / s
        return -0.5 * z.square().sum(1) - torch.log(s).sum() - 0.5 * len(self.mean) * math.log(2 * math.pi)

    def w2_squared_from_standard_normal(self) -> float:
        return sum(m * m for m in self.mean) + sum((s - 1) ** 2 for s in self.scale)


MEAN, SCALE = [1.5, -2.0], [0.5, 2.0]


def affine_model(mean: list[float] = MEAN, scale: list[float] = SCALE, shape: int | list[int] | None = None,
                 **kwargs) -> FlowMatchingModule:
    """A :class:`FlowMatchingModule` whose net is the analytic :class:`AffineField`; ``shape``
    (default ``len(mean)``) is the source's, e.g. ``[1, 8, 8]`` with one-element ``mean``/``scale``
    broadcast over the pixels."""
    source = Gaussian(len(mean) if shape is None else shape)
    model = FlowMatchingModule(net=AffineField(mean, scale), flow=CFMObjective(ICFMPath(0.0)), source=source, **kwargs)
    return model.eval()


class TinyExtractor(nn.Module):
    """A fixed random feature map for FID tests: ``tanh(W * mean-pooled 8x8 pixels)``."""

    def __init__(self, num_features: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features
        self.register_buffer("weight", torch.randn(num_features, 64, generator=torch.Generator().manual_seed(seed)) / 8)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8).flatten(1)
        return torch.tanh(pooled @ self.weight.T)
