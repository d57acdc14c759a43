"""ADM-style UNet velocity network for images (Dhariwal & Nichol's guided-diffusion layout).

``v = UNet(x, t, cond=None)`` with ``x`` (B, C, H, W), ``t`` (B,) in [0, 1] and optional class
labels ``cond`` (B,). Layout, top to bottom:

- a sinusoidal embedding of ``t`` (``[cos(t*f_k), sin(t*f_k)]``, ``f_k = 10000^(-k/half)``) and a
  two-layer MLP, plus a learned class embedding (label ``num_classes`` is the *null* class used
  for classifier-free guidance);
- an encoder of ``len(channel_mult)`` levels, each with ``num_res_blocks`` residual blocks (and
  self-attention at ``attention_resolutions``), halving the resolution between levels;
- a middle block (residual, attention, residual);
- a mirrored decoder with skip connections, and a zero-initialised output convolution.

With ``use_scale_shift_norm=False`` and the ``unet_cifar10`` preset this is TorchCFM's CIFAR-10
network layer for layer (35,746,307 parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .labels import add_label_embedding

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of times ``t`` (B,): ``[cos(t*f_k), sin(t*f_k)]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm of ``x`` (B, C, H, W); 16-bit inputs (autocast, or a ``.half()`` /
    ``.bfloat16()`` net) are normalised in fp32 and cast back, float32/float64 as they are."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``x + F(x, emb)``: norm-SiLU-conv, time/class injection, norm-SiLU-dropout-conv (zero init).

    With ``use_scale_shift_norm`` the embedding gives ``(scale, shift)`` and the second norm
    becomes ``norm(h)*(1 + scale) + shift``; otherwise it is added to ``h`` before that norm.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 use_scale_shift_norm: bool, num_groups: int) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(num_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = GroupNorm32(num_groups, out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised projection."""

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(num_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        # Heads are split before q/k/v (guided-diffusion's "legacy" order): (B, heads, 3*ch, T).
        qkv = self.qkv(self.norm(flat)).reshape(b, self.num_heads, 3 * c // self.num_heads, h * w)
        q, k, v = (z.transpose(-1, -2) for z in qkv.chunk(3, dim=2))
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, ch)
        a = a.transpose(-1, -2).reshape(b, c, h * w)
        return (flat + self.proj_out(a)).reshape(b, c, h, w)


class _Level(nn.Module):
    """A residual block optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """ADM-style UNet velocity field ``v = net(x, t, cond=None)``.

    Args:
        in_channels: image channels ``C`` (output has the same).
        image_size: nominal side length; it fixes where attention sits and must be divisible by
            ``2**(len(channel_mult) - 1)``. Inputs may have any ``H, W`` divisible by that factor.
        model_channels: base width; level ``i`` has ``model_channels*channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per level in the encoder (``+1`` in the decoder).
        attention_resolutions: resolutions (side lengths, e.g. ``[16]``) with self-attention.
        num_heads: attention heads when ``num_head_channels == -1``.
        num_head_channels: channels per head (overrides ``num_heads``); ``-1`` to use ``num_heads``.
        dropout: dropout rate inside residual blocks.
        num_classes: number of classes for class conditioning (0: unconditional). Labels run
            ``0..num_classes-1``; label ``num_classes`` is the null class (``cond=None`` means null).
        use_scale_shift_norm: FiLM-style ``norm(h)*(1+scale)+shift`` conditioning (ADM);
            ``False`` adds the embedding instead (TorchCFM's CIFAR-10 setting).
        num_groups: GroupNorm groups; every level's width must be divisible by it.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] | list[int] = (16,),
        num_heads: int = 4,
        num_head_channels: int = 64,
        dropout: float = 0.1,
        num_classes: int = 0,
        use_scale_shift_norm: bool = True,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        channel_mult, attention_resolutions = list(channel_mult), [int(r) for r in attention_resolutions]
        if in_channels < 1 or model_channels < 1 or num_res_blocks < 1 or not channel_mult:
            raise ValueError(
                "UNet needs in_channels, model_channels, num_res_blocks >= 1 and a non-empty channel_mult, got "
                f"{in_channels}, {model_channels}, {num_res_blocks}, {channel_mult}"
            )
        if not 0 <= dropout < 1 or num_classes < 0:
            raise ValueError(f"UNet needs 0 <= dropout < 1 and num_classes >= 0, got {dropout} and {num_classes}")
        self.in_channels, self.image_size, self.model_channels = in_channels, image_size, model_channels
        self.channel_mult, self.num_res_blocks = channel_mult, num_res_blocks
        self.attention_resolutions, self.num_heads, self.num_head_channels = attention_resolutions, num_heads, num_head_channels
        self.dropout, self.num_classes = dropout, num_classes
        self.use_scale_shift_norm, self.num_groups = use_scale_shift_norm, num_groups

        self.factor = 2 ** (len(channel_mult) - 1)
        if image_size < 1 or image_size % self.factor:
            raise ValueError(
                f"UNet with {len(channel_mult)} levels (channel_mult={channel_mult}) halves the image "
                f"{len(channel_mult) - 1} times, so image_size must be a multiple of {self.factor}; got {image_size}. "
                f"Resize the data (data.image_size) to e.g. {max(self.factor, -(-image_size // self.factor) * self.factor)}, "
                "or use fewer levels in channel_mult"
            )
        reachable = [image_size // 2**i for i in range(len(channel_mult))]
        bad = [r for r in attention_resolutions if r not in reachable]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not among this UNet's resolutions {reachable}")
        widths = {model_channels * m for m in channel_mult}
        if any(w % num_groups for w in widths):
            raise ValueError(f"every level width {sorted(widths)} must be divisible by num_groups={num_groups}")

        def heads(ch: int) -> int:
            if num_head_channels == -1:
                if ch % num_heads:
                    raise ValueError(f"attention width {ch} is not divisible by num_heads={num_heads}")
                return num_heads
            if ch % num_head_channels:
                raise ValueError(f"attention width {ch} is not divisible by num_head_channels={num_head_channels}")
            return ch // num_head_channels

        def level(ch_in: int, ch_out: int, res: int) -> _Level:
            block = ResBlock(ch_in, emb_dim, ch_out, dropout, use_scale_shift_norm, num_groups)
            attn = AttentionBlock(ch_out, heads(ch_out), num_groups) if res in attention_resolutions else None
            return _Level(block, attn)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        ch = model_channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, res = [ch], image_size
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level(ch, model_channels * mult, res))
                ch = model_channels * mult
                skips.append(ch)
            if i != len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.middle = nn.ModuleList([
            ResBlock(ch, emb_dim, ch, dropout, use_scale_shift_norm, num_groups),
            AttentionBlock(ch, heads(ch), num_groups),
            ResBlock(ch, emb_dim, ch, dropout, use_scale_shift_norm, num_groups),
        ])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                block = level(ch + skips.pop(), model_channels * mult, res)
                ch = model_channels * mult
                upsample = None
                if i and j == num_res_blocks:
                    upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                    res *= 2
                self.up.append(nn.ModuleList([block, upsample]) if upsample is not None else nn.ModuleList([block]))
        self.out = nn.Sequential(
            GroupNorm32(num_groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1))
        )

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Velocity (B, C, H, W) at ``x`` (B, C, H, W), times ``t`` (B,) and labels ``cond`` (B,)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet(in_channels={self.in_channels}) expects images (B, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}; set model.net.in_channels to the data's channel count (data.channels)"
            )
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"UNet with channel_mult={self.channel_mult} needs H and W divisible by {self.factor}, got "
                f"{tuple(x.shape[2:])}; resize the data or use fewer levels"
            )
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        emb = add_label_embedding(emb, self.label_emb, cond, "UNet")
        h = self.input_conv(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _Level) else layer(h)
            hs.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)
        for layers in self.up:
            h = layers[0](torch.cat([h, hs.pop()], dim=1), emb)
            if len(layers) > 1:
                h = layers[1](h)
        return self.out(h)
