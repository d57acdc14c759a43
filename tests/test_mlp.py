"""The MLP's ELU/SELU activation against its closed form and torch's kernels."""

import math

import pytest
import torch

from fm_lightning.nets.mlp import ACTIVATIONS, MLP, ExpLinear

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


@pytest.mark.parametrize("name, alpha, scale", [("selu", SELU_ALPHA, SELU_SCALE), ("elu", 1.0, 1.0)])
def test_exp_linear_matches_the_closed_form_and_torch(name, alpha, scale):
    act = ACTIVATIONS[name]()
    x = torch.tensor([-30.0, -2.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 3.0], dtype=torch.float64)
    expected = [scale * (v if v > 0 else alpha * math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(act(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch_act = torch.nn.SELU() if name == "selu" else torch.nn.ELU()
    y = torch.randn(64, 32, requires_grad=True)
    y2 = y.detach().clone().requires_grad_()
    torch.testing.assert_close(act(y), torch_act(y2), rtol=0, atol=3e-7)
    g = torch.randn(64, 32)
    act(y).backward(g)
    torch_act(y2).backward(g)
    torch.testing.assert_close(y.grad, y2.grad, rtol=1e-6, atol=1e-6)


def test_exp_linear_gradients_vmap_and_bf16():
    act = ExpLinear()
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(act, (x,))
    # The derivative at 0 is the left one, as torch's: scale * alpha.
    z = torch.zeros(1, requires_grad=True)
    act(z).sum().backward()
    assert z.grad.item() == pytest.approx(SELU_SCALE * SELU_ALPHA, rel=1e-6)
    batch = torch.randn(4, 6)
    torch.testing.assert_close(torch.vmap(act)(batch), act(batch))
    jac = torch.func.jacrev(act)(batch[0])
    torch.testing.assert_close(jac, torch.diag(torch.where(batch[0] > 0, SELU_SCALE, act(batch[0]) + SELU_SCALE * SELU_ALPHA)))
    xb = torch.randn(8, 8, dtype=torch.bfloat16, requires_grad=True)
    out = act(xb)
    out.sum().backward()
    assert out.dtype == xb.grad.dtype == torch.bfloat16


def test_weights_of_an_mlp_with_torchs_selu_load_and_give_the_same_field():
    """Checkpoints written when the MLP used nn.SELU load strictly and give the same output."""
    old = MLP(2, 16, 3)
    for i, layer in enumerate(old.body):
        if isinstance(layer, ExpLinear):
            old.body[i] = torch.nn.SELU()
    new = MLP(2, 16, 3)
    new.load_state_dict(old.state_dict(), strict=True)
    x, t = torch.randn(32, 2), torch.rand(32)
    torch.testing.assert_close(new(x, t), old(x, t), rtol=0, atol=1e-6)
