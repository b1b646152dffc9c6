"""Convolutional networks of the tokenizer: the latent-diffusion / VQGAN autoencoder that VAR's VQVAE uses.

Encoder: conv_in → per level [ResBlocks (each followed by self-attention on attention levels), downsample] →
mid (ResBlock, attention, ResBlock) → GroupNorm, SiLU, conv_out to the latent channels. Decoder: the mirror image,
one more ResBlock per level, nearest-neighbour upsampling. Configured as VAR's ``vae_ch160v4096z32`` (ch 160,
multipliers 1, 1, 2, 2, 4, two blocks, attention at the lowest level) the module tree and every tensor shape are
VAR's, so its released weights load under the same names (``pipeline.models.var_checkpoints``).

PatchDiscriminator: the pix2pix/VQGAN N-layer patch critic used by the adversarial loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm(channels: int, min_group_channels: int = 4) -> nn.GroupNorm:
    # 32 groups as in VQGAN and VAR (ch 160: 5 channels each). A narrow network gets fewer groups, never fewer than
    # ``min_group_channels`` channels in each: with one channel per group, GroupNorm removes every channel's mean
    # over the image, and a decoder that ends on such a norm can hardly set an image's colour (on CIFAR-10 the
    # channels-16 tokenizer's reconstructions lost most of their saturation; docs/results.md, "CIFAR-10").
    groups = 32
    while channels % groups or (groups > 1 and channels // groups < min_group_channels):
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, min_group_channels: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in, min_group_channels), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out, min_group_channels), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x_BChw) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, min_group_channels: int):
        super().__init__()
        self.norm = norm(channels, min_group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).transpose(-1, -2).unbind(1)
        out_BLC = F.scaled_dot_product_attention(q, k, v)
        return x_BChw + self.proj_out(out_BLC.transpose(-1, -2).reshape(B, C, h, w))


class Downsample(nn.Module):
    """Halve the side: zero-pad right and bottom by one, then an unpadded stride-2 3×3 conv (VQGAN's asymmetry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResBlocks, each followed by self-attention where enabled. The encoder gives it a
    ``downsample`` and the decoder an ``upsample`` afterwards, except at the ends of the pyramid."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool, min_group_channels: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_out, min_group_channels) for i in range(blocks)
        )
        self.attn = nn.ModuleList(Attention(c_out, min_group_channels) for _ in range(blocks if attention else 0))

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x_BChw = block(x_BChw)
            if self.attn:
                x_BChw = self.attn[i](x_BChw)
        return x_BChw


class Middle(nn.Module):
    def __init__(self, channels: int, attention: bool, min_group_channels: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, min_group_channels)
        self.attn_1 = Attention(channels, min_group_channels) if attention else nn.Identity()
        self.block_2 = ResBlock(channels, channels, min_group_channels)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BChw)))


def attention_flags(levels: int, attention_levels: list[int]) -> list[bool]:
    """Per level (0 = full resolution), whether its blocks are followed by attention; −1 names the lowest."""
    chosen = {a % levels for a in attention_levels}
    return [level in chosen for level in range(levels)]


class Encoder(nn.Module):
    def __init__(
        self,
        channels: int,
        multipliers: list[int],
        res_blocks: int,
        attention_levels: list[int],
        mid_attention: bool,
        latent_channels: int,
        min_group_channels: int = 4,
    ):
        super().__init__()
        widths = [channels * m for m in multipliers]
        attend = attention_flags(len(widths), attention_levels)
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.down = nn.ModuleList()
        c = channels
        for level, width in enumerate(widths):
            self.down.append(Level(c, width, res_blocks, attend[level], min_group_channels))
            c = width
            if level < len(widths) - 1:
                self.down[level].downsample = Downsample(c)
        self.mid = Middle(c, mid_attention, min_group_channels)
        self.norm_out = norm(c, min_group_channels)
        self.conv_out = nn.Conv2d(c, latent_channels, 3, padding=1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_B3HW)
        for i, level in enumerate(self.down):
            h = level(h)
            if i < len(self.down) - 1:
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(
        self,
        channels: int,
        multipliers: list[int],
        res_blocks: int,
        attention_levels: list[int],
        mid_attention: bool,
        latent_channels: int,
        min_group_channels: int = 4,
    ):
        super().__init__()
        widths = [channels * m for m in multipliers]
        attend = attention_flags(len(widths), attention_levels)
        c = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.mid = Middle(c, mid_attention, min_group_channels)
        # Indexed by level like the encoder (up[0] is full resolution) but run from the lowest level up. One more
        # block per level than the encoder, as in VQGAN: decoding is the harder direction.
        levels: list[Level] = [None] * len(widths)  # type: ignore[list-item]
        for level in reversed(range(len(widths))):
            levels[level] = Level(c, widths[level], res_blocks + 1, attend[level], min_group_channels)
            c = widths[level]
            if level > 0:
                levels[level].upsample = Upsample(c)
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(c, min_group_channels)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is computed against (VQGAN's choice)."""
        return self.conv_out.weight

    def forward(self, f_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(f_BChw))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN critic: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            # The critic keeps the grouping it was measured with (two channels a group at its defaults' narrowest).
            conv = nn.Conv2d(c, c_next, 4, stride=stride, padding=1, bias=False)
            blocks += [conv, norm(c_next, min_group_channels=1), nn.LeakyReLU(0.2)]
            c = c_next
        blocks.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(img_B3HW)
