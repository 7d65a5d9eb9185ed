"""The shared engine: backpropagate columns from the logits and sum squared per-sample gradients.

For columns v_k(n) in logit space (one per sample n and column k) this computes, per parameter θ,

    sum_n sum_k (J_n(θ)ᵀ v_k(n))**2 / N,    J_n = d logits_n / d θ,

with one forward pass per chunk and one backward pass per column, stopping at each parametrized
module's output. Autograd carries the columns through everything between those modules (any
activation, pooling, residual sum, concatenation, reshape or product), and the per-layer rules of
``_layers`` then form the squared per-sample gradients in closed form; modules without a rule take
the exact torch.func fallback of ``_fallback``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from obdprune.curvature._capture import (
    Site,
    check_idle_parameters,
    output_bytes_per_sample,
    outputs_modified,
    plan_sites,
    recording,
    reset,
)
from obdprune.curvature._common import check_logits, chunks, trainable_parameters

# Default chunk: the parametrized layers' outputs of one chunk take about this much memory. Small
# chunks keep temporaries cache- and allocator-friendly (measured fastest on LeNet-5 on CPU).
_CHUNK_BYTES = 4 << 20

# (logits of one chunk, detached (n, C); the chunk's slice) -> columns (K, n, C)
ColumnFn = Callable[[Tensor, slice], Tensor]


def mean_squared_column_grads(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    columns: ColumnFn,
    batch_size: int | None,
) -> dict[str, Tensor]:
    """(1/N) sum_{n,k} (J_nᵀ v_k(n))**2 for every trainable parameter, keyed like named_parameters()."""
    params = trainable_parameters(model)
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    sites = plan_sites(model)
    n_total = inputs.shape[0]
    for rows in chunks(n_total, _chunk_size(model, sites, inputs, batch_size)):
        reset(sites)
        try:
            with recording(sites), torch.enable_grad():
                logits = model(inputs[rows])
            if outputs_modified(sites):
                reset(sites)
                with recording(sites, clone_outputs=True), torch.enable_grad():
                    logits = model(inputs[rows])
            check_logits(logits, rows.stop - rows.start, None if targets is None else targets[rows])
            if rows.start == 0:
                check_idle_parameters(sites, logits)
            vs = columns(logits.detach(), rows)
            live = [s for s in sites if any(t.requires_grad for t in s.outputs)]
            handlers = [s.make_handler(vs.shape[0]) for s in live]
            outputs = [t for s in live for t in s.outputs]
            for k in range(vs.shape[0] if live else 0):
                grads = torch.autograd.grad(
                    logits, outputs, vs[k], retain_graph=k + 1 < vs.shape[0], allow_unused=True
                )
                at = 0
                for site, handler in zip(live, handlers):
                    mine = grads[at : at + len(site.outputs)]
                    at += len(site.outputs)
                    if site.handler is not None:
                        if mine[0] is not None:
                            handler.add_column(mine[0])
                    elif any(g is not None for g in mine):
                        handler.add_column(
                            tuple(torch.zeros_like(t) if g is None else g for t, g in zip(site.outputs, mine))
                        )
            for site, handler in zip(live, handlers):
                squares = handler.result()
                for local in site.trainable:
                    totals[site.qualified(local)] += squares[local].to(totals[site.qualified(local)].dtype)
        finally:
            reset(sites)
    for t in totals.values():
        t /= n_total
    return totals


def _chunk_size(model: nn.Module, sites: list[Site], inputs: Tensor, batch_size: int | None) -> int:
    """The user's batch_size, or less where the default memory bound asks for smaller chunks."""
    n = inputs.shape[0]
    limit = n if batch_size is None else min(n, batch_size)
    if limit <= 1 or not sites:
        return limit
    per_sample = output_bytes_per_sample(model, sites, inputs[:1])
    return max(1, min(limit, _CHUNK_BYTES // max(1, per_sample)))
