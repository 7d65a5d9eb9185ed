"""Exact per-sample gradients for parametrized modules that have no closed-form rule, by torch.func.

For a module m with its own trainable parameters θ (its children's parameters are their own
sites), the recorded inputs a_n of sample n and the columns g_k(n) backpropagated to its output,
this computes the same quantity as the closed-form rules,

    sum_n sum_k (∂⟨g_k(n), m_θ(a_n)⟩ / ∂θ)**2,

by running m again on each sample alone: ``torch.func.vmap`` over the samples of a ``vjp``, itself
vmapped over the buffered columns. Where vmap cannot batch an op of the module's forward, a loop
over samples with plain autograd computes the same numbers. Exact, but each flush of buffered
columns costs one forward of the module per sample plus one vector-Jacobian product per sample and
column, where a closed-form rule costs a few tensor products.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from obdprune.errors import UsageError

# Bound on buffered columns and on the per-sample gradients of one vmapped call, as in _layers.
_MAX_TEMP_BYTES = 16 << 20

_paused = 0


@contextmanager
def recording_paused() -> Iterator[None]:
    """While active, the recording hooks ignore forward passes (the fallback's own re-runs)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def recording_is_paused() -> bool:
    return _paused > 0


def tensor_leaves(obj: Any) -> list[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


def float_leaves(obj: Any) -> tuple[Tensor, ...]:
    """The floating-point tensors in a module's output, in pytree order (what gradients reach)."""
    return tuple(t for t in tensor_leaves(obj) if t.is_floating_point() or t.is_complex())


class FallbackSquares:
    """Accumulates sum_{n,k} (per-sample-per-column gradient)**2 of a module's own parameters.

    Built from the module's recorded call (``args``, ``kwargs``; tensors whose leading dimension
    is the chunk's n samples, n taken from the first tensor argument, are split per sample,
    everything else is shared) and fed one column at a time: a tuple with the column's gradient
    at each tensor the module returned (``outputs``, as recorded).
    """

    def __init__(
        self,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        outputs: tuple[Tensor, ...],
        trainable: tuple[str, ...],
        label: str,
    ) -> None:
        self.module = module
        self.params = {k: getattr(module, k).detach() for k in trainable}
        self.leaves, self.spec = tree_flatten((args, kwargs))
        batched = [t for t in self.leaves if isinstance(t, Tensor) and t.dim() > 0]
        if not batched:
            raise UsageError(f"{label} takes no batched tensor input; curvature needs one sample per row")
        self.n = n = batched[0].shape[0]
        self.per_sample = [
            i for i, t in enumerate(self.leaves) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n
        ]
        self.batch_dims = self._output_batch_dims(outputs, label)
        self.columns: list[tuple[Tensor, ...]] = []
        self.squares = {k: torch.zeros_like(p) for k, p in self.params.items()}

    def _output_batch_dims(self, outputs: tuple[Tensor, ...], label: str) -> tuple[int, ...]:
        """Where each returned tensor keeps its samples: the dim of size n that is 1 for one sample.

        (LSTM returns its states as (layers, N, H), for instance.)
        """
        with recording_paused(), torch.no_grad():
            single = self._call(self.params, [self.leaves[i][:1] for i in self.per_sample])
        dims = []
        for full, one in zip(outputs, single):
            found = [
                d for d in range(full.dim())
                if full.shape[d] == self.n and one.shape[d] == 1
                and full.shape[:d] + full.shape[d + 1 :] == one.shape[:d] + one.shape[d + 1 :]
            ]
            if len(single) != len(outputs) or not found:
                raise UsageError(
                    f"{label} returns a tensor of shape {tuple(full.shape)} that does not keep the "
                    f"{self.n} samples apart along one dimension; curvature needs per-sample outputs"
                )
            dims.append(found[0])
        return tuple(dims)

    def add_column(self, grads: tuple[Tensor, ...]) -> None:
        self.columns.append(tuple(g.movedim(d, 0) for g, d in zip(grads, self.batch_dims)))
        buffered = len(self.columns) * sum(g.numel() for g in grads) * grads[0].element_size()
        if buffered >= _MAX_TEMP_BYTES:
            self._flush()

    def result(self) -> dict[str, Tensor]:
        if self.columns:
            self._flush()
        return self.squares

    def _flush(self) -> None:
        # (n, K, *output shape without the batch dim) per returned tensor
        cotangents = tuple(torch.stack([c[j] for c in self.columns], 1) for j in range(len(self.columns[0])))
        self.columns = []
        with recording_paused():
            try:
                sums = self._vmapped(cotangents)
            except (RuntimeError, NotImplementedError, ValueError):
                # vmap lacks a batching rule for some op of this module (or it branches on data).
                sums = self._looped(cotangents)
        for k, s in sums.items():
            self.squares[k] += s

    def _call(self, params: dict[str, Tensor], sample_leaves: list[Tensor]) -> tuple[Tensor, ...]:
        leaves = list(self.leaves)
        for i, t in zip(self.per_sample, sample_leaves):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        return float_leaves(functional_call(self.module, params, args, kwargs, strict=False))

    def _rows(self, cotangents: tuple[Tensor, ...]) -> int:
        per_row = cotangents[0].shape[1] * sum(p.numel() for p in self.params.values())
        per_row += sum(c[0].numel() for c in cotangents)
        per_row += sum(self.leaves[i][0].numel() for i in self.per_sample)
        return max(1, (_MAX_TEMP_BYTES // cotangents[0].element_size()) // max(1, per_row))

    def _vmapped(self, cotangents: tuple[Tensor, ...]) -> dict[str, Tensor]:
        def one_sample(sample_leaves: list[Tensor], columns: tuple[Tensor, ...]) -> dict[str, Tensor]:
            def forward(params: dict[str, Tensor]) -> tuple[Tensor, ...]:
                return self._call(params, [t.unsqueeze(0) for t in sample_leaves])

            _, pullback = vjp(forward, self.params)
            (grads,) = vmap(pullback)(tuple(c.unsqueeze(1 + d) for c, d in zip(columns, self.batch_dims)))
            return {k: g.square().sum(0) for k, g in grads.items()}

        sums = {k: torch.zeros_like(p) for k, p in self.params.items()}
        step = self._rows(cotangents)
        with torch.no_grad():
            for start in range(0, self.n, step):
                rows = slice(start, min(start + step, self.n))
                per_sample = vmap(one_sample)(
                    [self.leaves[i][rows] for i in self.per_sample], tuple(c[rows] for c in cotangents)
                )
                for k, s in per_sample.items():
                    sums[k] += s.sum(0)
        return sums

    def _looped(self, cotangents: tuple[Tensor, ...]) -> dict[str, Tensor]:
        sums = {k: torch.zeros_like(p) for k, p in self.params.items()}
        names = list(self.params)
        num_columns = cotangents[0].shape[1]
        for n in range(self.n):
            with torch.enable_grad():
                params = {k: p.clone().requires_grad_(True) for k, p in self.params.items()}
                outputs = self._call(params, [self.leaves[i][n : n + 1] for i in self.per_sample])
                live = [j for j, o in enumerate(outputs) if o.requires_grad]
                for k in range(num_columns):
                    if not live:
                        break
                    grads = torch.autograd.grad(
                        [outputs[j] for j in live],
                        [params[q] for q in names],
                        [cotangents[j][n, k].unsqueeze(self.batch_dims[j]) for j in live],
                        retain_graph=k + 1 < num_columns,
                        allow_unused=True,
                    )
                    for q, g in zip(names, grads):
                        if g is not None:
                            sums[q] += g.square()
        return sums


def describe_costs(entries: list[tuple[str, nn.Module, tuple[str, ...]]]) -> str:
    """One line for modules of one type that take the fallback, e.g. every block of a ConvNeXt stage."""
    name, module, trainable = entries[0]
    count = sum(getattr(m, k).numel() for _, m, ks in entries for k in ks)
    if len(entries) == 1:
        who = f"module {name or '<root>'!r} ({type(module).__name__}) has no closed-form rule, so its"
    else:
        names = [n or "<root>" for n, _, _ in entries]
        quoted = [repr(n) for n in names]
        shown = ", ".join(quoted if len(quoted) <= 4 else quoted[:2] + ["…"] + quoted[-1:])
        who = (f"{len(entries)} modules of type {type(module).__name__} ({shown}) have no closed-form rule, "
               "so their")
    return (
        f"curvature: {who} {count} parameters ({', '.join(trainable)}) take the exact torch.func fallback, "
        f"which forms samples x (classes-1) x {count} per-sample gradient entries (measured 2-4x the time of a "
        "rule on conv and norm layers, up to 1000x on dense layers)"
    )
