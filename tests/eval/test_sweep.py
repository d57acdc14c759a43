"""The quality-vs-NFE sweep: its grid, its files, its W&B table and the end-of-training option."""

from __future__ import annotations

import csv

import torch

from eval_helpers import MEAN, SCALE, AffineGaussian, affine_model
from fm_lightning.evaluate import evaluate_points, log_sweep_table, nfe_sweep, sweep_grid, write_sweep
from fm_lightning.metrics import wasserstein2
from fm_lightning.train import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_grid_matches_nfe_across_solvers():
    grid = sweep_grid()
    nfe = {s.label: (s.steps or 0) * {"euler": 1, "midpoint": 2, "rk4": 4}.get(s.solver, 0) for s in grid}
    assert [s.steps for s in grid if s.solver == "euler"] == [1, 2, 4, 8, 16, 32, 64, 100]
    euler_nfe = {v for k, v in nfe.items() if k.startswith("euler")}
    for solver in ("midpoint", "rk4"):
        reached = {v for k, v in nfe.items() if k.startswith(solver)}
        assert reached <= euler_nfe  # every midpoint / rk4 budget is one of Euler's
    assert {v for k, v in nfe.items() if k.startswith("midpoint")} == {2, 4, 8, 16, 32, 64, 100}
    assert {v for k, v in nfe.items() if k.startswith("rk4")} == {4, 8, 16, 32, 64, 100}
    assert [s.tol for s in grid if s.solver == "dopri5"] == [1e-3, 1e-4, 1e-5]


def test_sweep_writes_csv_and_plot_and_reports_the_real_nfe(tmp_path):
    """On the analytic affine flow: the measured NFE of each fixed-step setting is steps x stages,
    and since the flow is straight, every setting reaches the exact map (W2 to it ~ 0)."""
    model = affine_model()
    x0 = model.source.sample(200, torch.Generator().manual_seed(0))
    exact = x0 * torch.tensor(SCALE) + torch.tensor(MEAN)

    def sample(setting):
        sol = model.sample(x0=x0, **setting.kwargs())
        return sol.x, sol.nfe

    rows = nfe_sweep(sample, lambda x: {"w2": wasserstein2(x, exact)})
    assert len(rows) == len(sweep_grid()) == 24
    for row in rows:
        if row["solver"] != "dopri5":
            assert row["nfe"] == row["steps"] * {"euler": 1, "midpoint": 2, "rk4": 4}[row["solver"]]
    # The flow is the straight OT map: every setting, one Euler step included, lands on it.
    assert max(r["w2"] for r in rows) < 1e-3

    csv_path, png_path = write_sweep(rows, tmp_path / "out", "w2")
    with open(csv_path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == 24 and set(read[0]) == {"solver", "steps", "tol", "nfe", "w2"}
    assert open(png_path, "rb").read(8) == PNG_MAGIC


def test_sweep_table_goes_to_loggers_that_take_tables():
    class TableLogger:
        def __init__(self):
            self.calls = []

        def log_table(self, key, columns, data):
            self.calls.append((key, columns, data))

    logger = TableLogger()
    rows = [{"solver": "euler", "steps": 1, "tol": None, "nfe": 1.0, "w2": 0.5}]
    log_sweep_table([logger, object()], rows, key="eval/nfe_sweep")
    assert logger.calls == [("eval/nfe_sweep", ["solver", "steps", "tol", "nfe", "w2"], [["euler", 1, None, 1.0, 0.5]])]


def test_evaluate_points_sweep_rows_carry_w2_and_mmd():
    out = evaluate_points(affine_model(), AffineGaussian(MEAN, SCALE), metrics=["w2"], num_samples=100, sweep=True)
    assert len(out["sweep"]) == 24 and {"w2", "mmd2", "nfe"} <= set(out["sweep"][0])


def test_end_of_training_sweep_option_writes_its_files(tiny_cfg, tmp_path):
    run(tiny_cfg("callbacks.samples.nfe_sweep=true", "trainer.max_steps=20", "callbacks.samples.num_samples=64",
                 "logger=none"))
    run_dir = tmp_path / "run"
    with open(run_dir / "nfe_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(float(r["w2"]) > 0 for r in rows)
    assert (run_dir / "nfe_sweep.png").read_bytes()[:8] == PNG_MAGIC
