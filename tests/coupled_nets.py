"""Small nets built from the blocks of the CNN families people ship, for the coupled-unit tests.

Every net takes (N, 3, 8, 8) and returns (N, 5) logits; widths are tiny so a test runs in seconds.
"""
from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


def _head(c: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)]


class ProjectionResidual(nn.Module):
    """ResNet basic block whose shortcut is a strided 1×1 conv + BN (the shape changes)."""

    def __init__(self, cin: int = 8, cout: int = 12) -> None:
        super().__init__()
        self.conv1, self.conv2 = _cbr(cin, cout, 3, 2), nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                                                      nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2: 1×1 expand, depthwise 3×3, linear 1×1 project, identity sum."""

    def __init__(self, c: int = 8, expand: int = 3) -> None:
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(_cbr(c, h, 1, act=nn.ReLU6), _cbr(h, h, 3, groups=h, act=nn.ReLU6),
                                  nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class SqueezeExcitation(nn.Module):
    """MobileNetV3 / EfficientNet: conv, then channels scaled by sigmoid(fc2(relu(fc1(pool)))), Hardswish."""

    def __init__(self, c: int = 8, squeeze: int = 4) -> None:
        super().__init__()
        self.conv = _cbr(c, c, 3, act=nn.Hardswish)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        y = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + y * s


class GroupedBottleneck(nn.Module):
    """RegNetX / ResNeXt: 1×1, grouped 3×3 (groups of 4 channels), 1×1, identity sum."""

    def __init__(self, c: int = 8, width: int = 8, group_width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(c, width, 1), _cbr(width, width, 3, groups=width // group_width),
                                  nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(_cbr(h, h, 1), nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    _cbr(h, h, 1))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class DenseBlock(nn.Module):
    """DenseNet: BN-ReLU-conv layers whose outputs are concatenated to their inputs."""

    def __init__(self, c: int = 8, growth: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(), nn.Conv2d(c + i * growth, growth, 3, 1, 1, bias=False))
            for i in range(layers))
        self.out_channels = c + layers * growth

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor, as ConvNeXt's."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt (1×1-conv MLP form): depthwise 7×7, LayerNorm over channels, 1×1 to 4C, GELU, 1×1 to C,
    identity sum."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)
        self.pw1, self.pw2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        return x + self.pw2(nn.functional.gelu(self.pw1(self.norm(self.dw(x)))))


def _net(*blocks: nn.Module, c_in_stem: int = 8, c_out: int = 8) -> nn.Sequential:
    return nn.Sequential(_cbr(3, c_in_stem, 3), *blocks, *_head(c_out))


BLOCK_NETS = {
    "projection-residual": lambda: _net(ProjectionResidual(8, 12), ProjectionResidual(12, 12), c_out=12),
    "inverted-residual": lambda: _net(InvertedResidual(), InvertedResidual()),
    "squeeze-excitation": lambda: _net(SqueezeExcitation(), SqueezeExcitation()),
    "grouped-conv": lambda: _net(GroupedBottleneck(), GroupedBottleneck()),
    "channel-shuffle": lambda: _net(ShuffleUnit(), ShuffleUnit()),
    "dense-concat": lambda: nn.Sequential(_cbr(3, 8, 3), DenseBlock(8, 4, 2), nn.BatchNorm2d(16), nn.ReLU(),
                                          *_head(16)),
    "layernorm-depthwise7": lambda: nn.Sequential(nn.Conv2d(3, 8, 2, 2), LayerNorm2d(8), ConvNeXtBlock(), ConvNeXtBlock(),
                                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)),
}
