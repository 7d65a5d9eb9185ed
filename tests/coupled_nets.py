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


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 unit as torchvision writes it: stride 1 splits the channels with ``chunk`` and transforms
    one half (1×1, depthwise 3×3, 1×1); stride 2 transforms the whole input twice (branch1: depthwise 3×3,
    1×1; branch2 as above); the halves are concatenated and shuffled (view, transpose, view)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, h = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                         _cbr(cin, h, 1))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(_cbr(cin if stride > 1 else h, h, 1),
                                     nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                     _cbr(h, h, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        n, c, hh, ww = out.size()
        out = out.view(n, 2, c // 2, hh, ww)
        return torch.transpose(out, 1, 2).contiguous().view(n, -1, hh, ww)


class TinyShuffleNetV2(nn.Module):
    """ShuffleNetV2's layout: stem, a stride-2 unit, two stride-1 units, a 1×1 conv5, global mean, fc."""

    def __init__(self, stem: int = 8, c: int = 16, c5: int = 32) -> None:
        super().__init__()
        self.conv1 = _cbr(3, stem, 3)
        self.stage2 = nn.Sequential(ShuffleV2Unit(stem, c, 2), ShuffleV2Unit(c, c, 1), ShuffleV2Unit(c, c, 1))
        self.conv5 = _cbr(c, c5, 1)
        self.fc = nn.Linear(c5, 5)

    def forward(self, x):
        return self.fc(self.conv5(self.stage2(self.conv1(x))).mean([2, 3]))


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """ConvNeXt block as torchvision writes it: depthwise 7×7, channels last, LayerNorm, Linear to 4C, GELU,
    Linear to C, channels first, times a per-channel layer scale γ, identity sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), Permute([0, 2, 3, 1]), nn.LayerNorm(c),
                                   nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        return x + self.layer_scale * self.block(x)


class TinyConvNeXt(nn.Module):
    """ConvNeXt's layout: 4×4 stride-4 stem + LayerNorm2d, two blocks, downsample (LayerNorm2d, 2×2 stride-2 conv),
    one block, global pool, head LayerNorm2d + flatten + Linear."""

    def __init__(self, c1: int = 16, c2: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, c1, 4, 4), LayerNorm2d(c1)), CNBlock(c1), CNBlock(c1),
                                      nn.Sequential(LayerNorm2d(c1), nn.Conv2d(c1, c2, 2, 2)), CNBlock(c2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(c2), nn.Flatten(1), nn.Linear(c2, 5))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


class Fire(nn.Module):
    """SqueezeNet fire module: 1×1 squeeze, ReLU, then 1×1 and 3×3 expands (ReLU) concatenated on channels."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def tiny_squeezenet() -> nn.Sequential:
    """SqueezeNet 1.1's layout: conv + ReLU, ceil-mode max pools between fire modules, and a conv classifier
    (Dropout, 1×1 conv to the classes, ReLU, global average pool, flatten)."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
                      Fire(16, 4, 8, 8), Fire(16, 4, 8, 8), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 8, 16, 16)),
        nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, 5, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)),
        nn.Flatten(1))


FAMILY_NETS = {
    "shufflenet-v2": TinyShuffleNetV2,
    "convnext": TinyConvNeXt,
    "squeezenet": tiny_squeezenet,
}
"""Tiny nets with the layout of whole families whose ops the channel graph library does not map by itself."""
