"""Couplings: how minibatch pairs ``(x0, x1)`` are drawn.

All couplings take ``x0, x1`` of shape (B, *shape) and an optional ``cond`` (B,) of the
target's labels, and return ``(x0, x1, cond)`` re-paired. Costs are squared Euclidean
distances between flattened samples, so 2-D points and images share the code. With
``cond`` given, OT couplings pair only within each class (a source point is never
transported onto a target of another class).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .assignment import optimal_assignment

__all__ = ["Coupling", "IndependentCoupling", "ExactOTCoupling", "SinkhornOTCoupling", "squared_cost"]

log = logging.getLogger(__name__)


def _batch_sizes(x: Tensor) -> list[int]:
    """The batch size ``x.shape[0]`` of every rank, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    return [int(s) for s in sizes]


def _all_gather(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate ``x`` (sizes[rank], ...) from every rank in rank order: (sum(sizes), ...).

    Unequal sizes (a last validation batch) are padded to the largest for the collective and
    the padding is dropped after it."""
    n = max(sizes)
    x = x.contiguous() if x.shape[0] == n else torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat(parts if min(sizes) == n else [p[:s] for p, s in zip(parts, sizes)])


def squared_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Pairwise squared Euclidean cost (B0, B1) between flattened rows, in float64:
    ``|a|^2 + |b|^2 - 2 a.b``, as ``torch.cdist`` computes it for batches over 25 rows, without
    its square root (4x faster at B = 256). Detached: the couplings use it only to pick indices."""
    a, b = x0.detach().flatten(1).double(), x1.detach().flatten(1).double()
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]).addmm_(a, b.T, alpha=-2).clamp_min_(0)


class Coupling:
    """Base coupling: subclasses implement :meth:`pair_indices` for one group of points."""

    def pair_indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Return index tensors ``(i, j)`` (B,) so that pairs are ``(x0[i], x1[j])``."""
        raise NotImplementedError

    def __call__(
        self, x0: Tensor, x1: Tensor, cond: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"couplings need equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
        if getattr(self, "global_batch", False) and dist.is_available() and dist.is_initialized():
            if dist.get_world_size() > 1:
                return self._pair_global_batch(x0, x1, cond, generator)
        if cond is None:
            i, j = self.pair_indices(x0, x1, generator)
        else:
            i, j = self._pair_within_classes(x0, x1, cond, generator)
        return x0[i], x1[j], None if cond is None else cond[j]

    def _pair_global_batch(self, x0, x1, cond, generator):
        """Gather every rank's batch (sizes may differ), solve the coupling on the global batch
        (identically on each rank), and keep this rank's share of the pairs: the rows of the
        global batch that came from this rank, ``sum(sizes[:rank]) ...`` (B of them)."""
        sizes = _batch_sizes(x0)
        g0, g1 = _all_gather(torch.stack([x0, x1], 1), sizes).unbind(1)  # one collective for both
        gc = None if cond is None else _all_gather(cond, sizes)
        i, j = self.pair_indices(g0, g1, generator) if gc is None else self._pair_within_classes(g0, g1, gc, generator)
        start = sum(sizes[: dist.get_rank()])
        mine = slice(start, start + x0.shape[0])
        return g0[i[mine]], g1[j[mine]], None if gc is None else gc[j[mine]]

    def _pair_within_classes(self, x0, x1, cond, generator):
        """Solve the coupling separately per class; source points are split by position."""
        i_all, j_all = torch.empty_like(cond, dtype=torch.long), torch.empty_like(cond, dtype=torch.long)
        for label in torch.unique(cond):
            idx = torch.nonzero(cond == label).squeeze(1)
            i, j = self.pair_indices(x0[idx], x1[idx], generator)
            i_all[idx], j_all[idx] = idx[i.to(idx.device)], idx[j.to(idx.device)]
        return i_all, j_all

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class IndependentCoupling(Coupling):
    """``(x0, x1)`` drawn independently: the pairs are kept as given."""

    def pair_indices(self, x0, x1, generator):
        ar = torch.arange(x0.shape[0], device=x0.device)
        return ar, ar

    def __call__(self, x0, x1, cond=None, generator=None):
        return x0, x1, cond


class ExactOTCoupling(Coupling):
    """Exact minibatch OT: the optimal assignment under squared Euclidean cost.

    Every source and every target point is used exactly once (a permutation), solved exactly by
    :func:`~fm_lightning.flow.assignment.optimal_assignment`.

    Under DDP each rank solves OT on its own minibatch by default. With ``global_batch=True``
    the batches of all ranks are gathered, OT is solved on the global batch, and each rank
    keeps its share of the pairs, which is worth it when per-rank batches are small.

    Args:
        global_batch: solve on the batch gathered from all ranks (no effect in one process).
    """

    def __init__(self, global_batch: bool = False) -> None:
        self.global_batch = bool(global_batch)

    def pair_indices(self, x0, x1, generator):
        ar = torch.arange(x0.shape[0], device=x0.device)
        if not (torch.isfinite(x0).all() and torch.isfinite(x1).all()):
            # The loss will be non-finite too; the training loop's guard decides what happens.
            log.warning("ExactOTCoupling got non-finite samples; keeping this batch's pairs as given")
            return ar, ar
        return ar, torch.as_tensor(optimal_assignment(squared_cost(x0, x1).cpu().numpy()), device=x1.device)


#: Epsilon-scaling in :func:`_entropic_plan`: each stage multiplies the regularisation by
#: ``EPS_FACTOR``, from the largest cost down to ``reg``. The stages before the last stop at the
#: loose marginal tolerance ``STAGE_TOL``.
EPS_FACTOR, STAGE_TOL = 0.3, 1e-2


def _entropic_plan(cost: np.ndarray, reg: float, tol: float, max_iters: int) -> tuple[np.ndarray, float, int]:
    """Entropic OT plan between uniform weights: ``argmin_P <P, C> - reg * H(P)`` subject to
    ``P 1 = 1/B0`` and ``P^T 1 = 1/B1``, with ``H(P) = -sum P log P``.

    The plan has the Gibbs form ``P_ij = exp((f_i + g_j - C_ij) / reg)`` (dual potentials f, g).
    Algorithm: stabilised Sinkhorn in the scaling form with absorption (Schmitzer 2019), with
    four parts.

    1. Epsilon-scaling: ``eps`` runs from ``max C`` down to ``reg`` by factors ``EPS_FACTOR``;
       each stage warm-starts from the previous stage's ``f, g``.
    2. In a stage, ``P = diag(u) K diag(v)`` with ``K = exp((f + g - C) / eps)``. Each iteration
       is two matrix-vector products and rescales ``v`` to fix the column sums, then ``u`` to fix
       the row sums. When ``u`` or ``v`` leave ``[1e-30, 1e30]``, they are absorbed into
       ``f += eps log u``, ``g += eps log v``, and ``K`` is rebuilt. So ``exp`` runs over the
       whole matrix only once per stage or absorption, not once per iteration as with log-domain
       updates.
    3. Over-relaxation (Thibault et al. 2021, Lehmann et al. 2022): ``u <- u / rowsum^w``, not
       ``w = 1``. The contraction rate ``lam`` of the log row residual is measured over windows
       of 10 iterations. Once it is steady, Young's SOR relation ``mu^2 = (lam + w - 1)^2 /
       (lam w^2)`` gives ``w = 2 / (1 + sqrt(1 - mu^2))``, capped at 1.99.
    4. Unless it converged at ``reg``, the plan is one log-domain half-step at ``reg`` from the
       last finite ``g``: ``P_ij = softmax_j((g_j - C_ij) / reg) / B0``. Its rows are exact and
       it is finite for any finite ``C / reg``. So a small reg gives a plan near exact OT even
       where the iterations run out before ``eps`` reaches it, or where the scaling form loses
       precision (``eps`` near ``1e-16 * max C``: a non-finite error, and that stage is dropped).

    It stops when ``max(|B0 * rowsum - 1|, |B1 * colsum - 1|) < tol`` in the last stage, or
    after ``max_iters`` iterations in all (stages included).

    Args:
        cost: (B0, B1) float64 cost matrix.
        reg: target regularisation ``> 0``, in the units of ``cost``.
        tol: relative marginal violation to reach.
        max_iters: cap on the total number of iterations.

    Returns:
        ``(plan, err, iters)``: the (B0, B1) plan at ``reg`` (non-finite only for a non-finite
        ``C / reg``), its relative marginal violation (as above, recomputed from the plan), and
        the iterations used.
    """
    n0, n1 = cost.shape
    f, g = np.zeros(n0), np.zeros(n1)
    eps, it = max(reg, float(cost.max())), 0
    with np.errstate(all="ignore"):  # a breakdown shows up as a non-finite err, handled below
        while True:
            g_last = g
            kernel = np.exp((f[:, None] + g[None, :] - cost) / eps)
            u, v, w, resid = np.ones(n0), np.ones(n1), 1.0, []
            stop = tol if eps <= reg else max(tol, STAGE_TOL)
            while it < max_iters:
                it += 1
                c = kernel.T @ u
                v = v / (v * c * n1) ** w
                row, col = u * (kernel @ v) * n0, v * c * n1
                err = max(np.abs(row - 1).max(), np.abs(col - 1).max())
                if not err > stop:  # converged, or NaN
                    break
                u = u / row**w
                log_row = np.log(row)
                resid.append(np.linalg.norm(log_row - log_row.mean()))
                if len(resid) % 10 == 0 and len(resid) >= 30:
                    lam_old, lam = (resid[-11] / resid[-21]) ** 0.1, (resid[-1] / resid[-11]) ** 0.1
                    if w - 1 < lam < 1 and abs(lam - lam_old) < 0.1 * (1 - lam):
                        mu2 = (lam + w - 1) ** 2 / (lam * w * w)
                        w = min(1.99, 2 / (1 + np.sqrt(max(1 - mu2, 0.0))))
                if max(u.max(), v.max(), 1 / u.min(), 1 / v.min()) > 1e30:
                    f, g = f + eps * np.log(u), g + eps * np.log(v)
                    kernel = np.exp((f[:, None] + g[None, :] - cost) / eps)
                    u, v = np.ones(n0), np.ones(n1)
            f, g = f + eps * np.log(u), g + eps * np.log(v)
            if not np.isfinite(err):  # lost precision: keep the last finite stage's g
                g = g_last
                break
            if eps <= reg or it >= max_iters:
                break
            eps = max(reg, eps * EPS_FACTOR)
        if eps <= reg and err <= tol:
            plan = np.exp((f[:, None] + g[None, :] - cost) / reg)
        else:
            logits = (g[None, :] - cost) / reg
            plan = np.exp(logits - logits.max(1, keepdims=True))
            plan /= plan.sum(1, keepdims=True) * n0
        err = max(np.abs(plan.sum(1) * n0 - 1).max(), np.abs(plan.sum(0) * n1 - 1).max())
    return plan, float(err), it


class SinkhornOTCoupling(Coupling):
    """Entropic OT: solve the Sinkhorn plan and draw B pairs from it (with replacement).

    The plan is solved by :func:`_entropic_plan` (stabilised Sinkhorn with epsilon-scaling and
    over-relaxation) to a relative marginal violation ``tol``. If ``num_iters`` runs out first,
    a warning gives the error reached (once per coupling). If the plan is not finite (non-finite
    samples, or ``C / reg`` beyond float64), the batch takes exact OT pairs, the ``reg -> 0``
    limit, with a warning (once per coupling).

    Args:
        reg: entropic regularisation ``epsilon > 0`` (finite) on the *unnormalised* squared cost.
            Schrodinger-bridge CFM uses ``reg = 2*sigma**2``; ``None`` lets the objective
            fill that in from its path (in its own copy; this object keeps ``None``).
        num_iters: maximum Sinkhorn iterations in all (epsilon-scaling stages included).
        global_batch: solve on the batch gathered from all ranks (see :class:`ExactOTCoupling`).
        tol: stop when ``max |B * row sums - 1|`` and ``max |B * column sums - 1|`` are below it
            (finite, ``> 0``).
    """

    def __init__(
        self, reg: float | None = None, num_iters: int = 1000, global_batch: bool = False, tol: float = 1e-4
    ) -> None:
        if reg is not None and not (math.isfinite(reg) and reg > 0):
            raise ValueError(f"SinkhornOTCoupling reg must be > 0 and finite, got {reg}")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"SinkhornOTCoupling needs tol > 0 and finite, got {tol}")
        if not (math.isfinite(num_iters) and num_iters >= 1):
            raise ValueError(f"SinkhornOTCoupling needs num_iters >= 1, got {num_iters}")
        self.reg = None if reg is None else float(reg)
        self.num_iters = int(num_iters)
        self.global_batch = bool(global_batch)
        self.tol = float(tol)
        self._warned = self._warned_fallback = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def plan(self, x0: Tensor, x1: Tensor) -> np.ndarray:
        """The entropic OT plan (B0, B1) between uniform weights, in float64."""
        if self.reg is None:
            raise ValueError("SinkhornOTCoupling.reg is unset; give reg or pair it with SchrodingerBridgePath")
        cost = squared_cost(x0, x1).cpu().numpy()
        pi, err, iters = _entropic_plan(cost, self.reg, self.tol, self.num_iters)
        if np.isfinite(err) and not err < self.tol and not self._warned:
            self._warned = True
            log.warning(
                "Sinkhorn did not converge in %d iterations (reg=%s): marginal error %.2e > tol %.0e. "
                "Increase num_iters or reg (warned once per coupling).",
                iters, self.reg, err, self.tol,
            )
        return pi

    def pair_indices(self, x0, x1, generator):
        pi = self.plan(x0, x1)
        n = x0.shape[0]
        if not np.isfinite(pi).all():
            if not self._warned_fallback:
                self._warned_fallback = True
                log.warning(
                    "Sinkhorn plan is not finite (non-finite samples, or cost / reg beyond float64 at reg=%s); "
                    "using exact OT pairs, the reg -> 0 limit (warned once per coupling).",
                    self.reg,
                )
            return ExactOTCoupling().pair_indices(x0, x1, generator)
        i, j = _draw_pairs(torch.as_tensor(pi), n, generator)
        return i.to(x0.device), j.to(x1.device)


def _draw_pairs(plan: Tensor, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``n`` index pairs ``(i, j)`` (n,) drawn with replacement, ``P(i, j) = plan[i, j] / plan.sum()``
    for a (B0, B1) plan: rows ``i`` from the row sums, then ``j`` from row ``i``. Two stages, since
    ``torch.multinomial`` takes at most 2^24 categories (B0 * B1 is more for B > 4096)."""
    i = torch.multinomial(plan.sum(1), n, replacement=True, generator=generator)
    j = torch.multinomial(plan[i], 1, generator=generator).squeeze(1)
    return i, j
