"""Learning-rate schedules against their closed forms; a resumed schedule follows the config."""

from __future__ import annotations

import math
import types

import pytest
import torch

from fm_lightning.schedules import WarmupConstant, WarmupCosine


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _sgd(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_cosine_matches_its_closed_form():
    lrs = _lrs(WarmupCosine(_sgd(2.0), warmup_steps=4, total_steps=24, final_lr_ratio=0.1), 30)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    for step in range(4, 30):
        progress = min(1.0, (step - 4) / 20)
        assert lrs[step] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert lrs[14] == pytest.approx(2.0 * 0.55) and lrs[24:] == pytest.approx([0.2] * 6)


def test_warmup_constant():
    assert _lrs(WarmupConstant(_sgd(), warmup_steps=3), 6) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


def test_resumed_schedule_follows_the_configured_length():
    first = WarmupCosine(_sgd(), warmup_steps=2, total_steps=12, final_lr_ratio=0.0)
    _lrs(first, 12)
    longer = WarmupCosine(_sgd(), warmup_steps=2, total_steps=22, final_lr_ratio=0.0)
    longer.optimizer.load_state_dict(first.optimizer.state_dict())  # as Lightning restores: optimizer first
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # the old schedule's end
    longer.load_state_dict(first.state_dict())
    assert longer.total_steps == 22 and longer.last_epoch == 12
    expected = 0.5 * (1 + math.cos(math.pi * 10 / 20))  # step 12 of the longer schedule, at once
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(expected) == longer.get_last_lr()[0]
    longer.optimizer.step()
    longer.step()
    assert longer.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))


def test_total_steps_null_follows_the_trainers_max_steps():
    import hydra

    from conftest import compose_config

    cfg = compose_config(["model.lr_scheduler.total_steps=null", "model.lr_scheduler.warmup_steps=2"])
    module = hydra.utils.instantiate(cfg.model)
    module._trainer = types.SimpleNamespace(max_steps=40)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.total_steps == 40
    module._trainer = types.SimpleNamespace(max_steps=-1)
    with pytest.raises(ValueError, match=r"model.lr_scheduler.total_steps \(fm-cli: --model.lr_scheduler.init_args."
                                         r"total_steps\) is null, so it follows trainer.max_steps, which is not set"):
        module.configure_optimizers()


@pytest.mark.parametrize("kwargs, match", [
    ({"final_lr_ratio": -1}, "0 <= final_lr_ratio <= 1"),
    ({"final_lr_ratio": float("nan")}, "0 <= final_lr_ratio <= 1"),
    ({"warmup_steps": 10, "total_steps": 10}, "0 <= warmup_steps < total_steps"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(_sgd(), **kwargs)


def test_warmup_errors_name_the_fm_train_and_fm_cli_keys_and_the_length_to_raise():
    """The length comes from total_steps when it is set, else from trainer.max_steps."""
    keys = r"lower model.lr_scheduler.warmup_steps \(fm-cli: --model.lr_scheduler.init_args.warmup_steps\) or raise "
    with pytest.raises(ValueError, match=keys + r"model.lr_scheduler.total_steps \(fm-cli: "
                                             r"--model.lr_scheduler.init_args.total_steps\)$"):
        WarmupCosine(_sgd(), warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match=keys + "trainer.max_steps$"):
        WarmupCosine(_sgd(), warmup_steps=10, total_steps=None).set_total_steps(5)
