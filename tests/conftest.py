"""Shared fixtures: compose the real Hydra configs at tiny sizes, run fm-train in-process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from fm_lightning.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]

# Tests train tiny nets, for which one thread per process is fastest; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per CPU this process may run on (psutil, when installed, would
    count the whole host's cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compose_config(overrides: list[str], output_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides``; ``paths.output_dir`` points at ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: the default experiment at smoke-test size, writing into ``tmp_path/run``."""

    def make(*overrides: str, output_dir: str | os.PathLike | None = None) -> DictConfig:
        return compose_config(["debug=fast", *overrides], output_dir or tmp_path / "run")

    return make


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a console script (``fm-train``, ``fm-sample``...) as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


#: Image experiments at smoke-test size.
IMAGE_TINY = ["trainer.max_steps=20", "trainer.val_check_interval=10", "model.lr_scheduler.warmup_steps=5",
              "callbacks.samples.num_samples=20", "callbacks.samples.steps=5", "callbacks.samples.num_trajectories=3",
              "logger=csv"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """``fm-train experiment=digits`` as a user runs it (from the run's parent folder), shrunk to
    20 steps: class-conditional 1x8x8, val_fraction=0.1."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    proc = run_cli("fm-train", "experiment=digits", *IMAGE_TINY, "model.net.model_channels=16",
                   f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch, tmp_path):
    """W&B never touches the network in tests and writes only under the test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
