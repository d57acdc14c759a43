"""Couplings against brute-force optima and the entropic-OT theory."""

import itertools
import logging
import math
import warnings

import numpy as np
import pytest
import torch

from fm_lightning.flow.couplings import ExactOTCoupling, IndependentCoupling, SinkhornOTCoupling
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath, LipmanOTPath, SchrodingerBridgePath


def _cost_matrix(x0, x1):
    """Squared Euclidean cost (B, B) in float64 numpy, computed independently of the library."""
    a = x0.reshape(x0.shape[0], -1).double().numpy()
    b = x1.reshape(x1.shape[0], -1).double().numpy()
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _brute_force(cost):
    """Optimal permutation sigma (sigma[i] = target of source i) and its total cost."""
    n = cost.shape[0]
    perms = np.array(list(itertools.permutations(range(n))))
    totals = cost[np.arange(n), perms].sum(1)
    best = int(np.argmin(totals))
    return perms[best], totals[best]


def _row_index(rows, table):
    """Index in ``table`` of each row of ``rows`` (exact match; rows are distinct)."""
    r = rows.reshape(rows.shape[0], -1)
    t = table.reshape(table.shape[0], -1)
    eq = (r[:, None, :] == t[None, :, :]).all(-1)
    assert (eq.sum(1) == 1).all(), "an output row is not exactly one input row"
    return eq.float().argmax(1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(7, 2), (6, 1, 3, 3), (5, 2)], ids=str)
def test_exact_ot_matches_brute_force(seed, shape):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    x1 = torch.randn(shape, generator=g) + 0.5
    y0, y1, c = ExactOTCoupling()(x0, x1)
    assert c is None and y0.shape == x0.shape and y1.shape == x1.shape
    i, j = _row_index(y0, x0), _row_index(y1, x1)
    # A permutation: every source and every target used exactly once.
    assert sorted(i.tolist()) == list(range(shape[0]))
    assert sorted(j.tolist()) == list(range(shape[0]))
    cost = _cost_matrix(x0, x1)
    sigma, best = _brute_force(cost)
    got = dict(zip(i.tolist(), j.tolist()))
    assert got == {k: int(sigma[k]) for k in range(shape[0])}
    assert cost[i.numpy(), j.numpy()].sum() == pytest.approx(best, rel=1e-12)


def test_exact_ot_within_classes():
    """With labels, each class is solved on its own, even where crossing classes is cheaper."""
    g = torch.Generator().manual_seed(0)
    cond = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2])
    x1 = torch.randn(8, 2, generator=g)
    # Sources of class c sit right next to targets of class (c + 1) % 3: the global optimum
    # would cross classes, the class-conditional one must not.
    x0 = x1[torch.tensor([1, 4, 3, 7, 0, 6, 2, 5])] + 0.01 * torch.randn(8, 2, generator=g)
    y0, y1, c = ExactOTCoupling()(x0, x1, cond)
    i, j = _row_index(y0, x0), _row_index(y1, x1)
    assert torch.equal(c, cond[j])
    assert torch.equal(cond[i], cond[j]), "a pair crosses classes"
    assert sorted(i.tolist()) == list(range(8)) and sorted(j.tolist()) == list(range(8))
    cost = _cost_matrix(x0, x1)
    for label in cond.unique():
        idx = torch.nonzero(cond == label).squeeze(1).numpy()
        sigma, best = _brute_force(cost[np.ix_(idx, idx)])
        pairs = {(a, b) for a, b in zip(i.tolist(), j.tolist()) if cond[a] == label}
        assert pairs == {(int(idx[k]), int(idx[sigma[k]])) for k in range(len(idx))}
    # The unconstrained optimum is strictly cheaper here, so the constraint really binds.
    _, global_best = _brute_force(cost)
    assert global_best < cost[i.numpy(), j.numpy()].sum() - 1e-6


def test_exact_ot_keeps_non_finite_batches_as_given_with_a_warning_and_rejects_unequal_batches(caplog):
    x = torch.randn(4, 2)
    bad = x.clone()
    bad[1, 0] = float("nan")
    y0, y1, _ = ExactOTCoupling()(bad, x)  # the loss will be NaN; the training guard decides
    assert torch.equal(y0.nan_to_num(), bad.nan_to_num())
    assert torch.equal(y1, x) and "non-finite" in caplog.text
    with pytest.raises(ValueError, match="equal batch sizes"):
        ExactOTCoupling()(x, x[:3])


def test_independent_coupling_keeps_pairs():
    x0, x1, cond = torch.randn(5, 2), torch.randn(5, 2), torch.arange(5)
    y0, y1, c = IndependentCoupling()(x0, x1, cond)
    assert torch.equal(y0, x0) and torch.equal(y1, x1) and torch.equal(c, cond)


def _plan(reg, x0, x1, num_iters=3000, tol=1e-12):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SinkhornOTCoupling(reg=reg, num_iters=num_iters, tol=tol).plan(x0, x1)


def _toy_clouds(n, seed):
    """moons -> 8gaussians-like point clouds (n, 2) in float64, squared costs up to ~100-200:
    two offset elongated blobs as the source, eight blobs on a circle of radius 5 as the target."""
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.5, 0.4], dtype=torch.float64)
    x0 = x0 + side[:, None] * torch.tensor([1.0, 0.75], dtype=torch.float64) - 1.0
    angle = torch.randint(0, 8, (n,), generator=g).double() * (math.pi / 4)
    x1 = 5 * torch.stack([angle.cos(), angle.sin()], 1) + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x0, x1


def _marginal_error(pi):
    """max(|B0 * row sums - 1|, |B1 * column sums - 1|)."""
    return max(np.abs(pi.sum(1) * pi.shape[0] - 1).max(), np.abs(pi.sum(0) * pi.shape[1] - 1).max())


@pytest.mark.parametrize("reg", [0.5, 0.05])
@pytest.mark.parametrize("tol", [1e-4, 1e-9])
def test_sinkhorn_marginals_uniform_on_toy_scale_costs(reg, tol, caplog):
    """B=256 at the SB-CFM reg (2 sigma^2 for sigma=0.5) and 10x smaller, on costs ~100x reg:
    the plan is a coupling of the uniform marginals to ``tol``, reached without a warning."""
    x0, x1 = _toy_clouds(256, seed=0)
    cost = _cost_matrix(x0, x1)
    assert 100 < cost.max() < 300  # the cost scale the solver must handle at reg = 0.5
    with caplog.at_level(logging.WARNING, logger="fm_lightning.flow.couplings"):
        pi = SinkhornOTCoupling(reg=reg, tol=tol).plan(x0, x1)
    assert not caplog.records
    assert pi.shape == (256, 256) and np.isfinite(pi).all() and (pi >= 0).all()
    assert _marginal_error(pi) < tol


def test_sinkhorn_plan_is_the_gibbs_optimum():
    """Uniform marginals plus the Gibbs form ``P_ij = exp((f_i + g_j - C_ij) / reg)`` are the
    optimality conditions of entropic OT: ``reg * log P + C`` must be a sum ``f_i + g_j``, so
    its double-centred residual vanishes."""
    x0, x1 = _toy_clouds(64, seed=1)
    reg = 0.5
    pi = _plan(reg, x0, x1, tol=1e-10)
    assert _marginal_error(pi) < 1e-10
    h = reg * np.log(pi) + _cost_matrix(x0, x1)
    resid = h - h.mean(1, keepdims=True) - h.mean(0, keepdims=True) + h.mean()
    assert np.abs(resid).max() < 1e-9


@pytest.mark.parametrize("reg", [0.5, 2.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_sinkhorn_matches_pot_log_sinkhorn(reg, seed):
    """Entry by entry, to 1e-8 relative, against POT's log-domain Sinkhorn run to 1e-12."""
    ot = pytest.importorskip("ot")
    x0, x1 = _toy_clouds(32, seed)
    cost = _cost_matrix(x0, x1)
    w = np.full(32, 1 / 32)
    ref = ot.sinkhorn(w, w, cost, reg, method="sinkhorn_log", numItermax=100000, stopThr=1e-12)
    assert _marginal_error(ref) < 1e-9  # the reference itself converged
    pi = _plan(reg, x0, x1, num_iters=100000, tol=1e-11)
    np.testing.assert_allclose(pi, ref, rtol=1e-8, atol=1e-15)
    assert (pi * cost).sum() == pytest.approx((ref * cost).sum(), rel=1e-10)


def test_sinkhorn_transport_cost_decreases_to_exact_ot():
    """``<P_reg, C>`` decreases monotonically as reg decreases, stays above the exact OT cost,
    and is within ``reg * log B`` of it (entropy bound); at small reg it meets the optimum."""
    from scipy.optimize import linear_sum_assignment

    n = 32
    x0, x1 = _toy_clouds(n, seed=2)
    cost = _cost_matrix(x0, x1)
    rows, cols = linear_sum_assignment(cost)
    ot_cost = cost[rows, cols].sum() / n
    regs = [cost.max() * r for r in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4)]
    gaps = []
    for reg in regs:
        pi = _plan(reg, x0, x1, num_iters=100000, tol=1e-11)
        assert _marginal_error(pi) < 1e-10
        gap = (pi * cost).sum() - ot_cost
        assert -1e-9 * ot_cost <= gap <= reg * math.log(n)
        gaps.append(gap)
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 3e-3 * gaps[0]


def test_sinkhorn_unconverged_warns_once_with_the_error(caplog):
    x0, x1 = _toy_clouds(64, seed=3)
    coupling = SinkhornOTCoupling(reg=0.05, num_iters=5)
    with caplog.at_level(logging.WARNING, logger="fm_lightning.flow.couplings"):
        pi = coupling.plan(x0, x1)
        coupling.plan(x0, x1)
    warned = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(warned) == 1, warned
    assert f"marginal error {_marginal_error(pi):.2e}" in warned[0]
    assert _marginal_error(pi) > coupling.tol
    assert "_warned" not in repr(coupling) and "tol=0.0001" in repr(coupling)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tol": 0.0}, "tol > 0"), ({"tol": -1e-4}, "tol > 0"), ({"tol": float("nan")}, "tol > 0 and finite"),
    ({"tol": float("inf")}, "tol > 0 and finite"), ({"num_iters": 0}, "num_iters >= 1"),
    ({"num_iters": float("inf")}, "num_iters >= 1")])
def test_sinkhorn_bad_tol_or_iters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinkhornOTCoupling(reg=1.0, **kwargs)


@pytest.mark.parametrize("seed", range(3))
def test_sinkhorn_converges_to_exact_ot(seed):
    n = 6
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0
    cost = _cost_matrix(x0, x1)
    sigma, best = _brute_force(cost)
    ot_cost = best / n  # uniform weights 1/n
    exact_plan = np.zeros((n, n))
    exact_plan[np.arange(n), sigma] = 1.0 / n
    scale = cost.max()
    gaps, dists = [], []
    for rel in (1.0, 0.1, 0.01):
        reg = rel * scale
        pi = _plan(reg, x0, x1)
        # Uniform marginals (the smallest reg converges slowly, so it gets a looser check).
        tol = 1e-8 if rel >= 0.1 else 1e-3 / n
        np.testing.assert_allclose(pi.sum(1), np.full(n, 1 / n), rtol=0, atol=tol)
        np.testing.assert_allclose(pi.sum(0), np.full(n, 1 / n), rtol=0, atol=tol)
        gap = (pi * cost).sum() - ot_cost
        # 0 <= <P_reg, C> - OT <= reg * (H(P_reg) - H(P*)) <= reg * log(n).
        assert -1e-3 * tol * scale <= gap <= reg * math.log(n)
        gaps.append(gap)
        dists.append(np.abs(pi - exact_plan).sum())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.1 * gaps[0]
    assert dists[0] > dists[1] > dists[2]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reg", [1e-3, 1e-4])
def test_sinkhorn_converges_to_exact_ot_at_small_reg_on_toy_batches(reg, seed, caplog):
    """The reg -> 0 limit at B=256 on toy-scale costs (max ~150, reg down to 1e-6 of it) with the
    default iteration budget, which runs out before convergence on some batches (seeds 2 and 3
    used to give plans of mass ~0 and fall back to independent pairs): the plan is finite with
    exact row marginals, puts >= 85% of its mass on the exact-OT pairs (independent pairs: 0.4%),
    and its transport cost is within 0.2% of exact OT."""
    from scipy.optimize import linear_sum_assignment

    x0, x1 = _toy_clouds(256, seed)
    cost = _cost_matrix(x0, x1)
    rows, cols = linear_sum_assignment(cost)
    ot_cost = cost[rows, cols].mean()
    coupling = SinkhornOTCoupling(reg=reg)
    with caplog.at_level(logging.WARNING, logger="fm_lightning.flow.couplings"):
        pi = coupling.plan(x0, x1)
        y0, y1, _ = coupling(x0, x1, generator=torch.Generator().manual_seed(seed))
    assert np.isfinite(pi).all() and (pi >= 0).all() and not _fallback_warnings(caplog)
    np.testing.assert_allclose(pi.sum(1), np.full(256, 1 / 256), rtol=1e-12)
    assert pi[rows, cols].sum() > 0.85
    assert abs((pi * cost).sum() - ot_cost) < 2e-3 * ot_cost
    i, j = _row_index(y0, x0), _row_index(y1, x1)
    assert (torch.as_tensor(cols)[i] == j).float().mean() > 0.8


def test_sinkhorn_marginals_uniform_on_images():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(9, 1, 3, 3, generator=g), torch.randn(9, 1, 3, 3, generator=g)
    pi = _plan(2.0, x0, x1)
    np.testing.assert_allclose(pi.sum(1), np.full(9, 1 / 9), atol=1e-8)
    np.testing.assert_allclose(pi.sum(0), np.full(9, 1 / 9), atol=1e-8)
    assert (pi >= 0).all()


def test_sinkhorn_small_reg_plan_is_exact_ot_plan():
    """With a unique optimum well separated from the runner-up, the plan at small reg is the
    exact OT plan (a permutation matrix / n) and every drawn pair is an exact-OT pair."""
    n = 6
    angles = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    hexagon = 3.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    rotated = 3.0 * torch.stack([torch.cos(angles + 0.2), torch.sin(angles + 0.2)], 1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    x0, x1 = hexagon, rotated[perm]
    cost = _cost_matrix(x0, x1)
    sigma, best = _brute_force(cost)
    assert [int(perm[s]) for s in sigma] == list(range(n))  # vertex k goes to its rotated self
    exact_plan = np.zeros((n, n))
    exact_plan[np.arange(n), sigma] = 1.0 / n
    coupling = SinkhornOTCoupling(reg=0.01 * cost.max(), num_iters=3000)
    pi = coupling.plan(x0, x1)
    np.testing.assert_allclose(pi, exact_plan, rtol=0, atol=1e-6)
    assert (pi * cost).sum() == pytest.approx(best / n, rel=1e-4)
    y0, y1, _ = coupling(x0, x1, generator=torch.Generator().manual_seed(0))
    i, j = _row_index(y0, x0), _row_index(y1, x1)
    assert all(int(sigma[a]) == b for a, b in zip(i.tolist(), j.tolist()))


def test_sinkhorn_draws_are_reproducible_and_within_classes():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)
    cond = torch.tensor([0, 1, 2] * 4)
    coupling = SinkhornOTCoupling(reg=2.0)
    a = coupling(x0, x1, cond, generator=torch.Generator().manual_seed(7))
    b = coupling(x0, x1, cond, generator=torch.Generator().manual_seed(7))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    i, j = _row_index(a[0], x0), _row_index(a[1], x1)
    assert torch.equal(cond[i], cond[j]) and torch.equal(a[2], cond[j])


def _fallback_warnings(caplog):
    return [r for r in caplog.records if "not finite" in r.getMessage() and r.levelno == logging.WARNING]


@pytest.mark.parametrize("reg", [1e-100, 1e-20, 1e-8])
def test_sinkhorn_tiny_reg_draws_exact_ot_pairs_without_a_fallback(reg, caplog):
    """Far below the cost scale (where the scaling iterations lose precision) the plan is still
    finite, and every drawn pair is an exact-OT pair: the reg -> 0 limit."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) + 3.0
    sigma, _ = _brute_force(_cost_matrix(x0, x1))
    coupling = SinkhornOTCoupling(reg=reg)
    with caplog.at_level(logging.WARNING, logger="fm_lightning.flow.couplings"):
        pi = coupling.plan(x0, x1)
        y0, y1, _ = coupling(x0, x1, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(pi).all() and not _fallback_warnings(caplog)
    np.testing.assert_allclose(pi.sum(1), np.full(6, 1 / 6), rtol=coupling.tol)
    i, j = _row_index(y0, x0), _row_index(y1, x1)
    assert all(int(sigma[a]) == b for a, b in zip(i.tolist(), j.tolist()))


def test_sinkhorn_non_finite_plan_falls_back_to_exact_ot_and_warns_once(caplog):
    """``cost / reg`` beyond float64 (reg=1e-310) gives no finite plan: the batch takes the exact
    OT pairs (the reg -> 0 limit), with one warning however many batches do. Non-finite samples
    have no assignment and are kept as given (the training guard sees the non-finite loss)."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) + 3.0
    sigma, _ = _brute_force(_cost_matrix(x0, x1))
    coupling = SinkhornOTCoupling(reg=1e-310)
    bad = x0.clone()
    bad[2, 1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fm_lightning.flow.couplings"):
        for _ in range(3):
            y0, y1, _ = coupling(x0, x1)
            assert torch.equal(y0, x0) and torch.equal(y1, x1[torch.as_tensor(sigma)])
        y0, y1, _ = coupling(bad, x1)
    assert torch.equal(y0.nan_to_num(), bad.nan_to_num()) and torch.equal(y1, x1)
    warned = _fallback_warnings(caplog)
    assert len(warned) == 1 and "exact OT pairs" in warned[0].getMessage()
    assert "did not converge" not in caplog.text


def test_sinkhorn_sane_reg_does_not_warn(caplog):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    with caplog.at_level(logging.WARNING, logger="fm_lightning.flow.couplings"):
        SinkhornOTCoupling(reg=1.0)(x0, x1)
    assert not caplog.records


@pytest.mark.parametrize("reg", [0.0, -1.0, float("nan"), float("inf")])
def test_sinkhorn_bad_reg_raises(reg):
    with pytest.raises(ValueError, match="reg must be > 0 and finite"):
        SinkhornOTCoupling(reg=reg)


def test_sinkhorn_unset_reg_plan_raises():
    with pytest.raises(ValueError, match="reg is unset"):
        SinkhornOTCoupling().plan(torch.randn(3, 2), torch.randn(3, 2))


@pytest.mark.parametrize("path", [ICFMPath(0.1), LipmanOTPath()], ids=repr)
def test_objective_rejects_unset_reg_without_sb_path(path):
    with pytest.raises(ValueError, match="SchrodingerBridgePath"):
        CFMObjective(path, SinkhornOTCoupling(reg=None))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.3])
def test_objective_fills_sb_reg(sigma):
    obj = CFMObjective(SchrodingerBridgePath(sigma), SinkhornOTCoupling(reg=None))
    assert obj.coupling.reg == pytest.approx(2 * sigma**2, rel=1e-15)
    # An explicit reg is kept.
    obj = CFMObjective(SchrodingerBridgePath(sigma), SinkhornOTCoupling(reg=0.7))
    assert obj.coupling.reg == 0.7


def test_objective_does_not_write_reg_into_the_callers_coupling():
    """One SinkhornOTCoupling(reg=None) shared by two objectives: each gets 2*sigma**2 of its own path."""
    shared = SinkhornOTCoupling(reg=None)
    a = CFMObjective(SchrodingerBridgePath(1.0), shared)
    b = CFMObjective(SchrodingerBridgePath(0.5), shared)
    assert (a.coupling.reg, b.coupling.reg, shared.reg) == (2.0, 0.5, None)


def test_sinkhorn_draws_pairs_for_batches_over_4096():
    """B*B > 2^24 (torch.multinomial's limit on categories) still draws B valid pairs."""
    b = 4097
    x0 = torch.arange(b, dtype=torch.float32)[:, None]
    i, j = SinkhornOTCoupling(reg=1e6).pair_indices(x0, x0 + 0.5, torch.Generator().manual_seed(0))
    assert i.shape == j.shape == (b,)
    assert 0 <= int(i.min()) and int(i.max()) < b and 0 <= int(j.min()) and int(j.max()) < b


def test_sinkhorn_pair_frequencies_match_the_plan():
    """Pairs drawn from a plan with strongly dependent rows and columns have the plan's frequencies
    (within 5 binomial standard deviations), not those of its marginals; draws are reproducible."""
    from fm_lightning.flow.couplings import _draw_pairs

    plan = torch.tensor([[0.30, 0.0, 0.05, 0.0], [0.0, 0.20, 0.0, 0.10], [0.05, 0.05, 0.15, 0.10]], dtype=torch.float64)
    n = 200_000
    i, j = _draw_pairs(plan, n, torch.Generator().manual_seed(0))
    freq = torch.zeros_like(plan).index_put_((i, j), torch.ones(n, dtype=torch.float64), accumulate=True) / n
    p = plan / plan.sum()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)
    i2, j2 = _draw_pairs(plan, n, torch.Generator().manual_seed(0))
    assert torch.equal(i, i2) and torch.equal(j, j2)


@pytest.mark.parametrize("coupling", [ExactOTCoupling(), SinkhornOTCoupling(reg=0.5)], ids=repr)
def test_ot_couplings_accept_inputs_that_require_grad(coupling):
    """The cost only picks indices; gradients flow through the returned x0[i], x1[j]:
    d/dx sum(w0 * x0[i]) = w0 summed over the rows that picked x (found by matching values)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_()
    x1 = (torch.randn(6, 2, generator=g, dtype=torch.float64) + 1).requires_grad_()
    w0, w1 = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    y0, y1, _ = coupling(x0, x1, generator=g)
    ((y0 * w0).sum() + (y1 * w1).sum()).backward()
    i, j = _row_index(y0.detach(), x0.detach()), _row_index(y1.detach(), x1.detach())
    torch.testing.assert_close(x0.grad, torch.zeros_like(w0).index_add_(0, i, w0), rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, torch.zeros_like(w1).index_add_(0, j, w1), rtol=0, atol=0)
