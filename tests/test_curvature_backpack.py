"""diag_ggn / diag_hessian against BackPACK's DiagGGNExact / DiagHessian on a zoo of Sequential nets."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import randomize_batchnorm

from obdprune.curvature import diag_ggn, diag_hessian

backpack = pytest.importorskip("backpack")
from backpack import extend  # noqa: E402
from backpack.extensions import DiagGGNExact, DiagHessian  # noqa: E402

# name -> (layers, input shape, whether BackPACK's DiagHessian supports every layer)
NETS = {
    "stride-padding-relu": (lambda: [
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=(2, 1), padding=(0, 2)),
        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 6, 5)], (2, 9, 7), True),
    "dilation-tanh-maxpool": (lambda: [
        nn.Conv2d(1, 3, 3, dilation=2, padding=2), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2),
        nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4)], (1, 8, 8), True),
    "avgpool-elu-leaky": (lambda: [
        nn.Conv2d(2, 4, 3, bias=False), nn.ELU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 2), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)], (2, 7, 7), True),
    "groups": (lambda: [
        nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6, stride=2),
        nn.Sigmoid(), nn.Flatten(), nn.Linear(6 * 2 * 2, 4)], (4, 6, 6), False),
    "batchnorm-eval": (lambda: [
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 5), nn.BatchNorm1d(5), nn.ELU(), nn.Linear(5, 3)], (1, 6, 6), False),
    "adaptive-avgpool": (lambda: [
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(12, 4)], (2, 6, 6), True),
    "mlp-dropout": (lambda: [
        nn.Flatten(), nn.Linear(12, 7), nn.Sigmoid(), nn.Dropout(0.3), nn.Linear(7, 7), nn.ReLU(),
        nn.Linear(7, 3)], (3, 2, 2), True),
    "conv1d-groups": (lambda: [
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2, groups=4), nn.Sigmoid(),
        nn.Conv1d(4, 2, 1, groups=2, bias=False), nn.Flatten(), nn.Linear(2 * 4, 3)], (2, 9), True),
    "conv3d-batchnorm3d": (lambda: [
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), groups=2), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 2, 1), nn.Flatten(), nn.Linear(2 * 2 * 2 * 3, 3)], (2, 3, 3, 3), False),
    "lenet-like": (lambda: [
        nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 10)], (1, 16, 16), True),
}


_AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def make(name: str, dtype: torch.dtype, n: int = 6):
    layers, shape, _ = NETS[name]
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).to(dtype)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(n, *shape, dtype=dtype)
    y = torch.randint(0, model(x).shape[1], (n,))
    return model, x, y


def backpack_diagonals(model, x, y, extensions):
    bp_model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
    with backpack.backpack(*extensions):
        loss_fn(bp_model(x), y).backward()
    return bp_model


def assert_close(got: dict, want: dict, rtol: float):
    assert list(got) == list(want)
    for k in want:
        err = (got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-30)
        assert err <= rtol, f"{k}: relative error {err:.2e}"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(NETS))
def test_matches_backpack(name, dtype, rtol):
    model, x, y = make(name, dtype)
    if dtype == torch.float64 and any(isinstance(m, _AVG_POOLS) for m in model):
        pytest.skip("BackPACK 1.7 builds a float32 kernel for average pooling and fails in float64 "
                    "(float64 average pooling is checked against brute force in test_curvature.py)")
    hessian_supported = NETS[name][2]
    extensions = [DiagGGNExact()] + ([DiagHessian()] if hessian_supported else [])
    bp = backpack_diagonals(model, x, y, extensions)
    assert_close(diag_ggn(model, x, y), {k: p.diag_ggn_exact for k, p in bp.named_parameters()}, rtol)
    if hessian_supported:
        assert_close(diag_hessian(model, x, y), {k: p.diag_h for k, p in bp.named_parameters()}, rtol)


class ResidualProjection(nn.Module):
    """A residual block whose shape changes (1×1 stride-2 shortcut); BackPACK needs its fx converter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.shortcut = nn.Conv2d(3, 4, 1, stride=2)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.body(x) + self.shortcut(x))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_residual_projection_matches_backpack(dtype, rtol):
    torch.manual_seed(0)
    model = ResidualProjection().to(dtype).eval()
    x, y = torch.randn(5, 2, 6, 6, dtype=dtype), torch.randint(0, 3, (5,))
    bp_model = extend(copy.deepcopy(model), use_converter=True)
    with backpack.backpack(DiagGGNExact()):
        extend(nn.CrossEntropyLoss())(bp_model(x), y).backward()
    want = {k: p.diag_ggn_exact for k, p in bp_model.named_parameters()}
    assert_close(diag_ggn(model, x, y), want, rtol)
