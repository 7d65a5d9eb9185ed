"""Argument checks and batching shared by the curvature estimators."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from obdprune.errors import UsageError


def check_batch(inputs: Tensor, targets: Tensor) -> int:
    """Check ``inputs`` (N, ...) and ``targets`` (N,) class indices; return N."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise UsageError("inputs and targets must be tensors")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise UsageError(f"inputs must have a non-empty batch dimension, got shape {tuple(inputs.shape)}")
    if targets.shape != (inputs.shape[0],):
        raise UsageError(
            f"targets must have shape ({inputs.shape[0]},) (one class index per input), "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise UsageError(f"targets must be integer class indices, got dtype {targets.dtype}")
    return inputs.shape[0]


def check_positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def check_logits(logits: Tensor, n: int, targets: Tensor | None = None) -> None:
    """The model must map a batch of n inputs to (n, C) class scores."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise UsageError(f"the model must return logits of shape ({n}, num_classes), got {shape}")
    if targets is not None and targets.numel() and (
        int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]
    ):
        raise UsageError(f"targets must lie in [0, {logits.shape[1]}) for a model with {logits.shape[1]} classes")


def chunks(n: int, batch_size: int | None) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` (all of ``n`` when None)."""
    step = n if batch_size is None else batch_size
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model.named_parameters()`` restricted to those with requires_grad, in order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def sample_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Random draws happen where the generator lives, then move to ``device``."""
    return generator.device if generator is not None else device
