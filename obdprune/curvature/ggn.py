"""Diagonal of the generalized Gauss–Newton matrix of the mean cross-entropy loss.

    G = (1/N) sum_n J_nᵀ H_n J_n,   H_n = diag(p_n) − p_n p_nᵀ,   p_n = softmax(logits_n),

J_n the Jacobian of sample n's logits with respect to the parameters. This is what BackPACK's
``DiagGGNExact`` returns for ``CrossEntropyLoss(reduction="mean")``; for cross-entropy it equals the
Fisher information of the model's predictive distribution.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from obdprune.curvature._backprop import mean_squared_column_grads
from obdprune.curvature._common import check_batch, check_positive, sample_device
from obdprune.errors import UsageError

GGN_METHODS = ("exact", "mc")


def diag_ggn(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    method: str = "exact",
    mc_samples: int = 1,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal of the GGN of the mean CE loss over ``inputs`` (N, ...) with ``targets`` (N,).

    ``method="exact"`` backpropagates C−1 columns per sample (a factor S_n of H_n, S_n S_nᵀ = H_n);
    ``method="mc"`` backpropagates ``mc_samples`` columns (e_y − p_n)/√mc_samples with y ~ p_n, an
    unbiased estimate. The targets do not enter the GGN of cross-entropy; they are only checked.
    ``batch_size`` bounds the samples per forward/backward chunk (None: chunks sized automatically,
    about 4 MiB of layer outputs each); results do not depend on it beyond rounding, for "mc" too.
    Returns {parameter name: tensor of the parameter's shape} for parameters with requires_grad.
    """
    check_batch(inputs, targets)
    check_positive("batch_size", batch_size, allow_none=True)
    if method == "exact":
        return mean_squared_column_grads(model, inputs, targets, lambda logits, _: hessian_factor(logits), batch_size)
    if method == "mc":
        check_positive("mc_samples", mc_samples)
        # Uniforms drawn up front, so the labels (and the result) do not depend on batch_size.
        where = sample_device(generator, inputs.device)
        uniforms = torch.rand(inputs.shape[0], mc_samples, generator=generator, device=where, dtype=torch.float64)

        def columns(logits: Tensor, rows: slice) -> Tensor:
            return sampled_gradient_columns(logits, uniforms[rows].to(logits.device))

        return mean_squared_column_grads(model, inputs, targets, columns, batch_size)
    raise UsageError(f"unknown GGN method {method!r}; valid: {', '.join(GGN_METHODS)}")


def hessian_factor(logits: Tensor) -> Tensor:
    """Columns S (C−1, N, C) with sum_k S[k, n] S[k, n]ᵀ = diag(p_n) − p_n p_nᵀ.

    Start from the symmetric factor diag(√p) − p √pᵀ, whose columns are annihilated by √p (a unit
    vector), and rotate with the Householder reflection P that maps √p to −e_m (m = argmax p, which
    keeps 1 + √p_m ≥ 1 away from zero): column m of the product vanishes and the others are
    √p ⊙ (e_j − v v_j / (1 + √p_m)) with v = √p + e_m. One column fewer to backpropagate.
    """
    n, c = logits.shape
    p = torch.softmax(logits, dim=1)
    sqrt_p = p.sqrt()
    m = p.argmax(dim=1)
    v = sqrt_p.clone()
    v[torch.arange(n, device=p.device), m] += 1.0
    scale = 1.0 / (1.0 + sqrt_p.gather(1, m[:, None]))  # (N, 1)
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    factor = sqrt_p[:, :, None] * (eye - v[:, :, None] * (v * scale)[:, None, :])  # (N, C, C)
    keep = torch.arange(c - 1, device=p.device)[None, :]
    keep = keep + (keep >= m[:, None]).long()  # (N, C−1): every column but m
    factor = factor.gather(2, keep[:, None, :].expand(n, c, c - 1))
    return factor.permute(2, 0, 1).contiguous()


def sampled_gradient_columns(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Columns (S, N, C): (e_y − p_n)/√S with y ~ p_n drawn by inverse CDF from ``uniforms`` (N, S)."""
    p = torch.softmax(logits, dim=1)
    cdf = torch.cumsum(p.double(), dim=1)
    y = torch.searchsorted(cdf, uniforms, right=True).clamp_(max=p.shape[1] - 1)  # (N, S)
    onehot = torch.nn.functional.one_hot(y.T, p.shape[1]).to(p.dtype)  # (S, N, C)
    return (onehot - p) / uniforms.shape[1] ** 0.5
