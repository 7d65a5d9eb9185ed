"""What to do with negative diagonal curvature (the Hessian diagonal can be negative; OBD assumes ≥ 0)."""
from __future__ import annotations

from torch import Tensor

from obdprune.choices import Choice


class NegativeCurvature(Choice, label="negative-curvature policy"):
    """CLAMP: max(h, 0); ABS: |h|; KEEP: h unchanged (saliency may then be negative)."""

    CLAMP = "clamp"
    ABS = "abs"
    KEEP = "keep"


def apply_negative_curvature_policy(h: Tensor, policy: "NegativeCurvature | str") -> Tensor:
    """Return ``h`` with negative entries handled by ``policy`` (new tensor except for KEEP)."""
    policy = NegativeCurvature.parse(policy)
    if policy is NegativeCurvature.CLAMP:
        return h.clamp(min=0)
    if policy is NegativeCurvature.ABS:
        return h.abs()
    return h
