"""Training throughput (steps/s) of the default toy run: Lightning Trainer vs a bare PyTorch
loop over the same objects vs TorchCFM's tutorial loop.

    python benchmarks/toy_throughput.py                  # ~2-3 min on 2 idle cores
    python benchmarks/toy_throughput.py --steps 100 --rounds 2 --threads 2
    python benchmarks/toy_throughput.py data.num_workers=2 --flows otcfm

(a) **trainer**: configs composed from ``configs/train.yaml`` (callbacks and logger off, no
    validation) and fitted by ``lightning.Trainer``; the rate is measured by a no-op timing
    callback between batch ``--warmup`` and the last batch (startup excluded).
(b) **bare**: the same composed net, ``CFMObjective``, optimizer, LR schedule and
    ``ToyDataModule`` loader (its workers drawing and OT-pairing the batches, as under the
    Trainer), driven by a plain ``for`` loop.
(c) **torchcfm**: TorchCFM's tutorial recipe (3x64 SELU MLP, Adam 1e-3, batch 256,
    sigma 0.1) with its ``ConditionalFlowMatcher`` / ``ExactOptimalTransportConditionalFlowMatcher``,
    fed by our samplers (8gaussians -> moons).

Every configuration runs once per round, rounds interleave, and each ratio is the median of
per-round ratios, so a shared machine's load drift cancels. Rates are given per wall-clock
second (the figure of merit: our loader workers use the second core) and per CPU second of
the main process alone (live loader workers are not counted, so for ours it is the training
step's cost, not the whole job's).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings

import hydra
import lightning as L
import torch

from _common import Clock, TorchCFMRecipe, bare_train, compose_train

QUIET_TRAINER = [
    "callbacks=none", "logger=none",
    "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    "+trainer.enable_checkpointing=false", "+trainer.limit_val_batches=0",
]
SMALL_NET = ["model.net.width=64", "model.net.depth=3", "model.net.activation=selu"]


class _Timer(L.Callback):
    """Records the clocks at the start of batch ``warmup`` and at the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.clock, self.wall, self.cpu = warmup, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.clock = Clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps:
            self.wall, self.cpu = self.clock.wall, self.clock.cpu


def trainer_rate(overrides: list[str], warmup: int, steps: int, out: str) -> tuple[float, float]:
    """Steps per (wall, CPU) second of ``Trainer.fit`` after ``warmup`` steps."""
    cfg = compose_train([*overrides, *QUIET_TRAINER, f"trainer.max_steps={warmup + steps}",
                         "model.lr_scheduler.total_steps=100000"], out)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    timer = _Timer(warmup)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer], logger=False)
    trainer.fit(model, datamodule=datamodule)
    return steps / timer.wall, steps / timer.cpu


def bare_rate(overrides: list[str], warmup: int, steps: int, out: str) -> tuple[float, float]:
    """Steps per (wall, CPU) second of a plain loop over the composed net/objective/data."""
    cfg = compose_train([*overrides, f"trainer.max_steps={warmup + steps}", "model.lr_scheduler.total_steps=100000"], out)
    _, _, wall, cpu = bare_train(cfg, seed_everything=False, warmup=warmup)
    return steps / wall, steps / cpu


def torchcfm_rate(flow: str, overrides: list[str], warmup: int, steps: int, out: str) -> tuple[float, float]:
    """Steps per (wall, CPU) second of TorchCFM's tutorial loop fed by our samplers."""
    cfg = compose_train(overrides, out)
    datamodule = hydra.utils.instantiate(cfg.data)
    recipe = TorchCFMRecipe(flow, datamodule.source, datamodule.target)
    for _ in range(warmup):
        recipe.step()
    clock = Clock()
    for _ in range(steps):
        recipe.step()
    return steps / clock.wall, steps / clock.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every loop")
    parser.add_argument("--flows", nargs="+", default=["otcfm", "icfm"], choices=["otcfm", "icfm"])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for our runs, e.g. data.num_workers=2")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    out = tempfile.mkdtemp(prefix="fm_bench_")

    # (key, label, function)
    cases = []
    for flow in args.flows:
        for net_name, net_ovr in (("default", []), ("3x64", SMALL_NET)):
            ovr = [f"flow={flow}", *net_ovr, *args.overrides]
            cases.append(((flow, net_name, "trainer"), lambda o=ovr: trainer_rate(o, args.warmup, args.steps, out)))
            cases.append(((flow, net_name, "bare"), lambda o=ovr: bare_rate(o, args.warmup, args.steps, out)))
        cases.append(((flow, "3x64", "torchcfm"),
                      lambda f=flow: torchcfm_rate(f, [f"flow={f}"], args.warmup, args.steps, out)))

    rates: dict[tuple, list[tuple[float, float]]] = {key: [] for key, _ in cases}
    for r in range(args.rounds):
        for key, fn in cases:
            torch.manual_seed(r)
            rates[key].append(fn())
            print(f"round {r} {'/'.join(key):28s} {rates[key][-1][0]:8.1f} steps/s wall "
                  f"{rates[key][-1][1]:8.1f} steps/s cpu", flush=True)

    med = {k: tuple(statistics.median(v[i] for v in vals) for i in (0, 1)) for k, vals in rates.items()}
    net_desc = {"default": "default (configs/model/net/mlp.yaml)", "3x64": "3x64 SELU (TorchCFM tutorial size)"}
    print(f"\nthroughput, 8gaussians -> moons, batch from configs/data/toy.yaml, torch threads={args.threads}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| flow | net | loop | steps/s (wall) | steps/s (CPU) |")
    print("| --- | --- | --- | ---: | ---: |")
    for (flow, net_name, loop), (w, c) in med.items():
        print(f"| {flow} | {net_desc[net_name]} | {loop} | {w:.1f} | {c:.1f} |")

    def ratio(a, b, i):
        return statistics.median(x[i] / y[i] for x, y in zip(rates[a], rates[b]))

    print("\nratios (median of per-round ratios; wall / CPU):")
    for flow in args.flows:
        for net_name in ("default", "3x64"):
            a, b = (flow, net_name, "trainer"), (flow, net_name, "bare")
            print(f"  Trainer/bare      {flow:5s} {net_name:7s}: {ratio(a, b, 0):5.2f} / {ratio(a, b, 1):5.2f}"
                  "   (goal >= 0.8)")
    for flow in args.flows:
        goal = ">= 3" if flow == "otcfm" else ">= 0.8"
        for net_name in ("3x64", "default"):
            a, b = (flow, net_name, "trainer"), (flow, "3x64", "torchcfm")
            print(f"  ours({net_name} net, Trainer)/TorchCFM {flow:5s}: {ratio(a, b, 0):5.2f} / {ratio(a, b, 1):5.2f}"
                  f"   (goal {goal}{'; same net size' if net_name == '3x64' else '; our default net'})")


if __name__ == "__main__":
    main()
