"""Analytic checks of the probability paths: u_t = d/dt x_t, endpoint marginals, parameters."""

import math

import pytest
import torch
from torch.func import jvp

from fm_lightning.flow.paths import ICFMPath, LipmanOTPath, SchrodingerBridgePath, VPPath

PATHS = [
    ICFMPath(0.0),
    ICFMPath(0.3),
    LipmanOTPath(1e-4),
    LipmanOTPath(0.2),
    LipmanOTPath(0.0),
    VPPath(0.0),
    VPPath(0.25),
    SchrodingerBridgePath(0.5),
    SchrodingerBridgePath(2.0),
]
SHAPES = [(16, 2), (8, 1, 3, 3)]


def _draw(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, x1, eps = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return x0, x1, eps


@pytest.mark.parametrize("path", PATHS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ut_is_time_derivative_of_xt(path, shape):
    """u_t = d/dt x_t at fixed (x0, x1, eps), by forward-mode AD and by central differences."""
    x0, x1, eps = _draw(shape)
    b = shape[0]
    # Interior times, away from the SB endpoint singularity of d sigma_t / dt.
    t = torch.linspace(0.02, 0.98, b, dtype=torch.float64)
    xt_of_t = lambda tt: path.interpolate(x0, x1, tt, eps)[0]  # noqa: E731
    _, dxdt = jvp(xt_of_t, (t,), (torch.ones_like(t),))
    _, ut = path.interpolate(x0, x1, t, eps)
    torch.testing.assert_close(ut, dxdt, rtol=1e-10, atol=1e-10)
    h = 1e-6
    fd = (xt_of_t(t + h) - xt_of_t(t - h)) / (2 * h)
    torch.testing.assert_close(ut, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_icfm_endpoints_and_velocity(sigma):
    x0, x1, eps = _draw((10, 3))
    path = ICFMPath(sigma)
    for tv, end in [(0.0, x0), (1.0, x1)]:
        xt, ut = path.interpolate(x0, x1, torch.full((10,), tv, dtype=torch.float64), eps)
        torch.testing.assert_close(xt, end + sigma * eps, rtol=0, atol=1e-12)
        torch.testing.assert_close(ut, x1 - x0, rtol=0, atol=1e-12)


def test_lipman_endpoints():
    """x_0 = x0 (the N(0, I) source) and x_1 = x1 + sigma_min * x0; eps is not used."""
    s = 0.1
    x0, x1, eps = _draw((10, 3))
    path = LipmanOTPath(s)
    xt0, _ = path.interpolate(x0, x1, torch.zeros(10, dtype=torch.float64), eps)
    xt1, _ = path.interpolate(x0, x1, torch.ones(10, dtype=torch.float64), eps)
    torch.testing.assert_close(xt0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(xt1, x1 + s * x0, rtol=0, atol=1e-12)
    # The conditional marginal at t: N(t*x1, (1 - (1 - s) t)^2 I) for x0 ~ N(0, I).
    n, tv = 200_000, 0.4
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1c = torch.tensor([[2.0, -1.0]], dtype=torch.float64).expand(n, 2)
    xt, _ = path.interpolate(z, x1c, torch.full((n,), tv, dtype=torch.float64), torch.zeros_like(z))
    torch.testing.assert_close(xt.mean(0), tv * x1c[0], rtol=0, atol=0.01)
    torch.testing.assert_close(xt.std(0), torch.full((2,), 1 - (1 - s) * tv, dtype=torch.float64), rtol=0, atol=0.01)


@pytest.mark.parametrize("sigma_min", [0.0, 1e-4, 0.3])
def test_lipman_ut_matches_closed_form(sigma_min):
    """u_t = (x1 - (1 - sigma_min) x_t) / (1 - (1 - sigma_min) t)."""
    x0, x1, eps = _draw((32, 2))
    t = torch.linspace(0.0, 0.99, 32, dtype=torch.float64)
    xt, ut = LipmanOTPath(sigma_min).interpolate(x0, x1, t, eps)
    expected = (x1 - (1 - sigma_min) * xt) / (1 - (1 - sigma_min) * t)[:, None]
    torch.testing.assert_close(ut, expected, rtol=1e-9, atol=1e-9)


def test_lipman_ut_finite_at_t1_with_zero_sigma_min():
    x0, x1, eps = _draw((8, 2))
    xt, ut = LipmanOTPath(0.0).interpolate(x0, x1, torch.ones(8, dtype=torch.float64), eps)
    assert torch.isfinite(ut).all()
    torch.testing.assert_close(xt, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(ut, x1 - x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.2])
def test_vp_endpoints(sigma):
    x0, x1, eps = _draw((10, 3))
    path = VPPath(sigma)
    xt0, ut0 = path.interpolate(x0, x1, torch.zeros(10, dtype=torch.float64), eps)
    xt1, ut1 = path.interpolate(x0, x1, torch.ones(10, dtype=torch.float64), eps)
    torch.testing.assert_close(xt0, x0 + sigma * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(xt1, x1 + sigma * eps, rtol=0, atol=1e-12)
    # u_0 = pi/2 x1 and u_1 = -pi/2 x0.
    torch.testing.assert_close(ut0, math.pi / 2 * x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(ut1, -math.pi / 2 * x0, rtol=0, atol=1e-12)


def test_vp_preserves_unit_variance():
    """For independent x0, x1 ~ N(0, I), x_t ~ N(0, I) at every t (cos^2 + sin^2 = 1)."""
    n = 200_000
    x0, x1, eps = _draw((n, 2), seed=3)
    for tv in (0.2, 0.5, 0.9):
        xt, _ = VPPath(0.0).interpolate(x0, x1, torch.full((n,), tv, dtype=torch.float64), eps)
        torch.testing.assert_close(xt.var(0), torch.ones(2, dtype=torch.float64), rtol=0, atol=0.02)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_sb_noise_vanishes_at_ends_and_ut_finite(sigma):
    x0, x1, eps = _draw((10, 3))
    path = SchrodingerBridgePath(sigma)
    for tv, end in [(0.0, x0), (1.0, x1)]:
        xt, ut = path.interpolate(x0, x1, torch.full((10,), tv, dtype=torch.float64), eps)
        torch.testing.assert_close(xt, end, rtol=0, atol=1e-12)
        assert torch.isfinite(ut).all()
    # Same in float32, where the floor must still keep the ends finite.
    f = [z.float() for z in (x0, x1, eps)]
    _, ut = path.interpolate(*f[:2], torch.tensor([0.0, 1.0] * 5), f[2])
    assert torch.isfinite(ut).all()


def test_sb_marginal_variance():
    """x_t | (x0, x1) ~ N(t x1 + (1-t) x0, sigma^2 t (1-t) I), with eps drawn by sample()."""
    sigma, n = 1.5, 200_000
    torch.manual_seed(0)
    x0 = torch.zeros(n, 2, dtype=torch.float64)
    x1 = torch.full((n, 2), 4.0, dtype=torch.float64)
    for tv in (0.25, 0.5):
        s = SchrodingerBridgePath(sigma).sample(x0, x1, torch.full((n,), tv, dtype=torch.float64))
        torch.testing.assert_close(s.xt.mean(0), torch.full((2,), 4.0 * tv, dtype=torch.float64), rtol=0, atol=0.02)
        expected_std = sigma * math.sqrt(tv * (1 - tv))
        torch.testing.assert_close(s.xt.std(0), torch.full((2,), expected_std, dtype=torch.float64), rtol=0.01, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ICFMPath(-0.1),
        lambda: VPPath(-0.1),
        lambda: LipmanOTPath(1.0),
        lambda: LipmanOTPath(1.5),
        lambda: LipmanOTPath(-0.01),
        lambda: SchrodingerBridgePath(0.0),
        lambda: SchrodingerBridgePath(-1.0),
        lambda: ICFMPath(float("nan")),
        lambda: VPPath(float("nan")),
        lambda: LipmanOTPath(float("nan")),
        lambda: SchrodingerBridgePath(float("nan")),
        lambda: ICFMPath(float("inf")),
        lambda: VPPath(float("inf")),
        lambda: LipmanOTPath(float("inf")),
        lambda: SchrodingerBridgePath(float("inf")),
    ],
)
def test_bad_params_raise(make):
    with pytest.raises(ValueError, match="sigma"):
        make()


def test_sample_rejects_mismatched_shapes_and_returns_dataclass():
    x0, x1, _ = _draw((4, 2))
    with pytest.raises(ValueError, match="same shape"):
        ICFMPath().sample(x0, x1[:, :1], torch.rand(4))
    s = ICFMPath().sample(x0, x1, torch.full((4,), 0.25, dtype=torch.float64))
    assert s.xt.shape == s.ut.shape == x0.shape and s.t.shape == (4,)
    torch.testing.assert_close(s.xt, 0.75 * x0 + 0.25 * x1)


@pytest.mark.parametrize("path", [ICFMPath(0.0), LipmanOTPath(1e-4), VPPath(0.0), SchrodingerBridgePath(1.0)], ids=repr)
def test_16bit_data_keeps_t_and_coefficients_in_float32(path):
    """With bf16 data at t = 0.999 (bf16 rounds it to 1), x_t and u_t are the float32 answer on the
    same inputs, rounded once to bf16 (the SB u_t coefficient is -15.8 there; at t = 1 it is -500)."""
    x0, x1, eps = (v.to(torch.bfloat16) for v in _draw((64, 3)))
    t = torch.full((64,), 0.999)
    xt, ut = path.interpolate(x0, x1, t, eps)
    ref_xt, ref_ut = path.interpolate(x0.float(), x1.float(), t, eps.float())
    assert xt.dtype == ut.dtype == torch.bfloat16
    torch.testing.assert_close(xt.float(), ref_xt, rtol=2**-8, atol=0)
    torch.testing.assert_close(ut.float(), ref_ut, rtol=2**-8, atol=0)
    if isinstance(path, SchrodingerBridgePath):
        tv = float(t[0])  # 0.999 in float32
        coef = (1 - 2 * tv) / (2 * math.sqrt(tv * (1 - tv)))
        torch.testing.assert_close(ref_ut, coef * eps.float() + x1.float() - x0.float(), rtol=1e-5, atol=1e-5)
