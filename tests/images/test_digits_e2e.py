"""End to end: fm-train on the image experiments at tiny sizes, then fm-sample on the checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import IMAGE_TINY as TINY
from conftest import compose_config, run_cli
from fm_lightning.module import load_checkpoint
from fm_lightning.sample import main as fm_sample
from fm_lightning.train import run
from image_helpers import trust_cifar10_files, write_cifar10, write_mnist


def test_digits_experiment_leaves_checkpoint_grids_and_metrics(digits_run):
    for name in ["checkpoints/last.ckpt", "grid.png", "trajectory.png", "metrics.json", "csv/metrics.csv"]:
        assert (digits_run / name).is_file(), name
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["global_step"] == 20 and metrics["val/nfe"] == 5 and np.isfinite(metrics["val/loss"])
    raw = torch.load(digits_run / "checkpoints/last.ckpt", weights_only=True)
    assert "current_model_state" in raw  # EMA weights in state_dict, raw ones beside them
    assert raw["hyper_parameters"]["net"]["class_path"] == "fm_lightning.nets.unet.UNet"
    assert raw["hyper_parameters"]["source"]["init_args"]["dim"] == [1, 8, 8]
    assert raw["hyper_parameters"]["cond_drop_prob"] == 0.1


def test_fm_sample_cli_writes_npz_and_png_grid(digits_run, tmp_path):
    out = tmp_path / "digits.npz"
    proc = run_cli("fm-sample", str(digits_run / "checkpoints/last.ckpt"), "--class", "all", "--guidance", "2",
                   "--num-samples", "30", "--solver", "euler", "--steps", "4", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    z = np.load(out)
    assert z["samples"].shape == (30, 1, 8, 8) and int(z["nfe"]) == 4
    assert z["labels"].tolist() == [i % 10 for i in range(30)]
    assert (tmp_path / "digits.png").is_file()


def test_fm_sample_options_on_an_image_checkpoint(digits_run, tmp_path, capsys):
    ckpt = str(digits_run / "checkpoints/last.ckpt")
    common = ["--num-samples", "6", "--solver", "euler", "--steps", "2", "--batch-size", "4"]
    assert fm_sample([ckpt, "--class", "3", "--raw-weights", "--out", str(tmp_path / "a.npz"),
                      "--grid", str(tmp_path / "g.png"), *common]) == 0
    assert (tmp_path / "g.png").is_file() and np.load(tmp_path / "a.npz")["labels"].tolist() == [3] * 6
    ema = load_checkpoint(ckpt).sample(x0=torch.from_numpy(np.load(tmp_path / "a.npz")["samples"][:1]) * 0, cond=3,
                                       solver="euler", steps=1)  # the EMA checkpoint loads and samples
    assert ema.x.shape == (1, 1, 8, 8)
    assert fm_sample([ckpt, "--class", "null", "--out", str(tmp_path / "n.npz"), *common]) == 0
    assert "labels" not in np.load(tmp_path / "n.npz").files
    assert fm_sample([ckpt, "--out", str(tmp_path / "x.npz"), *common]) == 2
    assert "class-conditional (10 classes): pass --class K (0..9), --class all or --class null" in capsys.readouterr().err
    for flag, name, ext in (("--out", "x.npy", ".npz"), ("--grid", "g.jpg", ".png")):
        extra = ["--out", str(tmp_path / "y.npz")] if flag == "--grid" else []
        assert fm_sample([ckpt, "--class", "3", *extra, flag, str(tmp_path / name), *common]) == 2
        assert f"{flag} {str(tmp_path / name)!r}: fm-sample writes a {ext} file here" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.npy*")) and not list(tmp_path.glob("g.jpg*"))
    for name in ("out.v2", "samples_g1.5"):  # dots that are not file types: the extension is appended
        assert fm_sample([ckpt, "--class", "3", "--out", str(tmp_path / name), *common]) == 0
        assert (tmp_path / f"{name}.npz").is_file() and (tmp_path / f"{name}.png").is_file()
    assert fm_sample([ckpt, "--class", "12", "--out", str(tmp_path / "x.npz"), *common]) == 2
    assert "--class must be a label 0..9" in capsys.readouterr().err
    assert fm_sample([ckpt, "--class", "all", "--batch-size", "0", "--out", str(tmp_path / "x.npz")]) == 2
    capsys.readouterr()
    for flags, message in ((["--class", "3", "--guidance", "nan"], "guidance=nan is not a finite number"),
                           (["--class", "null", "--guidance", "3"], "guidance=3 needs class labels")):
        assert fm_sample([ckpt, *flags, "--out", str(tmp_path / "x.npz"), *common]) == 2
        assert message in capsys.readouterr().err
    np.save(tmp_path / "x0.npy", np.zeros((20, 1, 8, 8), np.float32))
    for x0 in (tmp_path / "x0.npy", tmp_path / "missing.npy"):
        args = ["--class", "3", "--source-file", str(x0), "--out", str(tmp_path / "x.npz"), *common]
        assert fm_sample([ckpt, *args]) == 2
        assert "--source-file draws x0 points, but this model takes images; leave --source-file out" in \
            capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_raw_and_ema_samples_differ(digits_run, tmp_path):
    ckpt = str(digits_run / "checkpoints/last.ckpt")
    args = ["--class", "all", "--num-samples", "10", "--solver", "euler", "--steps", "3"]
    fm_sample([ckpt, *args, "--out", str(tmp_path / "ema.npz")])
    fm_sample([ckpt, *args, "--raw-weights", "--out", str(tmp_path / "raw.npz")])
    assert not np.allclose(np.load(tmp_path / "ema.npz")["samples"], np.load(tmp_path / "raw.npz")["samples"])


@pytest.mark.parametrize("experiment", ["mnist", "mnist_cond"])
def test_mnist_experiments_run_on_tiny_idx_files(tmp_path, experiment):
    write_mnist(str(tmp_path / "data"), n_train=24, n_test=8)
    native = ["data.image_size=null", "data.channels=null"] if experiment == "mnist" else []  # MNIST's own 1x28x28
    cfg = compose_config(
        [f"experiment={experiment}", f"data.root={tmp_path / 'data'}", "data.batch_size=8", "data.num_workers=0",
         *TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", "logger=none", *native],
        tmp_path / "run",
    )
    metrics = run(cfg)
    assert metrics["global_step"] == 6 and np.isfinite(metrics["val/loss"])
    model = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert model.num_classes == (10 if experiment == "mnist_cond" else 0)
    assert (model.net.in_channels, model.net.image_size) == (1, 28)
    out = tmp_path / "s.npz"
    args = ["--class", "all", "--guidance", "1.5"] if model.num_classes else []
    assert fm_sample([str(tmp_path / "run/checkpoints/last.ckpt"), *args, "--num-samples", "4", "--solver", "euler",
                      "--steps", "2", "--out", str(out)]) == 0
    assert np.load(out)["samples"].shape == (4, 1, 28, 28)
    if not model.num_classes:
        assert fm_sample([str(tmp_path / "run/checkpoints/last.ckpt"), "--guidance", "2", "--out", str(out)]) == 2


@pytest.mark.parametrize(
    "experiment",
    ["cifar10_otcfm", pytest.param("cifar10_icfm", marks=pytest.mark.slow), pytest.param("cifar10_fm", marks=pytest.mark.slow)],
)
def test_cifar10_experiments_run_with_both_fids(tmp_path, monkeypatch, experiment):
    trust_cifar10_files(monkeypatch, write_cifar10(str(tmp_path / "data"), n_per_batch=4)["md5"])
    fid = "{_target_:image_helpers.TinyExtractor}"
    cfg = compose_config(
        [f"experiment={experiment}", f"data.root={tmp_path / 'data'}", "data.batch_size=4", "data.num_workers=0",
         "data.pin_memory=false", *TINY, "trainer.max_steps=6", "trainer.val_check_interval=6",
         "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "model.net.model_channels=32", "logger=none",
         f"callbacks.fid_dopri5.feature={fid}", f"callbacks.fid_euler100.feature={fid}",
         "callbacks.fid_dopri5.num_samples=8", "callbacks.fid_euler100.num_samples=8",
         "callbacks.fid_euler100.steps=3", "callbacks.fid_dopri5.atol=1e-3", "callbacks.fid_dopri5.rtol=1e-3"],
        tmp_path / "run",
    )
    assert cfg.data.hflip and cfg.trainer.gradient_clip_val == 1.0 and cfg.callbacks.ema.decay == 0.9999
    metrics = run(cfg)
    assert metrics["val/fid_dopri5"] > 0 and metrics["val/fid_euler100"] > 0 and metrics["val/fid_euler100_nfe"] == 3
    assert (tmp_path / "data/fid_stats/cifar10_train_inception2048.npz").is_file()
    model = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert type(model.flow.path).__name__ == ("LipmanOTPath" if experiment == "cifar10_fm" else "ICFMPath")
