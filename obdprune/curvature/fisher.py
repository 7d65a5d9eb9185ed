"""Diagonal of the empirical Fisher: the mean of squared per-sample gradients with the true labels.

    F_emp = (1/N) sum_n g_n ⊙ g_n,   g_n = ∇_θ CE(logits_n, y_n) = J_nᵀ (p_n − e_{y_n}).

This is NOT the Fisher information: the Fisher (= GGN for cross-entropy) takes the expectation over
labels drawn from the model, E_{y~p_n}[(p_n − e_y)(p_n − e_y)ᵀ] = diag(p_n) − p_n p_nᵀ, whereas
the empirical Fisher plugs in the observed label. It is a biased curvature estimate: it shrinks
towards zero where the model fits the data (p_n ≈ e_{y_n}) and is inflated on misfit samples.
Replacing the labels with samples from the model gives the MC estimate of the GGN instead.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from obdprune.curvature._backprop import mean_squared_column_grads
from obdprune.curvature._common import check_batch, check_positive


def diag_empirical_fisher(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """(1/N) sum_n (∇_θ CE_n)**2 over ``inputs`` (N, ...) and true labels ``targets`` (N,).

    ``batch_size`` bounds the samples per chunk (None: automatic), as in :func:`diag_ggn`.

    Returns {parameter name: tensor of the parameter's shape} for parameters with requires_grad.
    """
    check_batch(inputs, targets)
    check_positive("batch_size", batch_size, allow_none=True)

    def columns(logits: Tensor, rows: slice) -> Tensor:
        p = torch.softmax(logits, dim=1)
        onehot = torch.nn.functional.one_hot(targets[rows].to(p.device), p.shape[1]).to(p.dtype)
        return (p - onehot)[None]  # (1, N, C)

    return mean_squared_column_grads(model, inputs, targets, columns, batch_size)
