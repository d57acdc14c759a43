"""Exact resume: a run SIGKILLed at a random step and resumed equals an uninterrupted run, bitwise."""

from __future__ import annotations

import csv
import os
import random

import pytest
import torch

from conftest import run_cli

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
# 60 steps over epochs of 25 batches, a checkpoint every 10 steps, losses logged every step.
TOY = ["debug=fast", "trainer.max_steps=60", "data.steps_per_epoch=25", "callbacks.model_checkpoint.every_n_train_steps=10",
       "trainer.log_every_n_steps=1", "trainer.val_check_interval=25", "flow=sbcfm", "experiment=n_to_moons"]


def _losses(run_dir) -> dict[int, str]:
    """train/loss by step; a step logged twice (before the kill and after resume) keeps its last row."""
    rows = csv.DictReader(open(run_dir / "csv/metrics.csv"))
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


def _final_state(run_dir) -> dict:
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 60
    return ckpt


def _assert_same_run(a, b) -> None:
    ca, cb = _final_state(a), _final_state(b)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), key
    for key, value in ca.get("current_model_state", {}).items():  # raw weights when EMA holds state_dict
        assert torch.equal(value, cb["current_model_state"][key]), key
    assert _losses(a) == _losses(b) and len(_losses(a)) == 60


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = run_cli("fm-train", *TOY, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(uninterrupted, tmp_path, monkeypatch, seed):
    kill_step = random.Random(seed).randint(11, 59)  # after the first checkpoint (step 10)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = run_cli("fm-train", *TOY, f"hydra.run.dir={run_dir}", "+callbacks.kill._target_=kill.KillAtStep",
                   f"+callbacks.kill.step={kill_step}", cwd=tmp_path)
    assert proc.returncode == -9, (kill_step, proc.stderr[-2000:])
    killed_at = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert killed_at == kill_step // 10 * 10
    proc = run_cli("fm-train", *TOY, f"hydra.run.dir={run_dir}", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(uninterrupted, run_dir)
