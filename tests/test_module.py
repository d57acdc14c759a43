"""FlowMatchingModule's attribute handling keeps nn.Module's semantics."""

import torch
from torch import nn

from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.module import FlowMatchingModule
from fm_lightning.nets import MLP


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
