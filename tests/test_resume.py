"""Exact resume: a run SIGKILLed at a random step and resumed equals an uninterrupted run, bitwise.

Each test trains once uninterrupted, then, for each kill point, starts ``fm-train`` as a
subprocess that SIGKILLs itself (``tests/helpers/kill.py``) at a step drawn at random after the
first checkpoint, resumes it with ``ckpt_path`` in place, and compares the final checkpoint
(weights, EMA weights, EMA count) and every logged ``train/loss``.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import compose_config, run_cli
from fm_lightning.reliability import RNGStateCallback
from fm_lightning.train import UserError, run

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
# 60 steps over epochs of 25 batches, a checkpoint every 10 steps, losses logged every step,
# validation at every epoch end (steps 25 and 50, so the checkpoint at 50 is followed by one).
TOY = ["debug=fast", "trainer.max_steps=60", "data.steps_per_epoch=25", "callbacks.model_checkpoint.every_n_train_steps=10",
       "trainer.log_every_n_steps=1", "trainer.val_check_interval=25", "flow=sbcfm", "experiment=n_to_moons"]
TOY_EMA = [*TOY, "+callbacks.ema._target_=fm_lightning.callbacks.EMA", "+callbacks.ema.decay=0.9"]
# Class-conditional digits (UNet, OT-CFM, label dropout, EMA): 180 training images in batches of
# 32 make epochs of 5 steps; 20 steps, validation (and a sample grid) every 5 steps.
DIGITS = ["experiment=digits", "trainer.max_steps=20", "data.val_fraction=0.9", "data.batch_size=32",
          "trainer.val_check_interval=5", "+trainer.limit_val_batches=2", "model.lr_scheduler.warmup_steps=5",
          "model.net.model_channels=16", "callbacks.samples.num_samples=10", "callbacks.samples.steps=2",
          "callbacks.samples.num_trajectories=2", "logger=csv", "trainer.log_every_n_steps=1"]
DIGITS_EPOCH = 5  # steps per epoch


def _every(n: int) -> str:
    return f"callbacks.model_checkpoint.every_n_train_steps={n}"


def _train(overrides: list[str], run_dir: Path, *extra: str):
    """``fm-train`` in a subprocess writing into ``run_dir``."""
    return run_cli("fm-train", *overrides, f"hydra.run.dir={run_dir}", *extra, cwd=run_dir.parent)


def _losses(run_dir: Path) -> list[tuple[int, str]]:
    """(step, train/loss) rows of metrics.csv, in order (a resumed run must not repeat the steps
    that the killed one logged after its last checkpoint)."""
    with open(run_dir / "csv/metrics.csv") as f:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)


def assert_same_run(a: Path, b: Path, steps: int, ema: bool) -> None:
    """Both runs end at ``steps`` with bitwise-equal weights (and EMA weights, raw weights and
    EMA update count when ``ema``) and the same ``train/loss`` at every step."""
    ca, cb = _last(a), _last(b)
    assert ca["global_step"] == cb["global_step"] == steps
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:  # the EMA weights when EMA is on
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), key
    assert ("current_model_state" in ca) == ema and ("current_model_state" in cb) == ema
    if ema:
        for key, value in ca["current_model_state"].items():  # the raw weights
            assert torch.equal(value, cb["current_model_state"][key]), key
        assert any(not torch.equal(v, ca["current_model_state"][k]) for k, v in ca["state_dict"].items())
        assert int(ca["averaging_state"]["n_averaged"]) == int(cb["averaging_state"]["n_averaged"]) == steps
    losses = _losses(a)
    assert _losses(b) == losses and [step for step, _ in losses] == list(range(steps))


def kill_and_resume(overrides: list[str], run_dir: Path, kill_step: int, monkeypatch) -> tuple[int, str]:
    """Train with ``overrides``, SIGKILLed at ``kill_step``, then resume from last.ckpt to the end.
    Returns the step of the checkpoint it resumed from and the resumed run's output."""
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
        kill = ["+callbacks.kill._target_=kill.KillAtStep", f"+callbacks.kill.step={kill_step}"]
        proc = _train(overrides, run_dir, *kill)
    assert proc.returncode == -9, (kill_step, proc.returncode, proc.stderr[-2000:])
    resumed_from = _last(run_dir)["global_step"]
    proc = _train(overrides, run_dir, f"ckpt_path={run_dir}/checkpoints/last.ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return resumed_from, proc.stderr + proc.stdout


def _uninterrupted(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    proc = _train(overrides, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, "toy", TOY)


@pytest.fixture(scope="module")
def toy_ema_run(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, "toy_ema", TOY_EMA)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return _uninterrupted(tmp_path_factory, "digits", [*DIGITS, _every(DIGITS_EPOCH)])


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(toy_run, tmp_path, monkeypatch, seed):
    kill_step = random.Random(seed).randint(11, 59)  # after the first checkpoint (step 10)
    resumed_from, _ = kill_and_resume(TOY, tmp_path / "run", kill_step, monkeypatch)
    assert resumed_from == kill_step // 10 * 10
    assert_same_run(toy_run, tmp_path / "run", steps=60, ema=False)


def test_sigkill_with_ema_resumes_the_average_bitwise(toy_ema_run, tmp_path, monkeypatch):
    # After the checkpoint at step 50, which is also an epoch end followed by validation: the
    # hardest point (the validation must not shift the restored RNG streams).
    kill_step = random.Random(2).randint(51, 59)
    assert kill_and_resume(TOY_EMA, tmp_path / "run", kill_step, monkeypatch)[0] == 50
    assert_same_run(toy_ema_run, tmp_path / "run", steps=60, ema=True)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # one kill point in CI
def test_digits_sigkill_then_resume_from_an_epoch_boundary_is_bitwise_identical(digits_run, tmp_path, monkeypatch,
                                                                              seed):
    kill_step = random.Random(seed).randint(DIGITS_EPOCH + 1, 19)  # after the first epoch's checkpoint
    resumed_from, _ = kill_and_resume([*DIGITS, _every(DIGITS_EPOCH)], tmp_path / "run", kill_step, monkeypatch)
    assert resumed_from == kill_step // DIGITS_EPOCH * DIGITS_EPOCH
    assert_same_run(digits_run, tmp_path / "run", steps=20, ema=True)


def test_digits_sigkill_then_resume_mid_epoch_is_bitwise_identical(digits_run, tmp_path, monkeypatch):
    """Checkpoints every 4 steps fall inside the 5-step epochs; the train loader's saved position
    (Lightning's stateful-dataloader protocol) resumes at the exact batch. The reference run
    checkpointed every 5 steps: checkpointing does not change training."""
    kill_step = random.Random(0).randint(5, 19)
    resumed_from, log = kill_and_resume([*DIGITS, _every(4)], tmp_path / "run", kill_step, monkeypatch)
    assert resumed_from == kill_step // 4 * 4 and resumed_from % DIGITS_EPOCH
    assert "dataloader is not resumable" not in log  # Lightning sees the loader as stateful
    assert_same_run(digits_run, tmp_path / "run", steps=20, ema=True)


def test_last_ckpt_holds_the_final_step_and_a_resume_from_it_trains_nothing(tmp_path, monkeypatch):
    """30 steps with a checkpoint every 20: Lightning's ModelCheckpoint left last.ckpt at step 20
    (it writes last.ckpt only next to interval saves). It must hold step 30 and the weights the
    module ends with (EMA on: the average in state_dict, the raw weights beside it); resuming
    the finished run with ckpt_path=last trains and writes nothing."""
    monkeypatch.syspath_prepend(HELPERS)
    logs, final = tmp_path / "logs", tmp_path / "final.pt"
    overrides = ["debug=fast", "trainer.max_steps=30", "+callbacks.ema._target_=fm_lightning.callbacks.EMA",
                 "+callbacks.ema.decay=0.9", f"paths.log_dir={logs}"]
    run_dir = logs / "train/runs/first"
    cfg = compose_config([*overrides, "+callbacks.final._target_=final.SaveFinalWeights", f"+callbacks.final.path={final}"],
                         run_dir)
    assert run(cfg)["global_step"] == 30
    last = run_dir / "checkpoints/last.ckpt"
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    ckpt, weights = torch.load(last, weights_only=True), torch.load(final, weights_only=True)
    assert ckpt["global_step"] == 30 and int(ckpt["averaging_state"]["n_averaged"]) == 30
    assert ckpt["state_dict"].keys() == weights.keys()
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in weights.items())  # the EMA weights
    assert any(not torch.equal(ckpt["current_model_state"][k], v) for k, v in weights.items())  # the raw ones

    # The fit-end evaluation is logged at step 29, beside the last batch (Lightning's step for it).
    with open(run_dir / "csv/metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("val/w2")][-1] == 29
    files = {name: (run_dir / name).read_text() for name in ("metrics.json", "csv/metrics.csv")}
    before = last.read_bytes()
    metrics = run(compose_config([*overrides, "ckpt_path=last"]))
    assert metrics["global_step"] == 30 and last.read_bytes() == before
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    assert {name: (run_dir / name).read_text() for name in files} == files and "val/w2" in metrics


def test_resume_continues_in_the_run_directory_and_keeps_its_earlier_config(tmp_path):
    """fm-train ckpt_path=last makes no new run folder, and neither it nor the README's
    explicit form (ckpt_path=<run>/checkpoints/last.ckpt hydra.run.dir=<run>) overwrites the
    .hydra/ files of the sessions before."""
    logs = tmp_path / "logs"
    common = ["debug=fast", f"paths.log_dir={logs}", "model.lr_scheduler.warmup_steps=1"]
    assert run_cli("fm-train", *common, "trainer.max_steps=20", cwd=tmp_path).returncode == 0
    (run_dir,) = (logs / "train/runs").iterdir()
    proc = run_cli("fm-train", *common, "trainer.max_steps=30", "ckpt_path=last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("fm-train", *common, "trainer.max_steps=40", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((logs / "train/runs").iterdir()) == [run_dir]
    steps = [OmegaConf.load(run_dir / sub / "config.yaml").trainer.max_steps
             for sub in (".hydra", ".hydra/resume-1", ".hydra/resume-2")]
    assert steps == [20, 30, 40]
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 40


class _Noisy(L.LightningModule):
    """Records what each training step draws from the global RNGs (torch, numpy, python);
    validation draws from all three as well."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.noise: list[tuple[float, float, float]] = []

    def training_step(self, batch, batch_idx):
        noise = torch.randn(1)
        self.noise.append((noise.item(), np.random.rand(), random.random()))
        return ((self.w - noise) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        torch.randn(3), np.random.rand(), random.random()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(range(4), batch_size=1)

    def val_dataloader(self):
        return DataLoader(range(2), batch_size=1)  # creating its iterator draws from the global RNG too


@pytest.mark.parametrize("with_callback", [True, False])
def test_validation_does_not_move_the_training_rng_streams(tmp_path, with_callback):
    """What makes a checkpoint written just before a validation resume exactly: with
    RNGStateCallback, training draws the same noise whether or not (and how often) it validates."""
    runs = []
    for val_every in (3, 5, None):
        L.seed_everything(0, verbose=False)
        model = _Noisy()
        trainer = L.Trainer(
            max_steps=12, val_check_interval=val_every or 1, check_val_every_n_epoch=None,
            limit_val_batches=2 if val_every else 0, num_sanity_val_steps=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[RNGStateCallback()] if with_callback else [],
        )
        trainer.fit(model)
        runs.append(model.noise)
    assert len(runs[0]) == 12
    assert (runs[0] == runs[1] == runs[2]) == with_callback


def test_a_resume_with_another_model_or_data_is_refused_naming_the_keys_and_the_run_overrides(tmp_path):
    """``fm-train ckpt_path=last`` composes the default config: resuming an n_to_moons run with it
    would train on with another source and activation. It is refused before training, with the
    run's own overrides to pass again."""
    run_dir = tmp_path / "run"
    common = ["debug=fast", "logger=none", "callbacks.samples=null"]
    run(compose_config([*common, "experiment=n_to_moons", "trainer.max_steps=10"], run_dir))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra/overrides.yaml").write_text("- experiment=n_to_moons\n- hydra.run.dir=elsewhere\n")
    last = run_dir / "checkpoints/last.ckpt"
    before = last.read_bytes()
    for overrides, keys in [
        ([], r"model.net.activation: 'elu' there, 'selu' here; model.source._target_: 'datamodules.toy.Gaussian' "
             r"there, 'datamodules.toy.EightGaussians' here\)"),
        (["experiment=n_to_moons", "data.target=scurve"], r"\(data.target._target_: 'datamodules.toy.Moons' there, "
                                                          r"'datamodules.toy.SCurve' here\)"),
    ]:
        cfg = compose_config([*common, *overrides, "trainer.max_steps=20", f"ckpt_path={last}"], run_dir)
        with pytest.raises(UserError, match=keys + r".* pass its overrides again \(experiment=n_to_moons, from "):
            run(cfg)
    assert last.read_bytes() == before
    # A checkpoint of an older version: an argument the code has added since, and no data record.
    older = torch.load(last, weights_only=True)
    del older["hyper_parameters"]["net"]["init_args"]["depth"], older["datamodule_hyper_parameters"]
    torch.save(older, last)
    cfg = compose_config([*common, "experiment=n_to_moons", "trainer.max_steps=20", f"ckpt_path={last}"], run_dir)
    assert run(cfg)["global_step"] == 20  # the run's own config resumes


def test_a_resume_on_other_images_is_refused(tmp_path):
    """Image data records what it is (dataset, size, channels, classes, split): a resume that
    would train on with other images is refused like one with another model."""
    run_dir = tmp_path / "run"
    common = ["experiment=digits", "debug=fast", "logger=none", "callbacks.samples=null"]
    run(compose_config([*common, "trainer.max_steps=6"], run_dir))
    last = run_dir / "checkpoints/last.ckpt"
    cfg = compose_config([*common, "data.val_fraction=0.2", "trainer.max_steps=10", f"ckpt_path={last}"], run_dir)
    with pytest.raises(UserError, match=r"\(data.val_fraction: 0.1 there, 0.2 here\)"):
        run(cfg)
    cfg = compose_config([*common, "data.batch_size=16", "trainer.max_steps=10", f"ckpt_path={last}"], run_dir)
    assert run(cfg)["global_step"] == 10  # how the same images are batched may change


def test_a_resume_knows_its_points_files_by_their_contents_wherever_they_are_now(tmp_path, monkeypatch, capsys):
    """Checkpoints record a fingerprint of each points file's points: a resume takes the run's
    points from wherever they are now (moved, or given by a relative path) and refuses other
    points at the recorded path; fm-sample refuses a recorded source whose file now holds other
    points, while --source-file still replaces it. Checkpoints without fingerprints still load."""
    from fm_lightning import sample
    from fm_lightning.module import load_checkpoint

    rng = np.random.default_rng(0)
    src, tgt = tmp_path / "src.csv", tmp_path / "tgt.npy"
    np.savetxt(src, rng.normal(size=(200, 2)), delimiter=",", header="x,y", comments="")
    np.save(tgt, rng.normal(size=(200, 2)).astype(np.float32) + 3)
    run_dir, last = tmp_path / "run", tmp_path / "run/checkpoints/last.ckpt"
    common = ["debug=fast", "logger=none", "callbacks.samples=null"]
    run(compose_config([*common, f"data.source={src}", f"data.target={tgt}", "trainer.max_steps=10"], run_dir))
    moved = tmp_path / "moved/src.csv"
    moved.parent.mkdir()
    src.rename(moved)
    monkeypatch.chdir(tmp_path)

    def resume(steps, *extra, source=str(moved), target="tgt.npy"):
        return run(compose_config([*common, f"data.source={source}", f"data.target={target}",
                                   f"trainer.max_steps={steps}", f"ckpt_path={last}", *extra], run_dir))

    assert resume(20)["global_step"] == 20
    np.save(tgt, rng.normal(size=(200, 2)).astype(np.float32) + 13)  # other points at the recorded path
    with pytest.raises(UserError, match=r"data.target.fingerprint: '200x2:[0-9a-f]{16}' there, '200x2:[0-9a-f]{16}' "
                                        r"here; another fingerprint means other points than the run trained on"):
        resume(30)
    np.savetxt(moved, rng.normal(size=(200, 2)) + 10, delimiter=",")
    assert sample.main([str(last), "--num-samples", "5", "--out", str(tmp_path / "a.npz")]) == 2
    assert f"points file {str(moved)!r} changed since training (fingerprint 200x2:" in capsys.readouterr().err
    assert sample.main([str(last), "--num-samples", "5", "--out", str(tmp_path / "b.npz"),
                        "--source-file", str(moved)]) == 0  # --source-file replaces the recorded source
    # A checkpoint written before fingerprints (and standard frames): its paths alone are compared, as before.
    older = torch.load(last, weights_only=True)
    for spec in (older["hyper_parameters"]["source"], older["datamodule_hyper_parameters"]["target"]):
        for key in ("fingerprint", "loc", "scale"):
            del spec["init_args"][key]
    torch.save(older, last)
    assert load_checkpoint(last).source.file == str(moved)
    assert resume(30, "data.standardize=false")["global_step"] == 30
