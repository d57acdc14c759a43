"""Where the time of one OT-CFM training step goes (8gaussians -> moons, one torch thread).

    python benchmarks/profile_otcfm.py                   # ~1-2 min
    python benchmarks/profile_otcfm.py --batch-sizes 128 256 512 --reps 100

Part 1 times each piece of a step in CPU milliseconds (medians of interleaved repetitions):
sampling the batch, the cost matrix (float64 ``squared_cost`` as shipped, float32 ``torch.cdist``,
numpy), the assignment (``scipy.optimize.linear_sum_assignment`` on float64 and float32 costs,
POT ``ot.emd``, our ``optimal_assignment``, and ``ExactOTCoupling`` as shipped), and the net
step (forward, backward, Adam) of the default net and of TorchCFM's 3x64 net.

Part 2 times the three exact solvers at one batch size on the four classic 2-D tasks, the
default 8gaussians -> moons, and image-sized costs (64-d digits, 3072-d), and checks that they
reach the same optimal cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from datamodules.toy import make_distribution
from fm_lightning.flow.assignment import optimal_assignment
from fm_lightning.flow.couplings import ExactOTCoupling, squared_cost
from fm_lightning.nets import MLP


def cpu_ms(fn, reps: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps * 1e3


def part1(batch_sizes: list[int], reps: int, rounds: int) -> None:
    import ot

    source, target = make_distribution("8gaussians"), make_distribution("moons")
    print("part 1: CPU ms per call (median of rounds), 8gaussians -> moons, 1 torch thread")
    header = None
    for b in batch_sizes:
        x0, x1 = source.sample(b), target.sample(b)
        c64 = squared_cost(x0, x1).numpy()
        c32 = torch.cdist(x0, x1).square().numpy()
        w = np.full(b, 1.0 / b)
        a0, a1 = x0.double().numpy(), x1.double().numpy()
        nets = {"net 3x256 step": MLP(2, 256, 3), "net 3x64 step": MLP(2, 64, 3)}
        opts = {k: torch.optim.Adam(n.parameters(), 1e-3) for k, n in nets.items()}
        xt, t = torch.randn(b, 2), torch.rand(b)

        def net_step(k):
            opts[k].zero_grad()
            (nets[k](xt, t) - x1).square().mean().backward()
            opts[k].step()

        n_slow = max(3, reps // 5) if b >= 512 else reps
        items = {
            "sample batch": (lambda: (source.sample(b), target.sample(b)), reps),
            "cost f64 squared_cost": (lambda: squared_cost(x0, x1).numpy(), reps),
            "cost f32 torch.cdist": (lambda: torch.cdist(x0, x1).square().numpy(), reps),
            "cost f64 numpy": (lambda: (a0 * a0).sum(1)[:, None] + (a1 * a1).sum(1) - 2 * a0 @ a1.T, reps),
            "scipy LSA f64": (lambda: linear_sum_assignment(c64), n_slow),
            "scipy LSA f32": (lambda: linear_sum_assignment(c32), n_slow),
            "POT emd f64": (lambda: ot.emd(w, w, c64, numItermax=10_000_000), n_slow),
            "optimal_assignment": (lambda: optimal_assignment(c64), n_slow),
            "ExactOTCoupling()": (lambda: ExactOTCoupling()(x0, x1), n_slow),
            "torchcfm OT sampler": (None, n_slow),
            "net 3x256 step": (lambda: net_step("net 3x256 step"), reps),
            "net 3x64 step": (lambda: net_step("net 3x64 step"), reps),
        }
        try:
            from torchcfm.optimal_transport import OTPlanSampler

            sampler = OTPlanSampler(method="exact")
            items["torchcfm OT sampler"] = (lambda: sampler.sample_plan(x0, x1), n_slow)
        except ImportError:
            del items["torchcfm OT sampler"]
        res = {k: [] for k in items}
        for _ in range(rounds):
            for k, (fn, n) in items.items():
                res[k].append(cpu_ms(fn, n))
        if header is None:
            header = list(items)
            print("| B | " + " | ".join(header) + " |")
            print("| ---: | " + " | ".join("---:" for _ in header) + " |")
        print(f"| {b} | " + " | ".join(f"{statistics.median(res[k]):.2f}" for k in header) + " |", flush=True)


def part2(batch: int, reps: int, rounds: int) -> None:
    """The exact solvers on the four classic 2-D tasks, the default one and image-sized costs,
    checked to reach the same optimal cost."""
    import ot
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().data, dtype=torch.float32) / 8 - 1
    gen = torch.Generator().manual_seed(0)
    cases = {f"{s} -> {t}": (make_distribution(s).sample(batch, gen), make_distribution(t).sample(batch, gen))
             for s, t in [("gaussian", "8gaussians"), ("moons", "8gaussians"), ("gaussian", "moons"),
                          ("gaussian", "scurve"), ("8gaussians", "moons")]}
    cases["N(0, I) -> digits (d=64)"] = (torch.randn(batch, 64, generator=gen),
                                          digits[torch.randint(len(digits), (batch,), generator=gen)])
    cases["N(0, I) -> U(-1, 1) (d=3072)"] = (torch.randn(batch, 3072, generator=gen),
                                             torch.rand(batch, 3072, generator=gen) * 2 - 1)
    w = np.full(batch, 1.0 / batch)
    print(f"\npart 2: exact assignment, B={batch}, CPU ms per call (median of rounds), 1 thread")
    print("| costs | optimal_assignment | scipy LSA | POT emd | speed-up vs best other | same optimum |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, (x0, x1) in cases.items():
        cost = squared_cost(x0, x1).numpy()
        solvers = {"ours": lambda: optimal_assignment(cost), "lsa": lambda: linear_sum_assignment(cost)[1],
                   "emd": lambda: ot.emd(w, w, cost, numItermax=10_000_000).argmax(1)}
        res = {k: statistics.median(cpu_ms(fn, reps) for _ in range(rounds)) for k, fn in solvers.items()}
        totals = [cost[np.arange(batch), fn()].sum() for fn in solvers.values()]
        same = all(np.isclose(t, totals[0], rtol=1e-12, atol=0) for t in totals)
        print(f"| {name} | {res['ours']:.2f} | {res['lsa']:.2f} | {res['emd']:.2f} | "
              f"{min(res['lsa'], res['emd']) / res['ours']:.1f}x | {same} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--reps", type=int, default=50, help="calls per timing (fewer for B >= 512 solvers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--solver-batch", type=int, default=256, help="batch of part 2 (0 skips it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    part1(args.batch_sizes, args.reps, args.rounds)
    if args.solver_batch:
        part2(args.solver_batch, args.reps, args.rounds)


if __name__ == "__main__":
    main()
