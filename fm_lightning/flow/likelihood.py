"""Likelihoods and path energies of a flow, by integrating augmented ODE states.

Everything goes through the one torchdyn adapter, :func:`fm_lightning.flow.solve.odeint`: the
state ``x`` (B, *shape) is flattened and extended by ``k`` scalar channels, ``s = [x, a]``
(B, D + k), and the augmented field returns ``[v(x, t), g(x, t)]``. The NFE reported is the
number of augmented-field evaluations, i.e. of velocity evaluations (each divergence also
costs backward passes: ``D`` for the exact one, one for Hutchinson's). The divergences leave
inference mode for their backward passes, so ``x`` may be made under ``torch.inference_mode``
(Lightning's validate, test and predict); tensors the velocity closes over (labels, scales) must
be made outside it, or cloned there.

- **Log-likelihood** (instantaneous change of variables, Chen et al. 2018):
  ``d/dt log p_t(x_t) = -div v(x_t, t)``, so ``log p_1(x_1) = log p_0(x_0) - int_0^1 div v dt``.
  We integrate ``[x, a]`` with ``da/dt = div v`` *backwards* from ``(x_1, 0)`` at ``t=1`` to
  ``t=0``; then ``a(0) = -int_0^1 div v dt`` and ``log p_1(x_1) = log p_0(x_0) + a(0)``.
- **Path energy**: ``PE = E_x0 int_0^1 ||v(x_t, t)||^2 dt``, integrated forwards with
  ``de/dt = ||v||^2``. For a flow that transports ``q0`` to ``q1``, ``PE >= W2^2(q0, q1)``, with
  equality for the straight, constant-speed OT map; the *normalized path energy* of Tong et al.
  is ``NPE = |PE - W2^2| / W2^2``.

This module is pure torch (no Lightning, Hydra or W&B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from .solve import Solver, odeint

__all__ = [
    "Divergence",
    "Probe",
    "exact_divergence",
    "hutchinson_divergence",
    "make_probe",
    "LikelihoodResult",
    "log_likelihood",
    "PathEnergyResult",
    "path_energy",
    "normalized_path_energy",
    "dequantize",
    "bits_per_dim",
]

Velocity = Callable[[Tensor, Tensor], Tensor]
Divergence = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]


def _normal(x: Tensor) -> Tensor:
    """``x``, copied (outside inference mode) into a normal tensor if it was made under
    ``torch.inference_mode`` (Lightning's validate, test and predict), which autograd cannot record."""
    return x.clone() if x.is_inference() else x


def _grad_input(x: Tensor) -> Tensor:
    """``x`` as a leaf that requires grad."""
    return _normal(x).detach().requires_grad_(True)


def exact_divergence(velocity: Velocity, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The velocity and its exact divergence ``div v = sum_i dv_i/dx_i``.

    Uses one backward pass per dimension ``D`` of ``x`` (fine for low-dimensional data). The
    batch is summed before each backward pass, so ``velocity`` must treat samples independently
    (no batch norm), as the project's nets do.

    Args:
        velocity: ``velocity(x, t) -> v``.
        x: points (B, *shape).
        t: times (B,).

    Returns:
        ``(v, div)``: ``v`` (B, *shape) and ``div`` (B,), both detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, t = _grad_input(x), _normal(t)
        v = velocity(x, t)
        flat = v.flatten(1)
        dims = flat.shape[1]
        div = torch.zeros(x.shape[0], dtype=flat.dtype, device=x.device)
        for i in range(dims):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < dims - 1)
            div = div + grad.flatten(1)[:, i]
    return v.detach(), div.detach()


def hutchinson_divergence(velocity: Velocity, x: Tensor, t: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """The velocity and Hutchinson's estimate ``eps^T (dv/dx) eps`` of its divergence.

    Unbiased when the probe has ``E[eps eps^T] = I`` (Rademacher or standard Gaussian entries):
    ``E[eps^T J eps] = tr(J E[eps eps^T]) = tr J``. One vector-Jacobian product per call.

    Args:
        velocity: ``velocity(x, t) -> v``.
        x: points (B, *shape).
        t: times (B,).
        probe: ``eps`` (B, *shape).

    Returns:
        ``(v, estimate)``: ``v`` (B, *shape) and the estimate (B,), both detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x, t, probe = _grad_input(x), _normal(t), _normal(probe)
        v = velocity(x, t)
        (vjp,) = torch.autograd.grad((v * probe).sum(), x)
    return v.detach(), (vjp * probe).flatten(1).sum(1).detach()


def make_probe(shape: tuple[int, ...], kind: Probe = "rademacher", generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """A Hutchinson probe of ``shape`` (B, *shape): Rademacher (+-1) or standard Gaussian entries."""
    if kind == "rademacher":
        eps = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    elif kind == "gaussian":
        eps = torch.randn(shape, generator=generator)
    else:
        raise ValueError(f"unknown probe {kind!r}; choose 'rademacher' or 'gaussian'")
    return eps.to(device)


def _augmented_odeint(
    field: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    x: Tensor,
    channels: int,
    t0: float,
    t1: float,
    solver: Solver,
    steps: int | None,
    atol: float,
    rtol: float,
) -> tuple[Tensor, Tensor, int]:
    """Integrate ``[x, a]`` with ``d[x, a]/dt = field(x, t)`` from ``(x, 0)`` at ``t0`` to ``t1``.

    ``field(x, t) -> (v (B, *shape), g (B, channels))``. Returns ``(x(t1), a(t1), nfe)``.
    """
    shape, dims = x.shape, x[0].numel()
    state = torch.cat([x.detach().float().flatten(1), x.new_zeros(x.shape[0], channels, dtype=torch.float32)], 1)

    def augmented(s: Tensor, t: Tensor) -> Tensor:
        v, g = field(s[:, :dims].reshape(shape), t)
        return torch.cat([v.float().flatten(1), g.float().reshape(s.shape[0], channels)], 1)

    sol = odeint(augmented, state, solver, steps, atol, rtol, t0=t0, t1=t1)
    return sol.x[:, :dims].reshape(shape), sol.x[:, dims:], sol.nfe


@dataclass
class LikelihoodResult:
    """Result of :func:`log_likelihood`.

    Attributes:
        log_prob: ``log p_1(x_1)`` (B,), in nats.
        x0: the points mapped back to the source (B, *shape).
        delta_logp: ``a(0) = -int_0^1 div v dt`` (B,).
        nfe: velocity evaluations of the backward integration.
    """

    log_prob: Tensor
    x0: Tensor
    delta_logp: Tensor
    nfe: int


def log_likelihood(
    velocity: Velocity,
    x1: Tensor,
    source_log_prob: Callable[[Tensor], Tensor],
    solver: Solver = "dopri5",
    steps: int | None = 100,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: Divergence = "exact",
    probe: Probe = "rademacher",
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """``log p_1(x_1)`` of the flow's pushforward of the source, by the instantaneous change of
    variables integrated backwards from data (``t=1``) to source (``t=0``).

    ``log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt`` with ``x_0`` the ODE solution
    from ``x_1`` at ``t=1`` back to ``t=0``.

    Args:
        velocity: ``velocity(x, t) -> v``; ``x`` (B, *shape), ``t`` (B,).
        x1: data points (B, *shape).
        source_log_prob: ``log p_0(x0) -> (B,)``, the source density (e.g. ``Gaussian.log_prob``).
        solver, steps, atol, rtol: ODE solver settings (see :func:`~fm_lightning.flow.solve.odeint`).
        divergence: ``exact`` (D backward passes per evaluation) or ``hutchinson`` (one; the
            probe is drawn once per sample and held along the trajectory, as in FFJORD).
        probe: Hutchinson probe distribution.
        generator: RNG of the Hutchinson probe.
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; choose 'exact' or 'hutchinson'")
    eps = make_probe(tuple(x1.shape), probe, generator, x1.device) if divergence == "hutchinson" else None

    def field(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        v, div = exact_divergence(velocity, x, t) if eps is None else hutchinson_divergence(velocity, x, t, eps)
        return v, div[:, None]

    x0, a, nfe = _augmented_odeint(field, x1, 1, 1.0, 0.0, solver, steps, atol, rtol)
    delta = a[:, 0]
    return LikelihoodResult(log_prob=source_log_prob(x0).float() + delta, x0=x0, delta_logp=delta, nfe=nfe)


@dataclass
class PathEnergyResult:
    """Result of :func:`path_energy`.

    Attributes:
        x1: the pushed-forward points (B, *shape).
        energy: ``int_0^1 ||v(x_t, t)||^2 dt`` per sample (B,).
        nfe: velocity evaluations.
    """

    x1: Tensor
    energy: Tensor
    nfe: int

    @property
    def mean(self) -> float:
        """``PE``: the mean energy over samples."""
        return float(self.energy.mean())


def path_energy(
    velocity: Velocity,
    x0: Tensor,
    solver: Solver = "dopri5",
    steps: int | None = 100,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> PathEnergyResult:
    """Integrate ``dx/dt = v(x, t)`` and ``de/dt = ||v(x, t)||^2`` from ``t=0`` to ``t=1``.

    Args:
        velocity: ``velocity(x, t) -> v``; ``x`` (B, *shape), ``t`` (B,).
        x0: source points (B, *shape).
        solver, steps, atol, rtol: ODE solver settings. Fixed-step solvers give the matching
            quadrature of the energy (Euler: the left Riemann sum).
    """

    def field(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        v = velocity(x, t).float()
        return v, v.flatten(1).square().sum(1, keepdim=True)

    x1, e, nfe = _augmented_odeint(field, x0, 1, 0.0, 1.0, solver, steps, atol, rtol)
    return PathEnergyResult(x1=x1, energy=e[:, 0], nfe=nfe)


def normalized_path_energy(energy: float, w2_squared: float) -> float:
    """Tong et al.'s normalized path energy ``NPE = |PE - W2^2| / W2^2``.

    Args:
        energy: the flow's path energy ``PE``.
        w2_squared: the squared 2-Wasserstein distance between source and target, ``> 0``.
    """
    if not w2_squared > 0:
        raise ValueError(f"NPE needs W2^2 > 0 between source and target, got {w2_squared}")
    return abs(float(energy) - float(w2_squared)) / float(w2_squared)


def dequantize(images: Tensor, generator: torch.Generator | None = None, levels: int = 256) -> Tensor:
    """Uniform dequantisation of 8-bit images given in [-1, 1].

    Pixels ``x = k/127.5 - 1`` (``k`` in 0..255) become ``y = 2*(k + u)/levels - 1`` with
    ``u ~ U[0, 1)``: a continuous density on ``[-1, 1)^D`` whose log-likelihood lower-bounds the
    discrete one (see :func:`bits_per_dim`).

    Args:
        images: (B, C, H, W) in [-1, 1].
        generator: RNG of ``u``.
        levels: quantisation levels (256 for 8 bits).
    """
    k = ((images.float().clamp(-1, 1) + 1) * (levels - 1) / 2).round()
    u = torch.rand(images.shape, generator=generator).to(images.device)
    return 2 * (k + u) / levels - 1


def bits_per_dim(log_prob: Tensor, dims: int, levels: int = 256) -> Tensor:
    """Bits per dimension of dequantised data (B,), from ``log p(y)`` in nats on ``[-1, 1)^D``.

    The map ``y = 2*(k + u)/levels - 1`` scales each dimension by ``2/levels``, so the density of
    ``k + u`` on ``[0, levels)^D`` is ``p(y) (2/levels)^D`` and
    ``bpd = (-log p(y)/D + log(levels/2)) / log 2``.
    """
    return (-log_prob / dims + math.log(levels / 2)) / math.log(2)
