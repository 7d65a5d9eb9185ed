"""The CNN families people ship (tests/family_nets.py), tiny but with every block type: the exact GGN
diagonal against autograd brute force in float64, and channel pruning by MACs to half then compaction
(MACs at the target within one unit step, the same function, no layer below its minimum)."""
import warnings

import pytest
import torch
from torch import nn

import obdprune
from obdprune.compact import count_units
from obdprune.curvature import diag_ggn
from obdprune.measure import count_macs

from conftest import randomize_batchnorm
from family_nets import FAMILIES, make
from test_curvature import assert_close, brute_ggn

# (width, depth, input side): the smallest standard-shaped models (a stride-32 family needs 32×32).
# ShuffleNetV2 gets three units in its middle stage: two stride-1 units in a row, as in every standard stage.
TINY = {name: (0.125, 0.01, 32) for name in FAMILIES}
TINY["shufflenetv2"] = (0.125, 0.375, 32)
TINY["convnext-tiny"] = (0.0625, 0.01, 32)

MIN_UNITS = 2
UNIT_STEP = 0.1  # the nearest unit step: one unit of a narrow stream is several % of the MACs

def _tiny(name: str, dtype: torch.dtype, n: int, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    width, depth, side = TINY[name]
    torch.manual_seed(0)
    model = make(name, width, depth, num_classes=num_classes).to(dtype)
    randomize_batchnorm(model)
    with torch.no_grad():  # non-trivial norms and layer scales (ConvNeXt's start at 1e-6)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(getattr(m, "gamma", None), nn.Parameter):
                m.gamma.normal_()
    model.eval()
    x = torch.randn(n, 3, side, side, dtype=dtype)
    return model, x, torch.arange(n) % num_classes


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exact_ggn_diagonal_equals_brute_force(name):
    model, x, y = _tiny(name, torch.float64, n=2, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvNeXt's LayerNorm2d and layer scale take the (exact) fallback
        got = diag_ggn(model, x, y)
    assert_close(got, brute_ggn(model, x), rtol=1e-8)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_half_the_macs_by_obd_then_compaction_is_exact(name):
    model, x, y = _tiny(name, torch.float32, n=4)
    dense = count_macs(model, x[:1])
    before = count_units(model)
    pruner = obdprune.Pruner(model, method="obd", granularity="channel", budget="macs", example_inputs=x[:1],
                             min_units=MIN_UNITS, layer_floor=0.0, curvature_samples=4)
    pruner.step(0.5, data=(x, y))
    small = pruner.compact()
    after = count_macs(small, x[:1])
    assert after == pruner.macs()  # the MAC model predicts the compacted model exactly
    assert abs(after / dense - 0.5) <= UNIT_STEP, after / dense
    assert sum(after_units < before[n] for n, after_units in count_units(small).items()) >= 2  # units went
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)
    for layer, units in count_units(small).items():
        assert units >= min(MIN_UNITS, before[layer]), layer
