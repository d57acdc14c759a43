"""UNet: shapes across resolutions/channels/conditioning, presets, TorchCFM parity, bad input."""

from __future__ import annotations

import hydra
import pytest
import torch

from conftest import compose_config
from fm_lightning.nets import UNet
from image_helpers import tiny_unet


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers weights, so every input can reach the output."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


@pytest.mark.parametrize(
    "channels, size, mult, attn, num_classes",
    [(1, 8, [1, 2], [4], 0), (3, 16, [1, 2, 2], [8, 4], 10), (1, 28, [1, 2, 2], [7], 10), (3, 32, [1, 2, 2, 2], [16], 0),
     (4, 12, [1, 1], [], 3)],
)
def test_output_shape_matches_input(channels, size, mult, attn, num_classes):
    net = tiny_unet(num_classes, in_channels=channels, image_size=size, channel_mult=mult, attention_resolutions=attn)
    x = torch.randn(3, channels, size, size)
    cond = torch.tensor([0, 1, num_classes]) % (num_classes + 1) if num_classes else None
    v = randomize(net)(x, torch.rand(3), cond)
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().sum() > 0


def test_non_square_inputs_and_scalar_time():
    net = tiny_unet(image_size=8)
    x = torch.randn(2, 1, 8, 16)
    assert net(x, torch.tensor(0.3)).shape == x.shape


def test_zero_initialised_output_and_null_class():
    net = tiny_unet(num_classes=5)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert net(x, t).abs().max() == 0  # output conv starts at zero, like ADM's
    randomize(net)
    null = torch.full((4,), 5)
    assert torch.equal(net(x, t), net(x, t, null))  # cond=None is the null class
    assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2, 3])), net(x, t, null))


def test_bf16_autocast_forward_keeps_output_dtype_finite():
    net = randomize(tiny_unet())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert torch.isfinite(v.float()).all()


def _net_from_config(net: str, *overrides: str) -> UNet:
    cfg = compose_config([f"model/net={net}", "data=images", *overrides])
    return hydra.utils.instantiate(cfg.model.net)


def test_unet_cifar10_preset_has_torchcfm_parameter_count():
    net = _net_from_config("unet_cifar10", "data.dataset=cifar10", "data.channels=3", "data.image_size=32",
                           "data.num_classes=0")
    assert n_params(net) == 35_746_307  # TorchCFM's UNetModelWrapper, same configuration
    assert net(torch.randn(1, 3, 32, 32), torch.rand(1)).shape == (1, 3, 32, 32)
    ssn = UNet(3, 32, 128, [1, 2, 2, 2], 2, [16], 4, 64, 0.1, 0, True, 32)
    assert n_params(ssn) == 38_307_203  # with ADM's scale-shift norm


def test_unet_mnist_and_tiny_presets():
    mnist = _net_from_config("unet_mnist", "data.dataset=mnist", "data.image_size=28")
    assert 0.9e6 < n_params(mnist) < 1.3e6 and mnist.num_classes == 10
    assert mnist(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 10])).shape == (2, 1, 28, 28)
    tiny = _net_from_config("unet_tiny")
    assert n_params(tiny) < 1e6
    assert tiny(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 9])).shape == (2, 1, 8, 8)


def test_same_function_as_torchcfm_unet():
    unet_module = pytest.importorskip("torchcfm.models.unet.unet")
    torch.manual_seed(0)
    ref = unet_module.UNetModelWrapper(dim=(3, 16, 16), num_res_blocks=1, num_channels=32, channel_mult=[1, 2],
                                       num_heads=2, num_head_channels=16, attention_resolutions="8", dropout=0.0).eval()
    ours = UNet(3, 16, 32, [1, 2], 1, [8], 2, 16, 0.0, 0, False, 32).eval()
    ref_params, our_params = list(ref.parameters()), list(ours.parameters())
    assert [p.shape for p in ref_params] == [p.shape for p in our_params]
    with torch.no_grad():
        for a, b in zip(ref_params, our_params):
            a.normal_(0, 0.05)
            b.copy_(a)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    torch.testing.assert_close(ours(x, t), ref(t, x), rtol=1e-5, atol=1e-5)


def test_image_size_the_downsampling_cannot_handle():
    with pytest.raises(ValueError, match="multiple of 8.*28"):
        UNet(in_channels=1, image_size=28, channel_mult=[1, 2, 2, 2])
    net = tiny_unet(image_size=8)
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 1, 9, 9), torch.rand(1))


def test_channel_mismatch():
    net = tiny_unet(in_channels=3)
    with pytest.raises(ValueError, match="in_channels=3.*data.channels"):
        net(torch.randn(2, 1, 8, 8), torch.rand(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"attention_resolutions": [5]}, "attention_resolutions"), ({"num_groups": 3}, "num_groups"),
     ({"dropout": 1.0}, "dropout"), ({"channel_mult": []}, "channel_mult"),
     ({"num_head_channels": 3}, "num_head_channels"), ({"num_heads": 3, "num_head_channels": -1}, "num_heads")],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet(**kwargs)


def test_unconditional_net_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet()(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([1]))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.bfloat16, 5e-2)])
def test_unet_runs_in_float64_and_bfloat16(dtype, tol):
    """After .double() / .bfloat16() the UNet runs in that dtype (16-bit group norms in fp32) and
    gives the float32 net's output within the dtype's precision."""
    torch.manual_seed(0)
    net = randomize(tiny_unet(num_classes=3)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        ref = net(x, t)
        out = net.to(dtype)(x.to(dtype), t.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
