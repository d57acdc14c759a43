"""Distributed semantics on the CPU: ddp_cpu runs, global batch, per-rank noise, gradients, bf16."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import run_cli
from datamodules.toy import ToyDataModule
from fm_lightning.distributed import check_devices, per_device_batch_size, seed_rank
from fm_lightning.flow.couplings import IndependentCoupling
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.module import load_checkpoint
from fm_lightning.nets import MLP
from fm_lightning.train import run


def test_fm_train_ddp_cpu_leaves_one_run_directory_with_one_checkpoint(tmp_path):
    """Also with OT on the gathered global batch, whose validation batches of 64 leave the
    ranks' last batches of different sizes (val_size=300), which once crashed gloo's all_gather."""
    runs = tmp_path / "runs"
    proc = run_cli("fm-train", "trainer=ddp_cpu", "debug=fast", f"paths.log_dir={runs}",
                   "model.flow.coupling.global_batch=true", "trainer.limit_val_batches=1.0", "data.val_size=300",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((runs / "train/runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert [p.name for p in run_dir.rglob("*.ckpt")] == ["last.ckpt"]
    for artefact in ["samples.png", "trajectories.png", "metrics.json", "csv/metrics.csv"]:
        assert len(list(run_dir.glob(artefact))) == 1, artefact
    assert len(list(run_dir.rglob("metrics.csv"))) == 1 and len(list(run_dir.rglob(".hydra"))) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 40 and "val/loss" in metrics


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_raises_ends_the_whole_job_promptly_with_an_error(tmp_path, rank, monkeypatch):
    helpers = os.path.join(os.path.dirname(__file__), "helpers")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([helpers, os.environ.get("PYTHONPATH", "")]))
    proc = run_cli("fm-train", "trainer=ddp_cpu", "debug=fast", "+callbacks.crash._target_=crash.CrashOnRank",
                   f"+callbacks.crash.rank={rank}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=180)
    assert proc.returncode != 0
    assert f"injected failure on rank {rank}" in proc.stderr


@pytest.mark.parametrize(("global_batch", "world", "accum", "per_device"), [(256, 1, 1, 256), (256, 2, 1, 128),
                                                                            (256, 2, 4, 32), (96, 3, 2, 16)])
def test_global_batch_arithmetic(global_batch, world, accum, per_device):
    assert per_device_batch_size(global_batch, world, accum) == per_device
    assert per_device * world * accum == global_batch


@pytest.mark.parametrize(("global_batch", "world", "accum", "message"), [
    (100, 3, 1, "does not divide across 3 device"), (256, 2, 3, "multiple of 6"), (0, 1, 1, "must be >= 1")])
def test_global_batch_errors(global_batch, world, accum, message):
    with pytest.raises(ValueError, match=message):
        per_device_batch_size(global_batch, world, accum)


def test_toy_datamodule_derives_the_per_device_batch_from_the_trainer():
    class FakeTrainer:
        global_rank, world_size, accumulate_grad_batches = 1, 2, 2

    dm = ToyDataModule(batch_size=64, steps_per_epoch=2, val_size=8)
    dm.trainer = FakeTrainer()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x1"].shape == (16, 2)
    dm = ToyDataModule(batch_size=66, steps_per_epoch=2, val_size=8)
    dm.trainer = FakeTrainer()
    with pytest.raises(ValueError, match="does not divide"):
        dm.setup("fit")


def test_device_checks_refuse_what_this_machine_cannot_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA GPUs but none is visible"):
        check_devices("gpu", -1, "bf16-mixed")
    with pytest.raises(ValueError, match="not supported on the CPU"):
        check_devices("cpu", 1, "16-mixed")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="only 2 GPU"):
        check_devices("gpu", 4, "32")
    check_devices("cpu", 2, "bf16-mixed")  # fine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PL_GLOBAL_SEED="7")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = MLP(dim=2, width=16, depth=2)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        objective = CFMObjective(ICFMPath(sigma=0.1), IndependentCoupling())
        data = torch.Generator().manual_seed(123)
        x0, x1 = torch.randn(8, 2, generator=data), torch.randn(8, 2, generator=data) + 3
        shard = slice(rank * 4, (rank + 1) * 4)
        loss = objective(ddp, x0[shard], x1[shard], generator=torch.Generator().manual_seed(1000 + rank)).loss
        loss.backward()
        torch.save({n: p.grad for n, p in net.named_parameters()}, os.path.join(out_dir, f"grad{rank}.pt"))
        seed_rank(rank)
        torch.save(torch.randn(5), os.path.join(out_dir, f"noise{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_equals_single_process_gradient_and_ranks_draw_different_noise(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = MLP(dim=2, width=16, depth=2)
    objective = CFMObjective(ICFMPath(sigma=0.1), IndependentCoupling())
    data = torch.Generator().manual_seed(123)
    x0, x1 = torch.randn(8, 2, generator=data), torch.randn(8, 2, generator=data) + 3
    # The same global batch and the same noise in one process: the mean loss over both shards.
    losses = [objective(net, x0[r * 4:(r + 1) * 4], x1[r * 4:(r + 1) * 4],
                        generator=torch.Generator().manual_seed(1000 + r)).per_sample for r in range(2)]
    torch.cat(losses).mean().backward()
    for rank in range(2):
        ddp_grads = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        for name, p in net.named_parameters():
            torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6)
    noise = [torch.load(tmp_path / f"noise{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.allclose(noise[0], noise[1])
    os.environ["PL_GLOBAL_SEED"] = "7"  # reproducible: the same seed and rank give the same noise
    seed_rank(1)
    torch.testing.assert_close(torch.randn(5), noise[1])


def test_bf16_mixed_on_cpu_trains_with_a_finite_loss_and_samples_in_fp32(tiny_cfg, tmp_path):
    metrics = run(tiny_cfg("trainer.precision=bf16-mixed"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert model.sample(num_samples=8, solver="euler", steps=4).x.dtype == torch.float32


def _gathered_ot_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fm_lightning.flow.couplings import ExactOTCoupling

        for case, n in (("equal", 3), ("unequal", 5 if rank == 0 else 3)):  # unequal: a last validation batch
            gen = torch.Generator().manual_seed(rank)
            x0, x1 = torch.randn(n, 2, generator=gen), torch.randn(n, 2, generator=gen) * 3
            cond = torch.arange(n) % 2
            p0, p1, _ = ExactOTCoupling(global_batch=True)(x0, x1)
            c0, c1, cc = ExactOTCoupling(global_batch=True)(x0, x1, cond)
            torch.save({"x0": x0, "x1": x1, "cond": cond, "p0": p0, "p1": p1, "c0": c0, "c1": c1, "cc": cc},
                       os.path.join(out_dir, f"{case}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_ot_pairs_are_the_global_optimum_and_each_rank_keeps_its_rows(tmp_path):
    """Rank batches of 3 and 3 rows, and of 5 and 3: the gathered assignment is a permutation of
    all targets and the optimum of the global batch (not two local optima), within classes when
    labelled, and each rank gets back exactly its own source rows."""
    from scipy.optimize import linear_sum_assignment

    mp.spawn(_gathered_ot_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for case, total in (("equal", 6), ("unequal", 8)):
        parts = [torch.load(tmp_path / f"{case}{r}.pt", weights_only=True) for r in range(2)]
        g0, g1 = torch.cat([p["x0"] for p in parts]), torch.cat([p["x1"] for p in parts])
        gc = torch.cat([p["cond"] for p in parts])
        for part in parts:  # its own rows, in order, and labels that follow their targets
            assert torch.equal(part["p0"], part["x0"]) and torch.equal(part["c0"], part["x0"])
            assert torch.equal(part["cc"], part["cond"])
        cost = torch.cdist(g0.double(), g1.double()).square().numpy()
        tgt = [int((g1 == row).all(1).nonzero()) for row in torch.cat([p["p1"] for p in parts])]
        assert sorted(tgt) == list(range(total))
        _, best = linear_sum_assignment(cost)
        assert abs(cost[range(total), tgt].sum() - cost[range(total), best].sum()) < 1e-9
        tgt = [int((g1 == row).all(1).nonzero()) for row in torch.cat([p["c1"] for p in parts])]
        assert sorted(tgt) == list(range(total)) and torch.equal(gc[tgt], gc)  # within classes


HELPERS = os.path.join(os.path.dirname(__file__), "helpers")


def test_resume_under_ddp_gives_each_rank_its_own_rng_streams_back(tmp_path):
    """Two gloo processes: a run resumed from its step-3 checkpoint draws, on each rank, what that
    rank drew in the uninterrupted run (bitwise), and the two ranks draw different numbers.
    Before, every rank resumed rank zero's streams (Lightning keeps callback state from rank 0)."""
    script = os.path.join(HELPERS, "rng_ddp.py")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run_cli(sys.executable, script, str(whole), "6", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = whole / "ckpt/epoch=0-step=3.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]["RNGStateCallback"]
    assert len(state["ranks"]) == 2 and not torch.equal(state["ranks"][0]["torch"], state["ranks"][1]["torch"])
    assert torch.equal(state["torch"], state["ranks"][0]["torch"])  # top level: rank zero's, as before
    proc = run_cli(sys.executable, script, str(resumed), "6", str(ckpt), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reseeded" not in proc.stderr
    drawn = {(run, r): torch.load(run / f"draws-{r}.pt", weights_only=True) for run in (whole, resumed) for r in (0, 1)}
    assert sorted(drawn[whole, 0]) == list(range(6)) and sorted(drawn[resumed, 0]) == [3, 4, 5]
    for step in (3, 4, 5):
        for rank in (0, 1):
            assert torch.equal(drawn[resumed, rank][step], drawn[whole, rank][step]), (step, rank)
        assert not torch.isclose(drawn[resumed, 0][step], drawn[resumed, 1][step]).any(), step


def _rng_gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    from fm_lightning.reliability import RNGStateCallback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        torch.manual_seed(rank)
        cb = RNGStateCallback()
        cb.setup(SimpleNamespace(world_size=world), None, "fit")
        if rank == 1:  # an exception on rank 1 alone: a checkpoint dumped there must not wait for rank 0
            cb.on_exception(None, None, RuntimeError("boom"))
            alone = cb.state_dict()
            assert alone["ranks"][0] is None and torch.equal(alone["ranks"][1]["torch"], torch.get_rng_state())
            cb.setup(SimpleNamespace(world_size=world), None, "fit")  # a new fit
        dist.barrier()
        torch.save(cb.state_dict(), os.path.join(out_dir, f"state{rank}.pt"))  # both ranks: gathered
    finally:
        dist.destroy_process_group()


def test_rng_state_is_gathered_from_every_rank_but_not_on_an_exception_path(tmp_path):
    mp.spawn(_rng_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in range(2)]
    for rank in range(2):
        torch.manual_seed(rank)
        for state in states:
            assert torch.equal(state["ranks"][rank]["torch"], torch.get_rng_state())


def test_rng_state_from_another_world_size_reseeds_each_rank_with_a_warning(monkeypatch):
    from types import SimpleNamespace

    from fm_lightning.reliability import RNGStateCallback

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    cb = RNGStateCallback()
    torch.manual_seed(123)
    single = cb.state_dict()  # no process group: the single-process format, unchanged
    assert "ranks" not in single
    two_ranks = {**single, "ranks": [single, single]}
    for state, world, rank in [(two_ranks, 1, 0), (single, 2, 1), (two_ranks, 3, 2)]:
        cb.load_state_dict(state)
        with pytest.warns(UserWarning, match=f"this run has {world}; each rank is reseeded"):
            cb.on_train_batch_start(SimpleNamespace(world_size=world, global_rank=rank), None, None, 0)
        drawn = torch.rand(3)
        seed_rank(rank)
        assert torch.equal(drawn, torch.rand(3))
    cb.load_state_dict(single)  # single process: restored exactly, as before
    cb.on_train_batch_start(SimpleNamespace(world_size=1, global_rank=0), None, None, 0)
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))


@pytest.mark.parametrize("nvml_loads", [True, False])
def test_nvml_check_dropped_only_where_nvml_is_missing(monkeypatch, nvml_loads):
    """Without the NVML library torch's NVML route only adds a failing dlopen per optimizer
    step, so it is turned off; with NVML (a GPU driver) Lightning's fork-safe setting stays."""
    import ctypes

    from fm_lightning.distributed import skip_nvml_check_without_nvml

    def cdll(name):
        assert name == "libnvidia-ml.so.1"
        if not nvml_loads:
            raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    skip_nvml_check_without_nvml()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == ("1" if nvml_loads else "0")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "0")  # a user's own choice is kept
    monkeypatch.setattr(ctypes, "CDLL", lambda name: None)
    skip_nvml_check_without_nvml()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"


def test_several_nodes_without_a_cluster_launcher_are_refused_before_training(tmp_path, monkeypatch):
    """Not under SLURM or torchrun, num_nodes=2 would wait forever at "Initializing distributed"."""
    import lightning as L

    from conftest import compose_config
    from fm_lightning.train import _check_launch

    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "LSB_JOBID", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="trainer.num_nodes=2 .* srun .* torchrun --nnodes=2"):
        _check_launch(compose_config(["trainer=multinode", "debug=fast"], tmp_path), trainer)
    monkeypatch.setenv("NODE_RANK", "0")  # Lightning's own variables, set by hand on every node
    _check_launch(compose_config(["trainer=multinode", "debug=fast"], tmp_path), trainer)

def test_a_batch_that_does_not_split_across_processes_is_refused_before_they_start(tmp_path):
    """Checked in the launching process, so it is said once, not once per process."""
    import lightning as L

    from conftest import compose_config
    from fm_lightning.train import _check_launch

    trainer = L.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="batch size 64 does not divide across 3 device"):
        _check_launch(compose_config(["debug=fast"], tmp_path), trainer)
