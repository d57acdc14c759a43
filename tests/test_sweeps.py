"""Hydra multirun: separate run directories per job; the Optuna search config runs."""

from __future__ import annotations

from omegaconf import OmegaConf

from conftest import run_cli


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
        groups.add(b"train_" in record)
    assert groups == {True}
    seeds = {OmegaConf.load(j / ".hydra/config.yaml").seed for j in jobs}
    assert seeds == {0, 1}


def test_optuna_search_minimises_val_w2(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("fm-train", "hparams_search=toy_optuna", "debug=fast", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.sampler.n_startup_trials=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in result and "best_value" in result
    assert len([p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]) == 2
