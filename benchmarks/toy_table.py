"""Aggregate the 2-D benchmark multirun into a Markdown table (mean and std over seeds).

    fm-train -m experiment=toy_table seed=0,1,2,3,4
    python benchmarks/toy_table.py logs/toy_table/multiruns/<date>   # one or more sweep/run dirs

Every job directory below the given folders that holds ``metrics.json`` and
``.hydra/config.yaml`` is one run; its cell (task and flow) is read from the config's
``table.cell`` (``experiment=toy_table``), or, for other runs, from ``data.source``/``data.target``
and the flow's path and coupling. For each cell the table gives the mean and the sample
standard deviation (ddof=1) over seeds of:

- **W2**: ``val/w2``, exact OT between 2000 generated and 2000 fresh target samples;
- **NPE**: ``val/npe``, Tong et al.'s normalized path energy ``|PE - W2^2| / W2^2``;
- **NFE**: ``val/nfe``, function evaluations of the run's evaluation solver (dopri5 at
  atol=rtol=1e-4 by default).

The table is printed and, with ``--out``, written to a Markdown file (a ``.json`` with the
per-run values is written beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import yaml

TASK_NAMES = {
    "n_to_8gaussians": "N → 8gaussians",
    "moons_to_8gaussians": "moons → 8gaussians",
    "n_to_moons": "N → moons",
    "n_to_scurve": "N → scurve",
}
FLOW_NAMES = {"icfm": "I-CFM", "otcfm": "OT-CFM", "sbcfm": "SB-CFM", "fm": "FM (Lipman)"}
METRICS = {"W2": "val/w2", "NPE": "val/npe", "NFE": "val/nfe"}
_TASK_OF = {("gaussian", "8gaussians"): "n_to_8gaussians", ("moons", "8gaussians"): "moons_to_8gaussians",
            ("gaussian", "moons"): "n_to_moons", ("gaussian", "scurve"): "n_to_scurve"}
_FLOW_OF = {("ICFMPath", "IndependentCoupling"): "icfm", ("ICFMPath", "ExactOTCoupling"): "otcfm",
            ("SchrodingerBridgePath", "SinkhornOTCoupling"): "sbcfm", ("LipmanOTPath", "IndependentCoupling"): "fm"}


def _cell(cfg: dict) -> tuple[str, str]:
    """(task, flow) of one run's composed config."""
    table = cfg.get("table") or {}
    if "cell" in table:
        cell = table["cells"][table["cell"]]
        return cell["task"], cell["flow"]
    data = cfg["data"]
    task = _TASK_OF.get((str(data["source"]), str(data["target"])), f"{data['source']} → {data['target']}")
    flow = cfg["model"]["flow"]
    kind = (flow["path"]["_target_"].rsplit(".", 1)[-1], flow["coupling"]["_target_"].rsplit(".", 1)[-1])
    return task, _FLOW_OF.get(kind, "/".join(kind))


def collect(folders: list[str]) -> list[dict]:
    """One record per finished run below ``folders``: task, flow, seed, metrics and directory."""
    records = []
    for folder in folders:
        for metrics_file in sorted(Path(folder).rglob("metrics.json")):
            run_dir = metrics_file.parent
            config_file = run_dir / ".hydra" / "config.yaml"
            if not config_file.is_file():
                continue
            cfg = yaml.safe_load(config_file.read_text())
            task, flow = _cell(cfg)
            metrics = json.loads(metrics_file.read_text())
            records.append({"task": task, "flow": flow, "seed": cfg.get("seed"), "dir": str(run_dir),
                            "steps": metrics.get("global_step"),
                            **{name: metrics.get(key) for name, key in METRICS.items()}})
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def _fmt(values: list, digits: int) -> str:
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if not values:
        return "n/a"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def table(records: list[dict]) -> str:
    """The Markdown table: one row per (task, flow), mean ± std over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["flow"])].append(r)
    task_order, flow_order = list(TASK_NAMES), list(FLOW_NAMES)
    key = lambda k: (task_order.index(k[0]) if k[0] in task_order else 99, k[0],  # noqa: E731
                     flow_order.index(k[1]) if k[1] in flow_order else 99, k[1])
    lines = ["| task | method | W2 ↓ | NPE ↓ | NFE ↓ | seeds | steps |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for task, flow in sorted(groups, key=key):
        runs = groups[(task, flow)]
        steps = sorted({r["steps"] for r in runs})
        lines.append(
            f"| {TASK_NAMES.get(task, task)} | {FLOW_NAMES.get(flow, flow)} | {_fmt([r['W2'] for r in runs], 3)} "
            f"| {_fmt([r['NPE'] for r in runs], 3)} | {_fmt([r['NFE'] for r in runs], 1)} "
            f"| {len(runs)} | {','.join(str(s) for s in steps)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="multirun (or run) directories to aggregate")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    records = collect(args.folders)
    if not records:
        parser.error(f"no finished runs (metrics.json + .hydra/config.yaml) under {args.folders}")
    text = table(records)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(os.path.splitext(args.out)[0] + ".json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
