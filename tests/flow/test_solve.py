"""The ODE solver on fields with closed-form solutions (and closed-form discretisations)."""

import math

import pytest
import torch

from fm_lightning.flow.solve import SOLVERS, odeint

FIXED = ["euler", "midpoint", "rk4"]
ADAPTIVE = ["dopri5", "tsit5"]
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4}


class Counter:
    """Wraps a velocity ``f(x, t)`` and records every call (and its times)."""

    def __init__(self, f):
        self.f, self.calls, self.times = f, 0, []

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],), "t must be (B,)"
        assert x.dtype == torch.float32 and t.dtype == torch.float32
        self.times.append(float(t[0]))
        return self.f(x, t)


def _x0(shape=(5, 3), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _tcol(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("solver", FIXED + ADAPTIVE)
@pytest.mark.parametrize("shape", [(5, 3), (4, 1, 3, 3)], ids=str)
def test_constant_field(solver, shape):
    x0 = _x0(shape)
    c = torch.linspace(-2, 3, shape[-1])
    sol = odeint(lambda x, t: c.expand_as(x), x0, solver, steps=3)
    torch.testing.assert_close(sol.x, x0 + c, rtol=1e-6, atol=1e-6)
    assert sol.x.shape == shape


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_linear_field_fixed_step_closed_form(steps):
    """On v = a*x each method multiplies x by its stability polynomial R(a h) per step."""
    a, h = 1.3, 1.0 / steps
    z = a * h
    growth = {
        "euler": (1 + z) ** steps,
        "midpoint": (1 + z + z**2 / 2) ** steps,
        "rk4": (1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24) ** steps,
    }
    x0 = _x0()
    for solver, g in growth.items():
        sol = odeint(lambda x, t: a * x, x0, solver, steps=steps)
        torch.testing.assert_close(sol.x, x0 * g, rtol=1e-5, atol=1e-6)
    # And rk4 converges to the exact solution x0 * exp(a).
    sol = odeint(lambda x, t: a * x, x0, "rk4", steps=50)
    torch.testing.assert_close(sol.x, x0 * math.exp(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ADAPTIVE)
@pytest.mark.parametrize("a", [1.0, -2.0])
def test_linear_field_adaptive_accuracy(solver, a):
    x0 = _x0()
    counter = Counter(lambda x, t: a * x)
    sol = odeint(counter, x0, solver, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sol.x, x0 * math.exp(a), rtol=2e-5, atol=2e-5)
    assert sol.nfe > 0 and sol.nfe == counter.calls


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_time_field_quadratic(steps):
    """v = 3 t^2 (x1 = x0 + 1): left Riemann sum for Euler, midpoint rule, Simpson (exact) for rk4."""
    x0 = _x0()
    v = lambda x, t: 3 * _tcol(t, x) ** 2 * torch.ones_like(x)  # noqa: E731
    n = steps
    expected = {"euler": (n - 1) * (2 * n - 1) / (2 * n**2), "midpoint": 1 - 1 / (4 * n**2), "rk4": 1.0}
    for solver, inc in expected.items():
        sol = odeint(v, x0, solver, steps=steps)
        torch.testing.assert_close(sol.x, x0 + inc, rtol=1e-6, atol=1e-6)
    for solver in ADAPTIVE:
        sol = odeint(v, x0, solver, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sol.x, x0 + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_rk4_exact_for_cubic_time_field(steps):
    """Classical RK4 reduces to Simpson's rule on v(t), exact for cubics: 4t^3 integrates to 1.
    (torchdyn's own rk4 evaluates the stages at the wrong times and gives 0.25 for steps=1.)"""
    x0 = _x0()
    counter = Counter(lambda x, t: 4 * _tcol(t, x) ** 3 * torch.ones_like(x))
    sol = odeint(counter, x0, "rk4", steps=steps)
    torch.testing.assert_close(sol.x, x0 + 1, rtol=1e-6, atol=1e-6)
    if steps == 1:
        assert counter.times == pytest.approx([0.0, 0.5, 0.5, 1.0])


def test_rk4_on_time_dependent_linear_field():
    """dx/dt = 2 t x has x(1) = x0 * e; classical RK4 is 4th order, the buggy stages are not."""
    x0 = _x0()
    errs = []
    for steps in (4, 8):
        sol = odeint(lambda x, t: 2 * _tcol(t, x) * x, x0, "rk4", steps=steps)
        errs.append((sol.x - x0 * math.e).abs().max().item() / x0.abs().max().item())
    assert errs[1] < 1e-4
    assert errs[0] / errs[1] > 10  # ~2^4 for a 4th-order method


@pytest.mark.parametrize("solver", FIXED)
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_fixed_step_nfe(solver, steps):
    counter = Counter(lambda x, t: -x)
    sol = odeint(counter, _x0(), solver, steps=steps)
    assert sol.nfe == steps * STAGES[solver] == counter.calls


@pytest.mark.parametrize("solver", FIXED)
def test_fixed_step_trajectory_matches_closed_form(solver):
    """Saved states are at step times, where Euler etc. equal R(a h)^k x0."""
    a, steps = 0.8, 10
    h, x0 = 1.0 / steps, _x0()
    z = a * h
    r = {"euler": 1 + z, "midpoint": 1 + z + z**2 / 2, "rk4": 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24}[solver]
    sol = odeint(lambda x, t: a * x, x0, solver, steps=steps, num_saves=5)
    assert sol.trajectory.shape == (5, *x0.shape) and sol.t.shape == (5,)
    assert sol.t[0].item() == 0.0 and sol.t[-1].item() == pytest.approx(1.0)
    assert torch.all(sol.t[1:] > sol.t[:-1])
    k = torch.round(sol.t / h)
    torch.testing.assert_close(sol.t, k * h, rtol=0, atol=1e-6)  # on the step grid
    torch.testing.assert_close(sol.trajectory[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x, rtol=0, atol=0)
    for tk, kk, xk in zip(sol.t, k, sol.trajectory):
        torch.testing.assert_close(xk, x0 * r ** int(kk), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_trajectory(solver):
    a, x0 = -1.5, _x0((4, 1, 3, 3))
    sol = odeint(lambda x, t: a * x, x0, solver, atol=1e-6, rtol=1e-6, num_saves=6)
    assert sol.trajectory.shape == (6, 4, 1, 3, 3)
    torch.testing.assert_close(sol.t, torch.linspace(0, 1, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(sol.trajectory[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x, rtol=0, atol=0)
    for tk, xk in zip(sol.t, sol.trajectory):
        torch.testing.assert_close(xk, x0 * math.exp(a * float(tk)), rtol=2e-5, atol=2e-5)


def test_no_trajectory_by_default():
    sol = odeint(lambda x, t: x, _x0(), "euler", steps=2)
    assert sol.t is None and sol.trajectory is None


@pytest.mark.parametrize("solver", FIXED + ADAPTIVE)
def test_backward_integration(solver):
    """From t0=1 to t1=0 on v = a x: x(0) = x(1) exp(-a); times run from 1 down to 0."""
    a, x1 = 0.9, _x0()
    sol = odeint(lambda x, t: a * x, x1, solver, steps=40, atol=1e-6, rtol=1e-6, t0=1.0, t1=0.0, num_saves=3)
    z = -a / 40  # each backward step multiplies by R(-a h)
    r = {"euler": 1 + z, "midpoint": 1 + z + z**2 / 2, "rk4": 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24}
    expected = r[solver] ** 40 if solver in r else math.exp(-a)
    torch.testing.assert_close(sol.x, x1 * expected, rtol=2e-5, atol=2e-5)
    assert sol.trajectory.shape == (3, *x1.shape)
    torch.testing.assert_close(sol.t, torch.tensor([1.0, 0.5, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(sol.trajectory[0], x1, rtol=0, atol=0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x, rtol=0, atol=0)


def test_backward_time_field_sees_true_times():
    """Backward rk4 on v = 4 t^3 from 1 to 0 removes exactly 1, evaluating at t in [0, 1]."""
    x1 = _x0()
    counter = Counter(lambda x, t: 4 * _tcol(t, x) ** 3 * torch.ones_like(x))
    sol = odeint(counter, x1, "rk4", steps=2, t0=1.0, t1=0.0)
    torch.testing.assert_close(sol.x, x1 - 1, rtol=1e-6, atol=1e-6)
    assert min(counter.times) >= 0.0 and max(counter.times) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["euler", "dopri5"])
def test_output_is_fp32(dtype, solver):
    x0 = _x0().to(dtype)
    sol = odeint(lambda x, t: (0.5 * x).double(), x0, solver, steps=4, num_saves=3)
    assert sol.x.dtype == torch.float32 and sol.trajectory.dtype == torch.float32
    torch.testing.assert_close(sol.trajectory[0], x0.float(), rtol=0, atol=0)


def test_runs_without_grad_and_autocast():
    a = torch.tensor(0.7, requires_grad=True)
    lin = torch.nn.Linear(3, 3)
    seen = {}

    def v(x, t):
        seen["grad"] = torch.is_grad_enabled()
        y = lin(x)
        seen["dtype"] = y.dtype
        return a * x + 0 * y

    x0 = _x0().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = odeint(v, x0, "rk4", steps=2)
    assert not sol.x.requires_grad
    assert seen == {"grad": False, "dtype": torch.float32}
    torch.testing.assert_close(sol.x, x0.detach() * (1 + 0.35 + 0.35**2 / 2 + 0.35**3 / 6 + 0.35**4 / 24) ** 2)


def test_unknown_solver_lists_choices():
    with pytest.raises(ValueError) as err:
        odeint(lambda x, t: x, _x0(), "heun", steps=2)
    msg = str(err.value)
    assert "heun" in msg
    for name in SOLVERS:
        assert name in msg
    assert set(SOLVERS) == set(FIXED + ADAPTIVE)


@pytest.mark.parametrize("solver", FIXED)
@pytest.mark.parametrize("steps", [0, -3, None, 2.5, "10"])
def test_bad_steps_raise(solver, steps):
    with pytest.raises(ValueError, match=r"needs steps >= 1 \(a whole number\)"):
        odeint(lambda x, t: x, _x0(), solver, steps=steps)


@pytest.mark.parametrize("solver", ADAPTIVE)
@pytest.mark.parametrize("atol,rtol", [(0.0, 1e-5), (1e-5, -1.0), (float("nan"), 1e-5), ("1e-5x", 1e-5), (1e-5, 1e-11)])
def test_bad_tolerances_raise(solver, atol, rtol):
    with pytest.raises(ValueError, match="atol > 0 and rtol > 0|rtol=1e-11 is far below float32 resolution"):
        odeint(lambda x, t: x, _x0(), solver, atol=atol, rtol=rtol)


def test_adaptive_ignores_steps():
    sol = odeint(lambda x, t: x, _x0(), "dopri5", steps=None)
    torch.testing.assert_close(sol.x, _x0() * math.e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "dopri5"])
@pytest.mark.parametrize("where", ["x0", "net"])
def test_non_finite_velocity_stops_the_solve(solver, where):
    x0 = _x0()
    if where == "x0":
        x0[1, 0] = float("inf")
    velocity = (lambda x, t: -x) if where == "x0" else (lambda x, t: x * float("nan"))
    with pytest.raises(ValueError, match="velocity is not finite at t=0 .*NaN/inf"):
        odeint(velocity, x0, solver, steps=4)


def test_adaptive_solve_that_cannot_finish_is_stopped(monkeypatch):
    # A field that oscillates 1000 times over [0, 1] needs far more evaluations than the cap:
    # the solve stops with advice instead of running on.
    monkeypatch.setattr("fm_lightning.flow.solve.MAX_NFE", 300)
    with pytest.raises(ValueError, match="did not reach the end within 300 velocity evaluations.*loosen atol/rtol"):
        odeint(lambda x, t: torch.cos(2000 * math.pi * t)[:, None] * x, _x0(), "dopri5", atol=1e-6, rtol=1e-6)
    assert odeint(lambda x, t: -x, _x0(), "dopri5").nfe < 300  # an ordinary solve is not affected
    assert odeint(lambda x, t: -x, _x0(), "euler", steps=500).nfe == 500  # fixed steps are bounded already


@pytest.mark.parametrize("solver", ["euler", "rk4", "dopri5"])
def test_zero_length_interval_returns_x0_without_evaluations(solver):
    """t0 == t1: x(t1) = x0 in fp32, no velocity evaluation, and a constant trajectory of
    num_saves states when asked (steps=10 >= num_saves - 1, so every save is a distinct step)."""
    x0 = _x0().double()
    f = Counter(lambda x, t: -x)
    sol = odeint(f, x0, solver, steps=10, t0=0.5, t1=0.5)
    assert sol.nfe == f.calls == 0 and sol.x.dtype == torch.float32
    torch.testing.assert_close(sol.x, x0.float(), rtol=0, atol=0)
    sol = odeint(f, x0, solver, steps=10, num_saves=4, t0=0.5, t1=0.5)
    assert sol.nfe == 0 and sol.t.tolist() == [0.5] * 4 and sol.trajectory.shape == (4, *x0.shape)
    torch.testing.assert_close(sol.trajectory, x0.float().expand(4, *x0.shape), rtol=0, atol=0)
