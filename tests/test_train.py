"""End-to-end fm-train / fm-sample runs on the real configs at tiny sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import compose_config, run_cli
from fm_lightning import sample
from fm_lightning.metrics import wasserstein2
from fm_lightning.module import load_checkpoint
from fm_lightning.train import UserError, run


def test_fm_train_cli_leaves_every_artefact_and_fm_sample_reads_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fm-train", "debug=fast", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["checkpoints/last.ckpt", "samples.png", "trajectories.png", "metrics.json", ".hydra/config.yaml"]:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/w2"] > 0 and metrics["val/nfe"] == 10 and metrics["global_step"] == 40

    out = tmp_path / "s.npz"
    proc = run_cli("fm-sample", str(run_dir / "checkpoints/last.ckpt"), "--num-samples", "33", "--out", str(out),
                   "--solver", "rk4", "--steps", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    z = np.load(out)
    assert z["samples"].shape == (33, 2) and np.isfinite(z["samples"]).all() and int(z["nfe"]) == 20


def test_fm_train_cli_keeps_a_finished_run_and_a_used_sweep_dir_untouched(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("fm-train", "debug=fast", "logger=none", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli("fm-train", "debug=fast", "logger=none", "flow=icfm", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("already holds checkpoints") == 1, proc.stderr[-3000:]
    # Hydra's .hydra/ files and train.log too: the refusal comes before Hydra writes them.
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    sweep = tmp_path / "sweep"
    (sweep / "0/checkpoints").mkdir(parents=True)
    (sweep / "0/checkpoints/last.ckpt").write_bytes(b"earlier")
    proc = run_cli("fm-train", "-m", "debug=fast", "logger=none", "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2 and "already holds runs with checkpoints" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.rglob("*")) == ["0", "checkpoints", "last.ckpt"]


def test_checkpoint_rebuilds_model_with_weights_only_and_no_config(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("data.source=gaussian", "data.target=scurve", "flow=fm")
    run(cfg)
    ckpt_path = tmp_path / "run/checkpoints/last.ckpt"
    raw = torch.load(ckpt_path, weights_only=True)  # must not raise
    assert raw["hyper_parameters"]["source"]["class_path"] == "datamodules.toy.Gaussian"
    model = load_checkpoint(ckpt_path)
    assert type(model.flow.path).__name__ == "LipmanOTPath"
    for k, v in raw["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v)
    x = model.sample(num_samples=7, solver="euler", steps=3, generator=torch.Generator().manual_seed(0)).x
    assert x.shape == (7, 2) and x.dtype == torch.float32
    # Lipman's path needs N(0, I) source samples, so fm-sample refuses other source points.
    np.save(tmp_path / "far.npy", np.full((10, 2), 100.0, dtype=np.float32))
    assert sample.main([str(ckpt_path), "--source-file", str(tmp_path / "far.npy"), "--out", str(tmp_path / "s")]) == 2
    assert "assumes a standard Gaussian source" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("flow", ["icfm", "otcfm", "sbcfm", "fm", "rf", "vp"])
def test_every_flow_trains_on_a_gaussian_source(tiny_cfg, flow):
    metrics = run(tiny_cfg(f"flow={flow}", "experiment=n_to_moons", "trainer.max_steps=20"))
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/w2"])


def test_short_training_beats_the_untrained_model(tmp_path):
    """A short OT-CFM run on 8gaussians -> moons gets a W2 clearly below the untrained model's."""
    cfg = compose_config(
        ["trainer.max_steps=600", "trainer.val_check_interval=300", "data.steps_per_epoch=300",
         "callbacks.samples.num_samples=1000", "data.val_size=512", "logger=none"],
        tmp_path / "run",
    )
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    untrained = instantiate(cfg.model)
    gen = torch.Generator().manual_seed(1)
    x0, target = dm.source.sample(1000, gen), dm.target.sample(1000, gen)
    w2_untrained = wasserstein2(untrained.sample(x0=x0).x, target)
    metrics = run(cfg)
    assert metrics["val/w2"] < 0.5 * w2_untrained, (metrics["val/w2"], w2_untrained)


def test_a_points_file_works_as_target_and_as_source(tiny_cfg, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(500, 3)) * [1.0, 2.0, 0.5] + [3.0, 0.0, -1.0]
    np.save(tmp_path / "mine.npy", pts.astype(np.float32))
    np.savetxt(tmp_path / "src.csv", rng.normal(size=(400, 3)), delimiter=",", header="a,b,c", comments="")
    monkeypatch.chdir(tmp_path)  # a relative source path is recorded absolute
    run(tiny_cfg("data.source=src.csv", f"data.target={tmp_path / 'mine.npy'}", "data.dim=3"))
    ckpt = str(tmp_path / "run/checkpoints/last.ckpt")
    assert load_checkpoint(ckpt).source.file == str(tmp_path / "src.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("fm-sample", ckpt, "--num-samples", "5", "--out", "a.npz", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert np.load(elsewhere / "a.npz")["samples"].shape == (5, 3)
    # With the recorded source file gone, --source-file stands in for it.
    (tmp_path / "src.csv").rename(tmp_path / "moved.csv")
    proc = run_cli("fm-sample", ckpt, "--num-samples", "5", "--out", "b.npz", cwd=elsewhere)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("fm-sample", ckpt, "--num-samples", "5", "--out", "b.npz", "--source-file", "../moved.csv",
                   cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert np.load(elsewhere / "b.npz")["samples"].shape == (5, 3)


def test_one_dimensional_points_train_and_plot(tiny_cfg, tmp_path):
    np.savetxt(tmp_path / "one.csv", np.random.default_rng(0).normal(size=(300, 1)) + 4.0)
    metrics = run(tiny_cfg("data.source=gaussian", f"data.target={tmp_path / 'one.csv'}", "data.dim=1"))
    assert metrics["val/w2"] < 4.0  # the untrained flow leaves the samples near N(0, 1), 4 away
    for name in ("samples.png", "trajectories.png"):
        assert (tmp_path / "run" / name).stat().st_size > 1000


@pytest.mark.parametrize("override", ["callbacks.samples.solver=nope", "callbacks.samples.steps=0",
                                      "callbacks.samples.atol=0"])
def test_bad_sampling_settings_are_refused_before_training(tiny_cfg, tmp_path, override):
    solver = [] if "solver" in override else ["callbacks.samples.solver=" + ("rk4" if "steps" in override else "dopri5")]
    with pytest.raises(ValueError, match="unknown solver|needs steps >= 1|needs atol > 0"):
        run(tiny_cfg(override, *solver))
    assert not (tmp_path / "run/checkpoints").exists()  # no step was trained


@pytest.mark.parametrize("override, key", [("model.net.width=abc", "model.net"), ("data.batch_size=abc", "data")])
def test_a_word_where_a_number_belongs_names_the_config_key(tiny_cfg, override, key):
    with pytest.raises(UserError, match=rf"^{key}: .*check the types of the values set under {key}"):
        run(tiny_cfg(override))


def test_a_second_run_never_overwrites_an_earlier_run(tiny_cfg, tmp_path):
    run(tiny_cfg())
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    before = ckpt.read_bytes()
    with pytest.raises(UserError, match="already holds checkpoints"):
        run(tiny_cfg())
    assert ckpt.read_bytes() == before


def test_a_run_shorter_than_the_validation_interval_ends_with_one_validation(tiny_cfg, tmp_path, monkeypatch):
    """10 steps, validation every 20: a validation after the last step gives metrics.json and
    metrics.csv their val/loss, and its sampling is the fit end's (not done twice)."""
    from fm_lightning.callbacks import SampleCallback

    steps, evaluate = [], SampleCallback.evaluate
    monkeypatch.setattr(SampleCallback, "evaluate", lambda self, trainer, module: steps.append(trainer.global_step)
                        or evaluate(self, trainer, module))
    run(tiny_cfg("trainer.max_steps=10"))
    assert steps == [10]
    assert {"val/loss", "val/w2"} <= json.loads((tmp_path / "run/metrics.json").read_text()).keys()
    with open(tmp_path / "run/csv/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert [(int(r["step"]), bool(r["val/w2"])) for r in rows] == [(9, True)]


def test_validation_logs_the_loss_in_ten_bins_of_t(tmp_path):
    import lightning as L
    from hydra.utils import instantiate

    cfg = compose_config(["debug=fast"], tmp_path)
    model, dm = instantiate(cfg.model), instantiate(cfg.data)
    metrics = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(model, dm)[0]
    bins = {k: v for k, v in metrics.items() if k.startswith("val_loss_by_t/")}
    assert sorted(bins) == [f"val_loss_by_t/t{i / 10:.2f}-{(i + 1) / 10:.2f}" for i in range(10)]
    # val/loss is the count-weighted mean of the bins, so it lies between them.
    assert min(bins.values()) <= metrics["val/loss"] <= max(bins.values())


@pytest.mark.slow
def test_compiled_training_runs_and_checkpoints_load_uncompiled(tiny_cfg, tmp_path):
    metrics = run(tiny_cfg("model.compile=true", "trainer.max_steps=10"))
    assert np.isfinite(metrics["train/loss"])
    model = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert model.hparams.compile and not any("_orig_mod" in k for k in model.state_dict())


@pytest.mark.parametrize(
    ("overrides", "env", "cores", "expected"),
    [
        ([], None, 2, 1),  # the default loader worker takes one of two cores
        (["data.num_workers=0"], None, 2, 2),
        (["data.num_workers=0", "trainer=ddp_cpu"], None, 4, 2),  # two processes share four cores
        ([], None, 1, 1),  # never below one
        (["threads=3"], "1", 2, 3),  # explicit setting wins
        ([], "1", 8, None),  # OMP_NUM_THREADS is respected: untouched
    ],
)
def test_training_threads_leave_the_loader_workers_their_cores(monkeypatch, overrides, env, cores, expected):
    from fm_lightning.train import _set_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    before = torch.get_num_threads()
    try:
        _set_threads(compose_config(overrides))
        assert torch.get_num_threads() == (before if expected is None else expected)
    finally:
        torch.set_num_threads(before)


def test_callbacks_none_writes_no_checkpoints_and_a_second_run_into_its_directory_is_refused(tiny_cfg, tmp_path):
    run(tiny_cfg("callbacks=none", "trainer.max_steps=10"))
    assert not list(tmp_path.rglob("*.ckpt"))  # Lightning's default ModelCheckpoint is off too
    before = (tmp_path / "run/csv/metrics.csv").read_text()
    with pytest.raises(UserError, match="already holds the outputs of an earlier run .*metrics.json"):
        run(tiny_cfg("callbacks=none", "trainer.max_steps=10"))
    assert (tmp_path / "run/csv/metrics.csv").read_text() == before


def test_a_callback_entry_without_target_is_refused_naming_it(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match=r"^callbacks.fid has no _target_.*callbacks.fid=null"):
        run(tiny_cfg("+callbacks.fid.num_samples=100"))
    assert not (tmp_path / "run/checkpoints").exists()


def test_an_entry_that_is_no_mapping_is_refused_naming_it(tiny_cfg):
    with pytest.raises(UserError, match=r"^callbacks.x has no _target_"):
        run(tiny_cfg("+callbacks.x=3"))


def test_a_null_callback_entry_turns_it_off(tiny_cfg, tmp_path):
    run(tiny_cfg("callbacks.samples=null", "trainer.max_steps=10"))
    assert not (tmp_path / "run/samples.png").exists() and (tmp_path / "run/checkpoints/last.ckpt").is_file()


def test_a_seed_that_is_not_a_number_is_named(tiny_cfg):
    with pytest.raises(UserError, match=r"^seed must be a whole number, got 'abc'"):
        run(tiny_cfg("seed=abc"))


def test_a_seed_from_an_environment_variable_is_decoded(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SEED", "7")
    with pytest.raises(UserError, match=r"got '7'.*decode them, seed='\$\{oc.decode:\$\{oc.env:SEED\}\}'"):
        run(tiny_cfg("seed=${oc.env:SEED}"))
    metrics = run(tiny_cfg("seed='${oc.decode:${oc.env:SEED}}'", "callbacks=none"))
    assert metrics["global_step"] > 0


def test_a_failed_download_says_to_place_the_files_under_root(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    from datamodules.images import ImageDataModule

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n<urlopen error>\n")

    monkeypatch.setattr(tvd, "MNIST", offline)
    dm = ImageDataModule(dataset="mnist", root=str(tmp_path), download=True, image_size=28, channels=1)
    with pytest.raises(FileNotFoundError, match="downloading mnist into .* failed .*place the files there yourself") as err:
        dm.prepare_data()
    assert "\n" not in str(err.value)  # one line


def _tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_hp_metric_follows_the_optimized_metric_and_a_resume_logs_each_step_once(tiny_cfg, tmp_path):
    """The HParams tab's hp_metric is the last val/w2 (not Lightning's placeholder -1); a run
    resumed from step 20 after logging to step 40 hides the first session's steps 20 and later."""
    overrides = ["logger=tensorboard", "callbacks.model_checkpoint.save_top_k=-1", "callbacks.samples.solver=euler"]
    metrics = run(tiny_cfg(*overrides))
    scalars = _tensorboard_scalars(tmp_path / "run")
    assert scalars["hp_metric"][-1][1] == pytest.approx(metrics["val/w2"])
    assert [step for step, _ in scalars["hp_metric"]] == [0] + [step for step, _ in scalars["val/w2"]]
    first = scalars["train/loss"]
    step_20 = next((tmp_path / "run/checkpoints").glob("*step=20.ckpt"))
    run(tiny_cfg(*overrides, f"ckpt_path='{step_20}'"))
    scalars = _tensorboard_scalars(tmp_path / "run")
    steps = [step for step, _ in scalars["train/loss"]]
    assert steps == [step for step, _ in first] and len(set(steps)) == len(steps)
    final = scalars["hp_metric"][-1][1]
    run(tiny_cfg(*overrides, f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}"))  # nothing to train
    assert _tensorboard_scalars(tmp_path / "run")["hp_metric"][-1][1] == final != -1  # not Lightning's placeholder


def test_tensorboard_hp_metric_key_is_checked_and_a_key_never_logged_is_reported(tmp_path, caplog):
    from fm_lightning.loggers import TensorBoardLogger

    with pytest.raises(ValueError, match=r"hp_metric_key must be a metric name such as 'val/w2' \(or null\), got 5"):
        TensorBoardLogger(str(tmp_path), hp_metric_key=5)
    logger = TensorBoardLogger(str(tmp_path), hp_metric_key="val/fid")
    logger.log_metrics({"val/loss": 1.0}, step=0)
    logger.finalize("success")
    assert "never logged 'val/fid', so TensorBoard's hp_metric stays -1; set optimized_metric" in caplog.text
