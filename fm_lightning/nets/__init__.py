"""Velocity networks. Contract: ``net(x, t, cond=None) -> v`` with ``x`` (B, *shape),
``t`` (B,) and ``v`` shaped like ``x``."""

from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet"]
