"""Layer-wise OBS against brute force in float64: the Hessian of the layer's inputs, the single-weight
closed form against least squares on the calibration inputs, greedy removal against an explicit
sequential search, and masks that stay exactly zero."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from obdprune.masking import MaskSet
from obdprune.obs import layer_hessians, obs_prune, obs_prune_rows, obs_saliency

D = torch.float64


def _best_update(X: torch.Tensor, w0: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
    """argmin over v (v = 0 outside ``keep``) of ‖Xᵀv − Xᵀw0‖² / N by least squares, and that error."""
    target = X.T @ w0
    v = torch.zeros_like(w0)
    if bool(keep.any()):
        v[keep] = torch.linalg.lstsq(X[keep].T, target[:, None]).solution[:, 0]
    return v, float(((X.T @ v - target) ** 2).sum() / X.shape[1])


def test_layer_hessian_of_a_conv_is_two_x_xt_of_its_unfolded_inputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    x = torch.randn(5, 2, 6, 6, dtype=D)
    H = layer_hessians(conv, x, damp=0.0)["weight"]
    cols = []  # unfold by hand: one patch (C_in·3·3) per output position
    xp = F.pad(x, (1, 1, 1, 1))
    for n in range(5):
        for i in range(0, 6, 2):
            for j in range(0, 6, 2):
                cols.append(xp[n, :, i:i + 3, j:j + 3].reshape(-1))
    X = torch.stack(cols, 1)
    torch.testing.assert_close(H, 2 * X @ X.T / 5)
    # the row ordering of the weight matches: the conv's output equals W·X
    out = conv(x) - conv.bias[None, :, None, None]
    torch.testing.assert_close(out.permute(1, 0, 2, 3).reshape(3, -1), conv.weight.reshape(3, -1) @ X)
    Hd = layer_hessians(conv, x, damp=0.1)["weight"]
    torch.testing.assert_close(Hd - H, 0.1 * H.diagonal().mean() * torch.eye(18, dtype=D))


def test_single_removal_closed_form_equals_least_squares():
    torch.manual_seed(1)
    d, n = 5, 40
    X = torch.randn(d, n, dtype=D) + 0.5 * torch.randn(d, 1, dtype=D)  # correlated inputs
    w = torch.randn(d, dtype=D)
    H = 2 * X @ X.T / n
    Hinv = torch.linalg.inv(H)
    sal = obs_saliency({"w": w[None]}, {"w": H})["w"][0]
    for q in range(d):
        keep = torch.ones(d, dtype=torch.bool)
        keep[q] = False
        v, err = _best_update(X, w, keep)
        closed = w - (w[q] / Hinv[q, q]) * Hinv[:, q]
        torch.testing.assert_close(closed, v, rtol=1e-9, atol=1e-10)
        assert float(sal[q]) == pytest.approx(2 * err, rel=1e-9)  # w_q²/[H⁻¹]_qq = 2 × output error
        W, free = obs_prune_rows(w[None], H, torch.ones(1, d, dtype=torch.bool), torch.tensor([1]))
    best = int(sal.argmin())
    assert not bool(free[0, best]) and float(W[0, best]) == 0.0


def test_greedy_rows_match_sequential_brute_force():
    torch.manual_seed(2)
    d, n, k = 6, 30, 4
    X = (torch.eye(d, dtype=D) + 0.4 * torch.randn(d, d, dtype=D)) @ torch.randn(d, n, dtype=D)
    H = 2 * X @ X.T / n
    Wrows = torch.randn(3, d, dtype=D)
    free = torch.ones(3, d, dtype=torch.bool)
    free[1, 2] = False  # pruned in an earlier round: stays out, never comes back
    Wrows[1, 2] = 0.0
    counts = torch.tensor([k, k - 1, 0])
    W, kept = obs_prune_rows(Wrows, H, free, counts)
    for r in range(3):
        keep = free[r].clone()
        w0 = Wrows[r]
        for _ in range(int(counts[r])):  # brute force: try every weight, keep the least error
            errs = {}
            for q in keep.nonzero().squeeze(1).tolist():
                trial = keep.clone()
                trial[q] = False
                errs[q] = _best_update(X, w0, trial)[1]
            keep[min(errs, key=errs.get)] = False
        v, _ = _best_update(X, w0, keep) if int(counts[r]) else (w0, 0.0)
        assert torch.equal(kept[r], keep)
        torch.testing.assert_close(W[r], v, rtol=1e-8, atol=1e-10)
        assert bool((W[r][~keep] == 0).all())
    assert torch.equal(W[2], Wrows[2])


def test_obs_prune_on_a_model_keeps_counts_per_row_and_exact_zeros():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    x = torch.randn(64, 1, 6, 6)
    hess = layer_hessians(model, x)
    current = MaskSet.dense(model)
    torch.manual_seed(4)
    selected = MaskSet({n: torch.rand_like(m, dtype=torch.float32) > 0.5 for n, m in current.items()})
    out = obs_prune(model, hess, current, selected)
    for name, p in [("0.weight", model[0].weight), ("3.weight", model[3].weight)]:
        rows = p.shape[0]
        assert torch.equal(out[name].reshape(rows, -1).sum(1), selected[name].reshape(rows, -1).sum(1))
        assert bool((p[~out[name]] == 0).all()) and not bool((p[out[name]] == 0).any())
    again = obs_prune(model, hess, out, MaskSet({n: m.clone() for n, m in out.items()}))  # nothing more to remove
    assert all(torch.equal(again[n], out[n]) for n in out)
    with pytest.raises(ValueError, match="only shrink"):
        obs_prune(model, hess, out, MaskSet.dense(model))
