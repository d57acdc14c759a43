"""Reflow: pair generation, the paired data source, the two-stage chain, and its effect."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import compose_config, run_cli
from datamodules.toy import EightGaussians, Gaussian, ToyDataModule, distribution_record, make_distribution
from fm_lightning.flow.likelihood import path_energy
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.metrics import wasserstein2
from fm_lightning.module import FlowMatchingModule, load_checkpoint
from fm_lightning.nets import MLP
from fm_lightning.reflow import ReflowChain, generate_pairs, main, save_pairs
from fm_lightning.train import run


def _train(model, draw, steps, seed):
    """A bare CFM loop (the module's objective and net), enough for a tiny 2-D task."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in range(steps):
        x0, x1 = draw(i)
        loss = model.flow(model, x0, x1).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _rectified_flow():
    torch.manual_seed(0)
    return FlowMatchingModule(MLP(2, 64, 2), CFMObjective(ICFMPath(0.0)), Gaussian(2))


def test_reflow_on_a_tiny_task_reduces_path_energy_and_one_step_error():
    """1-RF on N(0, I) -> 8 Gaussians crosses paths; 2-RF, trained on 1-RF's own (x0, ODE(x0))
    pairs, has straighter paths: lower path energy and a far better single Euler step."""
    target = EightGaussians(radius=3.0, std=0.3)
    g = torch.Generator().manual_seed(0)
    rf1 = _train(_rectified_flow(), lambda i: (torch.randn(256, 2, generator=g), target.sample(256, g)), 300, 0)
    x0, x1, nfe = generate_pairs(rf1, 3000, batch_size=1000, solver="rk4", steps=10)
    assert x0.shape == x1.shape == (3000, 2) and nfe == 40
    rf2 = _train(_rectified_flow(), lambda i: (lambda j: (x0[j], x1[j]))(torch.randint(0, 3000, (256,), generator=g)),
                 300, 1)
    z = torch.randn(600, 2, generator=torch.Generator().manual_seed(5))
    ref = target.sample(600, torch.Generator().manual_seed(6))
    pe1, pe2 = (path_energy(m.net, z, "rk4", steps=20).mean for m in (rf1, rf2))
    w1, w2 = (wasserstein2(m.sample(x0=z, solver="euler", steps=1).x, ref) for m in (rf1, rf2))
    assert pe2 < 0.85 * pe1, (pe1, pe2)
    assert w2 < 0.5 * w1, (w1, w2)


def _pairs_file(path, n=64, dim=2, shift=0):
    x0 = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    np.savez(path, x0=x0, x1=(2 * x0 + 1)[:, : dim - shift] if shift else 2 * x0 + 1)
    return str(path)


def test_paired_data_keeps_every_pair_together(tmp_path):
    dm = ToyDataModule("gaussian", "moons", batch_size=16, steps_per_epoch=3, val_size=10,
                       pairs=_pairs_file(tmp_path / "p.npz"))
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
    assert len(batches) == 4
    for b in batches:
        torch.testing.assert_close(b["x1"], 2 * b["x0"] + 1)
    assert isinstance(dm.target, type(ToyDataModule().target))  # the W2 reference is still the target


@pytest.mark.parametrize(("kind", "message"), [
    ("dim", "are 3-dimensional but the model and data are 2-dimensional"),
    ("ragged", "must be x0 and x1 of one shape"),
    ("keys", "must hold arrays 'x0' and 'x1'"),
    ("missing", "does not exist"),
    ("npy", "is not a valid .npz file: it holds a single .npy array; give an .npz with arrays x0 and x1"),
])
def test_bad_pairs_files_get_one_clear_error(tmp_path, kind, message):
    path = tmp_path / ("p.npy" if kind == "npy" else "p.npz")
    if kind == "npy":
        np.save(path, np.zeros((4, 2)))
    elif kind == "dim":
        _pairs_file(path, dim=3)
    elif kind == "ragged":
        _pairs_file(path, dim=3, shift=1)
    elif kind == "keys":
        np.savez(path, a=np.zeros((4, 2)))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ToyDataModule("gaussian", "moons", pairs=str(path))


def test_pairs_cli_and_save_pairs(tmp_path, capsys):
    with pytest.raises(ValueError, match="one shape"):
        save_pairs(tmp_path / "x.npz", torch.zeros(3, 2), torch.zeros(3, 3))
    assert main([str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "p.npz")]) == 2
    (tmp_path / "kept.npz").write_bytes(b"earlier pairs")
    for out, message in (("kept.npz", "pass --overwrite"), (".", "is a folder; give a file path")):
        assert main([str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "kept.npz").read_bytes() == b"earlier pairs"


def test_pairs_must_be_trained_with_the_source_and_target_they_connect(tmp_path):
    x0 = torch.randn(20, 2)
    records = {role: distribution_record(make_distribution(spec, dim=2))
               for role, spec in (("source", "gaussian"), ("target", {"name": "moons", "noise": 0.1}))}
    path = save_pairs(tmp_path / "p.npz", x0, 2 * x0, **records)
    assert ToyDataModule("gaussian", {"name": "moons", "noise": 0.1}, pairs=path).pairs == path
    with pytest.raises(ValueError, match="drawn for data.source=gaussian but data.source is EightGaussians"):
        ToyDataModule("8gaussians", {"name": "moons", "noise": 0.1}, pairs=path)
    with pytest.raises(ValueError, match=re.escape("drawn for 'data.target={name:moons,noise:0.1}' but data.target "
                                                   "is Moons(noise=0.2, ")):
        ToyDataModule("gaussian", "moons", pairs=path)
    old = save_pairs(tmp_path / "old.npz", x0, 2 * x0, source=records["source"])  # written before targets were
    assert ToyDataModule("gaussian", "8gaussians", pairs=old).pairs == old


def test_pairs_know_their_points_file_target_by_its_contents(tmp_path):
    """Pairs record the target's fingerprint: the same points are taken from any path (a copy,
    or the file moved), other points are refused, also at the recorded path."""
    points = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", points)
    x0 = torch.randn(20, 2)
    path = save_pairs(tmp_path / "p.npz", x0, 2 * x0,
                      target=distribution_record(ToyDataModule("gaussian", str(tmp_path / "a.npy")).target))
    np.save(tmp_path / "b.npy", points)
    assert ToyDataModule("gaussian", str(tmp_path / "b.npy"), pairs=path).pairs == path
    np.save(tmp_path / "other.npy", points + 1)
    with pytest.raises(ValueError, match="drawn for data.target=.*a.npy"):
        ToyDataModule("gaussian", str(tmp_path / "other.npy"), pairs=path)
    np.save(tmp_path / "a.npy", points + 1)
    with pytest.raises(ValueError, match="points file .*a.npy' has changed since the pairs in .*p.npz' were drawn"):
        ToyDataModule("gaussian", str(tmp_path / "a.npy"), pairs=path)
    (tmp_path / "a.npy").unlink()
    with pytest.raises(ValueError, match="drawn for data.target=.*a.npy"):  # moved, but other points
        ToyDataModule("gaussian", str(tmp_path / "other.npy"), pairs=path)


def test_pairs_recorded_before_fingerprints_know_their_points_by_path(tmp_path):
    """(Such records are from before standard frames too: their points were drawn as the files hold them.)"""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    record = json.loads(distribution_record(make_distribution(str(tmp_path / "a.npy"), dim=2)))
    del record["init_args"]["fingerprint"]
    x0 = torch.randn(20, 2)
    path = save_pairs(tmp_path / "p.npz", x0, 2 * x0, target=json.dumps(record))
    (tmp_path / "b.npy").write_bytes((tmp_path / "a.npy").read_bytes())
    assert ToyDataModule("gaussian", str(tmp_path / "a.npy"), pairs=path, standardize=False).pairs == path
    with pytest.raises(ValueError, match="drawn for data.target=.*a.npy"):  # the recorded file still exists
        ToyDataModule("gaussian", str(tmp_path / "b.npy"), pairs=path, standardize=False)
    (tmp_path / "a.npy").unlink()
    assert ToyDataModule("gaussian", str(tmp_path / "b.npy"), pairs=path, standardize=False).pairs == path


def test_pairs_are_not_re_paired_by_an_ot_flow(tmp_path):
    from fm_lightning.flow.couplings import ExactOTCoupling
    from fm_lightning.flow.objective import CFMObjective
    from fm_lightning.flow.paths import ICFMPath

    dm = ToyDataModule("gaussian", "moons", batch_size=16, pairs=_pairs_file(tmp_path / "p.npz"))
    dm.objective = CFMObjective(ICFMPath(0.0), ExactOTCoupling())
    with pytest.raises(ValueError, match="re-pairs them .ExactOTCoupling.; use flow=icfm"):
        dm.train_dataloader()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A finished stage-1 run of ``experiment=toy_reflow`` (N(0, I) -> 8 Gaussians), and its config."""
    run_dir = tmp_path_factory.mktemp("reflow") / "run"
    cfg = compose_config(["experiment=toy_reflow", "debug=fast", "logger=none", "trainer.max_steps=20",
                          "callbacks.samples.num_samples=64"], run_dir)
    run(cfg)
    return cfg, run_dir


def test_reflow_cli_records_source_and_target_and_takes_a_moved_source_file(stage1, tmp_path, capsys):
    """The pairs name their source and target, and the printed command trains on exactly those; a
    checkpoint whose points source has moved is refused with the flag to use, and takes it."""
    ckpt = torch.load(stage1[1] / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["source"] = {"class_path": "datamodules.toy.Points",
                                          "init_args": {"file": str(tmp_path / "moved_since_training.npy")}}
    torch.save(ckpt, tmp_path / "moved.ckpt")
    np.save(tmp_path / "x0.npy", np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    args = [str(tmp_path / "moved.ckpt"), "--num-pairs", "20", "--solver", "euler", "--steps", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "p.npz")]) == 2
    assert "does not exist (moved since training?); pass --source-file" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "p.npz"), "--source-file", str(tmp_path / "x0.npy")]) == 0
    hint = capsys.readouterr().out
    # the recorded source (from before standard frames) has none, so --source-file's points are drawn as they are
    assert (f"flow=icfm data.source={tmp_path / 'x0.npy'} data.target=8gaussians data.dim=2 data.standardize=false"
            in hint)
    pairs = str(tmp_path / "p.npz")
    assert ToyDataModule(str(tmp_path / "x0.npy"), "8gaussians", pairs=pairs, standardize=False).pairs == pairs
    with pytest.raises(ValueError, match="drawn for data.target=8gaussians but data.target is Moons"):
        ToyDataModule(str(tmp_path / "x0.npy"), "moons", pairs=pairs, standardize=False)
    with pytest.raises(ValueError, match="drawn in another standard frame of the source points than this run's; "
                                         "set data.standardize=false, as the run that drew them"):
        ToyDataModule(str(tmp_path / "x0.npy"), "8gaussians", pairs=pairs)


def test_reflow_chain_runs_stage_two_on_the_pairs(stage1):
    cfg, run_dir = stage1
    chain = ReflowChain(num_pairs=300, batch_size=150, solver="euler", steps=5, eval_samples=100)
    rows = chain.run(cfg, run_dir)
    out = run_dir / "reflow"
    with np.load(out / "pairs.npz") as z:
        assert z["x0"].shape == z["x1"].shape == (300, 2) and float(z["nfe"]) == 5
        assert str(z["target"]) == distribution_record(EightGaussians())
    stage2 = load_checkpoint(out / "stage2" / "checkpoints" / "last.ckpt")
    assert type(stage2.flow.coupling).__name__ == "IndependentCoupling" and stage2.flow.path.sigma == 0
    assert [r["model"] for r in rows] == ["1-RF", "2-RF"]
    assert json.loads((out / "reflow.json").read_text()) == rows
    assert "w2_euler1" in (out / "reflow.md").read_text()
    # Stage 2 trained on the pairs file: the saved config says so.
    assert str(out / "pairs.npz") in (out / "stage2_config.yaml").read_text()
    # A second reflow job in the same run directory (a resume in place, say) is refused before
    # its stage 1 starts, so the first one's files are kept.
    from types import SimpleNamespace

    with pytest.raises(SystemExit) as exit_:
        chain.on_run_start(SimpleNamespace(hydra=SimpleNamespace(run=SimpleNamespace(dir=str(run_dir)))))
    assert exit_.value.code == 2


def test_a_failing_reflow_stage_exits_non_zero(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from hydra.core.utils import JobStatus

    chain = ReflowChain()
    done = SimpleNamespace(status=JobStatus.COMPLETED, cfg=None)
    config = SimpleNamespace(hydra=SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path))))
    for error, code in ((ValueError("bad pairs"), 2), (RuntimeError("out of memory"), 1)):
        def fail(*args, error=error):
            raise error
        monkeypatch.setattr(chain, "run", fail)
        with pytest.raises(SystemExit) as exit_:
            chain.on_job_end(config, done)
        assert exit_.value.code == code


@pytest.mark.slow
def test_fm_train_experiment_toy_reflow_chains_both_stages(tmp_path):
    proc = run_cli("fm-train", "experiment=toy_reflow", "debug=fast", "logger=none", "trainer.max_steps=20",
                   "hydra.callbacks.reflow.num_pairs=200", "hydra.callbacks.reflow.eval_samples=100",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "run/reflow/reflow.json").read_text())
    assert [r["model"] for r in rows] == ["1-RF", "2-RF"]
    assert (tmp_path / "run/reflow/stage2/checkpoints/last.ckpt").is_file()
