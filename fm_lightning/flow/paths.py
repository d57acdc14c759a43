"""Probability paths: the interpolant ``x_t`` and its conditional velocity ``u_t``.

Every path draws ``x_t = mu_t(x0, x1) + sigma_t * eps`` and returns the target
``u_t = d/dt x_t`` at fixed ``(x0, x1, eps)``. Tensors are ``(B, *shape)``; ``t`` is ``(B,)``.
``t`` and the coefficients are computed in at least float32 (16-bit data would round ``t = 0.999``
to 1); only ``x_t`` and ``u_t`` are cast to the data dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["PathSample", "ProbabilityPath", "ICFMPath", "LipmanOTPath", "VPPath", "SchrodingerBridgePath"]


@dataclass
class PathSample:
    """One draw from a path. ``t``: (B,); ``x0, x1, xt, ut``: (B, *shape)."""

    t: Tensor
    x0: Tensor
    x1: Tensor
    xt: Tensor
    ut: Tensor

    @classmethod
    def from_dict(cls, d: dict) -> "PathSample":
        """The sample stored in a dict (such as a batch) under the field names."""
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """Reshape ``t`` (B,) to broadcast against ``like`` (B, *shape), in the dtype of ``t`` and
    ``like`` promoted to at least float32 (float64 stays float64)."""
    dtype = torch.promote_types(torch.promote_types(t.dtype, like.dtype), torch.float32)
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(dtype)


class ProbabilityPath:
    """Base class. Subclasses implement :meth:`interpolate`.

    Attributes:
        requires_gaussian_source: the path assumes ``x0 ~ N(0, I)`` (only true for
            paths that condition on ``x1`` alone).
    """

    requires_gaussian_source = False

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x_t, u_t)``, both (B, *shape), for ``t`` of shape (B,)."""
        raise NotImplementedError

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor | None = None) -> PathSample:
        """Draw ``x_t`` and its target ``u_t``; ``eps`` defaults to fresh N(0, I) noise."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if eps is None:
            eps = torch.randn_like(x1)
        xt, ut = self.interpolate(x0, x1, t, eps)
        return PathSample(t=t, x0=x0, x1=x1, xt=xt, ut=ut)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ICFMPath(ProbabilityPath):
    """Independent CFM path: ``x_t = t*x1 + (1-t)*x0 + sigma*eps``, ``u_t = x1 - x0``.

    With ``sigma=0`` this is rectified flow.

    Args:
        sigma: constant noise level, finite and ``>= 0``.
    """

    def __init__(self, sigma: float = 0.0) -> None:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"ICFMPath sigma must be >= 0 and finite, got {sigma}")
        self.sigma = float(sigma)

    def interpolate(self, x0, x1, t, eps):
        tb = _bcast(t, x1)
        xt = tb * x1 + (1 - tb) * x0
        if self.sigma > 0:
            xt = xt + self.sigma * eps
        return xt.to(x1.dtype), x1 - x0


class LipmanOTPath(ProbabilityPath):
    """Lipman et al.'s OT path, conditioned on ``x1``; ``x0 ~ N(0, I)`` plays the noise.

    ``mu_t = t*x1``, ``sigma_t = 1 - (1 - sigma_min)*t``, ``x_t = mu_t + sigma_t*x0`` and
    ``u_t = (x1 - (1 - sigma_min)*x_t) / (1 - (1 - sigma_min)*t)``.

    Args:
        sigma_min: terminal noise level, in ``[0, 1)``.
    """

    requires_gaussian_source = True

    def __init__(self, sigma_min: float = 1e-4) -> None:
        if not 0 <= sigma_min < 1:  # also rejects NaN and inf
            raise ValueError(f"LipmanOTPath sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def interpolate(self, x0, x1, t, eps):
        tb = _bcast(t, x1)
        sigma_t = 1 - (1 - self.sigma_min) * tb
        xt = tb * x1 + sigma_t * x0
        # Equal to (x1 - (1 - sigma_min) * xt) / sigma_t, without dividing by ~0 at t=1.
        ut = x1 - (1 - self.sigma_min) * x0.to(tb.dtype)
        return xt.to(x1.dtype), ut.to(x1.dtype)


class VPPath(ProbabilityPath):
    """Variance-preserving (trigonometric) path.

    ``x_t = cos(pi t/2)*x0 + sin(pi t/2)*x1 + sigma*eps`` and
    ``u_t = pi/2 * (cos(pi t/2)*x1 - sin(pi t/2)*x0)``.

    Args:
        sigma: constant noise level, finite and ``>= 0``.
    """

    def __init__(self, sigma: float = 0.0) -> None:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"VPPath sigma must be >= 0 and finite, got {sigma}")
        self.sigma = float(sigma)

    def interpolate(self, x0, x1, t, eps):
        angle = _bcast(t, x1) * (math.pi / 2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        xt = cos * x0 + sin * x1
        if self.sigma > 0:
            xt = xt + self.sigma * eps
        return xt.to(x1.dtype), ((math.pi / 2) * (cos * x1 - sin * x0)).to(x1.dtype)


class SchrodingerBridgePath(ProbabilityPath):
    """Brownian-bridge path of Schrodinger-bridge CFM.

    ``mu_t = t*x1 + (1-t)*x0``, ``sigma_t = sigma*sqrt(t(1-t))``, ``x_t = mu_t + sigma_t*eps`` and
    ``u_t = (1-2t)/(2t(1-t)) * (x_t - mu_t) + x1 - x0``. Since ``x_t - mu_t = sigma_t*eps`` the
    first term is computed as ``sigma*(1-2t)/(2*sqrt(t(1-t))) * eps``, with ``t(1-t)`` floored
    at ``1e-6`` so the target stays finite at the ends.

    Args:
        sigma: bridge noise level, finite and ``> 0``. Pair it with Sinkhorn ``reg = 2*sigma**2``.
    """

    def __init__(self, sigma: float = 1.0) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            hint = "; use ICFMPath (flow=icfm) for sigma=0" if sigma == 0 else ""
            raise ValueError(f"SchrodingerBridgePath needs sigma > 0 and finite, got {sigma}{hint}")
        self.sigma = float(sigma)

    def interpolate(self, x0, x1, t, eps):
        tb = _bcast(t, x1)
        var = (tb * (1 - tb)).clamp_min(1e-6)
        xt = tb * x1 + (1 - tb) * x0 + self.sigma * torch.sqrt(tb * (1 - tb)) * eps
        ut = self.sigma * (1 - 2 * tb) / (2 * torch.sqrt(var)) * eps + x1 - x0
        return xt.to(x1.dtype), ut.to(x1.dtype)
