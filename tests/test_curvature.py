"""Curvature engine: exact quantities against brute force, estimators against their variance, API contracts."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_batchnorm
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from obdprune.curvature import (
    CurvatureKind,
    NegativeCurvature,
    apply_negative_curvature_policy,
    diag_empirical_fisher,
    diag_ggn,
    diag_hessian,
    estimate_curvature,
)
from obdprune.curvature.ggn import hessian_factor, sampled_gradient_columns
from obdprune.errors import UsageError

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Tiny nets, declared as data: name -> (factory, input shape (C, H, W) or (features,))


class Residual(nn.Module):
    """Custom forward: two conv branches joined by a skip connection, in-place ReLU, reused activation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.Tanh())
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        h = self.act(self.stem(x))
        h = h + self.body(h)
        h = F.avg_pool2d(self.act(h), 2)
        return self.head(h.flatten(1))


class TokenMixer(nn.Module):
    """Linear applied to a (N, T, features) input: per-sample gradients sum over the T positions."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.sigmoid(self.mix(x.view(x.shape[0], 3, 4))).mean(1))


NETS = {
    "conv-stride-pad": (lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)), (2, 6, 6)),
    "conv-dilation-groups-nobias": (lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, dilation=2, groups=2, bias=False), nn.Tanh(),
        nn.Conv2d(4, 4, (2, 3), stride=(1, 2), padding=(1, 0), groups=4), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(4 * 4 * 1, 3)), (2, 7, 7)),
    "maxpool-elu": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 3)), (1, 6, 6)),
    "avgpool-bn-adaptive": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)), (1, 6, 6)),
    "mlp-dropout": (lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(8, 5), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(5, 4)), (8,)),
    "padding-modes": (lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(2, 2, 2, padding="same", padding_mode="circular"), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
     (1, 4, 4)),
    "residual": (Residual, (2, 4, 4)),
    "linear-3d-input": (TokenMixer, (12,)),
}


def make(name: str, n: int = 5, dtype=F64, seed: int = 0):
    factory, shape = NETS[name]
    torch.manual_seed(seed)
    model = factory().to(dtype)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(n, *shape, dtype=dtype)
    num_classes = model(x).shape[1]
    y = torch.randint(0, num_classes, (n,))
    return model, x, y


# ---------------------------------------------------------------------------------------------
# Brute force references (float64)


def _flat(model):
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for k, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.reshape(-1) for p in params])

    def unflatten(v):
        out, i = {}, 0
        for k, p in zip(names, params):
            out[k] = v[i:i + p.numel()].view_as(p)
            i += p.numel()
        return out

    return names, params, flat, unflatten


def brute_jacobian(model, x):
    """(N, C, P) Jacobian of the logits with respect to the flat trainable parameters."""
    names, params, flat, unflatten = _flat(model)
    jac = torch.autograd.functional.jacobian(lambda v: functional_call(model, unflatten(v), (x,)), flat)
    return jac, unflatten


def brute_ggn(model, x):
    jac, unflatten = brute_jacobian(model, x)
    p = functional_call(model, dict(model.named_parameters()), (x,)).detach().softmax(1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return unflatten(torch.einsum("ncp,ncd,ndp->p", jac, hess, jac) / x.shape[0])


def brute_hessian(model, x, y):
    names, params, flat, unflatten = _flat(model)
    h = torch.autograd.functional.hessian(
        lambda v: F.cross_entropy(functional_call(model, unflatten(v), (x,)), y), flat)
    return h, unflatten


def brute_empirical_fisher(model, x, y):
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    total = {k: 0.0 for k in names}
    for i in range(x.shape[0]):
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        for k, g in zip(names, grads):
            total[k] = total[k] + g**2 / x.shape[0]
    return total


def assert_close(got: dict, want: dict, rtol: float = 1e-10):
    assert list(got) == list(want)
    for k in want:
        scale = want[k].abs().max().clamp(min=1e-30)
        err = (got[k] - want[k]).abs().max() / scale
        assert err <= rtol, f"{k}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("name", list(NETS))
def test_diag_ggn_exact_equals_brute_force(name):
    model, x, y = make(name)
    got = diag_ggn(model, x, y)
    assert_close(got, brute_ggn(model, x))
    for k, p in model.named_parameters():
        assert got[k].shape == p.shape and got[k].dtype == p.dtype


@pytest.mark.parametrize("name", ["conv-dilation-groups-nobias", "maxpool-elu", "residual", "linear-3d-input"])
def test_diag_empirical_fisher_equals_brute_force(name):
    model, x, y = make(name)
    assert_close(diag_empirical_fisher(model, x, y), brute_empirical_fisher(model, x, y))


@pytest.mark.parametrize("name", ["conv-dilation-groups-nobias", "avgpool-bn-adaptive", "residual"])
def test_diag_hessian_exact_equals_brute_force(name):
    model, x, y = make(name)
    h, unflatten = brute_hessian(model, x, y)
    assert_close(diag_hessian(model, x, y), unflatten(torch.diagonal(h)))


def test_hessian_factor_reproduces_softmax_hessian():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(20, 7, dtype=F64) * 3, torch.tensor([[60.0] + [0.0] * 6], dtype=F64)])
    s = hessian_factor(logits)
    assert s.shape == (6, 21, 7)
    p = logits.softmax(1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(torch.einsum("knc,knd->ncd", s, s), h, rtol=0, atol=1e-15)


def test_piecewise_linear_net_hessian_diagonal_equals_ggn():
    # ReLU/max-pool nets are linear in each single weight, so d²f/dw² = 0 and diag(H) = diag(GGN).
    model, x, y = make("conv-stride-pad")
    assert_close(diag_hessian(model, x, y), diag_ggn(model, x, y), rtol=1e-10)


@pytest.mark.parametrize("fn", ["ggn", "ggn-mc", "fisher", "hessian", "hutchinson"])
def test_batch_size_does_not_change_the_result(fn):
    model, x, y = make("residual", n=7)
    call = {
        "ggn": lambda b: diag_ggn(model, x, y, batch_size=b),
        "ggn-mc": lambda b: diag_ggn(model, x, y, method="mc", mc_samples=3, batch_size=b,
                                     generator=torch.Generator().manual_seed(3)),
        "fisher": lambda b: diag_empirical_fisher(model, x, y, batch_size=b),
        "hessian": lambda b: diag_hessian(model, x, y, batch_size=b),
        "hutchinson": lambda b: diag_hessian(model, x, y, method="hutchinson", samples=5, batch_size=b,
                                             generator=torch.Generator().manual_seed(3)),
    }[fn]
    whole = call(None)
    for b in (1, 3):
        assert_close(call(b), whole, rtol=1e-12)


def test_float32_matches_float64():
    model, x, y = make("avgpool-bn-adaptive", n=16)
    want = diag_ggn(model, x, y)
    got = diag_ggn(model.float(), x.float(), y)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_close({k: v.double() for k, v in got.items()}, want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Estimators: errors against bounds computed from their exact variance


def _z_scores(estimate: dict, exact: dict, std: dict):
    err = torch.cat([(estimate[k] - exact[k]).flatten() for k in exact])
    sd = torch.cat([std[k].flatten() for k in exact])
    keep = sd > 1e-12 * sd.max()
    return err[keep] / sd[keep], err[~keep]


def test_mc_ggn_error_matches_its_variance():
    model, x, y = make("maxpool-elu", n=6)
    exact = diag_ggn(model, x, y)
    # Per-draw variance, exactly: for sample n, X_n(y) = (J_nᵀ(e_y − p_n))² with y ~ p_n.
    jac, unflatten = brute_jacobian(model, x)
    p = model(x).detach().softmax(1)
    n, c = p.shape
    per_label = torch.einsum("ncp,nyc->nyp", jac, torch.eye(c, dtype=F64)[None] - p[:, None, :]) ** 2  # (N, C, P)
    mean_n = torch.einsum("ny,nyp->np", p, per_label)
    var_n = torch.einsum("ny,nyp->np", p, (per_label - mean_n[:, None]) ** 2)
    std_one_draw = var_n.sum(0).sqrt() / n  # std of the mc_samples=1 estimate
    assert torch.allclose(mean_n.mean(0), torch.cat([v.flatten() for v in exact.values()]), rtol=1e-10)
    errors = []
    for k in (16, 1024):
        est = diag_ggn(model, x, y, method="mc", mc_samples=k, generator=torch.Generator().manual_seed(k))
        z, exact_entries = _z_scores(est, exact, unflatten(std_one_draw / k**0.5))
        assert exact_entries.abs().sum() <= 1e-12  # zero-variance entries are exact
        assert z.abs().max() < 5.0, z.abs().max()
        assert 0.3 < z.square().mean() < 2.0, z.square().mean()
        errors.append(torch.cat([(est[q] - exact[q]).flatten() for q in exact]).norm())
    assert 4.0 < errors[0] / errors[1] < 16.0  # error shrinks like 1/sqrt(K): ratio ≈ 8


def test_hutchinson_error_matches_its_variance():
    model, x, y = make("maxpool-elu", n=6)
    h, unflatten = brute_hessian(model, x, y)
    exact = unflatten(torch.diagonal(h))
    # For Rademacher z, Var[z_i (Hz)_i] = sum_{j≠i} H_ij².
    std_one_probe = ((h**2).sum(1) - torch.diagonal(h) ** 2).clamp(min=0).sqrt()
    errors = []
    for k in (16, 1024):
        est = diag_hessian(model, x, y, method="hutchinson", samples=k, generator=torch.Generator().manual_seed(k))
        z, _ = _z_scores(est, exact, unflatten(std_one_probe / k**0.5))
        assert z.abs().max() < 5.0, z.abs().max()
        assert 0.3 < z.square().mean() < 2.0, z.square().mean()
        errors.append(torch.cat([(est[q] - exact[q]).flatten() for q in exact]).norm())
    assert 4.0 < errors[0] / errors[1] < 16.0


def test_empirical_fisher_with_model_sampled_labels_is_the_mc_ggn():
    """With labels drawn from the model, the empirical Fisher *is* the MC GGN estimate (same draws);
    with the true labels it is a different, biased quantity."""
    model, x, y = make("conv-dilation-groups-nobias", n=8)
    uniforms = torch.rand(8, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    sampled = sampled_gradient_columns(model(x).detach(), uniforms)  # (1, N, C) = e_y − p
    y_model = (sampled[0] > 0).double().argmax(1)
    mc = diag_ggn(model, x, y, method="mc", mc_samples=1, generator=torch.Generator().manual_seed(5))
    assert_close(diag_empirical_fisher(model, x, y_model), mc, rtol=1e-10)

    exact = diag_ggn(model, x, y)
    fisher = diag_empirical_fisher(model, x, y)
    rel = max(((fisher[k] - exact[k]).norm() / exact[k].norm()).item() for k in exact)
    assert rel > 0.1
    # Labels equal to the model's own argmax on confident predictions shrink it below the GGN.
    with torch.no_grad():
        model[-1].weight.mul_(50)
    confident = model(x).argmax(1)
    shrunk = diag_empirical_fisher(model, x, confident)
    ggn = diag_ggn(model, x, confident)
    assert sum(v.sum() for v in shrunk.values()) < sum(v.sum() for v in ggn.values())


# ---------------------------------------------------------------------------------------------
# Contracts: the model is left as it was; errors users cause


def _snapshot(model):
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                      dict(m._backward_pre_hooks)) for k, m in model.named_modules()},
    }


@pytest.mark.parametrize("kind", [k.value for k in CurvatureKind] + ["hessian-exact"])
def test_model_is_left_untouched(kind):
    model, x, y = make("residual")
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.stem.bias.requires_grad_(False)
    model.body[0].train()  # conv in train mode: irrelevant, must stay so
    model.act.register_forward_hook(lambda m, i, o: None)
    before = _snapshot(model)
    if kind == "hessian-exact":
        out = diag_hessian(model, x, y)
    else:
        out = estimate_curvature(kind, model, x, y, samples=2, generator=torch.Generator().manual_seed(0))
    after = _snapshot(model)
    assert "stem.bias" not in out and list(out) == [k for k, p in model.named_parameters() if p.requires_grad]
    for part in ("params", "buffers"):
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part])
    assert before["grads"]["stem.weight"] is None and after["grads"]["stem.weight"] is None
    assert torch.equal(after["grads"]["head.weight"], torch.ones_like(model.head.weight))
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]


def test_works_under_no_grad_and_with_inplace_activations():
    model, x, y = make("residual")  # uses ReLU(inplace=True) right after a conv
    with torch.no_grad():
        got = diag_ggn(model, x, y)
    assert_close(got, brute_ggn(model, x))


def test_frozen_and_unused_parameters():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)  # never called

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = WithSpare().double().eval()
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    for fn in (diag_ggn, diag_empirical_fisher, diag_hessian):
        out = fn(model, x, y)
        assert torch.count_nonzero(out["spare.weight"]) == 0 and torch.count_nonzero(out["used.weight"]) > 0


def test_module_whose_output_mixes_samples_is_a_usage_error():
    class BatchMean(nn.Module):  # no closed-form rule, and no per-sample output for the fallback
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return x.mean(0) + self.shift

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stat = BatchMean()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x - self.stat(x))

    with pytest.warns(UserWarning, match=r"'stat' \(BatchMean\)"), pytest.raises(
            UsageError, match=r"'stat' \(BatchMean\) returns a tensor of shape \(4,\) that does not keep"):
        diag_ggn(Model(), torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


def test_frozen_unsupported_layer_is_fine():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4).requires_grad_(False)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8, 3))
    out = diag_ggn(model, torch.randint(0, 10, (3, 2)), torch.zeros(3, dtype=torch.long))
    assert list(out) == ["2.weight", "2.bias"]


def test_batchnorm_in_training_mode_and_reused_layers_are_usage_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    x, y = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    for fn in (diag_ggn, diag_hessian):
        with pytest.raises(UsageError, match=r"'1' \(BatchNorm1d\).*eval"):
            fn(model, x, y)
    assert model[1].num_batches_tracked == 0

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    with pytest.raises(UsageError, match="more than once"):
        diag_ggn(Twice(), torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_bad_arguments_are_usage_errors():
    model, x, y = make("mlp-dropout")
    with pytest.raises(UsageError, match="exact, mc"):
        diag_ggn(model, x, y, method="kfac")
    with pytest.raises(UsageError, match="exact, hutchinson"):
        diag_hessian(model, x, y, method="mc")
    with pytest.raises(UsageError, match="ggn, ggn-mc, empirical-fisher, hessian-hutchinson"):
        estimate_curvature("fisher", model, x, y)
    with pytest.raises(UsageError, match="batch_size"):
        diag_ggn(model, x, y, batch_size=0)
    with pytest.raises(UsageError, match="mc_samples"):
        diag_ggn(model, x, y, method="mc", mc_samples=0)
    with pytest.raises(UsageError, match="targets"):
        diag_ggn(model, x, y[:-1])
    with pytest.raises(UsageError, match=r"targets must lie in \[0, 4\)"):
        diag_empirical_fisher(model, x, torch.full_like(y, 9))
    with pytest.raises(UsageError, match="logits"):
        diag_ggn(nn.Flatten(0), x, y)
    model.train()
    with pytest.raises(UsageError, match="Dropout"):
        diag_ggn(model, x, y)


def test_estimate_curvature_dispatches():
    model, x, y = make("conv-stride-pad")
    assert_close(estimate_curvature("ggn", model, x, y), diag_ggn(model, x, y), rtol=0)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert_close(estimate_curvature("ggn-mc", model, x, y, samples=3, generator=gen()),
                 diag_ggn(model, x, y, method="mc", mc_samples=3, generator=gen()), rtol=0)
    assert_close(estimate_curvature("empirical-fisher", model, x, y), diag_empirical_fisher(model, x, y), rtol=0)
    assert_close(estimate_curvature("hessian-hutchinson", model, x, y, samples=4, batch_size=2, generator=gen()),
                 diag_hessian(model, x, y, method="hutchinson", samples=4, generator=gen()), rtol=1e-12)


def test_negative_curvature_policy():
    assert NegativeCurvature.parse("CLAMP") is NegativeCurvature.CLAMP
    assert NegativeCurvature.parse(NegativeCurvature.ABS) is NegativeCurvature.ABS
    with pytest.raises(UsageError, match="choose one of: clamp, abs, keep") as err:
        NegativeCurvature.parse("zero")
    assert "\n" not in str(err.value)
    h = torch.tensor([-2.0, 0.0, 3.0])
    assert apply_negative_curvature_policy(h, "clamp").tolist() == [0.0, 0.0, 3.0]
    assert apply_negative_curvature_policy(h, NegativeCurvature.ABS).tolist() == [2.0, 0.0, 3.0]
    assert apply_negative_curvature_policy(h, "keep").tolist() == [-2.0, 0.0, 3.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model, x, y = make("residual", n=6)
    want = diag_ggn(model, x, y)
    gpu = copy.deepcopy(model).cuda()
    for kind in ("exact", "mc", "empirical-fisher", "hutchinson"):
        out = estimate_curvature(kind, gpu, x.cuda(), y.cuda(), samples=2, generator=torch.Generator().manual_seed(0))
        assert all(v.is_cuda and v.dtype == F64 for v in out.values())
    got = diag_ggn(gpu, x.cuda(), y.cuda())
    assert_close({k: v.cpu() for k, v in got.items()}, want, rtol=1e-10)
    h = diag_hessian(gpu, x.cuda(), y.cuda())
    assert_close({k: v.cpu() for k, v in h.items()}, diag_hessian(model, x, y), rtol=1e-10)


@pytest.mark.parametrize("old, new", [("exact", "ggn"), ("mc", "ggn-mc"), ("hutchinson", "hessian-hutchinson")])
def test_old_curvature_names_still_work_with_a_deprecation_note(old, new):
    with pytest.warns(DeprecationWarning, match=f"now called '{new}'"):
        assert CurvatureKind.parse(old) is CurvatureKind(new)
    with pytest.raises(ValueError, match="choose one of: ggn, ggn-mc, empirical-fisher, hessian-hutchinson"):
        CurvatureKind.parse("hessian")
