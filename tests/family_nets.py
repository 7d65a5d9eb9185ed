"""The CNN families people ship, written from their papers' architecture tables, for tests and benchmarks.

``make(name, width=1.0, depth=1.0, num_classes=10, in_ch=3)`` builds one. ``width = depth = 1`` gives the
standard configuration (the channel counts and block repeats of the published model); smaller values give
tiny versions with every block type still present: ``width`` scales channel counts (rounded as each family
rounds them), ``depth`` scales the repeats of every stage, and a stage keeps at least its first block and,
where the standard stage repeats, one repeated block (e.g. MobileNetV2's identity-residual blocks), so
a tiny model has the same kinds of joins (sums, concatenations, splits, shuffles) as the full one.

Stochastic depth is left out (an identity in eval); dropout layers are kept as in the papers.

>>> model = make("resnet18", width=0.125, depth=0.1)
>>> model(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FAMILIES", "make", "LayerNorm2d", "channel_shuffle"]


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never more than 10% below it (MobileNet)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _scaled(c: int, width: float, divisor: int = 1) -> int:
    """``c·width`` rounded to a multiple of ``divisor`` (at least one ``divisor``); exactly ``c`` at width 1."""
    return c if width == 1.0 else max(divisor, round(c * width / divisor) * divisor)


def _repeats(n: int, depth: float) -> int:
    """A stage's block count at ``depth``: ``n`` at depth 1; at least its first and one repeated block."""
    return max(min(n, 2), math.ceil(n * depth))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# ResNet-18 (He et al. 2016, Table 1): 7×7/2 stem, max pool, four stages of two basic blocks.


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN; the sum with the input (or a strided 1×1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_ch, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                      for j in range(_repeats(2, depth))]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# Inverted residuals: MobileNetV2 (Sandler et al. 2018, Table 2), MNASNet-B1 (Tan et al. 2019),
# MobileNetV3-small (Howard et al. 2019, Table 2), EfficientNet-B0 (Tan & Le 2019, Table 1).


class SqueezeExcite(nn.Module):
    """Channels scaled by gate(fc2(act(fc1(global average))))."""

    def __init__(self, channels: int, squeezed: int, act: Callable[[], nn.Module],
                 gate: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(scale))))


class InvertedResidual(nn.Module):
    """1×1 expansion (skipped when it would not expand), k×k depthwise, optional squeeze-excitation,
    linear 1×1 projection; the identity is added when the shape is kept."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, act: Callable[[], nn.Module],
                 se: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(_conv_bn(cin, hidden, 1, act=act))
        layers.append(_conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
        if se is not None:
            layers.append(se(hidden))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    # expansion t, channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [_conv_bn(in_ch, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width)
            for i in range(_repeats(n, depth)):
                layers.append(InvertedResidual(cin, cin * t, cout, 3, s if i == 0 else 1, nn.ReLU6))
                cin = cout
        layers.append(_conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MNASNet(nn.Module):
    """MNASNet-B1 at depth multiplier 1.0: no squeeze-excitation, ReLU throughout."""

    STEM = (32, 16)
    # out channels, kernel, first stride, expansion, repeats
    STACKS = ((24, 3, 2, 3, 3), (40, 5, 2, 3, 3), (80, 5, 2, 6, 3), (96, 3, 1, 6, 2), (192, 5, 2, 6, 4),
              (320, 3, 1, 6, 1))

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()

        def round8(c: int) -> int:  # MNASNet rounds to multiples of 8, never below 90% of the scaled count
            v = c * width
            new = max(8, int(v + 4) // 8 * 8)
            return new if new >= 0.9 * v else new + 8

        c0, c1 = (round8(c) for c in self.STEM)
        layers: list[nn.Module] = [
            _conv_bn(in_ch, c0, 3, 2),
            _conv_bn(c0, c0, 3, 1, groups=c0),  # depthwise separable first block, no residual
            _conv_bn(c0, c1, 1, act=None),
        ]
        cin = c1
        for c, k, s, t, n in self.STACKS:
            cout = round8(c)
            for i in range(_repeats(n, depth)):
                layers.append(InvertedResidual(cin, cin * t, cout, k, s if i == 0 else 1, nn.ReLU))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1))
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean((2, 3)))


class MobileNetV3Small(nn.Module):
    # kernel, expansion channels, out channels, squeeze-excitation, activation, stride (the paper's Table 2)
    BNECK = ((3, 16, 16, True, "RE", 2),
             (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
             (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
             (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1),
             (5, 288, 96, True, "HS", 2), (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        stages: list[list[tuple]] = []  # consecutive blocks with the same output channels
        for row in self.BNECK:
            if stages and stages[-1][-1][2] == row[2]:
                stages[-1].append(row)
            else:
                stages.append([row])
        rows = [r for stage in stages for r in stage[:_repeats(len(stage), depth)]]
        cin = _make_divisible(16 * width)
        layers: list[nn.Module] = [_conv_bn(in_ch, cin, 3, 2, act=nn.Hardswish)]
        for k, exp, out, use_se, nl, s in rows:
            hidden, cout = _make_divisible(exp * width), _make_divisible(out * width)
            act = nn.ReLU if nl == "RE" else nn.Hardswish
            se = (lambda c: SqueezeExcite(c, _make_divisible(c // 4), nn.ReLU, nn.Hardsigmoid)) if use_se else None
            layers.append(InvertedResidual(cin, hidden, cout, k, s, act, se))
            cin = cout
        last_conv = 6 * cin
        layers.append(_conv_bn(cin, last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        last = _make_divisible(1024 * width)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNetB0(nn.Module):
    # expansion, kernel, first stride, out channels, repeats (the paper's Table 1, stages 2-8)
    STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        cin = _make_divisible(32 * width)
        layers: list[nn.Module] = [_conv_bn(in_ch, cin, 3, 2, act=nn.SiLU)]
        for t, k, s, c, n in self.STAGES:
            cout = _make_divisible(c * width)
            for i in range(_repeats(n, depth)):
                squeezed = max(1, cin // 4)  # a quarter of the block's input channels

                def se(ch: int, sq: int = squeezed) -> nn.Module:
                    return SqueezeExcite(ch, sq, nn.SiLU, nn.Sigmoid)

                layers.append(InvertedResidual(cin, cin * t, cout, k, s if i == 0 else 1, nn.SiLU, se))
                cin = cout
        last = 4 * _make_divisible(320 * width)
        layers.append(_conv_bn(cin, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------------------------------------
# RegNetX-400MF (Radosavovic et al. 2020): widths 32/64/160/384, depths 1/2/7/12, group width 16,
# bottleneck ratio 1 (the authors' quantization: 5.16M parameters at 1000 classes; rounding the last
# width up to 400 instead gives 5.50M); X block = 1×1, grouped 3×3, 1×1, sum with the input or a projection.


class XBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.a = _conv_bn(cin, cout, 1)
        self.b = _conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.c = _conv_bn(cout, cout, 1, act=None)
        self.proj = (_conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(shortcut + self.c(self.b(self.a(x))))


class RegNetX400MF(nn.Module):
    WIDTHS, DEPTHS, GROUP_WIDTH, STEM = (32, 64, 160, 384), (1, 2, 7, 12), 16, 32

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        g = _scaled(self.GROUP_WIDTH, width)
        stem = _scaled(self.STEM, width, 2)
        self.stem = _conv_bn(in_ch, stem, 3, 2)
        stages, cin = [], stem
        for w, d in zip(self.WIDTHS, self.DEPTHS):
            cout = _scaled(w, width, g)
            stages.append(nn.Sequential(*[XBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, g)
                                          for i in range(_repeats(d, depth))]))
            cin = cout
        self.trunk = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.trunk(self.stem(x)), 1), 1))


# ---------------------------------------------------------------------------------------------
# DenseNet-121 (Huang et al. 2017, Table 1): growth 32, bottleneck 4·growth, blocks of 6/12/24/16
# layers, transitions halving the channels.


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, new], 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2))


class DenseNet121(nn.Module):
    BLOCKS, GROWTH, STEM, BN_SIZE = (6, 12, 24, 16), 32, 64, 4

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        growth, c = _scaled(self.GROWTH, width), _scaled(self.STEM, width)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)]
        for i, n in enumerate(self.BLOCKS):
            for _ in range(_repeats(n, depth)):
                layers.append(DenseLayer(c, growth, self.BN_SIZE))
                c += growth
            if i < len(self.BLOCKS) - 1:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2 1.0× (Ma et al. 2018, Table 5): 24-channel stem, stages of 116/232/464 channels with
# 4/8/4 units, conv5 with 1024 channels.


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) → the channels read group-interleaved: channel ``g·(C/groups) + i`` goes to ``i·groups + g``."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split the channels in halves, transform the second, concatenate, shuffle. Stride 2: both
    halves come from the whole input through their own branch (depthwise 3×3/2 + 1×1, and 1×1 +
    depthwise 3×3/2 + 1×1)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin, act=None), _conv_bn(cin, half, 1))
        b_in = cin if stride == 2 else half
        self.branch2 = nn.Sequential(_conv_bn(b_in, half, 1), _conv_bn(half, half, 3, stride, groups=half, act=None),
                                     _conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    STAGE_CHANNELS, REPEATS, STEM, LAST = (116, 232, 464), (4, 8, 4), 24, 1024

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        c = _scaled(self.STEM, width, 4)
        self.conv1 = _conv_bn(in_ch, c, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for cout, n in zip(self.STAGE_CHANNELS, self.REPEATS):
            cout = _scaled(cout, width, 4)
            stages.append(nn.Sequential(*[ShuffleUnit(c if i == 0 else cout, cout, 2 if i == 0 else 1)
                                          for i in range(_repeats(n, depth))]))
            c = cout
        self.stage2, self.stage3, self.stage4 = stages
        last = _scaled(self.LAST, width, 4)
        self.conv5 = _conv_bn(c, last, 1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# ConvNeXt-Tiny (Liu et al. 2022): 4×4/4 patchify stem + LayerNorm, stages of 96/192/384/768 channels
# with 3/3/9/3 blocks, LayerNorm + 2×2/2 conv between stages; a block is depthwise 7×7, LayerNorm over
# channels (channels-last), Linear to 4C, GELU, Linear to C, layer scale, identity sum.


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    DIMS, DEPTHS = (96, 192, 384, 768), (3, 3, 9, 3)

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        dims = [_scaled(d, width, 4) for d in self.DIMS]
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(in_ch, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))])
        for a, b in zip(dims, dims[1:]):
            self.downsample.append(nn.Sequential(LayerNorm2d(a, eps=1e-6), nn.Conv2d(a, b, 2, 2)))
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(d) for _ in range(_repeats(n, depth))])
                                    for d, n in zip(dims, self.DEPTHS))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


# ---------------------------------------------------------------------------------------------
# SqueezeNet 1.1 (Iandola et al. 2016; the 1.1 revision of the reference implementation): 3×3/2
# 64-channel stem, fire modules between max pools, a 1×1 conv classifier averaged over positions.


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand1: int, expand3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    # fire modules (squeeze, expand 1×1, expand 3×3) between the max pools
    FIRES = (((16, 64, 64), (16, 64, 64)), ((32, 128, 128), (32, 128, 128)),
             ((48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)))

    def __init__(self, width: float, depth: float, num_classes: int, in_ch: int) -> None:
        super().__init__()
        c = _scaled(64, width)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, c, 3, 2), nn.ReLU()]
        for group in self.FIRES:
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            for s, e1, e3 in group[:_repeats(len(group), depth)]:
                s, e1, e3 = (_scaled(v, width) for v in (s, e1, e3))
                layers.append(Fire(c, s, e1, e3))
                c = e1 + e3
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(c, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


FAMILIES: dict[str, type[nn.Module]] = {
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "mnasnet": MNASNet,
    "mobilenetv3-small": MobileNetV3Small,
    "efficientnet-b0": EfficientNetB0,
    "regnetx-400mf": RegNetX400MF,
    "densenet121": DenseNet121,
    "shufflenetv2": ShuffleNetV2,
    "convnext-tiny": ConvNeXtTiny,
    "squeezenet1.1": SqueezeNet11,
}


def make(name: str, width: float = 1.0, depth: float = 1.0, num_classes: int = 10, in_ch: int = 3) -> nn.Module:
    """One family's model; ``width = depth = 1`` is the published configuration."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name](width, depth, num_classes, in_ch)
