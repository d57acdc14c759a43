"""Time samplers: draw training times ``t`` of shape (B,) in [0, 1]."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TimeSampler", "UniformTime", "LogitNormalTime"]


def _device(generator: torch.Generator | None, device) -> torch.device | None:
    """Draw on the generator's device (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else device


class TimeSampler:
    """Base class: ``sampler(n, device, generator) -> t`` with ``t`` of shape (n,)."""

    def __call__(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class UniformTime(TimeSampler):
    """``t ~ U[0, 1]``."""

    def __call__(self, n, device=None, generator=None):
        return torch.rand(n, generator=generator, device=_device(generator, device)).to(device)


class LogitNormalTime(TimeSampler):
    """``t = sigmoid(m + s*z)`` with ``z ~ N(0, 1)`` (as in Stable Diffusion 3).

    Args:
        mean: location ``m`` of the logit, finite.
        std: scale ``s > 0`` of the logit, finite.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not math.isfinite(mean):
            raise ValueError(f"LogitNormalTime mean must be finite, got {mean}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"LogitNormalTime std must be > 0 and finite, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, n, device=None, generator=None):
        z = torch.randn(n, generator=generator, device=_device(generator, device)).to(device)
        return torch.sigmoid(self.mean + self.std * z)
