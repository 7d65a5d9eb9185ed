"""Compaction: dead-unit detection, physical removal (parity to 1e-5), reloading by shapes."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obdprune.autograd_ops import CHANNELWISE_UNARY_OPS
from obdprune.compact import compact, count_units, find_dead_units, resize_to_state_dict
from obdprune.errors import ModelFileError, UsageError
from obdprune.export import load_safetensors, save_safetensors


def dead_idx(model: nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    return {k: torch.nonzero(v).flatten().tolist() for k, v in find_dead_units(model, x).items()}


def assert_parity(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        for x in inputs:
            ya, yb = a(x), b(x)
            assert ya.shape == yb.shape
            assert torch.allclose(ya, yb, rtol=0, atol=1e-5), float((ya - yb).abs().max())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


# ------------------------------------------------------------------------------ models


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        m[0].weight[3] = 0
        m[0].bias[3] = 0  # fc1 unit 3: zero incoming -> dead
        m[2].weight[:, 5] = 0  # fc1 unit 5: nobody reads it -> dead
        m[2].weight[2] = 0
        m[2].bias[2] = -0.5  # fc2 unit 2: relu(-0.5) == 0 always -> dead
        m[2].weight[4] = 0
        m[2].bias[4] = 0.5  # fc2 unit 4: constant 0.5, read by fc3 -> NOT dead
        m[4].weight[:, 9] = 0  # fc2 unit 9 unread -> dead ...
        m[2].weight[:, 7] = 0
        m[2].weight[9, 7] = 1.0  # ... and fc1 unit 7 was read only by fc2 unit 9 -> dead too
        m[4].weight[1] = 0
        m[4].bias[1] = 0  # an output unit with zero incoming weights: never removed
    return m


def lenet5() -> nn.Sequential:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )  # fmt: skip
    with torch.no_grad():
        m[0].weight[2] = 0
        m[0].bias[2] = 0  # conv1 filter 2: zero incoming -> dead
        m[3].weight[:, 4] = 0  # conv1 filter 4: conv2 ignores it -> dead
        m[7].weight[:, 5 * 16 : 6 * 16] = 0  # conv2 filter 5: its 16 flattened inputs of fc1 are 0 -> dead
        m[7].weight[:, 3 * 16 : 3 * 16 + 15] = 0  # conv2 filter 3: 15 of 16 zero -> NOT dead
        m[9].weight[7] = 0
        m[9].bias[7] = 0  # fc2 unit 7: zero incoming -> dead
        m[7].weight[11] = 0
        m[7].bias[11] = -1.0  # fc1 unit 11: relu(-1) == 0 -> dead
    return m


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def conv_bn() -> ConvBN:
    torch.manual_seed(2)
    m = ConvBN()
    randomize_bn(m)
    with torch.no_grad():
        m.b1.weight[1] = 0
        m.b1.bias[1] = 0  # BN scale and shift zero: dead whatever conv1 computes
        m.b1.weight[2] = 0
        m.b1.bias[2] = -0.3  # BN output -0.3, relu -> 0: dead
        m.b1.weight[3] = 0
        m.b1.bias[3] = 0.3  # constant 0.3 into a zero-padded conv: NOT dead
        m.b2.weight[5] = 0
        m.b2.bias[5] = 0  # dead
    return m


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = Block(8), Block(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet() -> ResNet:
    torch.manual_seed(3)
    m = ResNet()
    randomize_bn(m)
    with torch.no_grad():
        m.block1.bn2.weight[2] = 0
        m.block1.bn2.bias[2] = 0  # channel 2 zero in one summand only: must stay
        for bn in (m.bn, m.block1.bn2, m.block2.bn2):
            bn.weight[5] = 0
            bn.bias[5] = 0  # channel 5 zero in every summand: removed everywhere
        m.block1.bn1.weight[3] = 0
        m.block1.bn1.bias[3] = 0  # inner channel of block1: removed
        for w in (m.fc.weight, m.block1.conv1.weight, m.block2.conv1.weight):
            w[:, 6] = 0  # channel 6 read by nobody: removed though its producers are non-zero
    return m


# ------------------------------------------------------------------------------ tests


def test_mlp_dead_units_and_parity() -> None:
    m = mlp()
    x = torch.randn(8, 20)
    assert dead_idx(m, x) == {"0": [3, 5, 7], "2": [2, 9], "4": []}
    c = compact(m, x)
    assert count_units(c) == {"0": 13, "2": 10, "4": 5}
    assert c[2].in_features == 13 and c[4].in_features == 10
    assert_parity(m, c, x, torch.randn(3, 20) * 10)


def test_lenet_dead_by_incoming_outgoing_and_flatten() -> None:
    m = lenet5()
    x = torch.randn(4, 1, 28, 28)
    assert dead_idx(m, x) == {"0": [2, 4], "3": [5], "7": [11], "9": [7], "11": []}
    c = compact(m, x)
    assert count_units(c) == {"0": 4, "3": 15, "7": 119, "9": 83, "11": 10}
    assert c[3].in_channels == 4 and c[7].in_features == 15 * 16 and c[9].in_features == 119
    assert_parity(m, c, x, torch.randn(2, 1, 28, 28))


def test_bn_scale_and_shift() -> None:
    m = conv_bn()
    x = torch.randn(2, 3, 8, 8)
    assert dead_idx(m, x) == {"c1": [1, 2], "c2": [5], "fc": []}
    c = compact(m, x)
    assert (c.c1.out_channels, c.b1.num_features, c.c2.in_channels) == (6, 6, 6)
    assert (c.c2.out_channels, c.b2.num_features, c.fc.in_features) == (7, 7, 7)
    assert_parity(m, c, x, torch.randn(3, 3, 8, 8))


def test_residual_coupled_channels() -> None:
    m = resnet()
    x = torch.randn(2, 3, 8, 8)
    dead = dead_idx(m, x)
    assert dead == {
        "stem": [5, 6],
        "block1.conv1": [3],
        "block1.conv2": [5, 6],
        "block2.conv1": [],
        "block2.conv2": [5, 6],
        "fc": [],
    }
    c = compact(m, x)
    assert count_units(c) == {
        "stem": 6, "block1.conv1": 7, "block1.conv2": 6, "block2.conv1": 8, "block2.conv2": 6, "fc": 5,
    }  # fmt: skip
    assert c.bn.num_features == c.block1.bn2.num_features == c.block2.bn2.num_features == 6
    assert c.block1.conv2.in_channels == 7 and c.fc.in_features == 6
    assert_parity(m, c, x, torch.randn(3, 3, 8, 8))


def test_sigmoid_zero_input_unit_is_not_dead() -> None:
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight[2] = 0
        m[0].bias[2] = 0  # sigmoid(0) = 0.5 feeds the next layer
        m[2].weight[:, 4] = 0  # unread -> dead even behind a sigmoid
    x = torch.randn(4, 10)
    assert dead_idx(m, x) == {"0": [4], "2": []}
    c = compact(m, x)
    assert c[0].out_features == 7
    assert_parity(m, c, x)


def test_elu_zero_input_unit_is_dead() -> None:
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 0
    x = torch.randn(3, 6)
    assert dead_idx(m, x) == {"0": [1], "2": []}
    assert_parity(m, compact(m, x), x)


def test_input_model_unchanged_and_idempotent() -> None:
    m = resnet().train()
    before = snapshot(m)
    x = torch.randn(2, 3, 8, 8)
    c = compact(m, x)
    after = m.state_dict()
    assert m.training and c.training
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert count_units(m)["stem"] == 8
    c2 = compact(c, x)
    assert count_units(c2) == count_units(c)
    assert {k: v.shape for k, v in c2.state_dict().items()} == {k: v.shape for k, v in c.state_dict().items()}
    assert_parity(c, c2, x)
    assert not any(v.any() for v in find_dead_units(c, x).values())


def test_dense_model_untouched() -> None:
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 3, 8, 8)
    c = compact(m, x)
    assert count_units(c) == count_units(m)
    assert_parity(m, c, x)


def test_depthwise_and_concat() -> None:
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bna = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.dw, self.bnd = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)
            self.b = nn.Conv2d(3, 4, 1)
            self.g = nn.Conv2d(10, 10, 3, padding=1)
            self.fc = nn.Linear(10 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu6(self.bnd(self.dw(F.relu(self.bna(self.a(x))))))
            h = torch.cat([y, torch.sigmoid(self.b(x))], 1)
            h = F.max_pool2d(F.relu(self.g(h)), 2)
            return self.fc(h.view(h.size(0), -1))

    torch.manual_seed(7)
    m = Mix()
    with torch.no_grad():
        for p in (m.a.weight, m.a.bias, m.bna.weight, m.bna.bias, m.dw.weight, m.dw.bias, m.bnd.weight, m.bnd.bias):
            p[1] = 0  # channel 1 zero all along a -> dw
        m.b.weight[2] = 0
        m.b.bias[2] = 0  # sigmoid(0) = 0.5: not dead
        m.g.weight[7] = 0
        m.g.bias[7] = 0
        m.fc.weight[:, 3 * 16 : 4 * 16] = 0
    x = torch.randn(2, 3, 8, 8)
    assert dead_idx(m, x) == {"a": [1], "dw": [1], "b": [], "g": [3, 7], "fc": []}
    c = compact(m, x)
    assert (c.a.out_channels, c.dw.groups, c.g.in_channels, c.g.out_channels, c.fc.in_features) == (5, 5, 9, 8, 128)
    assert_parity(m, c, x)


def test_cases_torch_pruning_gets_wrong_are_left_alone() -> None:
    """Additions with the model input, model outputs, a channel of one group of a grouped conv's input
    (Torch-Pruning would slice the conv wrongly): nothing removed, same outputs."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.res = nn.Conv2d(3, 3, 3, padding=1)
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(x + self.res(x))  # coupled to the model input
            return self.head(F.relu(self.g(F.relu(self.a(x)))))

    torch.manual_seed(8)
    m = Odd()
    with torch.no_grad():
        m.res.weight[1] = 0
        m.res.bias[1] = 0
        m.a.weight[5] = 0
        m.a.bias[5] = 0  # read by a grouped conv (Torch-Pruning slices it wrongly)
        m.head.weight[2] = 0
        m.head.bias[2] = 0  # a model output channel
    x = torch.randn(2, 3, 6, 6)
    assert dead_idx(m, x) == {"res": [], "a": [], "g": [], "head": []}
    c = compact(m, x)
    assert count_units(c) == count_units(m)
    assert_parity(m, c, x)


def test_grouped_conv_loses_channels_evenly_from_every_group() -> None:
    """A grouped conv is rebuilt with fewer channels per group: of its inputs, positions dead in every
    group go; of its outputs, as many dead channels from each group (the rest stay)."""

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 12, 3, padding=1, groups=2)  # 4 inputs, 6 outputs per group
            self.bn = nn.BatchNorm2d(12)
            self.head = nn.Conv2d(12, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.bn(self.g(F.relu(self.a(x))))))

    torch.manual_seed(9)
    m = Grouped()
    randomize_bn(m)
    with torch.no_grad():
        for c in (1, 5, 2):  # position 1 of both input groups; position 2 of the first only
            m.a.weight[c], m.a.bias[c] = 0, 0
        for c in (0, 2, 9):  # two outputs of the first group, one of the second
            m.g.weight[c], m.g.bias[c], m.bn.weight[c], m.bn.bias[c] = 0, 0, 0, 0
    x = torch.randn(2, 3, 6, 6)
    assert dead_idx(m, x) == {"a": [1, 5], "g": [0, 9], "head": []}
    c = compact(m, x)
    assert (c.a.out_channels, c.g.in_channels, c.g.out_channels, c.g.groups, c.bn.num_features) == (6, 6, 10, 2, 10)
    assert c.g.weight.shape == (10, 3, 3, 3)
    assert torch.equal(c.g.weight[:5], m.g.weight[[1, 2, 3, 4, 5]][:, [0, 2, 3]])  # group 0: inputs 0, 2, 3
    assert torch.equal(c.g.weight[5:], m.g.weight[[6, 7, 8, 10, 11]][:, [0, 2, 3]])  # group 1: inputs 4, 6, 7
    assert_parity(m, c, x, torch.randn(3, 3, 6, 6))


def test_unsupported_ops_block_removal() -> None:
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)) + 1.0)  # relu(0) + 1 != 0

    torch.manual_seed(9)
    m = Shift()
    with torch.no_grad():
        m.fc1.weight[0] = 0
        m.fc1.bias[0] = 0
    x = torch.randn(3, 4)
    assert dead_idx(m, x) == {"fc1": [], "fc2": []}
    assert_parity(m, compact(m, x), x)


def test_whole_layer_dead_keeps_one_unit() -> None:
    torch.manual_seed(10)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        m[2].weight.zero_()
    x = torch.randn(2, 4)
    assert dead_idx(m, x) == {"0": [0, 1, 2], "2": []}
    c = compact(m, x)
    assert c[0].out_features == 1 and c[2].in_features == 1
    assert_parity(m, c, x)


def test_resize_to_state_dict_round_trip(tmp_path) -> None:
    m = resnet()
    x = torch.randn(2, 3, 8, 8)
    c = compact(m, x).eval()
    save_safetensors(c.state_dict(), tmp_path / "c.safetensors", {"arch": "resnet"})
    loaded = load_safetensors(tmp_path / "c.safetensors")
    fresh = ResNet()
    r = resize_to_state_dict(fresh, loaded, example_inputs=x)
    assert count_units(fresh)["stem"] == 8  # the fresh model is not modified
    assert count_units(r) == count_units(c)
    assert r.block1.bn1.eps == c.block1.bn1.eps and r.stem.padding == (1, 1)
    assert_parity(c, r, x)

    l5 = lenet5()
    y = torch.randn(2, 1, 28, 28)
    cl = compact(l5, y)
    rl = resize_to_state_dict(nn.Sequential(*[copy.deepcopy(mod) for mod in lenet5()]), cl.state_dict())
    assert_parity(cl, rl, y)


def test_resize_to_state_dict_errors() -> None:
    m = resnet()
    x = torch.randn(2, 3, 8, 8)
    sd = dict(compact(m, x).state_dict())
    missing = {k: v for k, v in sd.items() if k != "fc.bias"}
    with pytest.raises(ModelFileError):
        resize_to_state_dict(ResNet(), missing)
    bad = dict(sd)
    bad["block1.conv2.weight"] = torch.zeros(6, 5, 3, 3)  # reads 5 channels, block1.bn1 gives 7
    with pytest.raises(ModelFileError, match="inconsistent"):
        resize_to_state_dict(ResNet(), bad, example_inputs=x)
    bad = dict(sd)
    bad["stem.weight"] = torch.zeros(6, 3, 5, 5)  # different kernel
    with pytest.raises(ModelFileError):
        resize_to_state_dict(ResNet(), bad)
    with pytest.raises(UsageError):
        resize_to_state_dict(ResNet(), {"a": 1})  # type: ignore[dict-item]


def test_compact_rejects_non_module() -> None:
    with pytest.raises(UsageError):
        compact("model", torch.zeros(1))  # type: ignore[arg-type]


def test_no_warnings_on_supported_models() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compact(lenet5(), torch.randn(1, 1, 28, 28))


def test_output_check_catches_a_wrong_analysis(monkeypatch) -> None:
    """If the analysis were wrong (here: told that sigmoid(0) == 0), the parity check refuses."""
    monkeypatch.setitem(CHANNELWISE_UNARY_OPS, "SigmoidBackward", True)
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        m[0].weight[1] = 0
        m[0].bias[1] = 0
        m[3].weight[:, 0] = 0  # a genuinely dead unit elsewhere is still removed
    x = torch.randn(3, 5)
    with pytest.warns(RuntimeWarning, match="not removing"):
        c = compact(m, x)
    assert count_units(c) == {"0": 4, "2": 2, "3": 2}
    assert_parity(m, c, x)


# ------------------------------------------------------------------------------ property test

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ACTIVATIONS = [nn.ReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.ReLU6, lambda: nn.Hardtanh(0.5, 2.0), nn.LeakyReLU]


class RandomNet(nn.Module):
    """conv-BN-act blocks (optionally residual), pooling, flatten, linear-act, linear."""

    def __init__(self, gen: torch.Generator, acts: list[int], residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.stem, self.bn0 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 3 * 3, 10)
        self.fc2 = nn.Linear(10, 3)
        self.acts = nn.ModuleList(ACTIVATIONS[i]() for i in acts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.acts[0](self.bn0(self.stem(x)))
        y = self.acts[1](self.bn1(self.c1(x)))
        y = self.bn2(self.c2(y))
        x = self.acts[2](x + y if self.residual else y)
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(self.acts[3](self.fc1(x)))


def zero_randomly(model: nn.Module, gen: torch.Generator) -> None:
    def pick(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen) < 0.3

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                rows, cols = pick(m.weight.shape[0]), pick(m.weight.shape[1])
                m.weight[rows] = 0
                m.weight[:, cols] = 0
                kind = torch.randint(0, 3, (1,), generator=gen).item()
                m.bias[rows] = (0.0, -0.5, 0.5)[kind]
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
                g, b = pick(m.num_features), pick(m.num_features)
                m.weight[g] = 0
                m.bias[b] = 0
                m.bias[g & ~b] = -0.25


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    acts=st.lists(st.integers(0, len(ACTIVATIONS) - 1), min_size=4, max_size=4),
    residual=st.booleans(),
)
def test_random_zero_patterns_keep_outputs(seed: int, acts: list[int], residual: bool) -> None:
    """Soundness: whatever is removed, outputs stay equal and the parity check never has to refuse."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = RandomNet(gen, acts, residual)
    zero_randomly(m, gen)
    x = torch.randn(2, 2, 6, 6, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = compact(m, x)
    assert_parity(m, c, x, torch.randn(3, 2, 6, 6, generator=gen) * 3)
    dead, before, after = find_dead_units(m, x), count_units(m), count_units(c)
    for name, mask in dead.items():  # everything found is removed; a wholly dead group keeps one unit
        assert after[name] == before[name] - int(mask.sum()) + int(bool(mask.all())), name


def test_works_under_no_grad_and_inference_mode() -> None:
    m = mlp()
    with torch.inference_mode():
        x = torch.randn(2, 20)
        c = compact(m, x)
        dead = find_dead_units(m, x)
    assert not c[0].weight.is_inference() and c[0].weight.requires_grad
    assert int(dead["0"].sum()) == 3
    with torch.no_grad():
        assert count_units(compact(m, torch.randn(2, 20))) == count_units(c)


def test_compaction_does_not_depend_on_input_strides():
    """A (N, 1, H, W) slice whose strides also read as channels_last must compact like a contiguous one."""
    from obdprune.models import build_model

    torch.manual_seed(0)
    model = build_model("vgg-small", (1, 8, 8), 10).eval()
    last_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_bn.weight[:7] = 0
        last_bn.bias[:7] = 0
    plain = torch.randn(4, 1, 8, 8)
    odd = torch.randn(8, 8, 4, 1).permute(2, 3, 0, 1)
    sizes = {sum(p.numel() for p in compact(model, x).parameters()) for x in (plain, odd)}
    assert len(sizes) == 1 and sizes.pop() < sum(p.numel() for p in model.parameters())
