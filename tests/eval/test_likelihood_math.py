"""The likelihood, divergence and path-energy core against analytic answers."""

from __future__ import annotations

import math

import pytest
import torch

from eval_helpers import MEAN, SCALE, AffineField, AffineGaussian, affine_model
from fm_lightning.evaluate import evaluate_points
from fm_lightning.flow.likelihood import (
    bits_per_dim,
    dequantize,
    exact_divergence,
    hutchinson_divergence,
    log_likelihood,
    make_probe,
    normalized_path_energy,
    path_energy,
)
from fm_lightning.metrics import rbf_mmd2, wasserstein2

FIELD = AffineField(MEAN, SCALE)
TARGET = AffineGaussian(MEAN, SCALE)


def _std_normal_log_prob(x):
    return -0.5 * x.square().sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_nll_of_the_affine_gaussian_flow_matches_the_closed_form(divergence):
    """log p_1 of N(0, I) pushed through the affine flow is the N(mu, diag s^2) density, to 1e-3.
    (The Jacobian is diagonal, so even one Rademacher probe gives its trace exactly.)"""
    x1 = TARGET.sample(400, torch.Generator().manual_seed(0))
    res = log_likelihood(FIELD, x1, _std_normal_log_prob, atol=1e-6, rtol=1e-6, divergence=divergence,
                         generator=torch.Generator().manual_seed(1))
    expected = TARGET.log_prob(x1)
    assert (res.log_prob - expected).abs().max() < 1e-3
    # The backward integration lands on the inverse map x0 = (x1 - mu) / s.
    torch.testing.assert_close(res.x0, (x1 - torch.tensor(MEAN)) / torch.tensor(SCALE), atol=1e-4, rtol=1e-4)
    assert res.nfe > 0


def test_fm_eval_nll_in_nats_per_dim_matches_the_analytic_density():
    """evaluate_points' NLL (nats/dim) of an analytic model equals -mean log N(x1; mu, s^2) / d."""
    model = affine_model()
    out = evaluate_points(model, TARGET, metrics=["nll"], num_samples=64, num_likelihood=300, seed=3)
    # Replay evaluate_points' draws: source (64), reference (64), then the likelihood points.
    gen = torch.Generator().manual_seed(3)
    model.source.sample(64, gen), TARGET.sample(64, gen)
    x1 = TARGET.sample(300, gen)
    analytic = float(-TARGET.log_prob(x1).mean()) / 2
    assert abs(out["metrics"]["eval/nll"] - analytic) < 1e-3, (out["metrics"]["eval/nll"], analytic)
    assert out["metrics"]["eval/nll_nfe"] > 0


def _coupled_field(x, t):
    """A field with a full, point-dependent Jacobian."""
    a = torch.tensor([[0.3, -1.2, 0.5], [0.8, 0.1, -0.4], [-0.6, 0.9, 0.2]])
    return torch.tanh(x @ a.T) * (1 + t[:, None]) + x.roll(1, dims=1) * x


def test_exact_divergence_is_the_jacobian_trace():
    x, t = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.rand(5)
    _, div = exact_divergence(_coupled_field, x, t)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda xi: _coupled_field(xi[None], t[i : i + 1])[0], x[i])
        assert abs(float(div[i]) - float(jac.trace())) < 1e-5


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    """The mean of eps^T J eps over many probes matches the exact trace (within 4 standard errors)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.3)
    _, exact = exact_divergence(_coupled_field, x, t)
    k = 20_000
    xs, ts = x.repeat_interleave(k, 0), t.repeat_interleave(k)
    eps = make_probe(tuple(xs.shape), probe, torch.Generator().manual_seed(1))
    _, est = hutchinson_divergence(_coupled_field, xs, ts, eps)
    est = est.reshape(4, k)
    err = (est.mean(1) - exact).abs()
    sem = est.std(1) / math.sqrt(k)
    assert (err < 4 * sem + 1e-6).all(), (err, sem)
    assert (est.std(1) > 0).all()  # a real estimate, not the exact trace in disguise


def test_path_energy_of_the_straight_ot_map_gives_npe_near_zero():
    """Along the affine (OT) flow every particle moves straight at constant speed: its energy is
    ||T(x0) - x0||^2, the population PE is W2^2, and NPE ~ 0."""
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    res = path_energy(FIELD, x0, atol=1e-6, rtol=1e-6)
    x1 = x0 * torch.tensor(SCALE) + torch.tensor(MEAN)
    torch.testing.assert_close(res.x1, x1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.energy, (x1 - x0).square().sum(1), atol=1e-3, rtol=1e-4)
    # Against the empirical OT cost of the same points (exact: the identity matching is optimal).
    n = 800
    assert normalized_path_energy(float(res.energy[:n].mean()), wasserstein2(x0[:n], res.x1[:n]) ** 2) < 1e-3
    # Against the analytic W2^2 = ||mu||^2 + sum (s - 1)^2 (Monte Carlo error only).
    assert normalized_path_energy(res.mean, TARGET.w2_squared_from_standard_normal()) < 0.03


def test_a_curved_flow_has_npe_well_above_zero():
    """A quarter turn along the unit circle (v = (pi/2) * (-y, x)) has energy (pi/2)^2 per point,
    while the straight chord costs |x1 - x0|^2 = 2: NPE = (pi/2)^2 / 2 - 1 ~ 0.234."""
    field = lambda x, t: (math.pi / 2) * torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    theta = torch.linspace(0, 2 * math.pi, 101)[:-1]
    x0 = torch.stack([theta.cos(), theta.sin()], 1)
    res = path_energy(field, x0, atol=1e-7, rtol=1e-7)
    assert abs(res.mean - (math.pi / 2) ** 2) < 1e-4
    npe = normalized_path_energy(res.mean, (res.x1 - x0).square().sum(1).mean().item())
    assert abs(npe - ((math.pi / 2) ** 2 / 2 - 1)) < 1e-3


def test_npe_needs_a_positive_w2():
    with pytest.raises(ValueError, match="W2\\^2 > 0"):
        normalized_path_energy(1.0, 0.0)


def test_dequantisation_and_bits_per_dim_of_a_uniform_model_is_eight_bits():
    k = torch.randint(0, 256, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    images = k.float() / 127.5 - 1
    y = dequantize(images, torch.Generator().manual_seed(1))
    assert y.min() >= -1 and y.max() < 1
    assert torch.equal(((y + 1) * 128).floor().long(), k)  # every value stays in its own bin
    # A model uniform on [-1, 1)^D has log p = -D log 2: exactly 8 bits per dimension.
    d = 16
    bpd = bits_per_dim(torch.full((6,), -d * math.log(2)), d)
    torch.testing.assert_close(bpd, torch.full((6,), 8.0))


def test_rbf_mmd2_matches_the_gaussian_closed_form():
    """For x ~ N(a, I), y ~ N(b, I) in d dims and k = exp(-|u|^2 / 2l^2):
    E k = (l^2 / (l^2 + v))^(d/2) exp(-|m|^2 / (2 (l^2 + v))) with m the mean and v the variance
    (per dim) of the difference of the two points."""
    d, l = 2, 1.0
    a, b = torch.zeros(d), torch.tensor([1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    x, y = a + torch.randn(2000, d, generator=g), b + torch.randn(2000, d, generator=g)

    def ek(m2, v):
        return (l**2 / (l**2 + v)) ** (d / 2) * math.exp(-m2 / (2 * (l**2 + v)))

    analytic = ek(0, 2) + ek(0, 2) - 2 * ek(float((a - b).square().sum()), 2)
    assert abs(rbf_mmd2(x, y, bandwidths=(l,)) - analytic) < 0.015
    assert abs(rbf_mmd2(x, a + torch.randn(2000, d, generator=g), bandwidths=(l,))) < 0.005


def test_rbf_mmd2_default_bandwidths_follow_the_datas_units():
    """Two unit Gaussians 3 apart are as far apart in metres as in kilometres; fixed widths
    (0.1 to 5) saw data at scale 100 as a near-perfect match (MMD^2 ~1e-4)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 3, generator=g), torch.randn(1000, 3, generator=g) + 3
    mmd = rbf_mmd2(x, y)
    assert mmd > 0.5
    for scale in (1e-3, 100.0):
        assert rbf_mmd2(x * scale, y * scale) == pytest.approx(mmd, rel=1e-6)


def test_rbf_mmd2_refuses_bandwidths_that_are_not_positive():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match=r"MMD bandwidths must be positive lengths, got \(1.0, 0.0\)"):
        rbf_mmd2(x, x, bandwidths=(1.0, 0.0))


def test_fm_eval_gives_w2_and_nll_of_a_framed_points_target_in_the_files_units(tmp_path):
    """A points file in a standard frame (x = loc + 10 y): the model flows in the frame, and
    evaluate_points reports NLL with the file's density (log p(x) = log p(y) - sum log 10) and
    W2 in the file's units (10 times the frame's, the same draws)."""
    import numpy as np

    from datamodules.toy import Points

    y = TARGET.sample(5000, torch.Generator().manual_seed(0))
    loc, scale = [100.0, -30.0], [10.0, 10.0]
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "x.npy", (y.double() * 10 + torch.tensor(loc, dtype=torch.float64)).float().numpy())
    framed = Points(str(tmp_path / "x.npy"), loc=loc, scale=scale)
    unit = Points(str(tmp_path / "y.npy"), loc=[0.0, 0.0], scale=[1.0, 1.0])
    model = affine_model()
    out = evaluate_points(model, framed, metrics=["nll", "w2"], num_samples=500, num_likelihood=300, seed=3)
    gen = torch.Generator().manual_seed(3)  # replay: source (500), reference (500), the likelihood points
    model.source.sample(500, gen), framed.sample(500, gen)
    x1 = framed.sample(300, gen)
    analytic = float(-(TARGET.log_prob(x1) - 2 * math.log(10.0)).mean()) / 2
    assert abs(out["metrics"]["eval/nll"] - analytic) < 1e-3, (out["metrics"]["eval/nll"], analytic)
    w2_frame = evaluate_points(model, unit, metrics=["w2"], num_samples=500, seed=3)["metrics"]["eval/w2"]
    assert out["metrics"]["eval/w2"] == pytest.approx(10 * w2_frame, rel=1e-4)
    # reflow's comparison table too; a bare sampler (no to_data) is taken as it is
    from fm_lightning.reflow import compare

    rows = [compare({"m": model}, dist, 500, euler_steps=(2,))[0] for dist in (framed, unit)]
    assert rows[0]["w2_euler2"] == pytest.approx(10 * rows[1]["w2_euler2"], rel=1e-4)

    class Bare:
        def sample(self, n, generator=None):
            return unit.sample(n, generator)

    assert evaluate_points(model, Bare(), metrics=["w2"], num_samples=500, seed=3)["metrics"]["eval/w2"] == w2_frame
