"""Convolutional networks of the tokenizer, in the VQGAN / latent-diffusion style.

Encoder: conv → [ResBlocks, downsample] per level → mid (ResBlock, attention, ResBlock) → GroupNorm, SiLU, conv
to the latent channels. Decoder: the mirror image with nearest-neighbour upsampling. PatchDiscriminator: the
pix2pix/VQGAN N-layer patch critic used by the adversarial loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN, fewer when a narrow demo model has fewer channels than that.
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x_BChw) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions (used only at the lowest resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).transpose(-1, -2).unbind(1)
        out_BLC = F.scaled_dot_product_attention(q, k, v)
        return x_BChw + self.proj(out_BLC.transpose(-1, -2).reshape(B, C, h, w))


class Encoder(nn.Module):
    def __init__(self, channels: int, multipliers: list[int], res_blocks: int, attention: bool, latent_channels: int):
        super().__init__()
        widths = [channels * m for m in multipliers]
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        layers: list[nn.Module] = []
        c = channels
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResBlock(c, width))
                c = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(ResBlock(c, c), Attention(c) if attention else nn.Identity(), ResBlock(c, c))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, latent_channels, 3, padding=1))

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.down(self.conv_in(img_B3HW))))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, channels: int, multipliers: list[int], res_blocks: int, attention: bool, latent_channels: int):
        super().__init__()
        widths = [channels * m for m in multipliers]
        c = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(c, c), Attention(c) if attention else nn.Identity(), ResBlock(c, c))
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            # One more block per level than the encoder, as in VQGAN: decoding is the harder direction.
            for _ in range(res_blocks + 1):
                layers.append(ResBlock(c, widths[level]))
                c = widths[level]
            if level > 0:
                layers.append(Upsample(c))
        self.up = nn.Sequential(*layers)
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is computed against (VQGAN's choice)."""
        return self.out[-1].weight

    def forward(self, f_BChw: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.mid(self.conv_in(f_BChw))))


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN critic: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(c, c_next, 4, stride=stride, padding=1, bias=False), norm(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        blocks.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(img_B3HW)
