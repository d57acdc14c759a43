"""FID on torchmetrics: injected extractors, cached reference statistics, the callback, DDP sums,
and the standard Inception path (offline, with a stand-in weights file)."""

from __future__ import annotations

import io
import os

import hydra
import lightning as L
import numpy as np
import pytest
import rich
import torch
from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console

import fm_lightning.progress
from conftest import compose_config
from datamodules.images import ImageDataModule
from datamodules.toy import ToyDataModule
from fm_lightning.callbacks import FIDCallback
from fm_lightning.metrics import FID, to_uint8
from image_helpers import TinyExtractor, tiny_module


def _images(n, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1 + shift).clamp(-1, 1)


def test_identical_sets_score_about_zero_and_different_sets_clearly_positive():
    real = _images(400, 0)
    fid = FID(TinyExtractor())
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = fid.compute()
    fid.update(_images(400, 1), real=False)  # same distribution, other draw
    resampled = fid.compute()
    fid.update(_images(400, 2, shift=0.6), real=False)  # brighter images
    different = fid.compute()
    assert abs(same) < 1e-6
    assert different > 20 * max(resampled, 1e-4) and different > 0.1


def test_reference_statistics_round_trip_through_a_file(tmp_path):
    fid = FID(TinyExtractor())
    fid.update(_images(300, 0), real=True)
    stats = fid.reference()
    assert stats["mu"].shape == (16,) and stats["sigma"].shape == (16, 16) and int(stats["n"]) == 300
    path = str(tmp_path / "stats" / "ref.npz")
    fid.save_reference(path, "digits-train-1x8x8")
    fresh = FID(TinyExtractor())
    fresh.load_reference(path, "digits-train-1x8x8")
    np.testing.assert_allclose(fresh.reference()["sigma"], stats["sigma"], rtol=1e-10, atol=1e-12)
    fake = _images(300, 5, shift=0.3)
    for f in (fid, fresh):
        f.update(fake, real=False)
    assert fid.compute() == pytest.approx(fresh.compute(), rel=1e-6)


def _saved_reference(tmp_path) -> str:
    """A reference file of 50 random 8x8 images, made for digits."""
    fid = FID(TinyExtractor())
    fid.update(_images(50, 0), real=True)
    path = str(tmp_path / "ref.npz")
    fid.save_reference(path, "digits-train-1x8x8")
    return path


def test_reference_files_from_another_extractor_or_dataset_are_refused(tmp_path):
    path = _saved_reference(tmp_path)
    with pytest.raises(ValueError, match="made for source 'digits-train-1x8x8', not 'mnist-train-1x28x28'"):
        FID(TinyExtractor()).load_reference(path, "mnist-train-1x28x28")

    class Other(TinyExtractor):
        pass

    with pytest.raises(ValueError, match="made for extractor"):
        FID(Other()).load_reference(path)
    # The same class with other weights is another extractor; the same weights are the same one.
    with pytest.raises(ValueError, match="made for extractor .*TinyExtractor-16-.*, not .*; delete it to recompute"):
        FID(TinyExtractor(seed=1)).load_reference(path)
    FID(TinyExtractor(seed=0)).load_reference(path)
    # A plain pytorch-fid style file (mu, sigma only) is accepted.
    np.savez(tmp_path / "plain.npz", mu=np.zeros(16), sigma=np.eye(16))
    plain = FID(TinyExtractor())
    plain.load_reference(str(tmp_path / "plain.npz"))
    np.testing.assert_allclose(plain.reference()["sigma"], np.eye(16), atol=1e-12)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(16))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        plain.load_reference(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="16 features"):
        FID(TinyExtractor(num_features=8)).load_reference(str(tmp_path / "plain.npz"))


def test_reference_files_of_another_size_or_unreadable_are_refused_in_one_line(tmp_path):
    path = _saved_reference(tmp_path)
    with pytest.raises(ValueError, match="statistics of 50 images, not of the 1797 asked for; ask for 50 .the FID callback's num_reference, fm-eval: --num-reference., delete"):
        FID(TinyExtractor()).load_reference(path, "digits-train-1x8x8", num_images=1797)
    FID(TinyExtractor()).load_reference(path, "digits-train-1x8x8", num_images=50)
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "cut.npz").write_bytes(open(path, "rb").read()[:200])
    (tmp_path / "text.npz").write_text("mu sigma\n")
    np.save(tmp_path / "one.npy", np.zeros(16))
    for name in ("empty.npz", "cut.npz", "text.npz"):
        with pytest.raises(ValueError, match=f"FID reference file .*{name}' is not a readable .npz.*delete it"):
            FID(TinyExtractor()).load_reference(str(tmp_path / name))
    with pytest.raises(ValueError, match="one.npy' holds one array, not an .npz"):
        FID(TinyExtractor()).load_reference(str(tmp_path / "one.npy"))


def test_injected_extractor_needs_num_features():
    with pytest.raises(TypeError, match="num_features"):
        FID(torch.nn.Flatten())


def test_images_are_quantised_like_pngs():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def _fid_trainer(tmp_path, callback, datamodule):
    return L.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[callback], default_root_dir=tmp_path,
    )


def test_fid_callback_caches_reference_and_scores_the_model(tmp_path, monkeypatch):
    ref = tmp_path / "fid" / "digits.npz"
    kwargs = dict(num_samples=40, batch_size=20, reference=str(ref), feature=TinyExtractor(), solver="euler", steps=2)
    cb = FIDCallback(every_n_validations=1, key="val/fid_euler", **kwargs)
    dm = ImageDataModule("digits", num_classes=10, batch_size=32, val_fraction=0.1)
    trainer = _fid_trainer(tmp_path, cb, dm)
    trainer.fit(tiny_module(num_classes=10, cond_drop_prob=0.1), dm)
    assert ref.is_file() and int(np.load(ref)["n"]) == 1797 and str(np.load(ref)["source"]) == "digits-train-1x8x8"
    assert cb.last_metrics["val/fid_euler"] > 0 and cb.last_metrics["val/fid_euler_nfe"] == 2
    assert "val/fid_euler" in trainer.callback_metrics

    # A second run reads the cache instead of recomputing it.
    monkeypatch.setattr(FIDCallback, "_compute_reference", lambda *a: pytest.fail("recomputed the reference"))
    cb2 = FIDCallback(**kwargs)
    _fid_trainer(tmp_path, cb2, dm).fit(tiny_module(num_classes=10, cond_drop_prob=0.1), dm)
    assert cb2.last_metrics["val/fid"] > 0  # evaluated at fit end only (every_n_validations=0)


def test_fid_reference_subset_in_memory(tmp_path):
    cb = FIDCallback(num_samples=10, batch_size=10, num_reference=100, feature=TinyExtractor(), solver="euler", steps=1)
    dm = ImageDataModule("digits", batch_size=32, val_fraction=0.1)
    _fid_trainer(tmp_path, cb, dm).fit(tiny_module(), dm)
    assert cb.fid.reference()["n"] == 100 and cb.last_metrics["val/fid"] > 0


def test_fid_callback_refuses_a_cached_reference_of_another_num_reference(tmp_path):
    ref = str(tmp_path / "ref.npz")
    dm = ImageDataModule("digits", batch_size=32, val_fraction=0.1)
    kwargs = dict(num_samples=10, batch_size=10, reference=ref, feature=TinyExtractor(), solver="euler", steps=1)
    _fid_trainer(tmp_path, FIDCallback(num_reference=100, **kwargs), dm).fit(tiny_module(), dm)
    assert int(np.load(ref)["n"]) == 100
    with pytest.raises(ValueError, match="statistics of 100 images, not of the 1797 asked for"):
        _fid_trainer(tmp_path, FIDCallback(**kwargs), dm).fit(tiny_module(), dm)


def test_guidance_on_an_unconditional_model_is_refused_before_training(tmp_path):
    from fm_lightning.callbacks import SampleCallback

    dm = ImageDataModule("digits", batch_size=32, val_fraction=0.1)
    for cb, name in ((SampleCallback(num_samples=4, guidance=2.0), "SampleCallback"),
                     (FIDCallback(num_samples=10, num_reference=20, feature=TinyExtractor(), guidance=2.0),
                      r"FIDCallback \(key val/fid\)")):
        module = tiny_module()
        with pytest.raises(ValueError, match=f"{name}: guidance=2.0 needs a class-conditional model.*"
                                             "set this callback's guidance to null"):
            _fid_trainer(tmp_path, cb, dm).fit(module, dm)
        assert module.global_step == 0


@pytest.fixture
def bars(monkeypatch):
    """rich's global console as a terminal writing into a StringIO, and the (description, number of
    Live displays on the console) of every bar the progress helper starts."""
    buf = io.StringIO()
    monkeypatch.setattr(rich, "_console", Console(file=buf, force_terminal=True, width=200, color_system=None))
    started = []

    class Recorded(fm_lightning.progress.Progress):
        def add_task(self, description, *args, **kwargs):
            started.append((description, len(self.console._live_stack)))
            return super().add_task(description, *args, **kwargs)

    monkeypatch.setattr(fm_lightning.progress, "Progress", Recorded)
    return buf, started


def test_reference_statistics_bar_counts_images(bars):
    buf, started = bars
    dm = ImageDataModule("digits", batch_size=32, val_fraction=0.1)
    fid = FID(TinyExtractor())
    fid.update_reference(dm.reference_dataloader(batch_size=500))
    assert int(fid.reference()["n"]) == 1797 and started == [("FID reference statistics", 1)]
    assert "FID reference statistics" in buf.getvalue() and "1797/1797" in buf.getvalue()
    fid.update_reference(dm.reference_dataloader(batch_size=500, limit=10), progress=False)
    assert int(fid.reference()["n"]) == 1807 and len(started) == 1


@pytest.mark.parametrize("progress", [True, False])
def test_fid_callback_bars_under_lightnings_rich_progress_bar(tmp_path, bars, progress):
    """Reference statistics in setup (alone), samples at validation end (nested below the
    training bar: two Live displays, no LiveError)."""
    buf, started = bars
    cb = FIDCallback(num_samples=40, batch_size=20, num_reference=100, feature=TinyExtractor(), solver="euler",
                     steps=1, every_n_validations=1, progress=progress)
    bar = RichProgressBar(console_kwargs=dict(file=buf, force_terminal=True, width=200, color_system=None))
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=1,
        val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[bar, cb],
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_module(), ImageDataModule("digits", batch_size=32, val_fraction=0.1))
    out = buf.getvalue()
    assert cb.last_metrics["val/fid"] > 0 and "Epoch 0" in out  # Lightning's own bar was drawn
    if progress:
        assert started == [("FID reference statistics", 1), ("FID samples", 2), ("FID samples", 2)]
        assert "100/100" in out and "FID samples" in out and "40/40" in out
    else:
        assert started == [] and "FID samples" not in out


def test_fid_without_reference_or_images_fails_before_training(tmp_path):
    cb = FIDCallback(reference=str(tmp_path / "missing.npz"), feature=TinyExtractor())
    dm = ToyDataModule(batch_size=8, steps_per_epoch=2, val_size=8)
    with pytest.raises(ValueError, match="FID needs reference statistics.*missing.npz.*ToyDataModule"):
        _fid_trainer(tmp_path, cb, dm).fit(tiny_module(), dm)


def test_fid_callback_arguments():
    for kwargs in ({"num_samples": 1}, {"batch_size": 0}, {"every_n_validations": -1}, {"num_reference": 1}):
        with pytest.raises(ValueError):
            FIDCallback(**kwargs)


def test_cifar10_experiment_fid_callbacks_instantiate(tmp_path):
    cfg = compose_config(["experiment=cifar10_otcfm", f"data.root={tmp_path}"], tmp_path / "run")
    for name, solver in (("fid_dopri5", "dopri5"), ("fid_euler100", "euler")):
        cb = hydra.utils.instantiate(cfg.callbacks[name], feature=TinyExtractor())
        assert isinstance(cb, FIDCallback) and cb.num_samples == 50_000 and cb.solver_kwargs["solver"] == solver
        assert cb.reference.endswith("fid_stats/cifar10_train_inception2048.npz") and cb.feature.num_features == 16
    assert cfg.callbacks.fid_dopri5.atol == 1e-5 and cfg.callbacks.fid_euler100.steps == 100


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        real, fake = _images(120, 0), _images(90, 1, shift=0.3)
        fid = FID(TinyExtractor())
        fid.update(real[rank::world], real=True)  # each rank its shard of the reference
        stats = fid.reference()
        fid.update(fake[rank::world], real=False)
        computed = fid.compute()
        loaded = FID(TinyExtractor())
        loaded.set_reference(stats["mu"], stats["sigma"], int(stats["n"]), rank=rank)  # rank zero holds it
        loaded.update(fake[rank::world], real=False)
        torch.save({"n": int(stats["n"]), "computed": computed, "loaded": loaded.compute()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_sums_feature_statistics_over_ddp_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    single = FID(TinyExtractor())
    single.update(_images(120, 0), real=True)
    single.update(_images(90, 1, shift=0.3), real=False)
    expected = single.compute()
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["n"] == 120
        assert result["computed"] == pytest.approx(expected, rel=1e-6)
        assert result["loaded"] == pytest.approx(expected, rel=1e-6)


def _stand_in_inception_weights(path, monkeypatch):
    """A randomly initialised state dict of torch-fidelity's Inception (the real weights cannot be
    downloaded here); the network, resizing and feature layer are the real ones."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    with monkeypatch.context() as m:
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_standard_inception_path_offline(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    _stand_in_inception_weights(weights, monkeypatch)
    fid = FID(2048, weights_path=str(weights))
    assert fid.name.startswith("inception-v3-2048-")
    grey = _images(4, 0)
    fid.update(grey, real=True)  # 1-channel images are repeated to RGB
    fid.update(grey, real=False)
    assert abs(fid.compute()) < 1e-2


def test_standard_inception_without_weights_says_what_to_do(tmp_path):
    pytest.importorskip("torch_fidelity")
    with pytest.raises(FileNotFoundError, match="weights_path='.*nowhere.pth' does not exist; give the path of a "
                                                "local copy of .*/weights-inception-2015-12-05-6726825d.pth"):
        FID(2048, weights_path=str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        FID(2048, weights_path=str(tmp_path))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as info:  # not ~400 key names: their count and the first few
        FID(2048, weights_path=str(tmp_path / "other.pth"))
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    assert "does not hold torch-fidelity's Inception-v3 weights" in message
    assert "missing keys (Conv2d_1a_3x3.conv.weight, " in message and "1 unexpected keys (other.weight)" in message


class _RunsCode:
    """Unpickling this calls ``marker.touch()``: what a crafted weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_weights_file_holding_more_than_tensors_is_refused_unrun(tmp_path):
    pytest.importorskip("torch_fidelity")
    marker = tmp_path / "code-ran"
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCode(marker)}, tmp_path / "crafted.pth")
    with pytest.raises(ValueError, match=r"crafted.pth' holds \w+, which is not loaded \(unpickling could run code\)"):
        FID(2048, weights_path=str(tmp_path / "crafted.pth"))
    assert not marker.exists()
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="text.pth' is not a torch file"):
        FID(2048, weights_path=str(tmp_path / "text.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth' holds a list, not a state dict"):
        FID(2048, weights_path=str(tmp_path / "list.pth"))


def test_a_reference_path_that_is_a_folder_is_refused_and_nothing_is_left(tmp_path):
    fid = FID(TinyExtractor())
    fid.update(_images(10, 0), real=True)
    with pytest.raises(ValueError, match="FID reference .* is a folder; give the path of an .npz file"):
        fid.save_reference(str(tmp_path), "digits-train-1x8x8")
    assert list(tmp_path.iterdir()) == [] and not os.path.exists(f"{tmp_path}.tmp.npz")
