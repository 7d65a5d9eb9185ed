"""One entry point for choosing a curvature estimator by name (the CLI's ``--curvature``)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from obdprune.choices import Choice
from obdprune.curvature.fisher import diag_empirical_fisher
from obdprune.curvature.ggn import diag_ggn
from obdprune.curvature.hessian import diag_hessian
from obdprune.errors import UsageError

__all__ = ["CurvatureKind", "estimate_curvature"]

# Names used before the estimators were named for what they compute.
_DEPRECATED = {"exact": "ggn", "mc": "ggn-mc", "hutchinson": "hessian-hutchinson"}


class CurvatureKind(Choice, label="curvature"):
    """Which diagonal curvature OBD uses.

    ``ggn``: exact generalized Gauss–Newton diagonal (= Fisher for cross-entropy); ``ggn-mc``: its Monte
    Carlo estimate with sampled labels; ``empirical-fisher``: mean squared per-sample gradient with the
    true labels (biased, not the Fisher); ``hessian-hutchinson``: Hessian diagonal from Rademacher probes.
    """

    GGN = "ggn"
    GGN_MC = "ggn-mc"
    EMPIRICAL_FISHER = "empirical-fisher"
    HESSIAN_HUTCHINSON = "hessian-hutchinson"

    @classmethod
    def parse(cls, value: "str | CurvatureKind") -> "CurvatureKind":
        if isinstance(value, str) and value.strip().lower() in _DEPRECATED:
            new = _DEPRECATED[value.strip().lower()]
            warnings.warn(f"curvature {value!r} is now called {new!r}", DeprecationWarning, stacklevel=3)
            value = new
        return super().parse(value)


def estimate_curvature(
    kind: CurvatureKind | str,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal curvature of the mean CE loss by ``kind`` (a :class:`CurvatureKind`).

    ``samples``: MC label draws per input for ``ggn-mc`` (default 1), Rademacher probes for
    ``hessian-hutchinson`` (default 100).
    """
    kind = CurvatureKind.parse(kind)
    if kind is CurvatureKind.GGN:
        return diag_ggn(model, inputs, targets, method="exact", batch_size=batch_size)
    if kind is CurvatureKind.GGN_MC:
        return diag_ggn(
            model, inputs, targets, method="mc", mc_samples=1 if samples is None else samples,
            batch_size=batch_size, generator=generator,
        )
    if kind is CurvatureKind.EMPIRICAL_FISHER:
        return diag_empirical_fisher(model, inputs, targets, batch_size=batch_size)
    return diag_hessian(
        model, inputs, targets, method="hutchinson", samples=100 if samples is None else samples,
        batch_size=batch_size, generator=generator,
    )
