"""Users' points files through fm-train as a user launches it (unit tests: tests/datamodules/test_toy.py)."""

import numpy as np
import torch

from conftest import run_cli


def test_a_relative_points_path_is_taken_from_the_launch_directory_with_hydra_job_chdir(tmp_path):
    """With hydra.job.chdir=true fm-train runs inside its run directory; data.target=pts.npy still
    names the file beside the command, and the checkpoint records its absolute path."""
    pts = np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32)
    np.save(tmp_path / "pts.npy", pts)
    proc = run_cli("fm-train", "debug=fast", "logger=none", "callbacks.samples=null", "trainer.max_steps=10",
                   "data.target=pts.npy", "hydra.job.chdir=true", f"hydra.run.dir={tmp_path / 'out/run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "out/run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["target"]["init_args"]["file"] == str(tmp_path / "pts.npy")
