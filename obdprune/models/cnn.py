"""Reference CNNs whose channels are coupled: residual sums, depthwise convolutions, concatenation.

Each factory takes ``input_shape`` = (C, H, W) and ``num_classes`` and adapts to them: the stem
reads C channels, strides keep at least one pixel (a stage stops downsampling once the feature map
is 1 pixel wide), and a global average pool feeds the classifier, so 1×28×28, 3×32×32 and smaller
inputs all work. A width argument shrinks the model (tests use it for speed).

Example:
    >>> from obdprune.models import build_model
    >>> model = build_model("resnet20", (1, 28, 28), 10)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from obdprune.errors import UsageError

InputShape = tuple[int, int, int]


def _check_width(name: str, value: float) -> None:
    if not value > 0:
        raise UsageError(f"{name} must be positive, got {value!r}")


def _stride(size: list[int], stride: int) -> int:
    """``stride`` while the feature map is still larger than 1 pixel, else 1; updates ``size``."""
    if stride == 1 or min(size) < 2:
        return 1
    size[:] = [(s - 1) // stride + 1 for s in size]  # 3×3 kernel, padding 1 (and 1×1, padding 0)
    return stride


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ------------------------------------------------------------------------------------------------
# ResNet-20 (He et al. 2016, CIFAR variant)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus a shortcut (1×1 conv + BN where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout, 3))
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def resnet20(input_shape: InputShape, num_classes: int, width: int = 16) -> nn.Sequential:
    """CIFAR ResNet-20: conv3×3 stem, 3 stages × 3 basic blocks of ``width``·(1, 2, 4) channels.

    Stages 2 and 3 halve the resolution; their first block has a 1×1 conv + BN shortcut. Global
    average pool → classes. With width 16 on 3×32×32 and 10 classes: 272,474 parameters (16-32-64).
    """
    if isinstance(width, bool) or not isinstance(width, int):
        raise UsageError(f"width must be a positive integer, got {width!r}")
    _check_width("width", width)
    c, h, w = input_shape
    size = [h, w]
    layers: list[nn.Module] = [*_conv_bn(c, width, 3), nn.ReLU(inplace=True)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            stride = _stride(size, 2) if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(cin, cout, stride))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018), sized for 28×28 / 32×32


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU6 → depthwise 3×3-BN-ReLU6 → 1×1 project-BN (linear); identity sum when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion t, channels c, blocks n, stride s) as in the paper's table 2, fewer and narrower stages.
MOBILENETV2_SMALL_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1),
)


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def mobilenetv2_small(input_shape: InputShape, num_classes: int, width_mult: float = 1.0) -> nn.Sequential:
    """MobileNetV2 for small images: conv3×3 stem (stride 1) of 32, inverted residuals per
    ``MOBILENETV2_SMALL_CFG`` (two stride-2 stages: 32×32 → 8×8), conv1×1 to 320, pool → classes.

    All channel counts scale with ``width_mult``.
    """
    _check_width("width_mult", width_mult)
    c, h, w = input_shape
    size = [h, w]
    cin = _scaled(32, width_mult)
    layers: list[nn.Module] = [*_conv_bn(c, cin, 3), nn.ReLU6(inplace=True)]
    for expand, channels, blocks, stride in MOBILENETV2_SMALL_CFG:
        cout = _scaled(channels, width_mult)
        for i in range(blocks):
            layers.append(InvertedResidual(cin, cout, _stride(size, stride) if i == 0 else 1, expand))
            cin = cout
    last = _scaled(320, width_mult)
    layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------
# DenseNet-BC (Huang et al. 2017), small


class DenseLayer(nn.Module):
    """BN-ReLU-conv1×1 (4k) → BN-ReLU-conv3×3 (k), concatenated to its input: C → C + k channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], 1)


def densenet_small(
    input_shape: InputShape, num_classes: int, growth: int = 12, block_layers: tuple[int, ...] = (4, 4, 4)
) -> nn.Sequential:
    """DenseNet-BC: conv3×3 stem of 2k, dense blocks of ``block_layers`` layers (growth k), joined by
    transitions BN-ReLU-conv1×1 (halving the channels)-avgpool 2×2; BN-ReLU-pool → classes."""
    if isinstance(growth, bool) or not isinstance(growth, int) or growth < 1:
        raise UsageError(f"growth must be a positive integer, got {growth!r}")
    if not block_layers or any(not isinstance(n, int) or n < 1 for n in block_layers):
        raise UsageError(f"block_layers must be positive integers, got {block_layers!r}")
    c, h, w = input_shape
    size = [h, w]
    channels = 2 * growth
    layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1, bias=False)]
    for b, count in enumerate(block_layers):
        for _ in range(count):
            layers.append(DenseLayer(channels, growth))
            channels += growth
        if b + 1 < len(block_layers):
            out = channels // 2
            layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, out, 1, bias=False)]
            if min(size) >= 2:
                layers.append(nn.AvgPool2d(2))
                size = [s // 2 for s in size]
            channels = out
    layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
