"""The CFM objective: its regression target, reduction, pairing and reproducibility."""

import itertools

import numpy as np
import pytest
import torch

from fm_lightning.flow.couplings import ExactOTCoupling
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath, LipmanOTPath, SchrodingerBridgePath, VPPath
from fm_lightning.flow.timesteps import LogitNormalTime


def _data(shape=(16, 2), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype) + 2


def test_oracle_velocity_has_zero_loss_and_zero_net_gives_mean_square():
    """For rectified flow u_t = x1 - x0: v = u_t gives loss 0, v = 0 gives mean((x1 - x0)^2)."""
    x0, x1 = _data((16, 1, 3, 3))
    obj = CFMObjective(ICFMPath(0.0))
    out = obj(lambda x, t: (x1 - x0), x0, x1)
    assert out.loss.item() == 0.0
    out = obj(lambda x, t: torch.zeros_like(x), x0, x1)
    assert out.per_sample.shape == (16,)
    torch.testing.assert_close(out.per_sample, (x1 - x0).square().flatten(1).mean(1))
    torch.testing.assert_close(out.loss, (x1 - x0).square().mean())


@pytest.mark.parametrize("sigma_min", [0.0, 1e-4, 0.1])
def test_lipman_target_is_closed_form_of_drawn_xt(sigma_min):
    """The target for the drawn (x_t, t) is (x1 - (1 - s) x_t) / (1 - (1 - s) t)."""
    x0, x1 = _data((64, 2), dtype=torch.float64)
    obj = CFMObjective(LipmanOTPath(sigma_min))
    s, _ = obj.draw(x0, x1, generator=torch.Generator().manual_seed(0))
    t = s.t.double()[:, None]  # the sampler draws fp32 times; the path casts them to x's dtype
    expected = (s.x1 - (1 - sigma_min) * s.xt) / (1 - (1 - sigma_min) * t)
    torch.testing.assert_close(s.ut, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.xt, t * x1 + (1 - (1 - sigma_min) * t) * x0)


def test_sb_draw_uses_its_eps_consistently():
    """x_t - mu_t = sigma_t eps, and u_t - (x1 - x0) = sigma (1-2t)/(2 sqrt(t(1-t))) eps: same eps."""
    sigma = 0.7
    x0, x1 = _data((64, 2), dtype=torch.float64)
    s, _ = CFMObjective(SchrodingerBridgePath(sigma)).draw(x0, x1, generator=torch.Generator().manual_seed(1))
    t = s.t.double()[:, None]
    eps = (s.xt - t * x1 - (1 - t) * x0) / (sigma * torch.sqrt(t * (1 - t)))
    torch.testing.assert_close(s.ut - (x1 - x0), sigma * (1 - 2 * t) / (2 * torch.sqrt(t * (1 - t))) * eps)


def test_loss_is_fp32_for_low_precision_nets():
    x0, x1 = _data()
    out = CFMObjective(ICFMPath(0.0))(lambda x, t: torch.zeros_like(x, dtype=torch.bfloat16), x0, x1)
    assert out.loss.dtype == torch.float32 and out.per_sample.dtype == torch.float32
    torch.testing.assert_close(out.loss, (x1 - x0).square().mean())


def test_generator_reproducibility():
    x0, x1 = _data()
    obj = CFMObjective(VPPath(0.1), time_sampler=LogitNormalTime())
    a, _ = obj.draw(x0, x1, generator=torch.Generator().manual_seed(3))
    b, _ = obj.draw(x0, x1, generator=torch.Generator().manual_seed(3))
    c, _ = obj.draw(x0, x1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.t, b.t) and torch.equal(a.xt, b.xt) and torch.equal(a.ut, b.ut)
    assert not torch.equal(a.t, c.t)


def test_exact_ot_pairs_are_optimal_and_cond_follows_x1():
    n = 6
    x0, x1 = _data((n, 2), seed=2)
    cond = torch.arange(n) % 2
    seen = {}

    def net(x, t, c):
        seen["cond"] = c
        return torch.zeros_like(x)

    out = CFMObjective(ICFMPath(0.0), ExactOTCoupling())(net, x0, x1, cond)
    s = out.sample
    cost = torch.cdist(x0.double(), x1.double()).square().numpy()
    # Brute-force optimum within each class, compared as a total cost.
    best = 0.0
    for label in (0, 1):
        idx = np.nonzero(cond.numpy() == label)[0]
        best += min(
            sum(cost[idx[i], idx[p]] for i, p in enumerate(perm)) for perm in itertools.permutations(range(len(idx)))
        )
    assert (s.x1 - s.x0).square().sum().item() == pytest.approx(best, rel=1e-5)
    # cond passed to the net is the label of each re-paired x1.
    j = torch.cdist(s.x1, x1).argmin(1)
    assert torch.equal(seen["cond"], cond[j]) and torch.equal(out.cond, cond[j])


def test_net_called_without_cond_when_none():
    x0, x1 = _data()
    out = CFMObjective(ICFMPath(0.0))(lambda x, t: torch.zeros_like(x), x0, x1)  # 2-arg net must work
    assert out.cond is None
