"""Class-conditional training and classifier-free guidance through FlowMatchingModule."""

from __future__ import annotations

import hydra
import lightning as L
import numpy as np
import pytest
import torch

from conftest import compose_config
from datamodules.images import ImageDataModule
from fm_lightning.flow.couplings import ExactOTCoupling, squared_cost
from image_helpers import tiny_module


def _randomized(module):
    with torch.no_grad():
        for p in module.net.parameters():
            p.normal_(0, 0.2)
    return module


def _one_euler_step(module, x0, **kwargs):
    """One Euler step from t=0 with unit step: x1 - x0 is the velocity at (x0, t=0)."""
    return module.sample(x0=x0, solver="euler", steps=1, **kwargs).x - x0


def test_guidance_one_is_conditional_and_zero_is_unconditional():
    model = _randomized(tiny_module(num_classes=10, cond_drop_prob=0.1))
    x0 = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    t0 = torch.zeros(6)
    with torch.no_grad():
        v_cond = model.net(x0, t0, labels)
        v_uncond = model.net(x0, t0, torch.full((6,), 10))
    assert not torch.allclose(v_cond, v_uncond)
    torch.testing.assert_close(_one_euler_step(model, x0, cond=labels, guidance=1.0), v_cond)
    torch.testing.assert_close(_one_euler_step(model, x0, cond=labels), v_cond)  # default: plain conditional
    torch.testing.assert_close(_one_euler_step(model, x0, cond=labels, guidance=0.0), v_uncond)
    torch.testing.assert_close(_one_euler_step(model, x0, cond="null"), v_uncond)  # explicit unconditional
    # s = 2.5 runs both branches in one batch: v_u + s*(v_c - v_u).
    torch.testing.assert_close(
        _one_euler_step(model, x0, cond=labels, guidance=2.5), v_uncond + 2.5 * (v_cond - v_uncond), rtol=1e-4, atol=1e-5
    )
    # One int label stands for every sample.
    torch.testing.assert_close(_one_euler_step(model, x0, cond=3), model.net(x0, t0, torch.full((6,), 3)).detach())


def test_label_dropout_rate_seen_by_the_net_in_training():
    model = tiny_module(num_classes=10, cond_drop_prob=0.3)
    seen = []
    forward = model.net.forward

    def spy(x, t, cond=None):
        seen.append(cond.clone())
        return forward(x, t, cond)

    model.net.forward = spy
    torch.manual_seed(0)
    for step in range(40):
        batch = {"x1": torch.randn(50, 1, 8, 8), "cond": torch.arange(50) % 10}
        model.training_step(batch, step)
    labels = torch.cat(seen)
    rate = (labels == 10).float().mean().item()
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(labels))  # within 4 sigma of 2000 draws
    # Dropped labels are replaced, the others untouched (the OT coupling may reorder pairs within a class).
    assert labels.max() == 10 and (labels[labels != 10] < 10).all()


def test_drop_labels_statistics_and_zero_rate():
    model = tiny_module(num_classes=4, cond_drop_prob=0.15)
    cond = torch.randint(0, 4, (100_000,))
    dropped = model.drop_labels(cond, torch.Generator().manual_seed(0))
    assert abs((dropped == 4).float().mean().item() - 0.15) < 0.005
    keep = dropped != 4
    assert torch.equal(dropped[keep], cond[keep])
    plain = tiny_module(num_classes=4)
    assert torch.equal(plain.drop_labels(cond), cond)


def test_validation_never_drops_labels():
    model = tiny_module(num_classes=10, cond_drop_prob=0.9)
    seen = []
    forward = model.net.forward
    model.net.forward = lambda x, t, cond=None: (seen.append(cond), forward(x, t, cond))[1]
    model.validation_step({"x1": torch.randn(20, 1, 8, 8), "cond": torch.arange(20) % 10}, 0)
    assert (seen[0] < 10).all()


def test_ot_coupling_pairs_within_classes_for_images():
    """With labels, exact OT pairs every image with noise of its own class slot, and within each
    class the pairing is the optimal assignment (checked by brute force on 4 points per class).
    Dropped (null) labels form one more group, paired among themselves."""
    import itertools

    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(12, 1, 8, 8, generator=gen), torch.randn(12, 1, 8, 8, generator=gen)
    cond = torch.tensor([0, 1, 2] * 4)
    cond[[0, 4]] = 3  # two samples whose labels were dropped to the null class (3)
    p0, p1, pc = ExactOTCoupling()(x0, x1, cond)
    assert torch.equal(pc.sort().values, cond.sort().values)
    for label in cond.unique():
        rows = (pc == label).nonzero().squeeze(1)
        src = [int((x0 == p0[r]).flatten(1).all(1).nonzero()) for r in rows]
        tgt = [int((x1 == p1[r]).flatten(1).all(1).nonzero()) for r in rows]
        assert all(cond[j] == label for j in tgt)  # targets keep their own labels
        assert sorted(src) == sorted((cond == label).nonzero().squeeze(1).tolist())  # sources from that slot
        cost = squared_cost(x0[src], x1[tgt]).diagonal().sum()
        best = min(
            squared_cost(x0[[src[i] for i in perm]], x1[tgt]).diagonal().sum()
            for perm in itertools.permutations(range(len(src)))
        )
        assert cost <= best + 1e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [({}, "class-conditional .*cond='null'"), ({"cond": "none"}, "'null'"), ({"cond": torch.tensor([0, 11])}, "labels must be in"),
     ({"cond": torch.tensor([1, 2, 3])}, r"shape \(2,\)")],
)
def test_conditional_model_sampling_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_module(num_classes=10, cond_drop_prob=0.1).sample(num_samples=2, **kwargs)


def test_unconditional_model_refuses_guidance_and_labels():
    model = tiny_module()
    with pytest.raises(ValueError, match="guidance=2.0 needs a class-conditional model"):
        model.sample(num_samples=2, guidance=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(num_samples=2, cond=torch.tensor([1, 2]))


def test_guidance_must_be_finite_and_needs_class_labels():
    model = tiny_module(num_classes=10, cond_drop_prob=0.1)
    for guidance in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"guidance={guidance} is not a finite number"):
            model.sample(num_samples=2, cond=3, guidance=guidance)
    for cond in ("null", torch.tensor([10, 10])):  # all labels null: guidance would change nothing
        with pytest.raises(ValueError, match="guidance=3 needs class labels, but all labels are the null class"):
            model.sample(num_samples=2, cond=cond, guidance=3.0)
    model.sample(num_samples=2, cond=torch.tensor([10, 3]), guidance=3.0, solver="euler", steps=1)


def test_guidance_without_label_dropout_warns():
    with pytest.warns(UserWarning, match="cond_drop_prob=0"):
        tiny_module(num_classes=10).sample(num_samples=2, cond=1, guidance=3.0)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="needs a class-conditional net"):
        tiny_module(cond_drop_prob=0.1)
    with pytest.raises(ValueError, match=r"cond_drop_prob must be in \[0, 1\)"):
        tiny_module(num_classes=3, cond_drop_prob=1.0)
    model = tiny_module(num_classes=10)
    with pytest.raises(ValueError, match="batches carry no 'cond' labels.*data.num_classes"):
        model.training_step({"x1": torch.randn(4, 1, 8, 8)}, 0)


def test_conditional_training_reduces_loss_on_digits(tmp_path):
    """A few steps of class-conditional OT-CFM on digits, through the Trainer."""
    model = tiny_module(num_classes=10, cond_drop_prob=0.1)
    dm = ImageDataModule("digits", num_classes=10, batch_size=64, val_fraction=0.1)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, default_root_dir=tmp_path)
    torch.manual_seed(0)
    before = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    after = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before


def test_mnist_cond_config_wires_labels_and_dropout(tmp_path):
    cfg = compose_config(["experiment=mnist_cond", f"data.root={tmp_path}"], tmp_path / "run")
    model = hydra.utils.instantiate(cfg.model)
    assert model.num_classes == 10 and model.hparams.cond_drop_prob == 0.1
    assert cfg.callbacks.samples.guidance == 2.0 and cfg.data.num_classes == 10
    assert model.source.shape == (1, 28, 28)
