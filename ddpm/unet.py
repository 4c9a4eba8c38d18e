"""The DDPM U-Net (Ho et al. 2020, Appendix B), sized by ``UNetConfig``.

A PixelCNN++-style U-Net: per resolution level ``num_res_blocks`` residual blocks
(GroupNorm → SiLU → 3×3 conv, with the sinusoidal timestep embedding added after the
first conv, dropout before the second), self-attention at the resolutions listed in
``attn_resolutions``, and skip connections from every block of the encoder into the
decoder. ``ch_mult[i]`` multiplies the base width ``ch`` at level i; each level but
the last halves the resolution. The DDPM CIFAR-10 model is ch=128,
ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1 (35.7M
parameters). The image size and channel counts come from the data and the objective,
not from the config.

A class-conditional U-Net (``num_classes`` = K > 0) adds a learned class embedding to the
timestep embedding, as guided-diffusion's ``label_emb`` does; row K of the embedding is
the null class ∅ of classifier-free guidance (``ddpm.guidance``). It is called as
``net(x, t, y)``; an unconditional one as ``net(x, t)``.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm.config.network import UNetConfig
from ddpm.errors import InputError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM's get_timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups and at least 2 channels per group (when there are 2 channels).

    One channel per group would subtract every channel's spatial mean, and with it the per-channel
    timestep (and class) embedding a ResBlock adds just before its second norm: the network could
    not see t. 32 groups of 2+ channels (the DDPM models, ch >= 64) are unchanged by the floor.
    """
    groups = math.gcd(32, channels)
    if channels // groups < 2 and channels > 1:
        groups = math.gcd(32, channels // 2)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        # The 1×1 convolutions run as linear maps over the H·W positions: q, k, v come out
        # with unit stride in C, the layout SDPA's fused kernels take (strided ones make it
        # fall back to the unfused path, which materialises and copies more).
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                              # [B, HW, C]
        qkv = F.linear(h, self.qkv.weight.view(3 * C, C), self.qkv.bias)         # [B, HW, 3C]
        q, k, v = qkv.view(B, 1, H * W, 3, C).unbind(3)                          # [B, 1, HW, C] each
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]                       # [B, HW, C]
        h = F.linear(h, self.proj.weight.view(C, C), self.proj.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling. On CPU every pixel is repeated twice along each axis
    (``repeat_interleave``): the same values as ``F.interpolate(mode="nearest")``, whose CPU
    kernel takes 1.5-3× as long forward and backward; elsewhere ``F.interpolate``."""

    def forward(self, x):
        if x.device.type == "cpu":
            return x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Block(nn.Module):
    """A ResBlock, followed by attention when the level asks for it."""

    def __init__(self, cin, cout, temb_dim, dropout, attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, temb_dim, dropout)
        self.attn = AttnBlock(cout) if attn else nn.Identity()

    def forward(self, x, temb):
        return self.attn(self.res(x, temb))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, *, image_size: int, in_channels: int, out_channels: int,
                 num_classes: int = 0):
        super().__init__()
        config.validate(image_size)
        self.config = c = config
        temb_dim = 4 * c.ch
        self.temb = nn.Sequential(nn.Linear(c.ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, c.ch, 3, padding=1)

        # Encoder: record the channels of every activation pushed onto the skip stack.
        self.down = nn.ModuleList()
        skips, cur, res = [c.ch], c.ch, image_size
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(Block(cur, c.ch * mult, temb_dim, c.dropout, res in c.attn_resolutions))
                cur = c.ch * mult
                skips.append(cur)
            if level != len(c.ch_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                res //= 2
                skips.append(cur)

        self.mid = nn.ModuleList([Block(cur, cur, temb_dim, c.dropout, True), Block(cur, cur, temb_dim, c.dropout, False)])

        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(Block(cur + skips.pop(), c.ch * mult, temb_dim, c.dropout, res in c.attn_resolutions))
                cur = c.ch * mult
            if level != 0:
                self.up.append(nn.Sequential(Upsample(), nn.Conv2d(cur, cur, 3, padding=1)))
                res *= 2
        self.norm_out, self.conv_out = norm(cur), nn.Conv2d(cur, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        # Last, so that the layers above draw the same initial weights as an unconditional U-Net's.
        if num_classes < 0:
            raise InputError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None  # + the null class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # the embedding in the weights' dtype: bfloat16 for inference on weights cast once (float32 under autocast)
        temb = self.temb(timestep_embedding(t, self.config.ch).to(self.conv_in.weight.dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError(f"this U-Net is class-conditional: pass labels y in [0, {self.num_classes}] "
                                 f"({self.num_classes} = the null class)")
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this U-Net is unconditional (num_classes = 0): it takes no labels")
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), temb) if isinstance(layer, Block) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
