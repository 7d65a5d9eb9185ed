"""What to do with negative diagonal curvature (the Hessian diagonal can be negative; OBD assumes ≥ 0)."""
from __future__ import annotations

from enum import Enum

from torch import Tensor

from obdprune.errors import UsageError


class NegativeCurvature(Enum):
    """CLAMP: max(h, 0); ABS: |h|; KEEP: h unchanged (saliency may then be negative)."""

    CLAMP = "clamp"
    ABS = "abs"
    KEEP = "keep"

    @classmethod
    def parse(cls, value: "str | NegativeCurvature") -> "NegativeCurvature":
        """Case-insensitive name → member; UsageError listing the valid values otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise UsageError(f"unknown negative-curvature policy {value!r}; valid: {valid}") from None


def apply_negative_curvature_policy(h: Tensor, policy: "NegativeCurvature | str") -> Tensor:
    """Return ``h`` with negative entries handled by ``policy`` (new tensor except for KEEP)."""
    policy = NegativeCurvature.parse(policy)
    if policy is NegativeCurvature.CLAMP:
        return h.clamp(min=0)
    if policy is NegativeCurvature.ABS:
        return h.abs()
    return h
