"""The bad-input suite: one table of mistakes, each with the message it must produce.

Every case runs beside an earlier, finished run (same log root) and asserts that none of its
files changed or disappeared.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config
from fm_lightning import evaluate, reflow, sample
from fm_lightning.train import run

FAST = ["debug=fast", "logger=none"]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished run whose files every case must leave intact, plus a few prepared inputs."""
    root = tmp_path_factory.mktemp("bad_input")
    run(compose_config(FAST, root / "logs/train/runs/earlier"))
    np.save(root / "flat.npy", np.zeros(10, dtype=np.float32))
    np.save(root / "nan.npy", np.full((10, 2), np.nan, dtype=np.float32))
    np.save(root / "three_d.npy", np.zeros((10, 3), dtype=np.float32))
    np.savez(root / "pairs_3d.npz", x0=np.zeros((10, 3), np.float32), x1=np.zeros((10, 3), np.float32))
    np.savez(root / "pairs_ragged.npz", x0=np.zeros((10, 2), np.float32), x1=np.zeros((8, 2), np.float32))
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "ragged.csv").write_text("1,2\n3\n")
    (root / "pandas_index.csv").write_text(",x,y\n0,1.5,2\n1,3,4\n2,5,6\n")  # DataFrame.to_csv's default index=True
    (root / "bad_mnist/MNIST/raw").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / "bad_mnist/MNIST/raw" / name).write_bytes(b"not an IDX file at all")
    np.savez(root / "pairs_2d.npz", x0=np.zeros((10, 2), np.float32), x1=np.ones((10, 2), np.float32))
    (root / "evaluated").mkdir()
    (root / "evaluated/eval.json").write_text("{}")
    (root / "kept.npz").write_bytes(b"earlier samples")
    (root / "other.ckpt").write_bytes((root / "logs/train/runs/earlier/checkpoints/last.ckpt").read_bytes())
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, root / "foreign.ckpt")
    (root / "a_file").write_text("")
    (root / "folder.npz").mkdir()
    np.save(root / "two_d.npy", np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
    with open(root / "npy_named.npz", "wb") as f:  # np.save would append .npy
        np.save(f, np.zeros((10, 2), np.float32))
    _damaged_checkpoints(root, root / "logs/train/runs/earlier/checkpoints/last.ckpt")

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (root / "pwned", "code ran"))

    with open(root / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": Evil()}, f)
    return root


def _damaged_checkpoints(root: Path, good: Path) -> None:
    """Copies of ``good``: truncated, bit-flipped in a tensor record, with a NaN weight, with a
    recorded points source that has moved, and with Lipman's path (which needs N(0, I) sources)."""
    data = good.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[:5000])
    record = max(zipfile.ZipFile(good).infolist(), key=lambda info: info.file_size)
    at = record.header_offset + 100 + record.file_size // 2  # inside its data, past the local header
    (root / "bit_flipped.ckpt").write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at:at + 8]) + data[at + 8:])
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"][next(iter(ckpt["state_dict"]))][0] = float("nan")
    torch.save(ckpt, root / "nan_weights.ckpt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["source"] = {"class_path": "datamodules.toy.Points",
                                          "init_args": {"file": str(root / "moved_since_training.npy")}}
    torch.save(ckpt, root / "moved_source.ckpt")
    points = {"class_path": "datamodules.toy.Points",  # two_d.npy held other points when it was trained on
              "init_args": {"file": str(root / "two_d.npy"), "fingerprint": "10x2:0000000000000000"}}
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["source"] = points
    torch.save(ckpt, root / "changed_source.ckpt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["datamodule_hyper_parameters"]["target"] = points
    torch.save(ckpt, root / "changed_target.ckpt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["source"] = {"class_path": "datamodules.toy.Gaussian", "init_args": {"dim": 2, "std": 1.0}}
    ckpt["hyper_parameters"]["flow"]["init_args"]["path"] = {"class_path": "fm_lightning.flow.paths.LipmanOTPath",
                                                             "init_args": {"sigma_min": 1e-4}}
    torch.save(ckpt, root / "lipman.ckpt")


def _snapshot(root: Path) -> dict[str, str]:
    run_dir = root / "logs/train/runs/earlier"
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def train(*overrides: str, out: str = "logs/train/runs/new"):
    """A config case: fm-train with these overrides, writing next to the earlier run."""
    return ("train", list(overrides), out)


def fm_eval(*args: str):
    """A CLI case: fm-eval with these arguments."""
    return ("eval", list(args), None)


def fm_sample(*args: str):
    """A CLI case: fm-sample with these arguments ({root} is the test's input folder)."""
    return ("sample", list(args), None)


def fm_reflow(*args: str):
    """A CLI case: python -m fm_lightning.reflow with these arguments."""
    return ("reflow", list(args), None)


EARLIER_CKPT = "{root}/logs/train/runs/earlier/checkpoints/last.ckpt"
CASES = {
    # configs: data
    "unknown dataset": (train("data.target=nope"), "unknown distribution 'nope'"),
    "missing points file": (train("data.target={root}/missing.npy"), "does not exist"),
    "points file of wrong shape": (train("data.target={root}/flat.npy"), "shape (N, d)"),
    "points file with NaN": (train("data.target={root}/nan.npy"), "non-finite"),
    "points without a file": (train("data.target=points"), "'points' needs a file"),
    "CSV with a short row": (train("data.target={root}/ragged.csv"), "number of columns changed"),
    "points of another dimension": (train("data.target={root}/three_d.npy"), "has dim 3; they must match"),
    "CSV with pandas' row index": (train("data.target={root}/pandas_index.csv"),
                                   "its first column is pandas' row index, not a coordinate (header on line 1: ',x,y')"),
    "points file of another format": (train("data.target={root}/npy_named.npz"),
                                      "not a valid .npz file: it holds a single .npy array; rename it to end in .npy"),
    "distribution without a name": (train("data.target={{radius:3}}"), "has no name; add name: one of ['2spirals'"),
    "distribution argument out of range": (train("data.target={{name:circles,factor:2}}"),
                                           "distribution 'circles': factor must be in (0, 1), got 2.0"),
    "negative data dimension": (train("data.source=gaussian", "data.target=gaussian", "data.dim=-1"),
                                "distribution 'gaussian': dim must be a whole number >= 1"),
    "source and target dims differ": (train("data.dim=3", "data.source=gaussian"), "they must match"),
    "zero batch size": (train("data.batch_size=0"), "must all be >= 1"),
    "negative loader workers": (train("data.num_workers=-1"), "num_workers must be >= 0"),
    "zero training threads": (train("threads=0"), "threads must be a whole number >= 1"),
    "batch not divisible by accumulation": (train("data.batch_size=255", "trainer.accumulate_grad_batches=2"),
                                            "does not divide"),
    "corrupt MNIST files": (train("experiment=mnist", "data.root={root}/bad_mnist"), "not found (or is corrupted)"),
    "image source of another shape": (train("experiment=digits", "model.source.dim=[1,16,16]"),
                                      "source draws samples of shape (1, 16, 16) but the data are (1, 8, 8)"),
    "image net of another size": (train("experiment=digits", "model.net.image_size=16",
                                        "model.net.attention_resolutions=[8]"),
                                  "model.net.image_size=16 does not fit data of shape (1, 8, 8)"),
    "image net of other channels": (train("experiment=digits", "model.net.in_channels=3"),
                                    "model.net.in_channels=3 does not fit data of shape (1, 8, 8)"),
    "image net of other classes": (train("experiment=digits", "model.net.num_classes=12"),
                                   "model.net.num_classes=12 does not fit data with 10 classes"),
    "conditional net on unlabelled images": (train("experiment=digits", "data.num_classes=0", "model.net.num_classes=10"),
                                             "does not fit data with no labels (data.num_classes=0)"),
    "image data without an image preset": (train("data=images", "model/net=unet_tiny"),
                                           "start from an image preset (experiment=digits"),
    "guidance for an unconditional model": (train("experiment=digits", "data.num_classes=0", "model.cond_drop_prob=0"),
                                            "SampleCallback: guidance=2.0 needs a class-conditional model"),
    "FID without Inception weights": (train("experiment=digits", "+callbacks.fid._target_=fm_lightning.callbacks.FIDCallback",
                                            "+callbacks.fid.weights_path={root}/missing.pth"),
                                      "missing.pth' does not exist; give the path of a local copy of"),
    # configs: model and flow
    "Lipman path on a non-Gaussian source": (train("flow=fm"), "assumes a standard Gaussian source"),
    "SB path with sigma 0": (train("flow=sbcfm", "model.flow.path.sigma=0"), "needs sigma > 0"),
    "negative ICFM sigma": (train("flow=icfm", "model.flow.path.sigma=-1"), "sigma must be >= 0"),
    "negative Sinkhorn reg": (train("flow=sbcfm", "model.flow.coupling.reg=-1"), "reg must be > 0"),
    "zero Sinkhorn tolerance": (train("flow=sbcfm", "+model.flow.coupling.tol=0"), "needs tol > 0"),
    "logit-normal std 0": (train("flow=rf", "model.flow.time_sampler.std=0"), "std must be > 0"),
    "infinite ICFM sigma": (train("flow=icfm", "model.flow.path.sigma=inf"), "ICFMPath sigma must be >= 0 and finite"),
    "NaN logit-normal mean": (train("flow=rf", "model.flow.time_sampler.mean=nan"),
                              "LogitNormalTime mean must be finite"),
    "infinite SB sigma": (train("flow=sbcfm", "model.flow.path.sigma=inf"),
                          "SchrodingerBridgePath needs sigma > 0 and finite"),
    "infinite Sinkhorn reg": (train("flow=sbcfm", "model.flow.coupling.reg=inf"), "reg must be > 0 and finite"),
    "unknown activation": (train("model.net.activation=swish"), "unknown activation 'swish'"),
    "warmup longer than training": (train("model.lr_scheduler.warmup_steps=1000"), "lower model.lr_scheduler"),
    # solver settings
    "unknown solver": (train("model.solver=rk45"), "unknown solver 'rk45'"),
    "zero fixed steps": (train("model.solver=euler", "model.steps=0"), "needs steps >= 1"),
    "zero tolerance": (train("model.atol=0"), "needs atol > 0"),
    # trainer and devices
    "GPU preset without GPUs": (train("trainer=ddp"), "needs CUDA GPUs but none is visible"),
    "fp16 on the CPU": (train("trainer.precision=16-mixed"), "not supported on the CPU"),
    "bf16 weights": (train("trainer.precision=bf16-true"), "use trainer.precision=bf16-mixed"),
    # output directories and checkpoints
    "rerun into a finished run": (train(out="logs/train/runs/earlier"), "already holds checkpoints"),
    "output below a file": (train(out="a_file/run"), "cannot create output directory"),
    "resume from a missing checkpoint": (train("ckpt_path={root}/missing.ckpt"), "does not exist"),
    "resume from a text file": (train("ckpt_path={root}/notes.txt"), "not a readable checkpoint"),
    "resume from a bit-flipped checkpoint": (train("ckpt_path={root}/bit_flipped.ckpt"), "fails its checksum"),
    "resume from a malicious checkpoint": (train("ckpt_path={root}/evil.ckpt"), "refusing to load"),
    "resume another run's checkpoint into a finished run": (
        train("ckpt_path={root}/other.ckpt", out="logs/train/runs/earlier"), "already holds checkpoints"),
    "resume from another Lightning project's checkpoint": (train("ckpt_path={root}/foreign.ckpt"),
                                                           "not an fm-lightning checkpoint"),
    "resume with another net": (train(f"ckpt_path={EARLIER_CKPT}", "model.net.width=32"), "holds another model or data than this config"),
    "resume last with no runs": (train("ckpt_path=last", "task_name=nothing_yet", "paths.log_dir={root}/logs"),
                                 "no run under"),
    # fm-sample flags
    "fm-sample missing checkpoint": (fm_sample("{root}/missing.ckpt"), "does not exist"),
    "fm-sample malicious checkpoint": (fm_sample("{root}/evil.ckpt"), "refusing to load"),
    "fm-sample another Lightning project's checkpoint": (fm_sample("{root}/foreign.ckpt"),
                                                         "not an fm-lightning checkpoint"),
    "fm-sample a run directory": (fm_sample("{root}/logs/train/runs/earlier"), "is a directory"),
    "fm-sample onto an existing file": (fm_sample(EARLIER_CKPT, "--out", "{root}/kept.npz"), "--overwrite"),
    "fm-sample unknown solver": (fm_sample(EARLIER_CKPT, "--solver", "rk45"), "invalid choice: 'rk45'"),
    "fm-sample zero samples": (fm_sample(EARLIER_CKPT, "--num-samples", "0"), "--num-samples must be >= 1"),
    "fm-sample zero steps": (fm_sample(EARLIER_CKPT, "--solver", "euler", "--steps", "0"), "needs steps >= 1"),
    "fm-sample steps for the checkpoint's adaptive solver": (
        fm_sample(EARLIER_CKPT, "--steps", "10", "--out", "{root}/s.npz"),
        "--steps applies to the fixed-step solvers (euler, midpoint, rk4), not to dopri5"),
    "fm-sample tolerances for a fixed-step solver": (
        fm_sample(EARLIER_CKPT, "--solver", "euler", "--atol", "1e-3", "--out", "{root}/s.npz"),
        "--atol/--rtol apply to the adaptive solvers (dopri5, tsit5), not to euler"),
    "fm-sample output into a missing folder": (fm_sample(EARLIER_CKPT, "--out", "{root}/no/such/dir/s.npz"),
                                               "does not exist"),
    "fm-sample output onto a folder": (fm_sample(EARLIER_CKPT, "--out", "{root}/evaluated"), "names a folder"),
    "fm-sample output ending in a slash": (fm_sample(EARLIER_CKPT, "--out", "{root}/evaluated/"), "names a folder"),
    "fm-sample overwriting a folder": (fm_sample(EARLIER_CKPT, "--out", "{root}/folder.npz", "--overwrite"),
                                       "names a folder"),
    "fm-sample output into an unwritable folder": (fm_sample("{root}/missing.ckpt", "--out", "/proc/s.npz"),
                                                   "cannot write into /proc"),
    "fm-sample an unknown device": (fm_sample(EARLIER_CKPT, "--device", "gpu"), "is not a torch device"),
    "fm-sample a moved source file": (fm_sample("{root}/moved_source.ckpt", "--out", "{root}/s.npz"),
                                      "recorded in the checkpoint does not exist (moved since training?); pass "
                                      "--source-file"),
    "fm-sample a source file under Lipman's path": (
        fm_sample("{root}/lipman.ckpt", "--source-file", "{root}/two_d.npy", "--out", "{root}/s.npz"),
        "--source-file cannot be used with it"),
    "fm-sample a truncated checkpoint": (fm_sample("{root}/truncated.ckpt"), "it is truncated"),
    "fm-sample a device file": (fm_sample("/dev/null"), "is not a regular file"),
    "fm-sample a bit-flipped checkpoint": (fm_sample("{root}/bit_flipped.ckpt", "--out", "{root}/s.npz"),
                                           "fails its checksum"),
    "fm-sample tolerances below float32 resolution": (
        fm_sample(EARLIER_CKPT, "--atol", "1e-13", "--rtol", "1e-13", "--out", "{root}/s.npz"),
        "below float32 resolution"),
    "fm-sample source file of another format": (
        fm_sample(EARLIER_CKPT, "--source-file", "{root}/npy_named.npz", "--out", "{root}/s.npz"),
        "--source-file: points file"),
    "fm-sample source file of another dimension": (
        fm_sample(EARLIER_CKPT, "--source-file", "{root}/three_d.npy", "--out", "{root}/s.npz"), "3-dimensional"),
    # fm-eval and reflow (the earlier run maps 8gaussians -> moons: 2-D, source density unknown)
    "fm-eval a checkpoint with a NaN weight": (fm_eval("{root}/nan_weights.ckpt", "--out", "{root}/eval"),
                                                "holds NaN or inf values; use an earlier checkpoint"),
    "fm-eval FID of a 2-D model": (fm_eval(EARLIER_CKPT, "--metrics", "fid", "--out", "{root}/eval"),
                                   "metric 'fid' does not fit this checkpoint"),
    "fm-eval likelihood without a source density": (fm_eval(EARLIER_CKPT, "--metrics", "nll", "--out", "{root}/eval"),
                                                    "needs a source with a known density"),
    "reflow pairs of another dimension": (train("+data.pairs={root}/pairs_3d.npz"), "are 3-dimensional"),
    "reflow pairs under an OT flow": (train("+data.pairs={root}/pairs_2d.npz"), "re-pairs them"),
    "fm-eval into an earlier evaluation": (fm_eval(EARLIER_CKPT, "--metrics", "w2", "--out", "{root}/evaluated"),
                                           "already holds an evaluation"),
    "fm-eval output onto a file": (fm_eval(EARLIER_CKPT, "--out", "{root}/notes.txt"), "is a file"),
    "fm-eval steps for the checkpoint's adaptive solver": (
        fm_eval(EARLIER_CKPT, "--metrics", "w2", "--steps", "10", "--out", "{root}/eval"),
        "--steps applies to the fixed-step solvers (euler, midpoint, rk4), not to dopri5"),
    "reflow pairs of unequal shapes": (train("+data.pairs={root}/pairs_ragged.npz"), "of one shape"),
    "reflow pairs in a .npy": (train("+data.pairs={root}/two_d.npy"), "is not a valid .npz file: it holds a single"),
    "fm-eval a moved source file": (fm_eval("{root}/moved_source.ckpt", "--out", "{root}/eval"),
                                    "(moved since training?); pass --source-file"),
    "reflow a moved source file": (fm_reflow("{root}/moved_source.ckpt", "--out", "{root}/p.npz"),
                                   "(moved since training?); pass --source-file"),
    "fm-sample a source file that changed since training": (
        fm_sample("{root}/changed_source.ckpt", "--out", "{root}/s.npz"),
        "changed since training (fingerprint 10x2:0000000000000000, now 10x2:"),
    "fm-eval a source file that changed since training": (
        fm_eval("{root}/changed_source.ckpt", "--metrics", "w2", "--out", "{root}/eval"),
        "changed since training (fingerprint 10x2:0000000000000000, now 10x2:"),
    "fm-eval a target file that changed since training": (
        fm_eval("{root}/changed_target.ckpt", "--metrics", "w2", "--out", "{root}/eval"),
        "changed since training (fingerprint 10x2:0000000000000000, now 10x2:"),
    "reflow a source file that changed since training": (
        fm_reflow("{root}/changed_source.ckpt", "--out", "{root}/p.npz"),
        "changed since training (fingerprint 10x2:0000000000000000, now 10x2:"),
    "reflow steps for its adaptive solver": (fm_reflow(EARLIER_CKPT, "--steps", "10", "--out", "{root}/p.npz"),
                                             "--steps applies to the fixed-step solvers"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_message_and_loses_nothing(name, earlier, capsys):
    (kind, args, out), fragment = CASES[name]
    args = [a.format(root=earlier) for a in args]
    before = _snapshot(earlier)
    if kind == "train":
        with pytest.raises(Exception) as info:
            run(compose_config([*FAST, *args], earlier / out))
        message = str(info.value)
    else:
        try:
            code = {"sample": sample.main, "eval": evaluate.main, "reflow": reflow.main}[kind](args)
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
        assert code == 2
        message = capsys.readouterr().err
    assert fragment in message, message
    assert _snapshot(earlier) == before
    assert not (earlier / "pwned").exists()
    assert (earlier / "kept.npz").read_bytes() == b"earlier samples"
    assert (earlier / "evaluated/eval.json").read_text() == "{}"


def test_fm_sample_on_cuda_without_cuda_blames_the_device_not_the_checkpoint(earlier, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = earlier / "cuda.npz"
    assert sample.main([EARLIER_CKPT.format(root=earlier), "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available on this machine; use --device cpu" in err and "checkpoint" not in err
    assert not out.exists()


def test_the_table_is_large_enough():
    assert len(CASES) >= 25
