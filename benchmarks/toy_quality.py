"""Sample quality on the four classic 2-D tasks: fm-lightning's default run vs TorchCFM's
tutorial recipe given the same training time.

    python benchmarks/toy_quality.py                         # 8 rows x 3 seeds, ~2 x 24 default runs
    python benchmarks/toy_quality.py --tasks n_to_moons --flows otcfm --seeds 0 --clock cpu

For each task (configs/experiment/{n_to_8gaussians,moons_to_8gaussians,n_to_moons,n_to_scurve}),
flow (``flow=icfm``, ``flow=otcfm``) and training seed (``seed=S``, which seeds both sides):

1. **ours**: ``fm_lightning.train.run`` on the composed default config (default budget,
   callbacks and logger included, run directory under a temp dir), timed; the model is then
   reloaded from its ``checkpoints/last.ckpt``.
2. **TorchCFM**: the tutorial recipe (3x64 SELU MLP, Adam 1e-3, batch 256, sigma 0.1, its
   ``ConditionalFlowMatcher`` or ``ExactOptimalTransportConditionalFlowMatcher``) on the
   same samplers, trained until it has used the same time (``--clock wall``, the default,
   or ``cpu``: process CPU seconds, robust to other load on a shared machine).

Both are evaluated identically with fixed seeds (``_common.evaluate``): W2 of 2000 generated vs
2000 fresh target samples (``fm_lightning.metrics.wasserstein2``), the finite-sample floor (W2
between two fresh target sets) and the NFE of dopri5 at atol=rtol=1e-4
(``fm_lightning.flow.solve.odeint``), each the mean over 3 independent draws (a single
2000-vs-2000 W2 on 8gaussians moves by +-0.1 with the mode counts of the draw). A row is the
mean +- std over the training seeds: one seed's W2 also moves with where training stops (for
TorchCFM's constant-lr loop, by +-0.1 between checkpoints on N -> 8gaussians). dopri5's
attempted steps ``(dt, error ratio, worst-1% share)`` are printed and saved: NFE = 2 + 6 x steps,
so one more step can be a sliver left over just short of ``t = 1``; the share is how much of a
step's squared error its worst 1% of samples carry (0.01 if spread evenly). torchdyn grows the
next step by ``0.9 / error_ratio ** (1/5)`` (at most 10x), so fewer steps need far smaller ratios.
The table is printed and written to ``benchmarks/results/toy_quality.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import warnings

import torch

from _common import TASKS, Clock, TorchCFMRecipe, compose_train, evaluate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_ours(task: str, flow: str, out: str, extra: list[str]) -> tuple[object, dict]:
    from fm_lightning.module import load_checkpoint
    from fm_lightning.train import run

    cfg = compose_train([f"experiment={task}", f"flow={flow}", *extra], out)
    clock = Clock()
    metrics = run(cfg)
    timing = {"wall_s": clock.wall, "cpu_s": clock.cpu, "steps": int(metrics["global_step"])}
    model = load_checkpoint(os.path.join(out, "checkpoints", "last.ckpt"))
    return model, timing


def run_torchcfm(task: str, flow: str, seed: int, budget: float, clock_name: str,
                 out: str) -> tuple[TorchCFMRecipe, dict]:
    import hydra

    cfg = compose_train([f"experiment={task}", f"flow={flow}", f"seed={seed}"], out)
    torch.manual_seed(cfg.seed)
    dm = hydra.utils.instantiate(cfg.data)
    recipe = TorchCFMRecipe(flow, dm.source, dm.target)
    clock = Clock()
    while getattr(clock, clock_name) < budget:
        for _ in range(10):
            recipe.step()
    return recipe, {"wall_s": clock.wall, "cpu_s": clock.cpu, "steps": recipe.steps}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean_std: tuple[float, float], digits: int) -> str:
    mean, std = mean_std
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--flows", nargs="+", default=["icfm", "otcfm"], choices=["icfm", "otcfm"])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="which of ours' times TorchCFM is given (cpu: process CPU seconds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (both sides); each row is the mean over them")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both")
    parser.add_argument("--override", action="append", default=[],
                        help="extra Hydra override for ours (repeatable), e.g. trainer.max_steps=2000")
    parser.add_argument("--output", default=os.path.join(RESULTS, "toy_quality"),
                        help="path stem of the .md/.json results")
    args = parser.parse_args()
    if min(args.seeds) < 0:
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    if any(o.lstrip("+~").startswith("seed=") for o in args.override):
        parser.error("the training seeds come from --seeds (they seed both sides); drop seed= from --override")

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("fm_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="fm_quality_")

    rows = []
    for task in args.tasks:
        for flow in args.flows:
            per_seed = []
            for seed in args.seeds:
                out = os.path.join(tmp, f"{task}_{flow}_{seed}")
                model, ours_t = run_ours(task, flow, out, [f"seed={seed}", *args.override])
                budget = ours_t[f"{args.clock}_s"]
                recipe, theirs_t = run_torchcfm(task, flow, seed, budget, args.clock, os.path.join(tmp, "torchcfm"))
                source, target = model.source, recipe.target
                ours = {**evaluate(lambda x, t: model.net(x, t), source, target), **ours_t}
                theirs = {**evaluate(recipe.velocity(), source, target), **theirs_t}
                per_seed.append({"seed": seed, "ours": ours, "torchcfm": theirs})
                print(f"{task:20s} {flow:5s} seed {seed} ours W2 {ours['w2']:.3f} NFE {ours['nfe']:3d} "
                      f"({ours['steps']} steps, {ours['wall_s']:.0f} s wall, {ours['cpu_s']:.0f} s CPU) | TorchCFM "
                      f"W2 {theirs['w2']:.3f} NFE {theirs['nfe']:3d} ({theirs['steps']} steps, "
                      f"{theirs['wall_s']:.0f} s wall, {theirs['cpu_s']:.0f} s CPU) | floor {ours['floor']:.3f}",
                      flush=True)
                for name, result in (("ours", ours), ("TorchCFM", theirs)):
                    for draw, steps in enumerate(result["dopri5_steps"], 1):
                        print(f"    dopri5 (dt, error ratio, worst-1% share), {name}, draw {draw}: {steps}")
            summary = {side: {key: _mean_std([s[side][key] for s in per_seed])
                              for key in ("w2", "floor", "nfe", "steps", f"{args.clock}_s")}
                       for side in ("ours", "torchcfm")}
            rows.append({"task": task, "flow": flow, **summary, "seeds": per_seed})

    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"TorchCFM given the same {args.clock} time as our default run; torch threads={args.threads}. "
        "W2: 2000 generated vs 2000 fresh target samples; floor: W2 between two fresh target sets; "
        "NFE: dopri5, atol=rtol=1e-4; each the mean of 3 independent draws (same draws for every model), "
        f"then mean +- std over training seeds {seeds} (both sides).",
        "",
        "| task | flow | W2 ours | W2 TorchCFM | W2 floor | NFE ours | NFE TorchCFM | steps ours | steps TorchCFM "
        f"| {args.clock} s each | ours better on both |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in rows:
        o, t = r["ours"], r["torchcfm"]
        win = "yes" if o["w2"][0] < t["w2"][0] and o["nfe"][0] < t["nfe"][0] else "no"
        lines.append(f"| {r['task']} | {r['flow']} | {_fmt(o['w2'], 3)} | {_fmt(t['w2'], 3)} | {o['floor'][0]:.3f} | "
                     f"{_fmt(o['nfe'], 1)} | {_fmt(t['nfe'], 1)} | {o['steps'][0]:.0f} | {t['steps'][0]:.0f} | "
                     f"{o[f'{args.clock}_s'][0]:.0f} | {win} |")
    table = "\n".join(lines)
    print("\n" + table)
    with open(args.output + ".md", "w") as f:
        f.write(table + "\n")
    with open(args.output + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\nsaved {args.output}.md and .json")


if __name__ == "__main__":
    main()
