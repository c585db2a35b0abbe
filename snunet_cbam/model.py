"""SNUNet-CBAM (Fang et al., IEEE GRSL 2021).

A Siamese nested U-Net: one encoder, shared by both dates, feeds a UNet++ style dense decoder;
the four deep-supervision outputs of the top row are fused by the ensemble channel attention
module (ECAM). As the product describes it, the attention is CBAM-style: channel attention (as in
the official code) followed by spatial attention. ``use_attention=False`` gives plain SNUNet
(the four outputs concatenated, no attention); ``spatial_attention=False`` keeps ECAM and drops
only CBAM's spatial gate.

Initialisation decides whether a seed learns at all (docs/training.md, "Every seed learns"): the
encoder and decoder convolutions get kaiming (fan_out) as in the official code, but

* the 1x1 classifier starts small, normal(0, 0.01), with a bias that makes every pixel start at
  the change prior (``change_prior``). Kaiming with fan_out = 1 gave logits of +-17 to +-255, a
  saturated sigmoid and no Dice gradient;
* the spatial gate's 7x7 convolution starts at zero, so the gate is 0.5 everywhere: neutral. The
  same kaiming init on the un-normalised ECAM maps closed the gate (mean 1e-4) for some seeds.

The decoder follows the official implementation exactly, including its use of only the second
date's deeper features in the up-sampling paths, so parameter counts match the paper
(about 3.0 M / 12.0 M / 27.1 M for base_channel 16 / 32 / 48).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_DEPTH_DIVISOR = 16  # four 2x poolings


class NestedBlock(nn.Module):
    """Two 3x3 convolutions with a residual from the first one (the official conv_block_nested)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, kernel_size=3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        identity = x
        x = self.act(self.bn1(x))
        x = self.bn2(self.conv2(x))
        return self.act(x + identity)


class Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(ch, ch, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        mx = self.fc2(self.act(self.fc1(F.adaptive_max_pool2d(x, 1))))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class SNUNetCBAM(nn.Module):
    """Change detection network: ``forward(a, b)`` returns change logits ``(N, 1, H, W)``.

    Any input size works: inputs are padded (reflect) to a multiple of 16 and the logits are
    cropped back to the input size.
    """

    def __init__(self, in_channels: int = 3, base_channel: int = 32, use_attention: bool = True,
                 spatial_attention: bool = True, change_prior: float = 0.05) -> None:
        super().__init__()
        if not 0 < change_prior < 1:
            raise ValueError(f"change_prior must lie in (0, 1), got {change_prior}")
        self.base_channel = base_channel
        self.use_attention = use_attention
        self.spatial_attention = use_attention and spatial_attention
        f = [base_channel * m for m in (1, 2, 4, 8, 16)]
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

        self.conv0_0 = NestedBlock(in_channels, f[0], f[0])
        self.conv1_0 = NestedBlock(f[0], f[1], f[1])
        self.conv2_0 = NestedBlock(f[1], f[2], f[2])
        self.conv3_0 = NestedBlock(f[2], f[3], f[3])
        self.conv4_0 = NestedBlock(f[3], f[4], f[4])
        self.up1_0, self.up2_0, self.up3_0, self.up4_0 = Up(f[1]), Up(f[2]), Up(f[3]), Up(f[4])

        self.conv0_1 = NestedBlock(f[0] * 2 + f[1], f[0], f[0])
        self.conv1_1 = NestedBlock(f[1] * 2 + f[2], f[1], f[1])
        self.conv2_1 = NestedBlock(f[2] * 2 + f[3], f[2], f[2])
        self.conv3_1 = NestedBlock(f[3] * 2 + f[4], f[3], f[3])
        self.up1_1, self.up2_1, self.up3_1 = Up(f[1]), Up(f[2]), Up(f[3])

        self.conv0_2 = NestedBlock(f[0] * 3 + f[1], f[0], f[0])
        self.conv1_2 = NestedBlock(f[1] * 3 + f[2], f[1], f[1])
        self.conv2_2 = NestedBlock(f[2] * 3 + f[3], f[2], f[2])
        self.up1_2, self.up2_2 = Up(f[1]), Up(f[2])

        self.conv0_3 = NestedBlock(f[0] * 4 + f[1], f[0], f[0])
        self.conv1_3 = NestedBlock(f[1] * 4 + f[2], f[1], f[1])
        self.up1_3 = Up(f[1])

        self.conv0_4 = NestedBlock(f[0] * 5 + f[1], f[0], f[0])

        if use_attention:
            # ECAM: inter-output channel attention over the 4 stacked outputs, intra-output
            # attention over their sum; CBAM's spatial attention on the fused map.
            self.ca_inter = ChannelAttention(f[0] * 4, ratio=16)
            self.ca_intra = ChannelAttention(f[0], ratio=4)
        if self.spatial_attention:
            self.spatial = SpatialAttention()
        self.conv_final = nn.Conv2d(f[0] * 4, 1, kernel_size=1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_final.weight, std=0.01)
        nn.init.constant_(self.conv_final.bias, math.log(change_prior / (1 - change_prior)))
        if self.spatial_attention:
            nn.init.zeros_(self.spatial.conv.weight)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.conv0_0(x)
        x1 = self.conv1_0(self.pool(x0))
        x2 = self.conv2_0(self.pool(x1))
        x3 = self.conv3_0(self.pool(x2))
        return [x0, x1, x2, x3]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        height, width = a.shape[-2:]
        pad_h = (-height) % _DEPTH_DIVISOR
        pad_w = (-width) % _DEPTH_DIVISOR
        if pad_h or pad_w:
            mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
            a = F.pad(a, (0, pad_w, 0, pad_h), mode=mode)
            b = F.pad(b, (0, pad_w, 0, pad_h), mode=mode)

        # The Siamese encoder runs once over both dates stacked on the batch axis: one larger
        # convolution is faster than two, and BatchNorm then normalises both dates alike.
        both = self._encode(torch.cat([a, b], dim=0))
        x0a, x0b = both[0].chunk(2)
        x1a, x1b = both[1].chunk(2)
        x2a, x2b = both[2].chunk(2)
        x3a, x3b = both[3].chunk(2)
        x4b = self.conv4_0(self.pool(x3b))

        x0_1 = self.conv0_1(torch.cat([x0a, x0b, self.up1_0(x1b)], 1))
        x1_1 = self.conv1_1(torch.cat([x1a, x1b, self.up2_0(x2b)], 1))
        x0_2 = self.conv0_2(torch.cat([x0a, x0b, x0_1, self.up1_1(x1_1)], 1))
        x2_1 = self.conv2_1(torch.cat([x2a, x2b, self.up3_0(x3b)], 1))
        x1_2 = self.conv1_2(torch.cat([x1a, x1b, x1_1, self.up2_1(x2_1)], 1))
        x0_3 = self.conv0_3(torch.cat([x0a, x0b, x0_1, x0_2, self.up1_2(x1_2)], 1))
        x3_1 = self.conv3_1(torch.cat([x3a, x3b, self.up4_0(x4b)], 1))
        x2_2 = self.conv2_2(torch.cat([x2a, x2b, x2_1, self.up3_1(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1a, x1b, x1_1, x1_2, self.up2_2(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0a, x0b, x0_1, x0_2, x0_3, self.up1_3(x1_3)], 1))

        out = torch.cat([x0_1, x0_2, x0_3, x0_4], 1)
        if self.use_attention:
            intra = x0_1 + x0_2 + x0_3 + x0_4
            intra_weights = self.ca_intra(intra).repeat(1, 4, 1, 1)
            out = self.ca_inter(out) * (out + intra_weights)
        if self.spatial_attention:
            out = out * self.spatial(out)
        logits = self.conv_final(out)
        return logits[..., :height, :width]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
