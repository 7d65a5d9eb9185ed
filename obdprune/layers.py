"""Which layers obdprune prunes, and which it can shrink: the one definition every module imports.

A *prunable layer* is an ``nn.Conv2d`` or ``nn.Linear``. Masks, curvature, saliency, regularizers,
unit groups and the weight and MAC counts all act on these layers' ``weight`` tensors, and a sparsity is
always a fraction of their weights. :func:`obdprune.compact.compact` can remove the output units of a
wider set, :data:`COMPACTABLE_TYPES` (any non-transposed convolution), so a model with a ``Conv1d``
next to its pruned layers still loses that layer's dead units.
"""
from __future__ import annotations

from torch import nn

__all__ = ["PRUNABLE_TYPES", "CONV_TYPES", "COMPACTABLE_TYPES", "BATCH_NORM_TYPES", "prunable_layers", "is_depthwise",
           "is_grouped"]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
COMPACTABLE_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)
# BatchNorm1d/2d/3d (and SyncBatchNorm): their scale and shift go with the units of the layer they follow.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of every prunable layer of ``model``, in ``named_modules`` order
    (a module reachable under two names is listed once).

    Example:
        >>> from torch import nn
        >>> [n for n, _ in prunable_layers(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
        ...                                                nn.Linear(8, 3)))]
        ['0', '3']
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise convolution: one input and one output channel per group (``groups`` = in = out > 1).

    >>> is_depthwise(nn.Conv2d(8, 8, 3, groups=8)), is_depthwise(nn.Conv2d(8, 8, 3, groups=2))
    (True, False)
    """
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_grouped(m: nn.Module) -> bool:
    """A grouped convolution whose groups hold several channels (not depthwise).

    >>> is_grouped(nn.Conv2d(8, 8, 3, groups=2)), is_grouped(nn.Conv2d(8, 8, 3, groups=8))
    (True, False)
    """
    return isinstance(m, CONV_TYPES) and m.groups > 1 and not is_depthwise(m)
