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


def test_exp_linear_forward_mode_ad():
    """Dual tensors and forward-mode jacobians work; they match the closed-form derivative and the
    reverse-mode jacobian of the same MLP with torch's nn.SELU."""
    from torch.autograd import forward_ad

    act, x, tangent = ExpLinear(), torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(act(forward_ad.make_dual(x, tangent))).tangent
    slope = torch.where(x > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * torch.exp(x))
    torch.testing.assert_close(out, slope * tangent, rtol=1e-12, atol=1e-15)
    net = MLP(3, 16, 2).double()
    ref = MLP(3, 16, 2).double()
    ref.load_state_dict(net.state_dict())
    ref.body = torch.nn.Sequential(*[torch.nn.SELU() if isinstance(m, ExpLinear) else m for m in ref.body])
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    fwd = torch.autograd.functional.jacobian(lambda z: net(z, t), x, strategy="forward-mode", vectorize=True)
    torch.testing.assert_close(fwd, torch.autograd.functional.jacobian(lambda z: ref(z, t), x))


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_exp_linear_16bit_is_as_accurate_as_torch(dtype, ulp):
    """In bf16/fp16 ExpLinear is within one rounding of the float64 SELU of the same inputs
    (exp(x) - 1 would lose the small values near 0)."""
    x = torch.cat([torch.linspace(-0.05, 0.05, 201), torch.randn(200)]).to(dtype)
    out = ExpLinear()(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), torch.selu(x.double()), rtol=ulp, atol=0)


def test_mlp_cond_none_is_the_null_class():
    """A class-conditional MLP given no labels uses the null label num_classes, as the UNet does."""
    net, x, t = MLP(2, 16, 2, num_classes=3), torch.randn(6, 2), torch.rand(6)
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((6,), 3)), rtol=0, atol=0)
    assert not torch.allclose(net(x, t), net(x, t, torch.zeros(6, dtype=torch.long)))
