"""Users' points files through fm-train as a user launches it (unit tests: tests/datamodules/test_toy.py)."""

import re

import numpy as np
import pytest
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


def _std_run(tmp_path, name, points, *overrides):
    from conftest import compose_config
    from fm_lightning.train import run

    np.save(tmp_path / f"{name}.npy", points.astype(np.float32))
    cfg = compose_config(["debug=fast", "logger=none", "data.source=gaussian", f"data.target={tmp_path / name}.npy",
                          "trainer.max_steps=20", *overrides], tmp_path / name)
    return run(cfg), tmp_path / name / "checkpoints/last.ckpt"


def test_a_points_run_is_the_same_in_any_units_and_fm_sample_writes_the_files_units(tmp_path):
    """Points files are trained in their standard frame: the same points in other units
    (1000 x + 5) give the same run (the same val/loss in the frame; val/w2, in the file's units,
    1000 times larger), and fm-sample writes samples in the file's units; without the frame
    (data.standardize=false) the run is another, far from its target."""
    from fm_lightning import sample

    pts = np.random.default_rng(0).normal(size=(500, 2)) @ np.array([[1.0, 0.5], [0.0, 0.3]]) + [1.0, -2.0]
    unit, _ = _std_run(tmp_path, "unit", pts)
    big, last = _std_run(tmp_path, "big", 1000 * pts + 5)
    assert big["val/loss"] == pytest.approx(unit["val/loss"], rel=1e-3)
    assert big["val/w2"] == pytest.approx(1000 * unit["val/w2"], rel=1e-3)
    raw, _ = _std_run(tmp_path, "raw", 1000 * pts + 5, "data.standardize=false")
    assert raw["val/w2"] > 2 * big["val/w2"]
    assert sample.main([str(last), "--num-samples", "2000", "--out", str(tmp_path / "s.npz")]) == 0
    drawn, data = np.load(tmp_path / "s.npz")["samples"], 1000 * pts + 5
    assert np.all(np.abs(drawn.mean(0) - data.mean(0)) < 0.3 * data.std(0))
    assert np.all((drawn.std(0) > 0.5 * data.std(0)) & (drawn.std(0) < 2 * data.std(0)))


def test_the_standard_frame_is_part_of_the_run(tmp_path, capsys):
    """A resume in another frame (data.standardize flipped, or a run from before frames under the
    default) is refused naming data.standardize; fm-sample --source-file and fm-eval --target
    draw a new file in the frame the run recorded."""
    from fm_lightning import evaluate, sample
    from fm_lightning.train import UserError, run
    from conftest import compose_config

    rng = np.random.default_rng(1)
    src, tgt = tmp_path / "src.npy", tmp_path / "tgt.npy"
    np.save(src, (rng.normal(size=(300, 2)) * 4 + 50).astype(np.float32))
    np.save(tgt, (rng.normal(size=(300, 2)) * 20 - 10).astype(np.float32))
    common = ["debug=fast", "logger=none", "callbacks.samples=null", f"data.source={src}", f"data.target={tgt}"]
    run_dir, last = tmp_path / "run", tmp_path / "run/checkpoints/last.ckpt"
    run(compose_config([*common, "trainer.max_steps=10"], run_dir))

    def resume(steps, *extra):
        return run(compose_config([*common, f"trainer.max_steps={steps}", f"ckpt_path={last}", *extra], run_dir))

    with pytest.raises(UserError, match=r"another standard frame of the points: the run was trained with "
                                        r"data.standardize=true"):
        resume(20, "data.standardize=false")
    recorded = torch.load(last, weights_only=True)
    frame = recorded["datamodule_hyper_parameters"]["target"]["init_args"]
    assert recorded["hyper_parameters"]["source"]["init_args"]["loc"] == frame["loc"]  # the target's frame
    other = tmp_path / "other.npy"
    np.save(other, (rng.normal(size=(100, 2)) * 3).astype(np.float32))
    model = sample.load_model(last, str(other))
    assert (model.source.loc, model.source.scale) == (frame["loc"], frame["scale"])
    target = evaluate._target_of(last, model, str(other), None)
    assert (target.loc, target.scale) == (frame["loc"], frame["scale"])
    config = tmp_path / "data.yaml"  # another source (so another frame) and no standardize key
    config.write_text(f"data:\n  source: gaussian\n  target: {tgt}\n")
    target = evaluate._target_of(last, model, None, str(config))
    assert (target.loc, target.scale) == (frame["loc"], frame["scale"])
    for spec in (recorded["hyper_parameters"]["source"], recorded["datamodule_hyper_parameters"]["target"]):
        del spec["init_args"]["loc"], spec["init_args"]["scale"]  # a checkpoint from before frames
    torch.save(recorded, last)
    with pytest.raises(UserError, match=r"data.standardize=false"):
        resume(20)
    assert resume(20, "data.standardize=false")["global_step"] == 20


def test_a_refused_resume_suggests_the_runs_own_standardize_override(tmp_path):
    """A run trained with data.standardize=false, resumed with another source, is refused for
    the source; the overrides it suggests passing again keep data.standardize=false."""
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32) * 50 + 7)
    common = ["debug=fast", "logger=none", "callbacks.samples=null", f"data.target={tmp_path / 'pts.npy'}",
              "data.standardize=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("fm-train", *common, "data.source=gaussian", "trainer.max_steps=10", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("fm-train", *common, "data.source=8gaussians", "trainer.max_steps=20",
                   f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "model.source._target_" in proc.stderr and "standard frame" not in proc.stderr
    assert re.search(r"pass its overrides again \([^)]*data.standardize=false", proc.stderr), proc.stderr[-2000:]
