"""Entropic OT plan: SinkhornOTCoupling's solver vs POT's log-domain Sinkhorn (one CPU thread).

    OMP_NUM_THREADS=1 python benchmarks/sinkhorn_speed.py            # ~3-5 min, mostly POT at reg 0.05
    OMP_NUM_THREADS=1 python benchmarks/sinkhorn_speed.py --regs 0.5 --batches 20 --pot-batches 5

For B=256 batches of the toy tasks (n_to_8gaussians, moons_to_8gaussians, n_to_moons), and each
reg (0.5 = 2 sigma^2 is SB-CFM's default for sigma=0.5), it prints CPU milliseconds per plan of

* ``new``: ``_entropic_plan``, as ``SinkhornOTCoupling.plan`` calls it (epsilon-scaling,
  stabilised scaling iterations with absorption, over-relaxation), stopped at ``--tol``;
* ``POT``: ``ot.sinkhorn(method="sinkhorn_log")``, which the coupling called before, stopped by
  the same criterion. POT's own ``stopThr`` is an L2 norm of absolute column errors, so POT runs
  in chunks of 10 iterations (its own check interval), warm-started from its log-potentials,
  until ``err < tol`` or ``--pot-max-iters``. The chunking adds about one ``exp`` of the cost
  matrix per 10 iterations (a few percent of POT's time).

Both solve the same float64 cost matrix; the time to build it is left out. ``err`` is the
relative marginal violation ``max(|B * row sums - 1|, |B * column sums - 1|)`` of the returned
plan (the largest over the batches), and ``iters`` the iterations used: for ``new`` the median
and the largest over the batches, all epsilon-scaling stages together (the coupling's default
``num_iters`` is 1000; batches that need more log a warning in training).
``new`` is timed on ``--batches`` batches and POT on the first ``--pot-batches`` of them. ``x``
is POT's median time over the new solver's median on those same batches. ``L1(dP)`` is the
L1 distance ``sum |P - Q|`` between the two plans (each sums to 1, so 2 means disjoint plans),
the largest over the batches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ot
import torch

from datamodules.toy import make_distribution
from fm_lightning.flow.couplings import _entropic_plan, squared_cost

PAIRS = [("gaussian", "8gaussians"), ("moons", "8gaussians"), ("gaussian", "moons")]


def marginal_error(plan: np.ndarray) -> float:
    n0, n1 = plan.shape
    return float(max(np.abs(plan.sum(1) * n0 - 1).max(), np.abs(plan.sum(0) * n1 - 1).max()))


def pot_plan(cost: np.ndarray, reg: float, tol: float, max_iters: int) -> tuple[np.ndarray, int]:
    """POT's log-domain Sinkhorn stopped when ``marginal_error < tol``; returns (plan, iters)."""
    w0, w1 = np.full(cost.shape[0], 1.0 / cost.shape[0]), np.full(cost.shape[1], 1.0 / cost.shape[1])
    warm, iters = None, 0
    while iters < max_iters:
        plan, log = ot.sinkhorn(
            w0, w1, cost, reg, method="sinkhorn_log", numItermax=10, stopThr=0.0, log=True, warn=False, warmstart=warm
        )
        warm, iters = (log["log_u"], log["log_v"]), iters + 10
        if marginal_error(plan) < tol:
            break
    return plan, iters


def timed(fn):
    t0 = time.process_time()
    out = fn()
    return out, (time.process_time() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--regs", type=float, nargs="+", default=[0.5, 0.05])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--batches", type=int, default=10, help="batches timed for the new solver")
    parser.add_argument("--pot-batches", type=int, default=2, help="the first batches also solved by POT")
    parser.add_argument("--max-iters", type=int, default=100_000, help="num_iters of the new solver")
    parser.add_argument("--pot-max-iters", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    b, tol = args.batch_size, args.tol
    print(f"B={b}, tol={tol:g}, CPU ms per plan (median), one thread, {args.batches} batches ({args.pot_batches} for POT)")
    print(
        f"{'source -> target':24s} {'reg':>5s} {'max C':>6s} | {'new ms':>7s} {'iters':>10s} {'err':>8s}"
        f" | {'POT ms':>8s} {'iters':>6s} {'err':>8s} | {'x':>6s} {'L1(dP)':>8s}"
    )
    for source, target in PAIRS:
        gen = torch.Generator().manual_seed(args.seed)
        p0, p1 = make_distribution(source), make_distribution(target)
        costs = [squared_cost(p0.sample(b, gen), p1.sample(b, gen)).numpy() for _ in range(args.batches)]
        pot_plan(costs[0], 1.0, 1.0, 10)  # warm-up: POT's first call sets up its backend
        for reg in args.regs:
            new = [timed(lambda c=c: _entropic_plan(c, reg, tol, args.max_iters)) for c in costs]
            pot = [timed(lambda c=c: pot_plan(c, reg, tol, args.pot_max_iters)) for c in costs[: args.pot_batches]]
            new_ms = statistics.median(ms for _, ms in new)
            pot_ms = statistics.median(ms for _, ms in pot)
            same_ms = statistics.median(ms for _, ms in new[: len(pot)])
            new_err = max(marginal_error(plan) for (plan, _, _), _ in new)
            pot_err = max(marginal_error(plan) for (plan, _), _ in pot)
            new_its = [its for (_, _, its), _ in new]
            pot_its = statistics.median(its for (_, its), _ in pot)
            dp = max(np.abs(p - q[0]).sum() for ((p, _, _), _), (q, _) in zip(new, pot))
            print(
                f"{source + ' -> ' + target:24s} {reg:5g} {max(c.max() for c in costs):6.0f} |"
                f" {new_ms:7.1f} {statistics.median(new_its):4.0f}/{max(new_its):<5d} {new_err:8.1e} | {pot_ms:8.1f} {pot_its:6.0f} {pot_err:8.1e} |"
                f" {pot_ms / same_ms:6.0f} {dp:8.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
