"""The in-memory dataset types returned by :func:`obdprune.data.load_dataset`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """One split: ``x`` (N, C, H, W) float32, normalized; ``y`` (N,) int64 class indices."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != torch.float32:
            raise ValueError(f"Split.x must be (N, C, H, W) float32, got {tuple(self.x.shape)} {self.x.dtype}")
        if self.y.ndim != 1 or self.y.dtype != torch.int64:
            raise ValueError(f"Split.y must be (N,) int64, got {tuple(self.y.shape)} {self.y.dtype}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Split has {self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A dataset ready for training: train/val/test splits, normalized with train statistics.

    Raw pixels map to inputs as ``x = (raw / pixel_scale - mean[c]) / std[c]`` per channel ``c``;
    ``mean``/``std`` are computed on ``train`` only (after the validation split was carved off).
    """

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    classes: tuple[str, ...]
    source: str  # folder/files the data came from
    mean: tuple[float, ...] = ()  # per channel, in units of raw / pixel_scale
    std: tuple[float, ...] = ()
    pixel_scale: float = 255.0  # raw value that maps to 1.0 before normalization (16 for digits)
