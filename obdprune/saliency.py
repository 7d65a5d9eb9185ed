"""Saliency: how much each weight matters. Higher = keep.

- magnitude: |w| (Han et al. 2015).
- OBD: s_k = ½·h_kk·w_k² (LeCun, Denker & Solla 1990), the loss increase a diagonal quadratic model
  predicts when w_k is set to zero; h_kk from :mod:`obdprune.curvature`.
"""
from __future__ import annotations

from typing import Mapping

import torch

from obdprune.curvature import NegativeCurvature, apply_negative_curvature_policy

__all__ = ["magnitude_saliency", "obd_saliency"]


def magnitude_saliency(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w| per entry; same shapes as the weights."""
    return {n: w.detach().abs() for n, w in weights.items()}


def obd_saliency(
    weights: Mapping[str, torch.Tensor],
    curvature: Mapping[str, torch.Tensor],
    policy: NegativeCurvature | str = NegativeCurvature.CLAMP,
) -> dict[str, torch.Tensor]:
    """½·h·w² per entry for every tensor in ``weights``; ``curvature`` holds h of the same shapes.

    ``policy`` says what to do with negative h (possible for a true Hessian, never for a GGN):
    clamp to 0, take |h|, or keep the sign.
    """
    policy = NegativeCurvature.parse(policy) if isinstance(policy, str) else policy
    out = {}
    for name, w in weights.items():
        h = curvature[name].detach().to(w.dtype)
        if h.shape != w.shape:
            raise ValueError(f"curvature of {name!r} has shape {tuple(h.shape)}, weight has {tuple(w.shape)}")
        if torch.isnan(h).any() or torch.isinf(h).any():
            raise FloatingPointError(f"curvature of {name!r} contains NaN or inf")
        out[name] = 0.5 * apply_negative_curvature_policy(h, policy) * w.detach() ** 2
    return out
