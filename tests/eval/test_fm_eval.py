"""fm-eval end to end on tiny checkpoints, and the image metrics on an analytic model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import compose_config, run_cli
from datamodules.toy import EightGaussians, Moons
from eval_helpers import AffineGaussian, TinyExtractor, affine_model
from fm_lightning import evaluate
from fm_lightning.flow.likelihood import dequantize
from fm_lightning.module import load_checkpoint
from fm_lightning.train import run

POINT_KEYS = {"eval/w2", "eval/mmd2", "eval/nfe", "eval/nll", "eval/nll_nfe", "eval/path_energy", "eval/npe"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny N(0, I) -> moons checkpoint in its fm-train run directory."""
    root = tmp_path_factory.mktemp("fm_eval")
    run(compose_config(["debug=fast", "logger=none", "experiment=n_to_moons", "trainer.max_steps=20"], root / "run"))
    return root / "run" / "checkpoints" / "last.ckpt"


def test_fm_eval_cli_writes_json_and_markdown(ckpt, tmp_path):
    proc = run_cli("fm-eval", str(ckpt), "--num-samples", "200", "--num-likelihood", "100", "--likelihood-tol", "1e-3",
                   "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert POINT_KEYS <= set(report["metrics"]) and not report["skipped"]
    assert all(math.isfinite(v) for v in report["metrics"].values())
    assert report["target"].startswith("Moons(")  # recorded in the checkpoint
    assert report["kind"] == "points" and report["weights"] == "raw"  # a toy run trains no EMA
    md = (tmp_path / "e" / "eval.md").read_text()
    for label in ("W2", "RBF-MMD²", "NLL (nats/dim)", "NPE"):
        assert f"| {label} |" in md
    assert "NLL (nats/dim)" in proc.stdout


def test_default_output_is_beside_the_run_and_target_can_be_overridden(ckpt, capsys):
    assert evaluate.main([str(ckpt), "--metrics", "w2", "--num-samples", "100", "--target", "8gaussians"]) == 0
    report = json.loads((ckpt.parents[1] / "eval" / "eval.json").read_text())
    assert report["target"].startswith("EightGaussians(") and set(report["metrics"]) >= {"eval/w2", "eval/npe"}
    assert "eval/nll" not in report["metrics"]


def test_a_given_data_config_overrides_the_recorded_target(ckpt, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  target: scurve\n")
    out = ["--metrics", "w2", "--num-samples", "50", "--out"]
    assert evaluate.main([str(ckpt), "--data-config", str(config), *out, str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["target"].startswith("SCurve(")
    config.write_text("data:\n  dim: 2\n")
    assert evaluate.main([str(ckpt), "--data-config", str(config), *out, str(tmp_path / "b")]) == 2
    assert "has no data.target; pass --target" in capsys.readouterr().err
    # an fm-cli run's config.yaml holds the path as typed, relative to where fm-cli was started
    config.write_text("data:\n  class_path: datamodules.toy.ToyDataModule\n  init_args:\n    target: ../t.npy\n")
    assert evaluate.main([str(ckpt), "--data-config", str(config), *out, str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"data.target of --data-config '{config}': points file" in err and "does not exist" in err


def test_target_comes_from_the_run_config_when_the_checkpoint_lacks_it(ckpt, tmp_path):
    """Checkpoints written before the target was recorded: the run's .hydra/config.yaml says it."""
    raw = torch.load(ckpt, weights_only=True)
    del raw["datamodule_hyper_parameters"]
    run_dir = tmp_path / "old"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 3\ndata:\n  target: moons\n  dim: 2\n  seed: ${seed}\n")
    torch.save(raw, run_dir / "checkpoints" / "last.ckpt")
    report = evaluate.evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", metrics=["w2"], num_samples=50)
    assert report["target"].startswith("Moons(")
    (run_dir / ".hydra" / "config.yaml").unlink()
    with pytest.raises(ValueError, match="already holds an evaluation"):  # the first one's eval/ is kept
        evaluate.evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", metrics=["w2"], num_samples=50)
    with pytest.raises(ValueError, match="pass --target"):
        evaluate.evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", metrics=["w2"], num_samples=50,
                                     overwrite=True)
    # fm-cli's version folder: config.yaml in the Lightning CLI's class_path form.
    (run_dir / "config.yaml").write_text("data:\n  class_path: datamodules.toy.ToyDataModule\n"
                                         "  init_args:\n    target: scurve\n    dim: 2\n")
    report = evaluate.evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", metrics=["w2"], num_samples=50,
                                          overwrite=True)
    assert report["target"].startswith("SCurve(")


def test_a_relative_points_file_target_is_read_from_the_directory_fm_train_was_launched_from(ckpt, tmp_path,
                                                                                           monkeypatch):
    raw = torch.load(ckpt, weights_only=True)
    del raw["datamodule_hyper_parameters"]
    run_dir, launch = tmp_path / "run", tmp_path / "launch"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    launch.mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("data:\n  target: pts.npy\n")
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {launch}\n")
    np.save(launch / "pts.npy", Moons().sample(100).numpy())
    torch.save(raw, run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.chdir(tmp_path)  # holds no pts.npy
    report = evaluate.evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", metrics=["w2"], num_samples=50)
    assert report["target"].startswith("Points(") and str(launch / "pts.npy") in report["target"]


def test_a_moved_points_source_is_named_and_replaced_with_source_file(ckpt, tmp_path, capsys):
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["source"] = {"class_path": "datamodules.toy.Points",
                                         "init_args": {"file": str(tmp_path / "moved_since_training.npy")}}
    torch.save(raw, tmp_path / "moved.ckpt")
    np.save(tmp_path / "x0.npy", np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    args = [str(tmp_path / "moved.ckpt"), "--metrics", "w2", "--num-samples", "50", "--out", str(tmp_path / "e")]
    assert evaluate.main(args) == 2
    assert "does not exist (moved since training?); pass --source-file" in capsys.readouterr().err
    assert evaluate.main([*args, "--source-file", str(tmp_path / "x0.npy")]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["source"].startswith("Points(") and str(tmp_path / "x0.npy") in report["source"]


def test_a_likelihood_tolerance_out_of_range_is_refused_by_its_flag_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated"))
    assert evaluate.main(["any.ckpt", "--likelihood-tol", "0"]) == 2
    assert "--likelihood-tol 0 (atol = rtol of the likelihood ODE): adaptive solver 'dopri5' needs atol > 0" in \
        capsys.readouterr().err


def test_nll_is_skipped_with_the_reason_when_the_source_density_is_unknown(ckpt):
    model = load_checkpoint(ckpt)
    model.source = EightGaussians()
    out = evaluate.evaluate_points(model, Moons(), num_samples=50)
    assert "eval/nll" not in out["metrics"] and "known density" in out["skipped"]["nll"]
    with pytest.raises(ValueError, match="known density"):
        evaluate.evaluate_points(model, Moons(), metrics=["nll"], num_samples=50)


def test_fm_eval_sweep_flag_writes_the_sweep(ckpt, tmp_path):
    assert evaluate.main([str(ckpt), "--metrics", "w2", "--num-samples", "64", "--sweep", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "nfe_sweep.csv").read_text().count("\n") == 25 and (tmp_path / "nfe_sweep.png").is_file()
    assert "## Quality vs NFE" in (tmp_path / "eval.md").read_text()
    # Without --overwrite the evaluation is kept; with it, no stale sweep is left beside a new one.
    assert evaluate.main([str(ckpt), "--metrics", "w2", "--num-samples", "64", "--out", str(tmp_path)]) == 2
    assert evaluate.main([str(ckpt), "--metrics", "w2", "--num-samples", "64", "--out", str(tmp_path),
                          "--overwrite"]) == 0
    assert not (tmp_path / "nfe_sweep.csv").exists() and "## Quality vs NFE" not in (tmp_path / "eval.md").read_text()


def test_image_metrics_fid_and_bits_per_dim_of_an_analytic_model():
    """Per-pixel affine flow N(0, 1) -> N(0.2, 0.5^2) on 8x8 digits: FID (injected extractor) and
    bits/dim of held-out images, which must equal the closed form on the same dequantised
    validation images (Hutchinson is exact for this diagonal Jacobian)."""
    from datamodules.images import ImageDataModule

    dm = ImageDataModule("digits", batch_size=16, val_fraction=0.1)
    dm.setup("fit")
    model = affine_model([0.2], [0.5], shape=[1, 8, 8], solver="euler", steps=2)
    assert evaluate.data_kind(model) == "images"
    out = evaluate.evaluate_images(model, dm, num_samples=32, num_likelihood=16, batch_size=16,
                                   fid_feature=TinyExtractor(), num_reference=64, seed=0)
    m = out["metrics"]
    assert m["eval/nfe"] == 2 and m["eval/fid"] >= 0 and m["eval/bpd_nfe"] > 0
    assert out["bpd_data"] == {"split": "validation split (val_fraction=0.1 of the train split held out, seed 0)",
                               "images": 16, "likelihood": "log p(x)"}
    # Replay the first (only) batch's dequantisation on the validation images, not the training ones.
    x = next(iter(torch.utils.data.DataLoader(dm.data_val, batch_size=16)))["x1"]
    y = dequantize(x, torch.Generator().manual_seed(1))
    logp = AffineGaussian([0.2] * 64, [0.5] * 64).log_prob(y.flatten(1))
    expected = float(((-logp / 64 + math.log(128)) / math.log(2)).mean())
    assert abs(m["eval/bpd"] - expected) < 1e-3, (m["eval/bpd"], expected)


def test_a_cached_fid_reference_of_another_size_is_refused(tmp_path):
    from datamodules.images import ImageDataModule

    dm = ImageDataModule("digits", batch_size=16, val_fraction=0.1)
    model = affine_model([0.2], [0.5], shape=[1, 8, 8], solver="euler", steps=1)
    kw = dict(metrics=["fid"], num_samples=8, batch_size=8, fid_feature=TinyExtractor(),
              fid_reference=str(tmp_path / "ref.npz"), progress=False)
    evaluate.evaluate_images(model, dm, num_reference=10, **kw)
    with pytest.raises(ValueError, match="statistics of 10 images, not of the 1797 asked for"):
        evaluate.evaluate_images(model, dm, **kw)


def test_point_metrics_on_images_and_image_metrics_on_points_are_refused(ckpt, tmp_path):
    model = affine_model([0.2], [0.5], shape=[1, 8, 8])
    with pytest.raises(ValueError, match="does not fit this checkpoint"):
        evaluate.evaluate_images(model, None, metrics=["w2"])
    with pytest.raises(ValueError, match="needs image data"):
        evaluate.evaluate_checkpoint(ckpt, tmp_path, metrics=["bpd"])
    with pytest.raises(ValueError, match="unknown metric 'fidd'"):
        evaluate.evaluate_checkpoint(ckpt, tmp_path, metrics=["fidd"])


def test_fm_eval_logs_the_sweep_table_to_wandb(ckpt, tmp_path):
    """Offline (the test fixture sets WANDB_MODE=offline): the run holds the sweep table."""
    report = evaluate.evaluate_checkpoint(ckpt, tmp_path, metrics=["w2"], num_samples=32, sweep=True,
                                          wandb_project="fm-eval-test")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and report["wandb_dir"].startswith(str(runs[0]))
    table = json.loads(next(runs[0].glob("files/media/table/eval/nfe_sweep_*.table.json")).read_text())
    assert table["columns"][:4] == ["solver", "steps", "tol", "nfe"] and len(table["data"]) == 24
