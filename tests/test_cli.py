"""fm-cli (Lightning CLI): fit from the example configs, print_config round trip, parity with fm-train,
checkpoint checks, one folder per run, predict and test outputs."""

from __future__ import annotations

import csv as csv_module
import os
import pickle
import shutil

import hydra
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, compose_config, run_cli
from fm_lightning.cli import FlowMatchingCLI, main
from fm_lightning.module import FlowMatchingModule, load_checkpoint
from fm_lightning.reliability import read_checkpoint

TOY = str(REPO / "configs/cli/toy.yaml")
DIGITS = str(REPO / "configs/cli/digits.yaml")
TINY = ["--trainer.max_steps=20", "--trainer.val_check_interval=10", "--data.init_args.steps_per_epoch=10",
        "--data.init_args.val_size=64", "--model.lr_scheduler.init_args.total_steps=20",
        "--model.lr_scheduler.init_args.warmup_steps=2"]
QUICK = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.steps_per_epoch=2",
         "--data.init_args.val_size=64", "--model.lr_scheduler.init_args.total_steps=2",
         "--model.lr_scheduler.init_args.warmup_steps=1"]


def _cli(*args: str) -> FlowMatchingCLI:
    return FlowMatchingCLI(FlowMatchingModule, subclass_mode_data=True, run=False, args=list(args))


def _fit_error(capsys, *args: str) -> str:
    """``fm-cli fit`` on the tiny toy config, in this process (a subprocess costs seconds of
    imports); it must exit with status 2 and no traceback. Returns its last stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TOY, *TINY, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    """The last.ckpt of a 20-step fm-cli toy run (MLP width 256, lr 3e-3)."""
    root = tmp_path_factory.mktemp("toy_run")
    proc = run_cli("fm-cli", "fit", "--config", TOY, *TINY, f"--trainer.default_root_dir={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(root.rglob("last.ckpt"))


@pytest.mark.parametrize(("cli_config", "hydra_overrides"), [(TOY, []), (DIGITS, ["experiment=digits"])],
                         ids=["toy", "digits"])
def test_parity_same_experiment_gives_equal_hyperparameters(tmp_path, cli_config, hydra_overrides):
    cli_model = _cli("--config", cli_config).model
    hydra_model = hydra.utils.instantiate(compose_config(hydra_overrides, tmp_path).model)
    assert dict(cli_model.hparams) == dict(hydra_model.hparams)


def test_data_dimension_is_stated_once_and_linked(tmp_path):
    gaussian = ["--config", TOY, "--data.init_args.source=gaussian", "--data.init_args.target=gaussian"]
    model = _cli(*gaussian, "--data.init_args.dim=3").model
    assert model.net.dim == 3 and model.source.dim == 3 and model.source.is_standard_gaussian
    # The data's value may be repeated on the model side.
    assert _cli(*gaussian, "--data.init_args.dim=3", "--model.net.init_args.dim=3").model.net.dim == 3


def test_fm_cli_fit_writes_a_checkpoint_that_loads_like_fm_train(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("fm-cli", "fit", "--config", TOY, *TINY, f"--trainer.default_root_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(out.rglob("last.ckpt"))
    torch.load(ckpt, weights_only=True)
    model = load_checkpoint(ckpt)
    assert model.sample(num_samples=4, solver="euler", steps=2).x.shape == (4, 2)
    # The plots go beside the checkpoints, into the logger's version folder, as Lightning's do.
    assert (ckpt.parents[1] / "samples.png").is_file() and (ckpt.parents[1] / "trajectories.png").is_file()
    # A second run under the same default_root_dir gets its own folder and keeps the first one's.
    before = (ckpt.parents[1] / "samples.png").read_bytes()
    proc = run_cli("fm-cli", "fit", "--config", TOY, *TINY, f"--trainer.default_root_dir={out}", "--seed_everything=1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.rglob("samples.png"))) == 2 and (ckpt.parents[1] / "samples.png").read_bytes() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--ckpt_path=missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
    (["--model.flow.init_args.path.class_path=fm_lightning.flow.paths.NoSuchPath"], "has no attribute 'NoSuchPath'"),
    (["--model.net.init_args.dim=3"], "model.net.init_args.dim=3 differs from 2, the value linked from the data; "
                                      "leave it out (set data.init_args.dim instead)"),
    (["--model.net.init_args.num_classes=3"], "differs from 0, the value linked from the data; "
                                              "leave it out (this data has no such setting)"),
    (["--ckpt_path=last"], "no run under"),
    ([f"--trainer.default_root_dir={TOY}"], "cannot create the run folder"),  # a file, not a folder
    (["--trainer.logger=false", f"--trainer.default_root_dir={TOY}"], "cannot create the run folder"),
    (["--trainer.enable_progress_bar=false"], "found `RichProgressBar` in callbacks"),
])
def test_fm_cli_bad_input_gets_one_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in _fit_error(capsys, f"--trainer.default_root_dir={tmp_path / 'out'}", *args)
    assert not (tmp_path / "out").exists()


def test_fm_cli_warmup_error_names_the_fm_cli_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _fit_error(capsys, f"--trainer.default_root_dir={tmp_path / 'out'}",
                      "--model.lr_scheduler.init_args.warmup_steps=20")
    assert ("lower model.lr_scheduler.warmup_steps (fm-cli: --model.lr_scheduler.init_args.warmup_steps) or raise "
            "model.lr_scheduler.total_steps (fm-cli: --model.lr_scheduler.init_args.total_steps)") in line


@pytest.mark.parametrize("arg", ["--model.net.init_args.width=abc", "--model.net.init_args.activation=foo",
                                 "--model.optimizer.init_args.lr=abc",
                                 "--model.flow.init_args.path.init_args.sigma=abc"])
@pytest.mark.parametrize("print_config", [False, True])
def test_fm_cli_bad_value_inside_a_class_spec_is_a_parser_error(capsys, arg, print_config):
    key, value = arg.rsplit(".", 1)[1].split("=")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TOY, arg, *(["--print_config"] if print_config else [])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    assert f'Parser key "{key}"' in err and value in err


class _Payload:
    """Unpickling it runs code: it creates the folder ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("kind", ["truncated", "malicious pickle", "text"])
def test_fm_cli_bad_checkpoint_gets_read_checkpoints_one_line(tmp_path, capsys, kind):
    path = tmp_path / "bad.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(10_000)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "malicious pickle":
        path.write_bytes(pickle.dumps(_Payload(tmp_path / "payload_ran")))
    else:
        path.write_text("hello\n")
    with pytest.raises(ValueError) as expected:  # what fm-train and fm-sample say
        read_checkpoint(path)
    line = _fit_error(capsys, f"--trainer.default_root_dir={tmp_path / 'out'}", f"--ckpt_path={path}")
    assert line == f"fm-cli: error: {expected.value}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "payload_ran").exists()


def test_fm_cli_ckpt_path_keeps_the_model_config_given(tmp_path, toy_ckpt):
    """Lightning writes the checkpoint's hyperparameters over the parsed config; fm-cli keeps the
    values given, so another net is refused by the weight check and other settings take effect."""
    out = tmp_path / "out"
    args = ["fm-cli", "fit", "--config", TOY, *TINY, f"--trainer.default_root_dir={out}", f"--ckpt_path={toy_ckpt}"]
    proc = run_cli(*args, "--model.net.init_args.width=64", cwd=tmp_path)
    assert proc.returncode == 2 and "holds a different model than this config" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr and not out.exists()
    proc = run_cli(*args, "--trainer.max_steps=22", "--model.optimizer.init_args.lr=1e-5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(next(out.rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 22 and ckpt["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 1e-5
    config = yaml.safe_load(next(out.rglob("config.yaml")).read_text())
    assert config["model"]["optimizer"]["init_args"]["lr"] == 1e-5 and config["ckpt_path"] == str(toy_ckpt)


def test_fm_cli_ckpt_path_last_is_the_newest_runs_last_ckpt(tmp_path, toy_ckpt):
    run = tmp_path / "out/lightning_logs/version_0"
    shutil.copytree(toy_ckpt.parent, run / "checkpoints")
    proc = run_cli("fm-cli", "test", "--config", TOY, *TINY, f"--trainer.default_root_dir={tmp_path / 'out'}",
                   "--ckpt_path=last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((run.parent / "version_1/config.yaml").read_text())
    assert config["ckpt_path"] == str(run / "checkpoints/last.ckpt")


def test_every_fm_cli_run_gets_a_new_folder_whatever_the_logger(tmp_path):
    out = tmp_path / "out"
    fit = ["fm-cli", "fit", "--config", TOY, *QUICK, f"--trainer.default_root_dir={out}"]
    no_logger = [*fit, "--trainer.logger=false"]
    wandb = [*fit, "--trainer.logger=fm_lightning.loggers.WandbLogger", "--trainer.logger.init_args.offline=true"]
    for args in (no_logger, no_logger, wandb):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((out / "lightning_logs").iterdir())
    assert os.listdir(out) == ["lightning_logs"]
    assert [run.name for run in runs] == ["version_0", "version_1", "version_2"]
    for run in runs:
        assert {"config.yaml", "samples.png", "trajectories.png"} <= set(os.listdir(run))
        assert os.listdir(run / "checkpoints") == ["last.ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "wandb"]  # W&B keeps its own store (offline-run-*) in save_dir


def test_fm_cli_refuses_a_logger_version_folder_that_holds_a_run(tmp_path):
    earlier = tmp_path / "out/csv/fixed/config.yaml"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("earlier run\n")
    proc = run_cli("fm-cli", "validate", "--config", TOY, *TINY, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'out'}", "--trainer.logger.init_args.name=csv",
                   "--trainer.logger.init_args.version=fixed", cwd=tmp_path)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and os.listdir(earlier.parent) == ["config.yaml"]
    assert earlier.read_text() == "earlier run\n"


def test_fm_cli_predict_on_no_batches_is_an_error(tmp_path):
    proc = run_cli("fm-cli", "predict", "--config", TOY, *TINY, "--trainer.limit_predict_batches=0",
                   f"--trainer.default_root_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 2 and "predict ran on no batches" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_print_config_round_trips(tmp_path):
    proc = run_cli("fm-cli", "fit", "--config", TOY, *TINY, "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    out = tmp_path / "out"
    proc = run_cli("fm-cli", "fit", "--config", str(printed), f"--trainer.default_root_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.rglob("last.ckpt"))


def test_unknown_class_path_is_a_clear_error(tmp_path):
    proc = run_cli("fm-cli", "fit", "--config", TOY, "--data=datamodules.toy.NoSuchData", cwd=tmp_path)
    assert proc.returncode != 0 and "NoSuchData" in proc.stderr


def test_fm_cli_schedule_spans_the_trainers_max_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = [a for a in QUICK if "total_steps" not in a and "max_steps" not in a]
    main(["fit", "--config", TOY, *quick, "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}"])
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["lr_schedulers"][0]["total_steps"] == 3


def test_fm_cli_fit_on_digits_links_image_shape_and_classes(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("fm-cli", "fit", "--config", DIGITS, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                   "--trainer.limit_val_batches=1", "--model.lr_scheduler.init_args.total_steps=4",
                   "--model.lr_scheduler.init_args.warmup_steps=1", "--data.init_args.batch_size=16",
                   f"--trainer.default_root_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(out.rglob("last.ckpt"))
    pictures = {p.name for p in ckpt.parents[1].glob("*.png")}
    readme = (REPO / "README.md").read_text().split("## Lightning CLI")[1].split("\n## ")[0].replace("\n", " ")
    assert pictures == {"grid.png", "trajectory.png"} and "`grid.png` and `trajectory.png` (images" in readme
    model = load_checkpoint(ckpt)
    assert model.net.num_classes == 10 and list(model.source.dim) == [1, 8, 8]
    assert model.sample(num_samples=3, cond=torch.arange(3), solver="euler", steps=2).x.shape == (3, 1, 8, 8)
    # predict samples the validation images' classes and saves their labels beside them
    proc = run_cli("fm-cli", "predict", "--config", DIGITS, "--data.init_args.batch_size=16", f"--ckpt_path={ckpt}",
                   "--model.solver=euler", "--model.steps=2", f"--trainer.default_root_dir={tmp_path / 'predict'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = np.load(next((tmp_path / "predict").rglob("samples.npz")))
    assert saved["samples"].shape[1:] == (1, 8, 8) and saved["labels"].shape == saved["samples"].shape[:1]
    assert set(saved["labels"].tolist()) <= set(range(10))


def test_fm_cli_validate_test_and_predict_run_from_a_checkpoint(tmp_path, toy_ckpt):
    for sub in ["validate", "test", "predict"]:
        args = [f"--trainer.default_root_dir={tmp_path / sub}", f"--ckpt_path={toy_ckpt}", "--model.solver=euler",
                "--model.steps=2", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.init_args.save_dir={tmp_path / sub}"]
        proc = run_cli("fm-cli", sub, "--config", TOY, *TINY, *args, cwd=tmp_path)
        assert proc.returncode == 0, (sub, proc.stderr[-3000:])
    # validate logs the validation metrics of fit, sampled ones included, but writes no plots
    validate = next((tmp_path / "validate").rglob("metrics.csv"))
    header = validate.read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/w2", "val/nfe", "val/path_energy", "val/npe"} <= set(header)
    assert not list(validate.parent.glob("*.png"))
    # test logs only test/* keys (not validation's val/loss)
    header = next((tmp_path / "test").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert [key for key in header if "/" in key] == ["test/loss"]
    # predict saves its samples in the run folder, as fm-sample does, and says where
    path = tmp_path / "predict/lightning_logs/version_0/samples.npz"
    assert f"wrote 64 samples to {path}" in proc.stdout
    samples = np.load(path)["samples"]
    assert samples.shape == (64, 2) and np.isfinite(samples).all()


def test_fm_cli_validate_of_the_last_checkpoint_gives_fits_final_metrics(tmp_path, monkeypatch):
    """validate restores no training loops (its global_step is 0); the W2 target draw must still
    be the one fit used at that checkpoint's step."""
    monkeypatch.chdir(tmp_path)
    csv = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", "--config", TOY, *TINY, *csv, f"--trainer.default_root_dir={tmp_path}"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    fit_rows = list(csv_module.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    fit_w2 = [float(r["val/w2"]) for r in fit_rows if r.get("val/w2")][-1]
    main(["validate", "--config", TOY, *TINY, *csv[:1], f"--trainer.logger.init_args.save_dir={tmp_path / 'v'}",
          f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'v'}"])
    rows = list(csv_module.DictReader(open(next((tmp_path / "v").rglob("metrics.csv")))))
    assert float(rows[-1]["val/w2"]) == pytest.approx(fit_w2, rel=1e-6)


def test_a_data_error_is_the_classes_own_line(capsys):
    """jsonargparse reports a failed --data among the alternatives of its Optional type, with the
    whole namespace; fm-cli keeps the datamodule's own message."""
    line = _fit_error(capsys, "--data.init_args.target=nope")
    assert line.startswith("fm-cli: error: datamodules.toy.ToyDataModule: unknown distribution 'nope'; choose one of")
