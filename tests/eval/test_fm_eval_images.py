"""fm-eval on image checkpoints of real fm-train runs: data that fit the model, found from the
run's launch directory, options that apply, and what the report says bits/dim measured."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from datamodules.images import ImageDataModule
from eval_helpers import TinyExtractor
from fm_lightning import evaluate
from fm_lightning.module import load_checkpoint
from images.image_helpers import write_mnist

TINY = ["debug=fast", "trainer.max_steps=2", "trainer.val_check_interval=2", "model.lr_scheduler.warmup_steps=1",
        "callbacks.samples.num_samples=4", "callbacks.samples.steps=2", "callbacks.samples.num_trajectories=2",
        "logger=none"]
BPD = ["--metrics", "bpd", "--num-likelihood", "2", "--likelihood-tol", "1e-2", "--batch-size", "2"]


def _train(launch, *overrides):
    """``fm-train`` as a user runs it from ``launch``; returns the run directory ``launch/run``."""
    run_dir = launch / "run"
    proc = run_cli("fm-train", *overrides, *TINY, f"hydra.run.dir={run_dir}", cwd=launch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """``fm-train experiment=mnist``: unconditional 1x28x28, launched from the folder that holds
    ``data/MNIST`` (the default ``data.root``, relative: ``${paths.root_dir}/data``)."""
    launch = tmp_path_factory.mktemp("mnist")
    write_mnist(str(launch / "data"), n_train=24, n_test=8)
    return _train(launch, "experiment=mnist", "model.net.model_channels=32", "data.batch_size=8",
                  "data.num_workers=0")


def _ckpt(run_dir):
    return str(run_dir / "checkpoints" / "last.ckpt")


def test_image_data_of_another_shape_or_classes_are_refused(digits_run, mnist_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(mnist_run.parent)  # the launch directory: the data are there, only their shape is wrong
    config = str(mnist_run / ".hydra" / "config.yaml")
    assert evaluate.main([_ckpt(digits_run), "--data-config", config, *BPD, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shape (1, 28, 28) but the model's are (1, 8, 8)" in err
    unlabelled = OmegaConf.load(digits_run / ".hydra" / "config.yaml")
    unlabelled.data.num_classes = 0
    OmegaConf.save(unlabelled, tmp_path / "unlabelled.yaml")
    assert evaluate.main([_ckpt(digits_run), "--data-config", str(tmp_path / "unlabelled.yaml"), *BPD,
                          "--out", str(tmp_path / "b")]) == 2
    assert "class-conditional (10 classes) but the data have num_classes=0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the model's are \(1, 28, 28\)"):
        evaluate.evaluate_images(load_checkpoint(_ckpt(mnist_run)), ImageDataModule("digits"), metrics=["bpd"])


def test_image_data_are_found_from_the_directory_fm_train_was_launched_from(mnist_run, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)  # not the launch directory
    monkeypatch.delenv("FM_ROOT", raising=False)
    assert evaluate.main([_ckpt(mnist_run), *BPD, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert report["data"] == "mnist-train-1x28x28" and math.isfinite(report["metrics"]["eval/bpd"])
    # FM_ROOT set in the environment still wins; the error says what an fm-eval user can do.
    monkeypatch.setenv("FM_ROOT", str(tmp_path / "elsewhere"))
    assert evaluate.main([_ckpt(mnist_run), *BPD, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"root='{tmp_path / 'elsewhere'}/data'" in err and "fm-eval: pass --data-config" in err
    # A project moved since training (its launch directory is gone): paths are read as given, here.
    monkeypatch.delenv("FM_ROOT")
    moved = tmp_path / "moved"
    shutil.copytree(mnist_run.parent, moved)
    hydra_yaml = moved / "run" / ".hydra" / "hydra.yaml"
    hydra_yaml.write_text(hydra_yaml.read_text().replace(str(mnist_run.parent), str(tmp_path / "gone")))
    monkeypatch.chdir(moved)
    assert evaluate.main([str(moved / "run/checkpoints/last.ckpt"), *BPD, "--out", str(tmp_path / "c")]) == 0


def test_options_that_do_not_apply_to_an_image_checkpoint_are_refused(digits_run, mnist_run, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(mnist_run.parent)  # the launch directory: the data are there, only the options are wrong
    out = ["--out", str(tmp_path / "e")]
    assert evaluate.main([_ckpt(mnist_run), "--guidance", "5", *BPD, *out]) == 2
    assert "guidance=5 needs a class-conditional model" in capsys.readouterr().err
    assert evaluate.main([_ckpt(mnist_run), "--target", "moons", *BPD, *out]) == 2
    assert "--target moons applies to 2-D checkpoints only" in capsys.readouterr().err
    assert evaluate.main([_ckpt(digits_run), "--guidance", "2", *BPD, *out]) == 2  # bits/dim take no guidance
    assert "guidance=2 applies to generated images" in capsys.readouterr().err
    assert evaluate.main([_ckpt(mnist_run), "--num-reference", "1", *BPD, *out]) == 2
    assert "--num-reference must be >= 2" in capsys.readouterr().err
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    assert evaluate.main([_ckpt(mnist_run), "--fid-weights", str(weights), "--num-reference", "10", *BPD, *out]) == 2
    assert ("--fid-weights, --num-reference apply to FID (fid, --sweep), which bits/dim alone does not compute; "
            "drop them, or add fid to --metrics") in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    seen = {}

    def evaluate_checkpoint(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", evaluate_checkpoint)
    assert evaluate.main([_ckpt(mnist_run), "--metrics", "fid", "--num-reference", "100", *out]) == 2
    assert seen["num_reference"] == 100
    datamodule = ImageDataModule("mnist", root=str(mnist_run.parent / "data"), val_split="test")
    with pytest.raises(ValueError, match="guidance=5 needs a class-conditional model"):
        evaluate.evaluate_images(load_checkpoint(_ckpt(mnist_run)), datamodule, metrics=["fid"], num_samples=4,
                                 fid_feature=TinyExtractor(), guidance=5.0)


def test_report_records_the_guidance_and_the_held_out_split_of_bits_per_dim(digits_run, mnist_run, tmp_path):
    report = evaluate.evaluate_checkpoint(
        _ckpt(digits_run), tmp_path / "d", guidance=2.0, fid_feature=TinyExtractor(), num_samples=10,
        num_reference=20, num_likelihood=3, batch_size=3, solver="euler", steps=2, likelihood_tol=1e-2)
    assert json.loads((tmp_path / "d" / "eval.json").read_text())["sampling"]["guidance"] == 2.0
    assert report["bpd_data"] == {"split": "validation split (val_fraction=0.1 of the train split held out, seed 0)",
                                  "images": 3, "likelihood": "log p(x|y)"}
    md = (tmp_path / "d" / "eval.md").read_text()
    assert "; guidance 2;" in md and "bits/dim: from log p(x|y) on 3 images of the validation split" in md
    report = evaluate.evaluate_checkpoint(_ckpt(mnist_run), tmp_path / "m", metrics=["bpd"], num_likelihood=2,
                                          batch_size=2, likelihood_tol=1e-2)
    assert report["bpd_data"] == {"split": "test split", "images": 2, "likelihood": "log p(x)"}
    assert "guidance" not in report["sampling"]


def test_a_data_config_that_cannot_give_the_images_is_refused_in_one_line(digits_run, tmp_path, capsys):
    config = OmegaConf.load(digits_run / ".hydra" / "config.yaml")
    cases = {"points.yaml": "data:\n  _target_: datamodules.toy.ToyDataModule\n",
             "broken.yaml": "data:\n  dataset: [digits\n  seed: 0\n"}
    for name, change in (("digitz.yaml", {"dataset": "digitz"}), ("fraction.yaml", {"val_fraction": 1.5})):
        cases[name] = OmegaConf.to_yaml(OmegaConf.merge(config, {"data": change}))
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    expected = {"points.yaml": r"the data \(ToyDataModule\) are not images but the model's are images of shape "
                               r"\(1, 8, 8\)",
                "broken.yaml": r"broken.yaml' is not valid YAML \(while parsing a flow sequence",
                "digitz.yaml": "cannot build the data of --data-config '.*digitz.yaml': unknown image dataset 'digitz'",
                "fraction.yaml": "fraction.yaml': val_fraction must be in \\[0, 1\\), got 1.5; fix its data settings",
                str(digits_run): "--data-config '.*' is a folder; give a run's config file, such as "}
    for name, message in expected.items():
        path = name if name.startswith("/") else str(tmp_path / name)
        assert evaluate.main([_ckpt(digits_run), "--data-config", path, *BPD, "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fm-eval: error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "e").exists()


def test_a_folder_as_fid_reference_is_refused_before_any_work(digits_run, tmp_path, capsys):
    folder = tmp_path / "stats"
    folder.mkdir()
    assert evaluate.main([_ckpt(digits_run), "--metrics", "fid", "--fid-reference", str(folder),
                          "--out", str(tmp_path / "e")]) == 2
    assert f"FID reference '{folder}' is a folder; give the path of an .npz file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


def test_bits_per_dim_refuse_validation_images_the_model_trained_on(digits_run, tmp_path, capsys):
    """The digits run held out val_fraction=0.1 (seed 0): a larger fraction, or another seed, holds
    out images it trained on; none held out says how to get some."""
    config = OmegaConf.load(digits_run / ".hydra" / "config.yaml")
    for name, change in (("more", {"val_fraction": 0.2}), ("seed", {"seed": 1}), ("none", {"val_fraction": 0})):
        OmegaConf.save(OmegaConf.merge(config, {"data": change}), tmp_path / f"{name}.yaml")
    out = ["--out", str(tmp_path / "e")]
    for name in ("more", "seed"):
        assert evaluate.main([_ckpt(digits_run), "--data-config", str(tmp_path / f"{name}.yaml"), *BPD, *out]) == 2
        err = capsys.readouterr().err
        assert "bits/dim needs held-out images, but the validation split of the data" in err
        assert "was trained on (training: val_split=holdout, val_fraction=0.1, seed 0); pass a --data-config with " \
               "val_split: test" in err
    assert evaluate.main([_ckpt(digits_run), "--data-config", str(tmp_path / "none.yaml"), *BPD, *out]) == 2
    err = capsys.readouterr().err
    assert "the data hold none out (val_fraction=0); pass a --data-config with val_split: test" in err
    assert "val_fraction > 0" not in err and not (tmp_path / "e").exists()
