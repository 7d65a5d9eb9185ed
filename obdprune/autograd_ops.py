"""The autograd ops whose channel structure obdprune understands: one table for compaction and unit groups.

:func:`obdprune.compact.compact` and :func:`obdprune.groups.unit_groups` both walk the autograd graph
of a traced forward pass and must agree on which ops carry channel ``c`` of their input to channel ``c``
of their output, and which of those keep an identically-zero channel identically zero. Ops are named as
autograd names their backward nodes, without the overload number (``ReluBackward0`` → ``ReluBackward``);
:func:`op_name` does that.
"""
from __future__ import annotations

from typing import Any, Iterable

__all__ = [
    "CHANNELWISE_UNARY_OPS", "CONST_PRESERVING_OPS", "SPATIAL_REDUCE_OPS", "SHAPE_OPS", "BINARY_OPS",
    "op_name", "normalized_dims", "reduces_only_spatial_dims",
]

# Channel-wise unary ops (output channel c depends only on input channel c). Values: whether
# f(0) == 0 exactly, i.e. an identically-zero input channel stays identically zero.
CHANNELWISE_UNARY_OPS: dict[str, bool] = {
    "ReluBackward": True,
    "LeakyReluBackward": True,
    "EluBackward": True,
    "GeluBackward": True,
    "SiluBackward": True,
    "MishBackward": True,
    "HardswishBackward": True,
    "TanhBackward": True,
    "NegBackward": True,
    "AbsBackward": True,
    "CloneBackward": True,
    "MaxPool1DWithIndicesBackward": True,
    "MaxPool2DWithIndicesBackward": True,
    "MaxPool3DWithIndicesBackward": True,
    "AvgPool2DBackward": True,
    "AvgPool3DBackward": True,
    "AdaptiveAvgPool2DBackward": True,
    "AdaptiveAvgPool3DBackward": True,
    "AdaptiveMaxPool2DBackward": True,
    "AdaptiveMaxPool3DBackward": True,
    "UpsampleNearest2DBackward": True,
    "UpsampleBilinear2DBackward": True,
    "HardtanhBackward": True,  # compact propagates its exact constants by clamping
    "SigmoidBackward": False,
    "HardsigmoidBackward": False,
    "SoftplusBackward": False,
    "ExpBackward": False,
}
# Channel-wise ops that map a constant channel to the same constant (max-pool pads with -inf).
CONST_PRESERVING_OPS = frozenset({
    "CloneBackward",
    "MaxPool1DWithIndicesBackward",
    "MaxPool2DWithIndicesBackward",
    "MaxPool3DWithIndicesBackward",
    "AdaptiveMaxPool2DBackward",
    "AdaptiveMaxPool3DBackward",
    "UpsampleNearest2DBackward",
})
# A mean or sum over chosen dims (full autograd names: the overload without dims reduces everything).
SPATIAL_REDUCE_OPS = ("MeanBackward1", "SumBackward1")
# Prefixes of view-like ops; whether one keeps the channel dim depends on the shapes around it.
SHAPE_OPS = (
    "ViewBackward",
    "ReshapeAliasBackward",
    "UnsafeViewBackward",
    "SqueezeBackward",
    "UnsqueezeBackward",
)
# Elementwise ops of two tensors (full autograd names).
BINARY_OPS = ("AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0")


def op_name(node: Any) -> str:
    """An autograd node's op without the overload number; a name string works too; ``""`` for None.

    Example:
        >>> import torch
        >>> op_name(torch.ones(2, requires_grad=True).relu().grad_fn), op_name("MeanBackward1")
        ('ReluBackward', 'MeanBackward')
    """
    if node is None:
        return ""
    name = node if isinstance(node, str) else node.name()
    return name.rstrip("0123456789")


def normalized_dims(dims: Iterable[int], ndim: int) -> set[int]:
    """Dims as indices in ``range(ndim)``: negative dims wrap, and so do the uint64 values autograd saves
    them as (``-1`` is stored as ``2**64 - 1``).

    Example:
        >>> sorted(normalized_dims([-1, 2**64 - 2, 1], 4))
        [1, 2, 3]
    """
    out = set()
    for d in dims:
        d = int(d)
        if d >= 2**63:
            d -= 2**64
        out.add(d % ndim)
    return out


def reduces_only_spatial_dims(grad_fn: Any) -> bool:
    """Whether a :data:`SPATIAL_REDUCE_OPS` node reduces a (N, C, *S) tensor over dims of ``S`` only, so
    that it keeps batch and channel (global average pooling written as ``x.mean((2, 3))``)."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) < 3:
        return False
    return not {0, 1} & normalized_dims(grad_fn._saved_dim, len(sizes))
