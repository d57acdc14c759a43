"""Hydra multirun: separate run directories per job; the Optuna search config runs."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from fm_lightning.callbacks import FIDCallback
from fm_lightning.train import SweepError, _CheckOptimizedMetric


def test_multirun_gives_each_job_its_own_directory_and_grouped_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("fm-train", "-m", "flow=icfm,otcfm", "seed=0,1", "debug=fast", "logger=wandb",
                   "logger.wandb.offline=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    groups = set()
    for job in jobs:
        assert (job / "checkpoints/last.ckpt").is_file() and (job / "metrics.json").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        record = next(runs[0].glob("run-*.wandb")).read_bytes()
        groups.add(b"train_sweep" in record)
    assert groups == {True}  # one W&B group for the whole sweep: <task_name>_<sweep folder name>
    seeds = {OmegaConf.load(j / ".hydra/config.yaml").seed for j in jobs}
    assert seeds == {0, 1}


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("fm-train", "-m", "model.optimizer.lr=1e30,1e-3", "debug=fast", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode != 0 and "fm-train: error: non-finite loss" in proc.stderr
    assert "Traceback" not in proc.stderr and "model.optimizer.lr=1e+30" in proc.stderr  # the failed job, named
    assert not (sweep / "0/metrics.json").exists() and (sweep / "1/metrics.json").is_file()


def test_optuna_search_minimises_val_w2_and_goes_on_past_a_failed_trial(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("fm-train", "hparams_search=toy_optuna", "debug=fast", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=3", "model.optimizer.lr=choice(1e30,1e-3)",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.best_params["model.optimizer.lr"] == 1e-3 and result.best_value > 0
    jobs = [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == 3
    assert 0 < sum((j / "metrics.json").is_file() for j in jobs) < 3  # the 1e30 trials failed, the others ran


def test_an_optimized_metric_the_run_does_not_log_ends_the_search_at_the_first_validation(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("fm-train", "hparams_search=toy_optuna", "debug=fast", "hydra.sweeper.n_trials=2",
                   "optimized_metric=val/W2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fm-train: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("fm-train: error: optimized_metric=val/W2 is not a metric this run logs")
    assert "val/loss, val/nfe" in errors[0] and "val/w2" in errors[0]  # what it does log
    assert [p.name for p in sweep.iterdir() if p.is_dir()] == ["0"]  # the first trial, stopped at
    with open(sweep / "0/csv/metrics.csv") as f:  # its first validation (after step 20 of 40)
        assert max(int(r["step"]) for r in csv.DictReader(f)) == 19


def test_the_metric_check_counts_a_metric_that_a_callback_logs_at_fit_end():
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/loss": 1.0},
                              callbacks=[FIDCallback(key="val/fid")])
    _CheckOptimizedMetric("val/fid").on_validation_end(trainer, None)  # FID comes at fit end
    with pytest.raises(SweepError, match="optimized_metric=val/FID .*: val/fid, val/fid_nfe, val/loss$"):
        _CheckOptimizedMetric("val/FID").on_validation_end(trainer, None)



@pytest.mark.parametrize("override", ["ckpt_path=last", "ckpt_path=earlier.ckpt,last"])
def test_ckpt_path_last_in_a_sweep_is_refused_before_any_job(tmp_path, capsys, override):
    """Every job would resume (and train on) the same newest run in place."""
    from hydra import compose, initialize_config_dir
    from omegaconf import read_write

    from fm_lightning.train import CONFIG_DIR, KeepFinishedRuns

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    with read_write(cfg):  # what Hydra's multirun start holds: the config of the base values, the sweep overrides
        cfg.ckpt_path = None if "," in override else "last"
        cfg.hydra.overrides.task = [override]
    with pytest.raises(SystemExit, match="2"):
        KeepFinishedRuns().on_multirun_start(cfg)
    assert capsys.readouterr().err.startswith("fm-train: error: ckpt_path=last resumes one run in its own directory")


def test_a_sweep_of_jobs_that_lightning_starts_processes_for_is_refused(tmp_path, monkeypatch):
    """Lightning starts DDP's extra processes by running the command line again: with -m, each
    would run the whole sweep again, into a sweep directory of its own."""
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from conftest import compose_config
    from fm_lightning.train import _check_launch

    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN}}))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(SweepError, match="cannot run jobs with 2 training processes per node.* without -m"):
        _check_launch(compose_config(["debug=fast"], tmp_path), trainer)
    _check_launch(compose_config(["debug=fast"], tmp_path), L.Trainer(accelerator="cpu", devices=1, logger=False))
