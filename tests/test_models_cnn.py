"""The coupled-channel reference models: shapes, sizes, exact curvature, compaction and ONNX export."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import randomize_batchnorm
from test_curvature import assert_close, brute_ggn

from obdprune.compact import compact
from obdprune.curvature import diag_ggn
from obdprune.errors import UsageError
from obdprune.export import export_onnx
from obdprune.models import MODELS, build_model
from obdprune.models.cnn import densenet_small, mobilenetv2_small, resnet20

CNNS = ["resnet20", "mobilenetv2-small", "densenet-small"]
SHAPES = [(1, 28, 28), (3, 32, 32)]

# Tiny widths for brute force: name -> factory(input_shape, num_classes)
TINY = {
    "resnet20": lambda shape, k: resnet20(shape, k, width=2),
    "mobilenetv2-small": lambda shape, k: mobilenetv2_small(shape, k, width_mult=0.125),
    "densenet-small": lambda shape, k: densenet_small(shape, k, growth=2, block_layers=(2, 2, 2)),
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k + 2 * cout


def test_registered():
    assert set(CNNS) <= set(MODELS)


@pytest.mark.parametrize("name", CNNS)
@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_builds_and_runs_on_both_shapes(name, shape):
    model = build_model(name, shape, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert isinstance(model[-1], nn.Linear) and model[-1].out_features == 7


def test_resnet20_parameter_count():
    # stem; stage 1: 3 blocks of 16; stages 2, 3: first block with a 1×1 projection, then 2 blocks.
    stem = conv_bn(3, 16, 3)
    blocks = 3 * 2 * conv_bn(16, 16, 3)
    for cin, cout in ((16, 32), (32, 64)):
        blocks += conv_bn(cin, cout, 3) + conv_bn(cout, cout, 3) + conv_bn(cin, cout, 1)
        blocks += 2 * 2 * conv_bn(cout, cout, 3)
    head = 64 * 10 + 10
    assert count(build_model("resnet20", (3, 32, 32), 10)) == stem + blocks + head == 272_474
    model = build_model("resnet20", (1, 28, 28), 10)
    assert count(model) == 272_474 - 2 * 16 * 9
    shortcuts = [m.shortcut for m in model if hasattr(m, "shortcut")]
    assert sum(isinstance(s, nn.Sequential) for s in shortcuts) == 2 and len(shortcuts) == 9


def test_mobilenetv2_small_parameter_count_and_blocks():
    total = conv_bn(3, 32, 3)
    cin = 32
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)):
        for _ in range(n):
            hidden = cin * t
            total += (conv_bn(cin, hidden, 1) if t != 1 else 0) + conv_bn(hidden, hidden, 3, hidden)
            total += conv_bn(hidden, c, 1)
            cin = c
    total += conv_bn(96, 320, 1) + 320 * 10 + 10
    model = build_model("mobilenetv2-small", (3, 32, 32), 10)
    assert count(model) == total
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.groups == m.in_channels == m.out_channels > 1 for m in convs) == 9  # depthwise
    assert sum(getattr(m, "residual", False) for m in model.modules()) == 4
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_densenet_small_parameter_count():
    k, total, channels = 12, 3 * 24 * 9, 24
    for block in range(3):
        for _ in range(4):
            total += 2 * channels + channels * 4 * k + 2 * 4 * k + 4 * k * k * 9
            channels += k
        if block < 2:
            total += 2 * channels + channels * (channels // 2)
            channels //= 2
    total += 2 * channels + channels * 10 + 10
    assert count(build_model("densenet-small", (3, 32, 32), 10)) == total


def test_bad_widths_are_usage_errors():
    with pytest.raises(UsageError, match="width"):
        resnet20((3, 32, 32), 10, width=0)
    with pytest.raises(UsageError, match="width_mult"):
        mobilenetv2_small((3, 32, 32), 10, width_mult=0.0)
    with pytest.raises(UsageError, match="block_layers"):
        densenet_small((3, 32, 32), 10, block_layers=())


def tiny(name: str, shape=(3, 8, 8), classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = TINY[name](shape, classes).double()
    randomize_batchnorm(model)
    return model.eval()


@pytest.mark.parametrize("name", CNNS)
def test_exact_diag_ggn_equals_brute_force(name):
    model = tiny(name)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer has a closed-form rule: no fallback
        got = diag_ggn(model, x, torch.zeros(3, dtype=torch.long), batch_size=2)
    assert_close(got, brute_ggn(model, x))


def kill_one_unit(name: str, model: nn.Module) -> None:
    """Zero one inner channel (conv filter and BatchNorm entries) so that compaction can remove it."""
    if name == "resnet20":
        conv, bns = model[3].body[0], [model[3].body[1]]
    elif name == "mobilenetv2-small":  # an expanded channel: the expansion and the depthwise conv
        conv, bns = model[4].body[0], [model[4].body[1], model[4].body[4]]
    else:
        conv, bns = model[2].body[2], [model[2].body[3]]  # bottleneck 1×1 of a dense layer
    with torch.no_grad():
        conv.weight[0].zero_()
        for bn in bns:
            bn.weight[0] = 0.0
            bn.bias[0] = 0.0


@pytest.mark.parametrize("name", CNNS)
def test_compact_and_onnx_export(name, tmp_path):
    torch.manual_seed(0)
    model = TINY[name]((3, 12, 12), 4)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(5, 3, 12, 12)
    same = compact(model, x)
    assert count(same) == count(model)
    kill_one_unit(name, model)
    with torch.no_grad():
        want = model(x)
    small = compact(model, x)
    assert count(small) < count(model)
    with torch.no_grad():
        assert torch.allclose(small(x), want, atol=1e-5, rtol=0)
    result = export_onnx(small, x[:1], tmp_path / f"{name}.onnx", check_inputs=x)
    assert result["max_abs_diff"] <= 1e-4 and (tmp_path / f"{name}.onnx").exists()
