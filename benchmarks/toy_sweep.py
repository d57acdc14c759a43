"""Sweep default settings over the toy tasks: quality (W2, NFE) and CPU cost per configuration.

    python benchmarks/toy_sweep.py --config base= \
        --config w128=model.net.width=128,trainer.max_steps=8000 --flows otcfm --jobs 2

Each ``--config NAME=OVERRIDE,OVERRIDE,...`` is a set of Hydra overrides on top of the
defaults. Every (config, task, flow) is trained with the bare loop of ``_common.bare_train``
(the composed net, objective, optimizer, schedule and data stream; statistically the same
training as ``fm-train``, without Lightning's overhead), then evaluated with fixed seeds:
W2 of 2000 samples vs 2000 fresh target samples (in a points file's own units, whatever the
run's frame; ``points_x300`` and ``points_div100`` are the ``points`` task's file in other units), the floor (W2 between two fresh target
sets) and dopri5 NFE at atol=rtol=1e-4, each the mean of 3 draws. CPU seconds are this process's (one torch thread),
the right proxy for idle-core wall time on a shared machine. Results are appended to
``benchmarks/results/sweep.jsonl`` and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TASK_OVERRIDES = {
    "default": [],
    "n_to_8gaussians": ["experiment=n_to_8gaussians"],
    "moons_to_8gaussians": ["experiment=moons_to_8gaussians"],
    "n_to_moons": ["experiment=n_to_moons"],
    "n_to_scurve": ["experiment=n_to_scurve"],
    "points": ["data.target={file}"],
    # the same points in other units: 300 x + (1000, -500), and x / 100
    "points_x300": ["data.target={file}"],
    "points_div100": ["data.target={file}"],
}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _one(job: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from _common import bare_train, compose_train, evaluate

    out = tempfile.mkdtemp(prefix="fm_sweep_")
    cfg = compose_train(job["overrides"], out)
    t0 = time.perf_counter()
    net, dm, _, cpu_s = bare_train(cfg)
    steps = int(cfg.trainer.max_steps)
    metrics = evaluate(lambda x, t: net(x, t), dm.source, dm.target, seed=job["eval_seed"])
    return {**job, **metrics, "cpu_ms_per_step": 1e3 * cpu_s / steps, "steps": steps, "train_cpu_s": cpu_s,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="NAME=OVERRIDE,OVERRIDE,... (repeatable)")
    parser.add_argument("--tasks", nargs="+", default=["default", "n_to_8gaussians", "moons_to_8gaussians",
                                                        "n_to_moons", "n_to_scurve", "points"],
                        choices=list(TASK_OVERRIDES))
    parser.add_argument("--flows", nargs="+", default=["otcfm"], choices=["otcfm", "icfm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (one torch thread each)")
    parser.add_argument("--tag", default="", help="label stored with the results")
    args = parser.parse_args()

    from _common import make_points_file

    os.makedirs(RESULTS, exist_ok=True)
    points = {"points": os.path.join(RESULTS, "user_points.npy")}
    if not os.path.exists(points["points"]):
        make_points_file(points["points"])
    for name, (scale, shift) in {"points_x300": (300.0, [1000.0, -500.0]), "points_div100": (0.01, [0.0, 0.0])}.items():
        points[name] = os.path.join(RESULTS, f"user_{name}.npy")
        if not os.path.exists(points[name]):
            np.save(points[name], (scale * np.load(points["points"]) + np.float32(shift)).astype(np.float32))
    jobs = []
    for spec in args.config:
        name, _, ovr = spec.partition("=")
        extra = [o for o in ovr.split(",") if o]
        for task in args.tasks:
            for flow in args.flows:
                for seed in args.seeds:
                    task_ovr = [o.format(file=points.get(task)) for o in TASK_OVERRIDES[task]]
                    jobs.append({"config": name, "task": task, "flow": flow, "seed": seed, "eval_seed": 0,
                                 "overrides": [f"flow={flow}", *task_ovr, *extra, f"seed={seed}"], "tag": args.tag})
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool, \
            open(os.path.join(RESULTS, "sweep.jsonl"), "a") as log:
        for row in pool.map(_one, jobs):
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{row['config']:>14s} {row['task']:>20s} {row['flow']:5s} seed {row['seed']}: "
                  f"W2 {row['w2']:.3f} (floor {row['floor']:.3f}) NFE {row['nfe']:3d} "
                  f"{row['cpu_ms_per_step']:.1f} ms/step x {row['steps']} = {row['train_cpu_s']:.0f} s CPU", flush=True)
    print("\n| config | task | flow | seed | W2 | floor | NFE | CPU ms/step | steps | train CPU s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['task']} | {r['flow']} | {r['seed']} | {r['w2']:.3f} | {r['floor']:.3f} | "
              f"{r['nfe']} | {r['cpu_ms_per_step']:.1f} | {r['steps']} | {r['train_cpu_s']:.0f} |")


if __name__ == "__main__":
    main()
