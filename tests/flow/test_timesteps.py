"""Time samplers against their analytic moments and quantiles."""

import math

import pytest
import torch

from fm_lightning.flow.timesteps import LogitNormalTime, UniformTime

N = 200_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uniform_moments():
    t = UniformTime()(N, generator=_gen()).double()
    assert t.shape == (N,)
    assert 0.0 <= t.min() and t.max() < 1.0
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.002)
    # The CDF is the identity: P(t < q) = q.
    for q in (0.1, 0.5, 0.9):
        assert (t < q).double().mean().item() == pytest.approx(q, abs=0.005)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.7, 1.3), (-1.0, 0.5)])
def test_logit_normal_matches_analytic(mean, std):
    t = LogitNormalTime(mean, std)(N, generator=_gen(1)).double()
    assert t.shape == (N,)
    assert 0.0 < t.min() and t.max() < 1.0
    # sigmoid is monotone, so the median of t is sigmoid(median of the logit) = sigmoid(mean).
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)
    logit = torch.log(t) - torch.log1p(-t)
    assert logit.mean().item() == pytest.approx(mean, abs=0.02)
    assert logit.std().item() == pytest.approx(std, rel=0.02)


def test_logit_normal_standard_is_symmetric():
    """For mean 0, t and 1 - t have the same law: E t = 1/2 and the quartiles mirror."""
    t = LogitNormalTime(0.0, 1.0)(N, generator=_gen(2)).double()
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    q = torch.quantile(t[:100_000], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert (q[0] + q[1]).item() == pytest.approx(1.0, abs=0.01)
    # Analytic quartile: sigmoid(Phi^-1(0.75)) with Phi^-1(0.75) = 0.6744897...
    assert q[1].item() == pytest.approx(1 / (1 + math.exp(-0.6744897501960817)), abs=0.005)


@pytest.mark.parametrize("sampler", [UniformTime(), LogitNormalTime(0.3, 0.8)], ids=repr)
def test_generator_reproducibility(sampler):
    a = sampler(64, generator=_gen(5))
    b = sampler(64, generator=_gen(5))
    c = sampler(64, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    # Same seed through the global RNG also reproduces.
    torch.manual_seed(3)
    d = sampler(64)
    torch.manual_seed(3)
    assert torch.equal(d, sampler(64))


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan"), float("inf")])
def test_logit_normal_bad_std_raises(std):
    with pytest.raises(ValueError, match="std must be > 0 and finite"):
        LogitNormalTime(0.0, std)


@pytest.mark.parametrize("mean", [float("nan"), float("inf"), -float("inf")])
def test_logit_normal_non_finite_mean_raises(mean):
    with pytest.raises(ValueError, match="mean must be finite"):
        LogitNormalTime(mean, 1.0)
