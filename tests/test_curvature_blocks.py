"""Curvature on the blocks of the CNNs people ship, against brute force in float64.

Each net below is declared with one block type of a family (ResNet, MobileNetV2/V3, EfficientNet,
RegNet, ShuffleNetV2, DenseNet, ConvNeXt) and a few channels, so that the brute-force GGN diagonal
diag(Σ_n J_nᵀ H_n J_n)/N of test_curvature.py takes a fraction of a second.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_batchnorm
from test_curvature import assert_close, brute_empirical_fisher, brute_ggn, brute_hessian

from obdprune.curvature import diag_empirical_fisher, diag_ggn, diag_hessian
from obdprune.curvature._capture import plan_sites
from obdprune.curvature._fallback import FallbackSquares
from obdprune.curvature._layers import HANDLERS
from obdprune.errors import UsageError

F64 = torch.float64


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class ResidualProjection(nn.Module):
    """ResNet basic block whose shape changes: stride-2 body, 1×1 conv + BN shortcut, in-place sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(2, 3), nn.ReLU(inplace=True))
        self.body = nn.Sequential(*conv_bn(3, 4, stride=2), nn.ReLU(inplace=True), *conv_bn(4, 4))
        self.shortcut = nn.Sequential(*conv_bn(3, 4, k=1, stride=2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        out = self.body(x)
        out += self.shortcut(x)
        return self.head(F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, depthwise 3×3, ReLU6, linear 1×1 projection, identity sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(2, 3), nn.ReLU6(inplace=True))
        self.block = nn.Sequential(
            *conv_bn(3, 6, k=1), nn.ReLU6(inplace=True),
            *conv_bn(6, 6, groups=6), nn.ReLU6(inplace=True),
            *conv_bn(6, 3, k=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.pool(x + self.block(x)).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = act
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class SqueezeExcitation(nn.Module):
    """MobileNetV3 / EfficientNet: Hardswish and SiLU bodies, SE gated by Hardsigmoid and Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(*conv_bn(2, 4), nn.Hardswish())
        self.se_a = SqueezeExcite(4, 2, nn.ReLU(), nn.Hardsigmoid())
        self.b = nn.Sequential(*conv_bn(4, 4, groups=4), nn.SiLU())
        self.se_b = SqueezeExcite(4, 2, nn.SiLU(), nn.Sigmoid())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.se_b(self.b(self.se_a(self.a(x)))))


class GroupedConv(nn.Module):
    """RegNetX-style grouped 3×3 convs with GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GroupNorm(2, 4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), nn.GroupNorm(3, 6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3),
        )

    def forward(self, x):
        return self.body(x)


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """ShuffleNetV2 unit: split channels, transform one half, concatenate, shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(2, 4), nn.ReLU())
        self.branch = nn.Sequential(
            *conv_bn(2, 2, k=1), nn.ReLU(), *conv_bn(2, 2, groups=2), *conv_bn(2, 2, k=1), nn.ReLU()
        )
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = self.stem(x)
        keep, work = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([keep, self.branch(work)], dim=1), 2)
        return self.head(F.avg_pool2d(x, 2).flatten(1))


class DenseConcat(nn.Module):
    """DenseNet: BN-ReLU-conv layers whose outputs are concatenated, then a transition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1, bias=False))
        self.layer2 = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 3, padding=1, bias=False))
        self.transition = nn.Sequential(nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 3, 1, bias=False), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 3))

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.layer1(x)], 1)
        x = torch.cat([x, self.layer2(x)], 1)
        return self.head(self.transition(x))


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7 → channels-last LayerNorm → Linear 4× → GELU → Linear, plus the identity."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 7, padding=3, groups=channels), Permute(0, 2, 3, 1),
            nn.LayerNorm(channels, eps=1e-6), nn.Linear(channels, 4 * channels), nn.GELU(),
            nn.Linear(4 * channels, channels), Permute(0, 3, 1, 2),
        )

    def forward(self, x):
        return x + self.block(x)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 2, stride=2)
        self.block = ConvNeXtBlock(3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        x = self.block(self.stem(x)).mean((2, 3))
        return self.head(self.norm(x))


class Conv1dNet(nn.Module):
    """Conv1d with GroupNorm, a depthwise Conv1d, LayerNorm over (C, L), adaptive pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU(approximate="tanh"),
            nn.Conv1d(4, 4, 3, stride=2, groups=4), nn.LayerNorm((4, 3)), nn.SiLU(),
            nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(8, 3),
        )

    def forward(self, x):
        return self.body(x)


# name -> (factory, input shape)
BLOCKS = {
    "residual-projection": (ResidualProjection, (2, 6, 6)),
    "inverted-residual": (InvertedResidual, (2, 5, 5)),
    "squeeze-excitation": (SqueezeExcitation, (2, 4, 4)),
    "grouped-conv-groupnorm": (GroupedConv, (2, 5, 5)),
    "channel-shuffle": (ChannelShuffle, (2, 4, 4)),
    "dense-concat": (DenseConcat, (2, 4, 4)),
    "convnext-layernorm-dw7x7": (ConvNeXt, (2, 8, 8)),
    "conv1d": (Conv1dNet, (2, 7)),
}


def make(name: str, n: int = 4, seed: int = 0):
    factory, shape = BLOCKS[name]
    torch.manual_seed(seed)
    model = factory().to(F64)
    randomize_batchnorm(model)
    with torch.no_grad():  # non-trivial affine parameters of the other norms too
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.normal_()
                m.bias.normal_()
    model.eval()
    x = torch.randn(n, *shape, dtype=F64)
    y = torch.randint(0, model(x).shape[1], (n,))
    return model, x, y


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_block_has_closed_form_rules(name):
    model, _, _ = make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sites = plan_sites(model)
    assert all(s.handler is HANDLERS[type(s.module)] for s in sites)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_diag_ggn_of_each_block_equals_brute_force(name):
    model, x, y = make(name)
    got = diag_ggn(model, x, y, batch_size=3)  # two chunks of unequal size
    assert_close(got, brute_ggn(model, x))


@pytest.mark.parametrize("name", ["squeeze-excitation", "convnext-layernorm-dw7x7", "conv1d"])
def test_diag_empirical_fisher_of_blocks_equals_brute_force(name):
    model, x, y = make(name)
    assert_close(diag_empirical_fisher(model, x, y), brute_empirical_fisher(model, x, y))


class HardsigmoidAsRelu6(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3) / 6


def twice_differentiable_copy(model: nn.Module) -> nn.Module:
    """PyTorch has no derivative of hardsigmoid's backward: the reference uses relu6(x + 3) / 6."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(module, name, HardsigmoidAsRelu6())
    return model


@pytest.mark.parametrize("name", ["squeeze-excitation", "grouped-conv-groupnorm", "conv1d"])
def test_diag_hessian_of_blocks_equals_brute_force(name):
    # Smooth activations and norms are not piecewise linear: the Hessian differs from the GGN.
    model, x, y = make(name, n=3)
    h, unflatten = brute_hessian(twice_differentiable_copy(model), x, y)
    got = diag_hessian(model, x, y)
    assert_close(got, unflatten(torch.diagonal(h)))
    ggn = diag_ggn(model, x, y)
    assert max(((got[k] - ggn[k]).norm() / ggn[k].norm()).item() for k in ggn) > 1e-3


def test_conv3d_and_batchnorm3d_rules():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), groups=2), nn.BatchNorm3d(4),
        nn.ReLU(), nn.Conv3d(4, 2, 1, padding="same", padding_mode="replicate"), nn.Flatten(),
        nn.Linear(2 * 2 * 2 * 3, 3),
    ).to(F64)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(3, 2, 3, 3, 3, dtype=F64)
    assert_close(diag_ggn(model, x, torch.zeros(3, dtype=torch.long)), brute_ggn(model, x))


# ---------------------------------------------------------------------------------------------
# The torch.func fallback: any other module with parameters


class LayerScale(nn.Module):
    """ConvNeXt's per-channel scale, a raw parameter on a container module (as in torchvision CNBlock)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ConvNeXtBlock(channels).block
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.gamma * self.block(x)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm2d as in ConvNeXt code: normalizes (N, C, H, W) over C by permuting around F.layer_norm."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ManualChannelsFirstLayerNorm(nn.Module):
    """The other ConvNeXt variant: mean and variance written out over dim 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + self.bias[:, None, None]


class StandardizedConv(nn.Conv2d):
    """Weight standardization: a Conv2d subclass whose forward the closed-form rule would get wrong."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Branchy(nn.Module):
    """Data-dependent control flow, which torch.func.vmap refuses: the per-sample loop takes over."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

    def forward(self, x):
        if bool((x.sum() > 0).item()):
            return x * self.scale[:, None, None]
        return x * self.scale[:, None, None] ** 2


class FallbackNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StandardizedConv(2, 3, 2, stride=2)
        self.norm = ChannelsFirstLayerNorm(3)
        self.block = LayerScale(3)
        self.norm2 = ManualChannelsFirstLayerNorm(3)
        self.branchy = Branchy()
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        x = self.norm2(self.block(self.norm(self.stem(x))))
        return self.head(self.branchy(x).mean((2, 3)))


def make_fallback(n: int = 4):
    torch.manual_seed(0)
    model = FallbackNet().to(F64).eval()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x = torch.randn(n, 2, 8, 8, dtype=F64)
    return model, x, torch.randint(0, 4, (n,))


def test_fallback_is_exact_and_warns_once_per_module():
    model, x, y = make_fallback()
    with pytest.warns(UserWarning) as record:
        got = diag_ggn(model, x, y, batch_size=3)
    lines = [str(w.message) for w in record]
    for name, kind in [("stem", "StandardizedConv"), ("norm", "ChannelsFirstLayerNorm"), ("block", "LayerScale"),
                       ("norm2", "ManualChannelsFirstLayerNorm"), ("branchy", "Branchy")]:
        assert sum(f"module {name!r} ({kind})" in line for line in lines) == 1, lines
    assert all("\n" not in line and "torch.func" in line and "requires_grad" not in line for line in lines)
    assert_close(got, brute_ggn(model, x))


class Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return x * self.gamma


def test_modules_of_one_type_on_the_fallback_share_one_warning_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), *[Scale(3) for _ in range(5)], nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    model = model.to(F64)
    model(x)
    model.eval()
    with pytest.warns(UserWarning) as record:
        got = diag_ggn(model, x, torch.tensor([0, 1, 0]))
    lines = [str(w.message) for w in record]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "5 modules of type Scale ('1', '2', …, '5')" in lines[0] and "15 parameters (gamma)" in lines[0]
    assert_close(got, brute_ggn(model, x))


def test_fallback_batches_samples_with_vmap_where_it_can(monkeypatch):
    looped = []
    original = FallbackSquares._looped

    def spy(self, cotangents):
        looped.append(type(self.module).__name__)
        return original(self, cotangents)

    monkeypatch.setattr(FallbackSquares, "_looped", spy)
    model, x, y = make_fallback()
    with pytest.warns(UserWarning):
        diag_ggn(model, x, y)
    assert set(looped) == {"Branchy"}


def test_fallback_empirical_fisher_equals_brute_force():
    model, x, y = make_fallback(n=3)
    with pytest.warns(UserWarning):
        got = diag_empirical_fisher(model, x, y)
    assert_close(got, brute_empirical_fisher(model, x, y))


class Recurrent(nn.Module):
    """Modules that take integer inputs or return tuples: Embedding, LSTM (batch_first)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        out, (h, c) = self.lstm(self.embed(tokens))
        return self.head(out[:, -1] + c[0])


def test_fallback_embedding_and_lstm():
    torch.manual_seed(0)
    model = Recurrent().to(F64).eval()
    x = torch.randint(0, 6, (4, 5))
    with pytest.warns(UserWarning) as record:
        got = diag_ggn(model, x, torch.zeros(4, dtype=torch.long))
    assert sorted(str(w.message).split(")")[0] for w in record) == [
        "curvature: module 'embed' (Embedding", "curvature: module 'lstm' (LSTM"]
    assert_close(got, brute_ggn(model, x))


def test_closed_form_type_with_an_extra_parameter_takes_the_fallback():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    conv.register_parameter("gain", nn.Parameter(torch.rand(1) + 0.5))  # unused by forward: zero
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).to(F64).eval()
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    with pytest.warns(UserWarning, match=r"'0' \(Conv2d\).*gain"):
        got = diag_ggn(model, x, torch.zeros(3, dtype=torch.long))
    assert torch.count_nonzero(got["0.gain"]) == 0
    assert_close(got, brute_ggn(model, x))


def test_parameter_used_outside_its_module_is_a_usage_error():
    class Borrower(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(F.linear(x, self.fc.weight))  # fc itself never runs

    with pytest.raises(UsageError, match=r"'fc.weight' is used outside the forward of its module 'fc'"):
        diag_ggn(Borrower(), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))


def test_fallback_equals_the_closed_form_rule_on_the_same_layer():

    class Wrapped(nn.Module):  # same maths as the conv inside, but an unknown type
        def __init__(self, conv):
            super().__init__()
            self.weight, self.bias = conv.weight, conv.bias
            self.conv = conv

        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, padding=1)

    torch.manual_seed(0)
    closed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x, y = torch.randn(32, 3, 12, 12), torch.zeros(32, dtype=torch.long)
    fallback = nn.Sequential(*closed).eval()
    fallback[2] = Wrapped(closed[2])
    del fallback[2].conv
    want = diag_ggn(closed, x, y)
    with pytest.warns(UserWarning, match=r"'2' \(Wrapped\)"):
        got = diag_ggn(fallback, x, y)
    assert_close(got, want, rtol=1e-4)
