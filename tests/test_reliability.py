"""Non-finite guard and safe loading."""

from __future__ import annotations

import os
import pickle

import torch

from conftest import run_cli
from fm_lightning.module import load_checkpoint

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
POISON = ["debug=fast", "callbacks.model_checkpoint.every_n_train_steps=10", "+callbacks.poison._target_=poison.NaNBatchAtStep",
          "+callbacks.poison.step=25"]


def test_injected_nan_stops_the_run_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = run_cli("fm-train", *POISON, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step 25" in proc.stderr and "learning rate" in proc.stderr
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_bounded_number_of_bad_steps_can_be_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = run_cli("fm-train", *POISON, "callbacks.non_finite_guard.max_skipped_steps=1", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping it (1 of 1 allowed)" in proc.stderr + proc.stdout
    model = load_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": Evil()}}, evil)
    proc = run_cli("fm-sample", str(evil), "--out", str(tmp_path / "s.npz"), cwd=tmp_path)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr
    assert not marker.exists()
    with open(tmp_path / "legacy.ckpt", "wb") as f:
        pickle.dump(Evil(), f)
    proc = run_cli("fm-train", "debug=fast", f"ckpt_path={tmp_path / 'legacy.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}",
                   cwd=tmp_path)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr
    assert not marker.exists()
