"""Deterministic stratified subsets/splits and per-channel normalization (vectorized numpy/torch)."""
from __future__ import annotations

import numpy as np
import torch

# Fixed seeds, independent of any training seed, so the same files always give the same splits.
VAL_SEED = 0x0BD0
LIMIT_SEED = 0x0BD1
DIGITS_TEST_SEED = 0


def allocate(counts: np.ndarray, total: int, caps: np.ndarray | None = None) -> np.ndarray:
    """Share ``total`` items among classes in proportion to ``counts`` (largest remainder).

    ``caps`` (default ``counts``) bounds each class's share; the result sums to
    ``min(total, caps.sum())``. Ties go to the lower class index, so the result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    caps = counts.copy() if caps is None else np.minimum(np.asarray(caps, dtype=np.int64), counts)
    caps = np.maximum(caps, 0)
    n = int(counts.sum())
    total = int(min(max(total, 0), int(caps.sum())))
    if n == 0 or total == 0:
        return np.zeros_like(counts)
    quota = counts * (total / n)
    share = np.minimum(np.floor(quota).astype(np.int64), caps)
    remaining = total - int(share.sum())
    while remaining > 0:
        eligible = np.flatnonzero(share < caps)
        # Largest fractional remainder first; stable sort keeps class order among ties.
        order = eligible[np.argsort(-(quota[eligible] - share[eligible]), kind="stable")]
        take = order[:remaining]
        share[take] += 1
        remaining -= take.size
    return share


def stratified_pick(y: np.ndarray, per_class: np.ndarray, seed: int) -> np.ndarray:
    """Pick ``per_class[c]`` random indices of each class ``c`` of ``y`` (N,); sorted indices out."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(y.size)
    grouped = perm[np.argsort(y[perm], kind="stable")]  # random order within each class
    counts = np.bincount(y, minlength=per_class.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(y.size) - np.repeat(starts, counts)  # position of each grouped item in its class
    chosen = grouped[rank < np.repeat(per_class, counts)]
    return np.sort(chosen)


def stratified_subset(y: np.ndarray, limit: int, seed: int = LIMIT_SEED) -> np.ndarray:
    """Indices (sorted) of a class-proportional subset of ``limit`` items of ``y`` (N,)."""
    if limit >= y.size:
        return np.arange(y.size)
    counts = np.bincount(y)
    return stratified_pick(y, allocate(counts, limit), seed)


def stratified_split(y: np.ndarray, fraction: float, seed: int = VAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``y`` (N,) into (kept, carved), ``carved`` ≈ ``fraction`` of each class.

    Every class keeps at least one item on the kept side.
    """
    counts = np.bincount(y)
    carved_n = allocate(counts, int(round(fraction * y.size)), caps=counts - 1)
    carved = stratified_pick(y, carved_n, seed)
    mask = np.ones(y.size, dtype=bool)
    mask[carved] = False
    return np.flatnonzero(mask), carved


def channel_stats(x: np.ndarray, pixel_scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of images ``x`` (N, C, H, W), in units of raw / pixel_scale.

    uint8 images go through a 256-bin histogram per channel, so it is exact and cheap; float images are
    summed in float64. A constant channel gets std 1.
    """
    if x.dtype != np.uint8:
        means, stds = [], []
        for c in range(x.shape[1]):
            channel = x[:, c].astype(np.float64) / pixel_scale
            mean, std = float(channel.mean()), float(channel.std())
            means.append(mean)
            stds.append(std if std > 0 else 1.0)
        return tuple(means), tuple(stds)
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        channel = torch.from_numpy(np.ascontiguousarray(x[:, c])).reshape(-1)
        hist = torch.bincount(channel, minlength=256).numpy().astype(np.float64)
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        var = float((hist * (values - mean) ** 2).sum() / n)
        std = var**0.5
        means.append(mean / pixel_scale)
        stds.append(std / pixel_scale if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def normalize(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], pixel_scale: float) -> torch.Tensor:
    """uint8 or float (N, C, H, W) → float32 tensor ``(x / pixel_scale - mean) / std`` per channel."""
    if not x.flags.writeable:
        x = x.copy()
    out = torch.from_numpy(x).to(torch.float32)
    shift = torch.tensor([m * pixel_scale for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
    div = torch.tensor([s * pixel_scale for s in std], dtype=torch.float32).view(1, -1, 1, 1)
    return out.sub_(shift).div_(div)
