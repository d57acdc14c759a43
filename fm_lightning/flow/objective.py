"""The conditional flow matching objective: coupling + time sampler + path + regression."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .couplings import Coupling, IndependentCoupling, SinkhornOTCoupling
from .paths import PathSample, ProbabilityPath, SchrodingerBridgePath
from .timesteps import TimeSampler, UniformTime

__all__ = ["CFMObjective", "CFMLoss"]

Velocity = Callable[..., Tensor]


@dataclass
class CFMLoss:
    """Result of one objective evaluation.

    Attributes:
        loss: scalar mean loss (fp32).
        per_sample: (B,) squared error per sample, averaged over dimensions (fp32).
        sample: the path draw that was regressed on.
        cond: (B,) labels re-paired with ``x1``, or ``None``.
    """

    loss: Tensor
    per_sample: Tensor
    sample: PathSample
    cond: Tensor | None


class CFMObjective:
    """``E_{t, (x0, x1) ~ coupling, eps} ||v(x_t, t) - u_t||^2``.

    Args:
        path: the probability path that gives ``x_t`` and ``u_t``.
        coupling: how ``(x0, x1)`` pairs are drawn from a minibatch.
        time_sampler: the distribution of ``t``.
    """

    def __init__(
        self,
        path: ProbabilityPath,
        coupling: Coupling | None = None,
        time_sampler: TimeSampler | None = None,
    ) -> None:
        self.path = path
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        if isinstance(self.coupling, SinkhornOTCoupling) and self.coupling.reg is None:
            if not isinstance(path, SchrodingerBridgePath):
                raise ValueError("SinkhornOTCoupling(reg=None) needs a SchrodingerBridgePath (reg = 2*sigma**2)")
            self.coupling = copy.copy(self.coupling)  # the caller's coupling may serve another sigma
            self.coupling.reg = 2 * path.sigma**2

    def draw(
        self, x0: Tensor, x1: Tensor, cond: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[PathSample, Tensor | None]:
        """Pair, draw ``t`` and ``eps``, and sample the path: everything but the net, so a
        data loader can do it (``ToyDataModule`` does). Shapes (B, *shape)."""
        x0, x1, cond = self.coupling(x0, x1, cond, generator=generator)
        t = self.time_sampler(x1.shape[0], device=x1.device, generator=generator)
        if generator is None:
            eps = torch.randn_like(x1)
        else:
            eps = torch.randn(x1.shape, generator=generator, device=generator.device, dtype=x1.dtype).to(x1.device)
        return self.path.sample(x0, x1, t, eps), cond

    def regress(self, net: Velocity, sample: PathSample, cond: Tensor | None = None) -> CFMLoss:
        """The loss of ``net(x, t, cond)`` on a drawn sample; the target and reduction stay fp32."""
        v = net(sample.xt, sample.t, cond) if cond is not None else net(sample.xt, sample.t)
        per_sample = (v.float() - sample.ut.float()).square().flatten(1).mean(1)
        return CFMLoss(loss=per_sample.mean(), per_sample=per_sample, sample=sample, cond=cond)

    def __call__(
        self,
        net: Velocity,
        x0: Tensor,
        x1: Tensor,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CFMLoss:
        """Draw (:meth:`draw`) and evaluate the loss (:meth:`regress`)."""
        sample, cond = self.draw(x0, x1, cond, generator)
        return self.regress(net, sample, cond)

    def __repr__(self) -> str:
        return f"CFMObjective(path={self.path}, coupling={self.coupling}, time_sampler={self.time_sampler})"
