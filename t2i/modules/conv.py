"""Convolutional blocks of the image and scene tokenizers (VQGAN, discrete VAE, VQ-SEG).

Encoder and Decoder follow the VQGAN layout (Esser et al. 2021) at a smaller scale:
residual blocks at each resolution, a stride-2 convolution to go down, nearest-neighbour
upsampling plus a convolution to go up, GroupNorm + SiLU before every convolution. The
patch discriminator is the PatchGAN of pix2pix (Isola et al. 2017), returning its
intermediate feature maps too, which the tokenizers use as a download-free perceptual loss.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConvStackConfig:
    """The Encoder / Decoder shape shared by every tokenizer's config."""

    channels: int = 32  # width of the first level
    mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; downsampling 2**(len-1)
    res_blocks: int = 1  # residual blocks per level

    @property
    def factor(self) -> int:
        """Downsampling factor: 32 px images become 32 / factor tokens a side."""
        return 2 ** (len(self.mults) - 1)


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (tiny test models have fewer)."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, out_channels, H/f, W/f], f = 2 ** (len(mults) - 1)."""

    def __init__(self, in_channels: int, out_channels: int, channels: int,
                 mults: tuple[int, ...], res_blocks: int):
        super().__init__()
        widths = [channels * m for m in mults]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        cin = widths[0]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        layers += [ResBlock(cin, cin), norm(cin), nn.SiLU(), nn.Conv2d(cin, out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """[B, in_channels, h, w] -> [B, out_channels, h*f, w*f]; the mirror of Encoder."""

    def __init__(self, in_channels: int, out_channels: int, channels: int,
                 mults: tuple[int, ...], res_blocks: int):
        super().__init__()
        widths = [channels * m for m in reversed(mults)]
        cin = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cin, 3, padding=1), ResBlock(cin, cin)]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResBlock(cin, width))
                cin = width
            if level < len(widths) - 1:
                layers.append(Upsample(cin))
        layers += [norm(cin), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, out_channels, 3, padding=1)  # the "last layer" of VQGAN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(x))


class PatchDiscriminator(nn.Module):
    """PatchGAN: [B, C, H, W] -> (logits [B, 1, h, w], feature maps of every layer)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Sequential(nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2))]
        cin = channels
        for i in range(1, layers + 1):
            cout = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 4, stride, 1), norm(cout),
                                        nn.LeakyReLU(0.2)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, 1, 4, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.head(x), features
