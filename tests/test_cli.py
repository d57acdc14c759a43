"""fm-cli (Lightning CLI): fit from the example configs, print_config round trip, parity with fm-train."""

from __future__ import annotations


import hydra
import pytest
import torch

from conftest import REPO, compose_config, run_cli
from fm_lightning.cli import FlowMatchingCLI
from fm_lightning.module import FlowMatchingModule, load_checkpoint

TOY = str(REPO / "configs/cli/toy.yaml")
DIGITS = str(REPO / "configs/cli/digits.yaml")
TINY = ["--trainer.max_steps=20", "--trainer.val_check_interval=10", "--data.init_args.steps_per_epoch=10",
        "--data.init_args.val_size=64", "--model.lr_scheduler.init_args.total_steps=20",
        "--model.lr_scheduler.init_args.warmup_steps=2"]


def _cli(*args: str) -> FlowMatchingCLI:
    return FlowMatchingCLI(FlowMatchingModule, subclass_mode_data=True, run=False, args=list(args))


@pytest.mark.parametrize(("cli_config", "hydra_overrides"), [(TOY, []), (DIGITS, ["experiment=digits"])],
                         ids=["toy", "digits"])
def test_parity_same_experiment_gives_equal_hyperparameters(tmp_path, cli_config, hydra_overrides):
    cli_model = _cli("--config", cli_config).model
    hydra_model = hydra.utils.instantiate(compose_config(hydra_overrides, tmp_path).model)
    assert dict(cli_model.hparams) == dict(hydra_model.hparams)


def test_data_dimension_is_stated_once_and_linked(tmp_path):
    model = _cli("--config", TOY, "--data.init_args.source=gaussian", "--data.init_args.target=gaussian",
                 "--data.init_args.dim=3").model
    assert model.net.dim == 3 and model.source.dim == 3 and model.source.is_standard_gaussian


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
    (["--model.flow.init_args.path.class_path=fm_lightning.flow.paths.NoSuchPath"], "flow must be a CFMObjective"),
])
def test_fm_cli_bad_input_gets_one_message(tmp_path, args, message):
    proc = run_cli("fm-cli", "fit", "--config", TOY, *TINY, f"--trainer.default_root_dir={tmp_path / 'out'}", *args,
                   cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


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


def test_fm_cli_fit_on_digits_links_image_shape_and_classes(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("fm-cli", "fit", "--config", DIGITS, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                   "--trainer.limit_val_batches=1", "--model.lr_scheduler.init_args.total_steps=4",
                   "--model.lr_scheduler.init_args.warmup_steps=1", "--data.init_args.batch_size=16",
                   f"--trainer.default_root_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_checkpoint(next(out.rglob("last.ckpt")))
    assert model.net.num_classes == 10 and list(model.source.dim) == [1, 8, 8]
    assert model.sample(num_samples=3, cond=torch.arange(3), solver="euler", steps=2).x.shape == (3, 1, 8, 8)


def test_fm_cli_validate_test_and_predict_run_from_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("fm-cli", "fit", "--config", TOY, *TINY, f"--trainer.default_root_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = str(next(out.rglob("last.ckpt")))
    for sub in ["validate", "test", "predict"]:
        proc = run_cli("fm-cli", sub, "--config", TOY, *TINY, f"--trainer.default_root_dir={tmp_path / sub}",
                       f"--ckpt_path={ckpt}", "--model.solver=euler", "--model.steps=2", cwd=tmp_path)
        assert proc.returncode == 0, (sub, proc.stderr[-3000:])
