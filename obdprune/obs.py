"""Layer-wise Optimal Brain Surgeon (Hassibi & Stork 1993; Dong et al. 2017; ExactOBS, Frantar & Alistarh 2022).

A Conv2d/Linear layer computes W·X with W (rows, d_in) and X (d_in, positions) its inputs (for Conv2d the
unfolded patches, d_in = C_in·k_h·k_w, one column per output position). Keeping each output row's response
on N calibration images, the squared output error of a row w changed by δ is δᵀ(X·Xᵀ/N)δ = ½·δᵀHδ with

    H = 2·X·Xᵀ / N   (d_in × d_in, summed over the positions, averaged over the images),

dampened to H + λ·mean(diag H)·I (λ = ``damp``, ≈ 0.01) so it is invertible. For the weights of a row
still present (H⁻¹ the inverse of H restricted to them):

- removing weight q costs at least ½·w_q² / [H⁻¹]_qq of output error; :func:`obs_saliency` returns
  w_q² / [H⁻¹]_qq (twice that: the same ranking);
- the best correction of the others is δw = −(w_q / [H⁻¹]_qq)·H⁻¹e_q, after which
  H⁻¹ ← H⁻¹ − H⁻¹e_q·e_qᵀH⁻¹ / [H⁻¹]_qq is the inverse restricted to what is left.

:func:`obs_prune_rows` removes a given number of weights from every row greedily, each time the one of
lowest saliency, applying the correction and the downdate after each (ExactOBS's row-wise algorithm).
With a diagonal H the correction vanishes and the saliency is OBD's with h = H_qq. Everything runs in
float64. Grouped convolutions and non-zero padding modes are refused.

Cost per layer and pruning step: one d_in³ inverse per row that already has pruned weights (the inverse
restricted to its free weights) plus d_in² per removed weight per row. The rank-1 downdates are memory
bound on a CPU: a 300 × 784 layer losing 90% of its weights takes ≈ 145 s on one thread (float64).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from obdprune.errors import UsageError
from obdprune.layers import PRUNABLE_TYPES
from obdprune.masking import MaskSet

__all__ = ["layer_hessians", "dampen", "obs_saliency", "obs_prune_rows", "obs_prune", "DEFAULT_DAMP"]

DEFAULT_DAMP = 0.01
_BLOCK = 2 ** 22  # float64 entries of row-restricted inverses held at once (32 MiB)


def _layer_columns(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as columns X (d_in, positions)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1]).T
    if module.groups != 1:
        raise UsageError("layer-wise OBS does not support grouped convolutions (groups > 1)")
    if module.padding_mode != "zeros":
        raise UsageError(f"layer-wise OBS supports zero padding only, not {module.padding_mode!r}")
    padding = module.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise UsageError(f"layer-wise OBS needs numeric padding, not {padding!r}")
        padding = 0
    cols = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (d_in, N·L)


@torch.no_grad()
def layer_hessians(model: nn.Module, x: torch.Tensor, *, damp: float = DEFAULT_DAMP, batch_size: int = 256
                   ) -> dict[str, torch.Tensor]:
    """H = 2·X·Xᵀ/N + damp·mean(diag)·I (float64, d_in × d_in) of every Conv2d/Linear layer on inputs
    ``x`` (N, ...), keyed by the layer's weight name; the model runs in eval mode.

    >>> layer = nn.Linear(3, 2)
    >>> H = layer_hessians(layer, torch.eye(3), damp=0.0)["weight"]
    >>> torch.allclose(H, 2 * torch.eye(3, dtype=torch.float64) / 3)
    True
    """
    if not damp >= 0:
        raise UsageError(f"OBS dampening must be >= 0, got {damp}")
    layers = {(f"{n}.weight" if n else "weight"): m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            cols = _layer_columns(module, args[0].detach()).to(torch.float64)
            xx = cols @ cols.T
            sums[name] = xx if name not in sums else sums[name] + xx
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, x.shape[0], batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: dampen(2.0 * xx / x.shape[0], damp) for name, xx in sums.items()}


def dampen(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp·mean(diag H)·I (damp·I when the diagonal's mean is not positive), in place; returns H.

    >>> dampen(torch.diag(torch.tensor([1.0, 3.0])), 0.5).diagonal().tolist()
    [2.0, 4.0]
    """
    if not damp >= 0:
        raise UsageError(f"OBS dampening must be >= 0, got {damp}")
    mean = float(H.diagonal().mean())
    H.diagonal().add_(damp * (mean if mean > 0 else 1.0))
    return H


def _restricted_inverses(H: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """(B, d, d): for each row of ``free`` (B, d) the inverse of H restricted to its True entries, zero elsewhere."""
    f = free.to(H.dtype)
    outer = f[:, :, None] * f[:, None, :]
    inv = torch.linalg.inv(H * outer + torch.diag_embed(1.0 - f))
    return inv * outer


def _row_blocks(rows: int, d: int):
    step = max(1, _BLOCK // max(1, d * d))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def obs_saliency(weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                 masks: MaskSet | None = None) -> dict[str, torch.Tensor]:
    """w_q² / [H⁻¹]_qq per weight, H⁻¹ restricted to the row's weights still present (``masks``); same
    shapes as the weights, 0 for pruned entries. Higher = keep."""
    out = {}
    for name, w in weights.items():
        if name not in hessians:
            raise UsageError(f"no layer Hessian for {name!r}")
        H = hessians[name]
        W = w.detach().reshape(w.shape[0], -1).to(torch.float64)
        if W.shape[1] != H.shape[0]:
            raise ValueError(f"{name!r} has {W.shape[1]} inputs per row, its Hessian is {tuple(H.shape)}")
        free = (masks[name].reshape(W.shape).to(W.device) if masks is not None and name in masks
                else torch.ones_like(W, dtype=torch.bool))
        if bool(free.all()):
            diag = torch.linalg.inv(H).diagonal().expand_as(W)
        else:
            diag = torch.cat([_restricted_inverses(H, free[b]).diagonal(dim1=1, dim2=2)
                              for b in _row_blocks(W.shape[0], W.shape[1])])
        score = torch.where(free, W ** 2 / torch.where(free, diag, torch.ones_like(diag)), torch.zeros_like(W))
        out[name] = score.reshape(w.shape).to(w.dtype)
    return out


def obs_prune_rows(W: torch.Tensor, H: torch.Tensor, free: torch.Tensor, counts: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy row-wise OBS: from every row r of ``W`` (R, d) remove ``counts[r]`` of the weights still
    ``free`` (R, d) one at a time, each time the one of lowest w_q²/[H⁻¹]_qq, correcting the remaining
    free weights of the row after each removal. Returns the new weights (float64, removed and non-free
    entries exactly 0) and the new free mask.

    >>> H = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> w = torch.tensor([[1.0, 0.25]], dtype=torch.float64)
    >>> W, free = obs_prune_rows(w, H, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]))
    >>> W.tolist(), free.tolist()  # w₂ goes, w₁ takes over its share: 1 + 0.25·½
    ([[1.125, 0.0]], [[True, False]])
    """
    W = W.detach().to(torch.float64).clone()
    free = free.clone()
    counts = counts.to(torch.int64)
    if bool((counts > free.sum(1)).any()):
        raise ValueError("a row is asked to lose more weights than it has")
    for b in _row_blocks(W.shape[0], W.shape[1]):
        left = counts[b].clone()
        if left.numel() == 0 or int(left.max()) == 0:
            continue
        Hinv = _restricted_inverses(H, free[b])  # (B, d, d)
        w, f = W[b], free[b]
        w[~f] = 0.0
        rows = torch.arange(w.shape[0])
        for _ in range(int(left.max())):
            active = left > 0
            diag = Hinv.diagonal(dim1=1, dim2=2)
            score = torch.where(f, w ** 2 / torch.where(f, diag, torch.ones_like(diag)),
                                torch.full_like(diag, float("inf")))
            q = score.argmin(dim=1)  # rows already done pick anything; their update is scaled by 0
            col = Hinv[rows, :, q]  # (B, d) = H⁻¹e_q per row
            hqq = col[rows, q]
            coef = torch.where(active, 1.0 / torch.where(active, hqq, torch.ones_like(hqq)), torch.zeros_like(hqq))
            w -= (coef * w[rows, q])[:, None] * col
            Hinv.baddbmm_(col[:, :, None], (coef[:, None] * col)[:, None, :], alpha=-1.0)
            done_rows, done_q = rows[active], q[active]
            f[done_rows, done_q] = False
            Hinv[done_rows, done_q, :] = 0.0
            Hinv[done_rows, :, done_q] = 0.0
            w.masked_fill_(~f, 0.0)
            left -= active.to(left.dtype)
    return W, free


@torch.no_grad()
def obs_prune(model: nn.Module, hessians: Mapping[str, torch.Tensor], current: MaskSet, selected: MaskSet) -> MaskSet:
    """Apply ``selected`` (masks that only shrink ``current``) the OBS way: every row of every layer loses
    as many weights as ``selected`` takes from it, chosen greedily by :func:`obs_prune_rows`, with the
    remaining weights of the row corrected in place. Returns the masks actually in force: the same count
    per row (so per layer and in total) as ``selected``, possibly other entries within a row."""
    params = dict(model.named_parameters())
    out = {}
    for name, new in selected.items():
        old = current[name] if name in current else torch.ones_like(new)
        p = params[name]
        free = old.reshape(p.shape[0], -1).to(p.device)
        counts = (free & ~new.reshape(free.shape).to(p.device)).sum(1)
        if bool((new.reshape(free.shape).to(p.device) & ~free).any()):
            raise ValueError(f"masks of {name!r} would bring back pruned weights; masks only shrink")
        if int(counts.sum()) == 0:
            out[name] = new
            continue
        W, kept = obs_prune_rows(p.reshape(free.shape), hessians[name].to(p.device), free, counts)
        p.copy_(W.reshape(p.shape).to(p.dtype))
        out[name] = kept.reshape(new.shape).to(new.device)
    return MaskSet(out)
