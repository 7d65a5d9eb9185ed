"""Training data as obdprune's loops see it: a re-iterable source of ``(inputs, targets)`` batches.

Users pass what they have: a ``torch.utils.data.DataLoader``, any re-iterable of ``(inputs, targets)``
batches (a list of tuples, a generator *function*'s result is not re-iterable and is refused), or an
``(inputs, targets)`` pair of tensors. :func:`as_batches` turns each into a :class:`Batches`:

- :class:`TensorBatches` holds tensors in memory and shuffles them itself with a seeded generator (the
  built-in datasets take this path, bit for bit as before);
- :class:`LoaderBatches` iterates the user's loader as it is (its own batch size, sampler, workers).

Both give training epochs, evaluation passes, a sample for curvature and one example input.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch

from obdprune.errors import UsageError

__all__ = ["Batches", "TensorBatches", "LoaderBatches", "PartBatches", "as_batches"]

HINT = "pass a DataLoader, a list of (inputs, targets) batches, or an (inputs, targets) pair of tensors"


class Batches:
    """A re-iterable source of ``(inputs (B, ...), targets (B,))`` batches."""

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One training epoch of batches (shuffled)."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int | None:
        """Batches in one epoch, or None when unknown."""
        raise NotImplementedError

    def global_batch_sizes(self, batch_size: int) -> list[int] | None:
        """Samples in each step's batch summed over all ranks, when this rank holds a shard; else None."""
        return None

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample once, in order."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples (or all there are) as one ``(inputs, targets)`` pair, for curvature estimates."""
        raise NotImplementedError

    def example(self) -> torch.Tensor:
        """One input batch ``(1, ...)``, for tracing the model."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def part(self, index: int, parts: int) -> "PartBatches":
        """Training epochs of every ``parts``-th batch from batch ``index``: 1/parts of the steps.

        >>> b = TensorBatches(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long)).part(1, 2)
        >>> b.steps_per_epoch(2), len(list(b.epoch(2, torch.Generator())))
        (2, 2)
        """
        return PartBatches(self, index, parts)


class TensorBatches(Batches):
    """In-memory ``x`` (N, ...), ``y`` (N,) int64, shuffled with ``torch.randperm`` on the given generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self), generator=generator)
        for step in range(self.steps_per_epoch(batch_size)):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            yield self.x[idx], self.y[idx]

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(self), generator=generator)[:n]
        return self.x[idx], self.y[idx]

    def example(self) -> torch.Tensor:
        return self.x[:1]


class LoaderBatches(Batches):
    """The user's re-iterable of batches, used as it comes (its own shuffling and batch size)."""

    def __init__(self, loader: Iterable, what: str = "data"):
        self.loader, self.what = loader, what
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            ds = getattr(self.loader, "dataset", None)
            try:
                self._len = len(ds) if ds is not None else sum(int(y.shape[0]) for _, y in self._batches())
            except TypeError:
                self._len = sum(int(y.shape[0]) for _, y in self._batches())
        return self._len

    def steps_per_epoch(self, batch_size: int) -> int | None:
        try:
            return len(self.loader)
        except TypeError:
            return None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self.loader):
            yield _checked_batch(batch, self.what, i)

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches()

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, have = [], [], 0
        for x, y in self._batches():
            xs.append(x[:n - have])
            ys.append(y[:n - have])
            have += xs[-1].shape[0]
            if have >= n:
                break
        if not xs:
            raise UsageError(f"{self.what} yielded no batches; {HINT}")
        return torch.cat(xs), torch.cat(ys)

    def example(self) -> torch.Tensor:
        for x, _ in self._batches():
            return x[:1]
        raise UsageError(f"{self.what} yielded no batches; {HINT}")


class PartBatches(Batches):
    """``base``'s training batches ``index``, ``index + parts``, ... of each epoch: ``parts`` of these (one per
    index) together cost one epoch of ``base``. Every rank under torchrun skips the same steps. Evaluation,
    samples and the example input are ``base``'s own."""

    def __init__(self, base: Batches, index: int, parts: int):
        if not 0 <= index < parts:
            raise ValueError(f"part {index} of {parts}")
        self.base, self.index, self.parts = base, index, parts

    def __len__(self) -> int:
        return len(self.base)

    def steps_per_epoch(self, batch_size: int) -> int | None:
        n = self.base.steps_per_epoch(batch_size)
        return None if n is None else len(range(self.index, n, self.parts))

    def global_batch_sizes(self, batch_size: int) -> list[int] | None:
        sizes = self.base.global_batch_sizes(batch_size)
        return None if sizes is None else sizes[self.index::self.parts]

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self.base.epoch(batch_size, generator)):
            if i % self.parts == self.index:
                yield batch

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.base.eval_batches(batch_size)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.sample(n, generator)

    def example(self) -> torch.Tensor:
        return self.base.example()


def _checked_batch(batch: Any, what: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        raise UsageError(f"{what}: batch {index} is a dict; obdprune needs (inputs, targets) pairs — wrap the "
                         f"loader, e.g. ((b['image'], b['label']) for b in loader) in a list or a small class")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = type(batch).__name__
        raise UsageError(f"{what}: batch {index} is a {kind}, not an (inputs, targets) pair; {HINT}")
    x, y = batch
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise UsageError(f"{what}: batch {index} holds {type(x).__name__} and {type(y).__name__}, not tensors; {HINT}")
    if y.ndim != 1 or y.is_floating_point() or y.is_complex():
        raise UsageError(f"{what}: batch {index} targets must be class indices (B,) of an integer dtype, got "
                         f"{tuple(y.shape)} {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"{what}: batch {index} has {x.shape[0]} inputs but {y.shape[0]} targets")
    return x, y.long()


def as_batches(data: Any, what: str = "data") -> Batches:
    """``data`` as :class:`Batches`; ``what`` names it in errors (``"train"``, ``"val"``).

    >>> b = as_batches((torch.zeros(10, 1, 4, 4), torch.zeros(10, dtype=torch.long)), "train")
    >>> len(b), b.example().shape
    (10, torch.Size([1, 1, 4, 4]))
    """
    if isinstance(data, Batches):
        return data
    if data is None:
        raise UsageError(f"{what} is None; {HINT}")
    if hasattr(data, "x") and hasattr(data, "y") and torch.is_tensor(data.x) and torch.is_tensor(data.y):
        data = (data.x, data.y)  # an obdprune Split
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if x.ndim < 2 or y.ndim != 1 or y.is_floating_point():
            raise UsageError(f"{what}: expected inputs (N, ...) and integer class targets (N,), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)} {y.dtype}")
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} targets")
        if x.shape[0] == 0:
            raise UsageError(f"{what} is empty")
        return TensorBatches(x, y.long())
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset) \
            and not isinstance(data, (list, tuple)):
        raise UsageError(f"{what} is a torch Dataset; wrap it in a DataLoader(dataset, batch_size=..., "
                         f"shuffle=True) — {HINT}")
    if torch.is_tensor(data) or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise UsageError(f"{what} is a {type(data).__name__}; {HINT}")
    if iter(data) is data:
        raise UsageError(f"{what} is a one-shot iterator and would be empty after one pass; {HINT}")
    return LoaderBatches(data, what)
