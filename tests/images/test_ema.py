"""EMA weights: they differ from the raw ones, sampling and checkpoints use them, resume keeps them."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from conftest import compose_config
from datamodules.images import ImageDataModule
from fm_lightning.callbacks import EMA, SampleCallback, model_weights
from fm_lightning.module import load_checkpoint
from image_helpers import tiny_module


def _fit(tmp_path, callbacks, max_steps=20, ckpt_path=None, model=None):
    L.seed_everything(0, verbose=False)
    model = model or tiny_module(num_classes=10, cond_drop_prob=0.1)
    samples = []
    sample = model.sample
    model.sample = lambda *a, **k: (lambda sol: (samples.append(sol.x.clone()), sol)[1])(sample(*a, **k))
    trainer = L.Trainer(
        max_steps=max_steps, val_check_interval=10, check_val_every_n_epoch=None, limit_val_batches=1,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, ImageDataModule("digits", num_classes=10, batch_size=32, val_fraction=0.1), ckpt_path=ckpt_path)
    return model, samples


def _checkpoint(tmp_path, every=10):
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_train_steps=every)


def _samples_cb():
    return SampleCallback(num_samples=10, num_trajectories=2, solver="euler", steps=3, num_saves=3)


@pytest.mark.parametrize("ema_first", [False, True])
def test_sampling_uses_the_ema_weights_whatever_the_callback_order(tmp_path, ema_first):
    ema, samples_cb = EMA(decay=0.8), _samples_cb()
    callbacks = [ema, samples_cb] if ema_first else [samples_cb, ema]
    model, samples = _fit(tmp_path, [*callbacks, _checkpoint(tmp_path)])
    # Validation at steps 10 and 20 (grid + strip each), then nothing new at fit end (same step).
    assert len(samples) == 4 and (tmp_path / "grid.png").is_file() and (tmp_path / "trajectory.png").is_file()

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    ema_state, raw_state = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.allclose(ema_state[k], raw_state[k]) for k in ema_state)  # EMA != raw after training
    averaged = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(ema_state[k], v) for k, v in averaged.state_dict().items())
    raw = load_checkpoint(tmp_path / "ckpt" / "last.ckpt", ema=False)
    assert all(torch.equal(raw_state[k], v) for k, v in raw.state_dict().items())
    assert (averaged.loaded_weights, raw.loaded_weights) == ("ema", "raw")

    # The callback's last grid is what the EMA weights of the checkpoint give, not the raw ones.
    x0, cond = samples_cb._x0, samples_cb._cond
    from_ema = load_checkpoint(tmp_path / "ckpt" / "last.ckpt").sample(x0=x0, cond=cond, solver="euler", steps=3).x
    from_raw = raw.sample(x0=x0, cond=cond, solver="euler", steps=3).x
    torch.testing.assert_close(samples[2], from_ema)
    assert not torch.allclose(samples[2], from_raw, atol=1e-4)
    # After fit the module holds the EMA weights (Lightning copies them in).
    assert all(torch.equal(ema_state[k], v) for k, v in model.state_dict().items())
    # The validation loss was computed with the EMA weights too (Lightning swaps them in).


def test_last_checkpoint_written_at_fit_end_keeps_both_weight_sets(tmp_path):
    """ModelCheckpoint(save_last) writes last.ckpt in on_train_end, after the EMA callback's own
    on_train_end; the raw weights must still be there (Lightning's copy would have lost them)."""
    ema = EMA(decay=0.8)
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    model, _ = _fit(tmp_path, [ema, last], max_steps=10)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert any(not torch.allclose(ckpt["state_dict"][k], v) for k, v in ckpt["current_model_state"].items())
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in model.state_dict().items())  # module: EMA
    with ema.weights(model, ema=False):
        assert all(torch.equal(ckpt["current_model_state"][k], v) for k, v in model.state_dict().items())
    # A validation after fit still runs on the EMA weights, and leaves them in place.
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        callbacks=[ema], default_root_dir=tmp_path)
    trainer.validate(model, ImageDataModule("digits", num_classes=10, batch_size=32, val_fraction=0.1), verbose=False)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in model.state_dict().items())


def test_same_samples_in_both_callback_orders(tmp_path):
    runs = []
    for i, ema_first in enumerate([False, True]):
        ema, cb = EMA(decay=0.8), _samples_cb()
        _, samples = _fit(tmp_path / str(i), [ema, cb] if ema_first else [cb, ema])
        runs.append(samples)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def test_raw_weights_on_request_and_weight_context(tmp_path):
    ema, cb = EMA(decay=0.8), _samples_cb()
    cb.use_ema = False
    _, samples = _fit(tmp_path, [cb, ema, _checkpoint(tmp_path)], max_steps=10)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    raw = load_checkpoint(ckpt, ema=False).sample(x0=cb._x0, cond=cb._cond, solver="euler", steps=3).x
    torch.testing.assert_close(samples[0], raw)


def test_ema_survives_checkpoint_and_resume(tmp_path):
    decay = 0.8
    _fit(tmp_path, [EMA(decay=decay), _checkpoint(tmp_path, every=1)], max_steps=10)
    at10 = torch.load(tmp_path / "ckpt" / "epoch=0-step=10.ckpt", weights_only=True)
    assert int(at10["averaging_state"]["n_averaged"]) == 10
    _fit(tmp_path / "resumed", [EMA(decay=decay), ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=1,
                                                                   save_top_k=-1)],
         max_steps=11, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    at11 = torch.load(tmp_path / "ckpt2" / "epoch=0-step=11.ckpt", weights_only=True)
    # One more EMA update on top of the *restored* average: ema11 = d*ema10 + (1-d)*raw11.
    for key, ema11 in at11["state_dict"].items():
        expected = decay * at10["state_dict"][key] + (1 - decay) * at11["current_model_state"][key]
        torch.testing.assert_close(ema11, expected, rtol=1e-5, atol=1e-6)
    assert int(at11["averaging_state"]["n_averaged"]) == 11
    # The raw weights resumed from the raw ones, not from the average.
    moved = [k for k in at11["state_dict"] if not torch.allclose(at10["current_model_state"][k], at10["state_dict"][k])]
    assert moved


def test_model_weights_context_swaps_and_restores():
    model = tiny_module()
    ema = EMA(decay=0.5)

    class _Trainer:
        callbacks = [ema]

    ema.setup(None, model, "fit")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # raw weights move away from the average (the initial copy)
    raw = [p.clone() for p in model.parameters()]
    with model_weights(_Trainer, model):
        assert all(torch.allclose(p, q - 1.0, atol=1e-6) for p, q in zip(model.parameters(), raw))
        with model_weights(_Trainer, model, ema=False):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), raw))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), raw)) and not ema.swapped


def test_other_weight_averaging_callbacks_are_flagged():
    class _Trainer:
        callbacks = [EMAWeightAveraging()]

    with pytest.warns(UserWarning, match="cannot tell which weights"):
        with model_weights(_Trainer, tiny_module()):
            pass


def test_before_its_first_update_the_ema_is_the_current_weights(tmp_path):
    ema = EMA(decay=0.9, update_starting_at_step=15)
    _fit(tmp_path, [ema, _checkpoint(tmp_path)])
    early = torch.load(tmp_path / "ckpt" / "epoch=0-step=10.ckpt", weights_only=True)
    assert all(torch.equal(early["state_dict"][k], v) for k, v in early["current_model_state"].items())
    late = torch.load(tmp_path / "ckpt" / "epoch=0-step=20.ckpt", weights_only=True)
    assert any(not torch.equal(late["state_dict"][k], v) for k, v in late["current_model_state"].items())


def test_ema_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="update_every_n_steps"):
        EMA(update_every_n_steps=0)


def test_images_callbacks_config_instantiates(tmp_path):
    cfg = compose_config(["experiment=digits"], tmp_path / "run")
    callbacks = {name: hydra.utils.instantiate(c) for name, c in cfg.callbacks.items()}
    assert isinstance(callbacks["ema"], EMA) and callbacks["ema"].decay == 0.995
    assert isinstance(callbacks["samples"], SampleCallback) and callbacks["samples"].guidance == 2.0
    assert callbacks["samples"].num_saves == 8 and callbacks["samples"].use_ema
