"""ODE integration: the one adapter over torchdyn, with an NFE count.

Velocities follow the project contract ``v = velocity(x, t)`` with ``x`` (B, *shape) and
``t`` (B,); torchdyn calls ``f(t, x)`` with a scalar ``t``, which the adapter broadcasts.
Integration always runs in fp32 under ``torch.no_grad`` (autocast disabled).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
from torch import Tensor

__all__ = ["Solver", "SOLVERS", "FIXED_STEP_SOLVERS", "ODESolution", "odeint", "check_solver",
           "check_solver_options"]

Solver = Literal["euler", "midpoint", "rk4", "dopri5", "tsit5"]
SOLVERS: tuple[str, ...] = get_args(Solver)
#: Function evaluations per step of each fixed-step solver.
FIXED_STEP_SOLVERS = {"euler": 1, "midpoint": 2, "rk4": 4}


@dataclass
class ODESolution:
    """Result of :func:`odeint`.

    Attributes:
        x: final state (B, *shape), fp32.
        nfe: number of velocity evaluations used.
        t: (T,) times of the trajectory, or ``None``.
        trajectory: (T, B, *shape) states at ``t``, or ``None``.
    """

    x: Tensor
    nfe: int
    t: Tensor | None = None
    trajectory: Tensor | None = None


def check_solver(solver: str, steps: int | None = None, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Raise ``ValueError`` for an unknown solver or invalid step count / tolerances."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    if solver in FIXED_STEP_SOLVERS:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"fixed-step solver {solver!r} needs steps >= 1 (a whole number), got {steps!r}")
    elif not all(isinstance(tol, numbers.Real) and tol > 0 for tol in (atol, rtol)):  # NaN too
        raise ValueError(f"adaptive solver {solver!r} needs atol > 0 and rtol > 0, got atol={atol}, rtol={rtol}")
    elif rtol < 1e-10:  # float32 resolves 1.2e-7; below ~1e-11 steps shrink until MAX_NFE
        raise ValueError(f"adaptive solver {solver!r}: rtol={rtol:g} is far below float32 resolution (1.2e-07); the "
                         "solve could not end: use rtol 1e-6 or larger")


def check_solver_options(solver: str, steps: int | None, atol: float | None, rtol: float | None) -> None:
    """Refuse ``--steps`` for an adaptive solver and ``--atol``/``--rtol`` for a fixed-step one
    (``solver``: the one that will run, given or the checkpoint's), which it would ignore."""
    if solver in FIXED_STEP_SOLVERS and (atol is not None or rtol is not None):
        raise ValueError(f"--atol/--rtol apply to the adaptive solvers (dopri5, tsit5), not to {solver}; "
                         "give --steps, or --solver dopri5")
    if solver not in FIXED_STEP_SOLVERS and steps is not None:
        raise ValueError(f"--steps applies to the fixed-step solvers ({', '.join(FIXED_STEP_SOLVERS)}), not to "
                         f"{solver}; give --atol/--rtol, or --solver euler (or midpoint, rk4) with --steps")


#: Velocity evaluations after which an adaptive solve is given up (it would otherwise never end).
MAX_NFE = 10_000


class _SolveFailed(Exception):
    """Raised inside torchdyn's loop to stop an integration that cannot succeed."""


class _TorchdynField(torch.nn.Module):
    """torchdyn's ``f(t, x)`` view of a project velocity ``v(x, t)``; counts evaluations and
    stops the solve on a non-finite velocity or after ``max_nfe`` evaluations (if not ``None``)."""

    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor], max_nfe: int | None) -> None:
        super().__init__()
        self.velocity, self.max_nfe = velocity, max_nfe
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor, args=None) -> Tensor:
        self.nfe += 1
        v = self.velocity(x, t.reshape(()).expand(x.shape[0])).float()
        if not torch.isfinite(v).all():
            raise _SolveFailed(
                f"the velocity is not finite at t={float(t):.3g} (after {self.nfe} evaluations): the start "
                "points or the net's weights hold NaN/inf values, or the state left float32 range"
            )
        if self.max_nfe is not None and self.nfe > self.max_nfe:
            raise _SolveFailed(
                f"the adaptive solver did not reach the end within {self.max_nfe} velocity evaluations "
                f"(stuck at t={float(t):.3g}); loosen atol/rtol (float32 resolves relative changes of "
                "about 1e-7) or use a fixed-step solver"
            )
        return v


def _torchdyn_solver(solver: str):
    """A torchdyn solver instance. torchdyn 1.0.6's ``rk4`` evaluates its stages at times
    ``t + (0, 0, 1/2, 1/2)*dt`` instead of ``t + (0, 1/2, 1/2, 1)*dt`` (it indexes its ``c``
    vector from the first, zero, entry), which is wrong for time-dependent fields; we give it
    the shifted vector so the classical RK4 is what runs."""
    from torchdyn.numerics.solvers.ode import RungeKutta4, str_to_solver

    if solver != "rk4":
        return str_to_solver(solver)
    rk4 = RungeKutta4()
    c, a, bsol, berr = rk4.tableau
    rk4.tableau = (torch.tensor([0.5, 0.5, 1.0], dtype=c.dtype), a, bsol, berr)
    return rk4


def odeint(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    solver: Solver = "dopri5",
    steps: int | None = 100,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    num_saves: int = 0,
    t0: float = 0.0,
    t1: float = 1.0,
) -> ODESolution:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t0`` to ``t1``.

    Args:
        velocity: ``velocity(x, t) -> v``, ``x`` (B, *shape), ``t`` (B,).
        x0: initial state (B, *shape); cast to fp32.
        solver: ``euler``, ``midpoint`` and ``rk4`` take ``steps`` fixed steps (NFE =
            steps x 1, 2, 4); ``dopri5`` and ``tsit5`` adapt to ``atol``/``rtol``.
        steps: number of fixed steps (ignored by adaptive solvers).
        atol: absolute tolerance of adaptive solvers.
        rtol: relative tolerance of adaptive solvers.
        num_saves: if > 1, also return the trajectory at this many evenly spaced times.
        t0: start time.
        t1: end time (may be < ``t0`` to integrate backwards; ``t1 == t0`` returns ``x0``, NFE 0).

    Raises ``ValueError`` on a non-finite velocity, or when an adaptive solver needs more than
    :data:`MAX_NFE` evaluations.
    """
    from torchdyn.numerics import odeint as torchdyn_odeint

    check_solver(solver, steps, atol, rtol)
    x0 = x0.float()
    field = _TorchdynField(velocity, max_nfe=None if solver in FIXED_STEP_SOLVERS else MAX_NFE)
    device = x0.device
    # torchdyn flips a decreasing t_span itself, but then never matches the fixed-step
    # ``save_at`` times and returns negated times; integrate ``-v(x, -s)`` over s in [-t0, -t1].
    reverse = t1 < t0
    f = (lambda t, x: -field(-t, x)) if reverse else field
    s0, s1 = (-t0, -t1) if reverse else (t0, t1)
    if solver in FIXED_STEP_SOLVERS:
        t_span = torch.linspace(s0, s1, int(steps) + 1, device=device)
        kwargs = {}
        if num_saves > 1:
            # Save at the step times nearest to evenly spaced fractions of the way.
            idx = torch.linspace(0, int(steps), num_saves).round().long().unique()
            kwargs["save_at"] = t_span[idx]
    else:
        t_span = torch.linspace(s0, s1, max(num_saves, 2), device=device)
        kwargs = {"atol": atol, "rtol": rtol}
    if t0 == t1:  # nothing to integrate (torchdyn's fixed-step loop asserts): x0 at every save
        t_eval = kwargs.get("save_at", t_span)
        traj = x0.expand(len(t_eval), *x0.shape).clone()
    else:
        with torch.no_grad(), torch.autocast(device.type, enabled=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting tolerances has no effect")
            try:
                t_eval, traj = torchdyn_odeint(f, x0, t_span, _torchdyn_solver(solver), **kwargs)
            except _SolveFailed as err:
                raise ValueError(f"{solver}: {err}") from None
    if reverse:
        t_eval = -t_eval
    if num_saves > 1:
        return ODESolution(x=traj[-1], nfe=field.nfe, t=t_eval, trajectory=traj)
    return ODESolution(x=traj[-1], nfe=field.nfe)
