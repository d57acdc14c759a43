"""W&B: offline runs write their files under the run directory; no global state leaks."""

from __future__ import annotations

import os
import time

import pytest

from fm_lightning.loggers import WandbLogger
from fm_lightning.train import run


def _wandb_run_dir(output_dir):
    runs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_offline_run_writes_config_metrics_and_images_and_leaks_nothing(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run(tiny_cfg("logger=wandb", "logger.wandb.offline=true", "logger.wandb.tags=[unit]"))
    assert "WANDB_MODE" not in os.environ
    wb = _wandb_run_dir(tmp_path / "run")
    record_file = next(wb.glob("run-*.wandb"))
    for _ in range(60):  # W&B's service process writes the record asynchronously; give it time
        record = record_file.read_bytes()
        if b"val/w2" in record:
            break
        time.sleep(0.5)
    assert b"ExactOTCoupling" in record and b"8gaussians" in record  # the resolved config
    assert b"val/w2" in record and b"train/loss" in record  # slash-grouped scalar metrics
    images = list((wb / "files/media/images").rglob("*.png"))
    assert any("samples" in p.name for p in images) and any("trajectories" in p.name for p in images)


def test_online_without_credentials_falls_back_to_offline_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    logger = WandbLogger(project="p", save_dir=str(tmp_path))
    assert logger.offline_mode and "no credentials" in caplog.text
    assert "WANDB_MODE" not in os.environ


def test_log_model_offline_is_refused(tmp_path):
    with pytest.raises(ValueError, match="log_model needs an online"):
        WandbLogger(project="p", save_dir=str(tmp_path), offline=True, log_model=True)
