"""Saliency: how much each weight matters. Higher = keep.

- magnitude: |w| (Han et al. 2015).
- OBD: s_k = ½·h_kk·w_k² (LeCun, Denker & Solla 1990), the loss increase a diagonal quadratic model
  predicts when w_k is set to zero; h_kk from :mod:`obdprune.curvature`.

Structured (per output unit, see :mod:`obdprune.groups`): a unit's score is the sum of its group's
entry scores, so it is again an additive cost of removing the unit:

- group OBD: S_g = Σ_{k∈g} ½·h_kk·w_k² over the unit's weights, bias and BatchNorm scale and shift,
  the diagonal model's loss increase when the whole group is zeroed;
- group magnitude: S_g = ‖w_g‖₂² = Σ_{k∈g} w_k², the squared L2 norm of the same group (it ranks
  units as ‖w_g‖₂ does and is group OBD with h ≡ 2; L2 matches the group-lasso penalty ‖w_g‖₂).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from obdprune.curvature import NegativeCurvature, apply_negative_curvature_policy
from obdprune.errors import UsageError
from obdprune.groups import UnitLayer

__all__ = ["magnitude_saliency", "obd_saliency", "group_saliency", "group_magnitude_saliency"]


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
        if name not in curvature:
            raise UsageError(f"no curvature for {name!r}; curvature is computed for parameters with "
                             f"requires_grad=True, and {name!r} is one that pruning scores")
        h = curvature[name].detach().to(w.dtype)
        if h.shape != w.shape:
            raise ValueError(f"curvature of {name!r} has shape {tuple(h.shape)}, weight has {tuple(w.shape)}")
        if torch.isnan(h).any() or torch.isinf(h).any():
            raise FloatingPointError(f"curvature of {name!r} contains NaN or inf")
        out[name] = 0.5 * apply_negative_curvature_policy(h, policy) * w.detach() ** 2
    return out


def group_saliency(element_scores: Mapping[str, torch.Tensor], groups: Sequence[UnitLayer]) -> dict[str, torch.Tensor]:
    """Per-unit sums of entry scores: ``{layer: (units,)}`` with S[i] = Σ_p Σ element_scores[p][row_p(i)]
    over every member p of unit i (coupled members included: the other side of a residual sum, a
    depthwise conv, the BatchNorm slices of a concatenation).

    element_scores: {parameter name: scores of the parameter's shape} for every member of every group
      (e.g. :func:`obd_saliency` over the weights, biases and BatchNorm parameters).
    """
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        members = g.members()
        missing = [p for p, _, _ in members if p not in element_scores]
        if missing:
            raise ValueError(f"no scores for {', '.join(map(repr, missing))} (members of {g.layer!r}'s units)")
        total = None
        for p, shape, rows in members:
            s = element_scores[p].detach()
            if rows is None:
                if s.shape[0] != g.units:
                    raise ValueError(f"scores of {p!r} have {s.shape[0]} rows, {g.layer!r} has {g.units} units")
                row = s.reshape(g.units, -1).sum(dim=1)
            else:
                if tuple(s.shape) != tuple(shape):
                    raise ValueError(f"scores of {p!r} have shape {tuple(s.shape)}, expected {tuple(shape)}")
                row = s.reshape(shape[0], -1).sum(dim=1)[rows.to(s.device)]
                if row.dim() > 1:  # (units, blocks): a unit's rows in every channel group
                    row = row.sum(dim=1)
            total = row if total is None else total + row.to(total.device)
        out[g.layer] = total
    return out


def group_magnitude_saliency(params: Mapping[str, torch.Tensor], groups: Sequence[UnitLayer]) -> dict[str, torch.Tensor]:
    """Squared L2 norm of each unit's group: ``{layer: (units,)}``, S[i] = Σ_p ‖params[p][i]‖₂²."""
    return group_saliency({n: w.detach() ** 2 for n, w in params.items()}, groups)
