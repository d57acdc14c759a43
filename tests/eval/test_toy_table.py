"""The benchmark table: the experiment config sweeps the 15 valid cells; the script aggregates runs."""

from __future__ import annotations

import json
import sys

import yaml
from hydra.utils import instantiate

from conftest import REPO, compose_config, run_cli


def test_toy_table_sweeps_every_valid_task_and_flow(tmp_path):
    cfg = yaml.safe_load((REPO / "configs/experiment/toy_table.yaml").read_text())
    cells = cfg["hydra"]["sweeper"]["params"]["table.cell"].split(",")
    assert sorted(cells) == sorted(cfg["table"]["cells"]) and len(cells) == 15
    # Lipman's path only where the source is Gaussian.
    assert all(cfg["table"]["tasks"][cfg["table"]["cells"][c]["task"]]["source"] == "gaussian"
               for c in cells if c.endswith("__fm"))
    # Each task is its preset: the same data and net as `experiment=<task>`.
    for task, spec in cfg["table"]["tasks"].items():
        preset = compose_config([f"experiment={task}"], tmp_path / task)
        assert spec == {"source": preset.data.source, "target": preset.data.target,
                        "activation": preset.model.net.activation}, task
        cell = compose_config(["experiment=toy_table", f"table.cell={task}__otcfm"], tmp_path / f"{task}_cell")
        assert (cell.data.source, cell.model.net.activation) == (spec["source"], spec["activation"]), task
    composed = compose_config(["experiment=toy_table", "table.cell=moons_to_8gaussians__sbcfm"], tmp_path)
    model, data = instantiate(composed.model), instantiate(composed.data)
    assert type(model.flow.path).__name__ == "SchrodingerBridgePath" and type(data.source).__name__ == "Moons"


def test_aggregation_gives_mean_and_std_over_seeds(tmp_path):
    for seed, w2 in enumerate([0.5, 0.7]):
        run = tmp_path / "sweep" / str(seed)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra/config.yaml").write_text(yaml.safe_dump({
            "seed": seed, "table": {"cell": "n_to_moons__otcfm",
                                    "cells": {"n_to_moons__otcfm": {"task": "n_to_moons", "flow": "otcfm"}}}}))
        (run / "metrics.json").write_text(json.dumps({"val/w2": w2, "val/npe": 0.1, "val/nfe": 20.0, "global_step": 9}))
    out = tmp_path / "table.md"
    proc = run_cli(sys.executable, str(REPO / "benchmarks/toy_table.py"), str(tmp_path / "sweep"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| N → moons | OT-CFM | 0.600 ± 0.141 | 0.100 ± 0.000 | 20.0 ± 0.0 | 2 | 9 |" in out.read_text()
    assert len(json.loads((tmp_path / "table.json").read_text())) == 2
