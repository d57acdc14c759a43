"""Where the time of one OT-CFM training step goes (8gaussians -> moons, one torch thread).

    python benchmarks/profile_otcfm.py                   # ~1-2 min
    python benchmarks/profile_otcfm.py --batch-sizes 128 256 512 --reps 100

Part 1 times each piece of a step in CPU milliseconds (medians of interleaved repetitions):
sampling the batch, the cost matrix (float64 ``torch.cdist`` as in ``squared_cost``, float32,
numpy), the assignment (``scipy.optimize.linear_sum_assignment`` on float64 and float32 costs,
POT ``ot.emd``, and ``ExactOTCoupling`` as shipped), and the net step (forward, backward, Adam)
of the default net and of TorchCFM's 3x64 net.

Part 2 is a wall-clock A/B of a bare training loop: serial (pair, then step) vs overlapped
(a worker thread solves the assignment of batch k+1 while the net trains on batch k; both
scipy and POT release the GIL), and 1 vs 2 torch threads. On a shared machine wall-clock
numbers depend on the other load; the ratios are from interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from datamodules.toy import make_distribution
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
            "cost f64 torch.cdist": (lambda: squared_cost(x0, x1).numpy(), reps),
            "cost f32 torch.cdist": (lambda: torch.cdist(x0, x1).square().numpy(), reps),
            "cost f64 numpy": (lambda: (a0 * a0).sum(1)[:, None] + (a1 * a1).sum(1) - 2 * a0 @ a1.T, reps),
            "scipy LSA f64": (lambda: linear_sum_assignment(c64), n_slow),
            "scipy LSA f32": (lambda: linear_sum_assignment(c32), n_slow),
            "POT emd f64": (lambda: ot.emd(w, w, c64, numItermax=10_000_000), n_slow),
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


def _loop(net, opt, batches, coupling, overlap: bool, pool: ThreadPoolExecutor) -> float:
    """Wall seconds to train on ``batches`` with OT pairing serial or one batch ahead in a thread."""
    def pair(batch):
        return coupling(*batch)[:2]

    t0 = time.perf_counter()
    nxt = pool.submit(pair, batches[0]) if overlap else None
    for k in range(len(batches)):
        if overlap:
            x0, x1 = nxt.result()
            if k + 1 < len(batches):
                nxt = pool.submit(pair, batches[k + 1])
        else:
            x0, x1 = pair(batches[k])
        t = torch.rand(x0.shape[0])
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        opt.zero_grad()
        (net(xt, t) - (x1 - x0)).square().mean().backward()
        opt.step()
    return time.perf_counter() - t0


def part2(batch: int, steps: int, rounds: int, width: int) -> None:
    source, target = make_distribution("8gaussians"), make_distribution("moons")
    batches = [(source.sample(batch), target.sample(batch)) for _ in range(steps)]
    coupling = ExactOTCoupling()
    pool = ThreadPoolExecutor(1)
    variants = {"serial, 1 thread": (False, 1), "overlapped, 1 thread": (True, 1),
                "serial, 2 threads": (False, 2), "overlapped, 2 threads": (True, 2)}
    wall = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (overlap, threads) in variants.items():
            torch.set_num_threads(threads)
            net = MLP(2, width, 3)
            wall[k].append(_loop(net, torch.optim.Adam(net.parameters(), 1e-3), batches, coupling, overlap, pool))
    torch.set_num_threads(1)
    base = wall["serial, 1 thread"]
    print(f"\npart 2: bare OT-CFM loop, net 3x{width}, batch {batch}, {steps} steps, {rounds} interleaved rounds")
    print("| variant | steps/s (wall, median) | speed vs serial 1-thread (median of per-round ratios) |")
    print("| --- | ---: | ---: |")
    for k, ws in wall.items():
        print(f"| {k} | {steps / statistics.median(ws):.1f} | "
              f"{statistics.median(b / w for b, w in zip(base, ws)):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--reps", type=int, default=50, help="calls per timing (fewer for B >= 512 solvers)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overlap-steps", type=int, default=200, help="steps per part-2 run (0 skips part 2)")
    parser.add_argument("--overlap-batch", type=int, default=256)
    parser.add_argument("--overlap-width", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    part1(args.batch_sizes, args.reps, args.rounds)
    if args.overlap_steps:
        part2(args.overlap_batch, args.overlap_steps, args.rounds, args.overlap_width)


if __name__ == "__main__":
    main()
