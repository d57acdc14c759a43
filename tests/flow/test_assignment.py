"""The exact assignment solver against brute force, the 1-D monotone rearrangement and scipy."""

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from fm_lightning.flow.assignment import optimal_assignment


def _brute_force_total(cost):
    n = cost.shape[0]
    perms = np.array(list(itertools.permutations(range(n))))
    return cost[np.arange(n), perms].sum(1).min()


def _total(cost, cols):
    assert sorted(cols.tolist()) == list(range(cost.shape[0])), "not a permutation"
    return cost[np.arange(cost.shape[0]), cols].sum()


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("kind", ["uniform", "ties", "squared-euclidean"])
def test_matches_brute_force(n, kind):
    rng = np.random.default_rng(n)
    for _ in range(20):
        if kind == "uniform":
            cost = rng.uniform(-3, 5, (n, n))
        elif kind == "ties":  # many equal costs and many optimal permutations
            cost = rng.integers(0, 3, (n, n)).astype(float)
        else:
            x0, x1 = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + 1
            cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
        assert _total(cost, optimal_assignment(cost)) == pytest.approx(_brute_force_total(cost), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [64, 256])
def test_one_dimensional_points_get_the_monotone_rearrangement(n):
    """Under a convex cost on the line the optimal map sends the k-th smallest source to the
    k-th smallest target; the points are embedded in 2-D (second coordinate 0)."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=n)
    x1 = np.concatenate([rng.normal(-4, 0.5, n // 2), rng.normal(3, 1, n - n // 2)])
    cost = (x0[:, None] - x1[None, :]) ** 2
    cols = optimal_assignment(cost)
    expected = np.empty(n, dtype=np.int64)
    expected[np.argsort(x0)] = np.argsort(x1)
    np.testing.assert_array_equal(cols, expected)


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (1e12, 1.0), (0.0, 1e-12), (-50.0, 1e6)])
def test_matches_scipy_on_clustered_points_at_any_offset_and_scale(offset, scale):
    """2-D clusters (the hard case for augmenting-path solvers) against scipy's optimum; a cost
    far from zero or in tiny units must neither stall the auction nor change the answer."""
    rng = np.random.default_rng(1)
    n = 200
    centres = 4 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)
    x0 = rng.normal(size=(n, 2))
    x1 = centres[rng.integers(0, 8, n)] + 0.1 * rng.normal(size=(n, 2))
    base = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    cost = offset + scale * base
    rows, ref = linear_sum_assignment(base)
    cols = optimal_assignment(cost)
    assert _total(base, cols) == pytest.approx(base[rows, ref].sum(), rel=1e-9)


def test_constant_empty_and_single_costs():
    np.testing.assert_array_equal(optimal_assignment(np.full((5, 5), 2.5)), np.arange(5))
    assert optimal_assignment(np.zeros((0, 0))).shape == (0,)
    np.testing.assert_array_equal(optimal_assignment(np.array([[7.0]])), [0])


@pytest.mark.parametrize("cost, match", [
    (np.zeros((3, 4)), "square"),
    (np.zeros(3), "square"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), "finite"),
    (np.array([[0.0, np.inf], [1.0, 0.0]]), "finite"),
])
def test_bad_costs_raise(cost, match):
    with pytest.raises(ValueError, match=match):
        optimal_assignment(cost)


@pytest.mark.parametrize("n", [3, 255, 257, 300])
@pytest.mark.parametrize("kind", ["images", "outlier"])
def test_matches_scipy_at_any_size_and_dynamic_range(n, kind):
    """Sizes around a power of two (the column index bits of the auction's keys) on image-like
    costs (64-d points), and costs where one huge outlier squeezes every other normalised cost
    into a few key units: the auction's prices are then coarse, and the exact finish must
    still reach scipy's optimum."""
    rng = np.random.default_rng(n)
    x0, x1 = rng.normal(size=(n, 64)), rng.uniform(size=(n, 64))
    cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    if kind == "outlier":
        cost[n // 2, n // 3] = 1e13
    rows, ref = linear_sum_assignment(cost)
    cols = optimal_assignment(cost)
    assert _total(cost, cols) == pytest.approx(cost[rows, ref].sum(), rel=1e-12)
