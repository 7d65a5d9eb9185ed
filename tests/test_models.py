import pytest
import torch

from obdprune.errors import UsageError
from obdprune.models import MODELS, build_model

SHAPES = {"mnist-like": ((1, 28, 28), 10), "digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10),
          "odd": ((2, 20, 24), 3)}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("data", list(SHAPES))
def test_model_shapes_on_each_dataset(name, data):
    shape, classes = SHAPES[data]
    model = build_model(name, shape, classes).eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


def test_published_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())
    assert count(build_model("lenet300", (1, 28, 28), 10)) == 266_610
    assert count(build_model("lenet5-caffe", (1, 28, 28), 10)) == 431_080
    assert count(build_model("lenet5", (1, 28, 28), 10)) == 61_706


def test_unknown_model_lists_choices():
    with pytest.raises(UsageError, match="lenet300, lenet5"):
        build_model("resnet9000", (1, 28, 28), 10)
    with pytest.raises(UsageError):
        build_model("lenet5", (1, 28, 28), 1)
