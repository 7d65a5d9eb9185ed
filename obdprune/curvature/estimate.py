"""One entry point for the CLI flag ``--curvature``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from obdprune.curvature.fisher import diag_empirical_fisher
from obdprune.curvature.ggn import diag_ggn
from obdprune.curvature.hessian import diag_hessian
from obdprune.errors import UsageError

CURVATURE_KINDS = ("exact", "mc", "empirical-fisher", "hutchinson")


def estimate_curvature(
    kind: str,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal curvature of the mean CE loss by ``kind``.

    "exact": GGN diagonal (exact); "mc": GGN diagonal, Monte Carlo with ``samples`` labels per input
    (default 1); "empirical-fisher": mean squared per-sample gradient (biased, not the Fisher);
    "hutchinson": Hessian diagonal from ``samples`` Rademacher probes (default 100).
    """
    if kind == "exact":
        return diag_ggn(model, inputs, targets, method="exact", batch_size=batch_size)
    if kind == "mc":
        return diag_ggn(
            model, inputs, targets, method="mc", mc_samples=1 if samples is None else samples,
            batch_size=batch_size, generator=generator,
        )
    if kind == "empirical-fisher":
        return diag_empirical_fisher(model, inputs, targets, batch_size=batch_size)
    if kind == "hutchinson":
        return diag_hessian(
            model, inputs, targets, method="hutchinson", samples=100 if samples is None else samples,
            batch_size=batch_size, generator=generator,
        )
    raise UsageError(f"unknown curvature kind {kind!r}; valid: {', '.join(CURVATURE_KINDS)}")
