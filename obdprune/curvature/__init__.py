"""Diagonal curvature of the mean cross-entropy loss, per trainable parameter.

Every function returns {name: tensor} keyed like ``model.named_parameters()`` (parameters with
requires_grad only), tensors of the parameters' shapes, devices and dtypes. The model, its
parameters, their ``.grad``, its mode and its hooks are left as they were.

- :func:`diag_ggn`: generalized Gauss–Newton diagonal (= Fisher for cross-entropy), exact or MC.
- :func:`diag_empirical_fisher`: mean squared per-sample gradient with the true labels (biased).
- :func:`diag_hessian`: true Hessian diagonal, exact (small models) or Hutchinson.

The GGN and empirical-Fisher passes have closed-form per-sample rules for Linear, Conv1d/2d/3d
(grouped and depthwise included), BatchNorm (eval mode), GroupNorm and LayerNorm; autograd carries
the columns through everything between them (activations, pooling, residual sums, concatenation,
channel shuffles, squeeze-excitation products). Any other module with trainable parameters gets
exact per-sample gradients from torch.func instead, slower, with a one-line warning naming it.
"""
from obdprune.curvature.estimate import CurvatureKind, estimate_curvature
from obdprune.curvature.fisher import diag_empirical_fisher
from obdprune.curvature.ggn import GGN_METHODS, diag_ggn
from obdprune.curvature.hessian import HESSIAN_METHODS, diag_hessian
from obdprune.curvature.policy import NegativeCurvature, apply_negative_curvature_policy

__all__ = [
    "CurvatureKind",
    "GGN_METHODS",
    "HESSIAN_METHODS",
    "NegativeCurvature",
    "apply_negative_curvature_policy",
    "diag_empirical_fisher",
    "diag_ggn",
    "diag_hessian",
    "estimate_curvature",
]
