"""FlowMatchingModule takes built objects (load_checkpoint rebuilds them from the recorded specs),
and its attribute handling keeps nn.Module's semantics."""

import functools

import pytest
import torch
from torch import nn

from datamodules.toy import Gaussian
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.module import FlowMatchingModule, load_checkpoint
from fm_lightning.nets import MLP


def test_the_constructor_takes_objects_and_load_checkpoint_rebuilds_them_from_their_specs(tmp_path):
    model = FlowMatchingModule(MLP(2, 8, 1), CFMObjective(ICFMPath(0.0)), Gaussian(2),
                               optimizer=functools.partial(torch.optim.SGD, lr=0.5),
                               lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "m.ckpt")
    loaded = load_checkpoint(tmp_path / "m.ckpt")
    assert dict(loaded.hparams) == dict(model.hparams)
    scheduler = loaded.lr_scheduler_factory(loaded.optimizer_factory(loaded.parameters()))
    assert scheduler.step_size == 3 and scheduler.optimizer.defaults["lr"] == 0.5
    # Lightning's own loader takes the same safe path.
    lightning_loaded = FlowMatchingModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert dict(lightning_loaded.hparams) == dict(model.hparams)
    assert all(torch.equal(a, b) for a, b in zip(lightning_loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(TypeError, match="checkpoint_path and map_location only, not \\['strict'\\]"):
        FlowMatchingModule.load_from_checkpoint(tmp_path / "m.ckpt", strict=False)
    for name in ("net", "source", "optimizer"):  # specs are refused where objects belong
        parts = {"net": MLP(2, 8, 1), "flow": CFMObjective(ICFMPath(0.0)), "source": Gaussian(2),
                 name: model.hparams[name]}
        with pytest.raises(ValueError, match=f"^{name} is a class_path/init_args spec; .* load_checkpoint"):
            FlowMatchingModule(**parts)
    with pytest.raises(ValueError, match="flow must be a CFMObjective, got 3"):
        FlowMatchingModule(MLP(2, 8, 1), 3, Gaussian(2))


def test_plain_attribute_fast_path_keeps_module_semantics():
    model = FlowMatchingModule(MLP(2, 8, 1), CFMObjective(ICFMPath(0.0)), source="gaussian")
    keys = set(model.state_dict())
    model._current_fx_name = "training_step"  # Lightning's per-hook bookkeeping
    model._current_fx_name = None
    assert model._current_fx_name is None and "_current_fx_name" in vars(model)
    assert set(model.state_dict()) == keys
    # New names, tensors, parameters and submodules still go through nn.Module.
    model.plain = 3
    model.plain = nn.Linear(2, 2)
    assert "plain" in model._modules and "plain" not in vars(model)
    assert "plain.weight" in model.state_dict()
    model.register_buffer("extra", torch.ones(2))
    model.extra = None
    assert model._buffers["extra"] is None
    model.scale = nn.Parameter(torch.ones(1))
    model.scale = None
    assert model._parameters["scale"] is None
