"""Per-layer sums of squared per-sample gradients, in closed form.

Only modules that own parameters need a rule: everything between them (activations, pooling,
residual additions, concatenation, reshapes such as flatten or channel shuffle, products such as
squeeze-excitation gating) is differentiated by autograd when the engine backpropagates the
columns from the logits to each module's output. Modules without a rule here are handled exactly,
but slowly, by :mod:`obdprune.curvature._fallback`.

Each handler is built from one chunk's layer input ``x`` (N, ...) and is then fed, one at a time,
backpropagated columns ``g`` = d(column)/d(layer output), shape (N, *output_shape). It returns, per
parameter, sum over samples n and columns k of (d column_k(n) / d parameter)**2, which is the
parameter's shape. Samples must not interact inside the network (BatchNorm in eval mode only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Bound on each temporary tensor (per-sample gradients, buffered columns, unfolded inputs). Above
# ~32 MiB glibc serves every allocation with fresh pages, and page faults then cost more than the math.
_MAX_TEMP_BYTES = 16 << 20


class LayerSquares:
    """Accumulates sum_{n,k} (per-sample-per-column gradient)**2 for one module."""

    param_names: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, x: Tensor, num_columns: int) -> None:
        self.module = module

    def add_column(self, g: Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Tensor]:
        raise NotImplementedError


class LinearSquares(LayerSquares):
    """y = x Wᵀ + b. For x (N, in): sum_{n,k} (g_nk x_nᵀ)**2 = (sum_k g_k**2)ᵀ @ x**2."""

    param_names = ("weight", "bias")

    def __init__(self, module: nn.Linear, x: Tensor, num_columns: int) -> None:
        super().__init__(module, x, num_columns)
        self.x = x
        self.g_sq: Tensor | None = None  # (N, out): sum over columns of g**2, when x is (N, in)
        self.w_sq = torch.zeros_like(module.weight)
        self.b_sq = torch.zeros(module.out_features, dtype=x.dtype, device=x.device)

    def add_column(self, g: Tensor) -> None:
        if self.x.dim() == 2:
            self.g_sq = g * g if self.g_sq is None else self.g_sq.addcmul_(g, g)
            return
        # x (N, *, in): each sample's gradient sums over the extra positions.
        x = self.x.reshape(self.x.shape[0], -1, self.x.shape[-1])
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        for rows in _row_chunks(x.shape[0], g.shape[-1] * x.shape[-1], _max_elements(x)):
            per_sample = torch.bmm(g[rows].transpose(1, 2), x[rows])  # (n, out, in)
            self.w_sq += per_sample.square_().sum(0)
        self.b_sq += g.sum(1).square().sum(0)

    def result(self) -> dict[str, Tensor]:
        if self.g_sq is not None:
            self.w_sq += self.g_sq.T @ self.x.square()
            self.b_sq += self.g_sq.sum(0)
            self.g_sq = None
        return {"weight": self.w_sq, "bias": self.b_sq}


class ConvSquares(LayerSquares):
    """Per-sample weight gradient of a 1d/2d/3d convolution, per group: g (O, L) @ unfold(x)ᵀ (L, I·k).

    L is the number of output positions and k the kernel's size (kh·kw for Conv2d). Grouped and
    depthwise convolutions are handled group by group.

    Columns are buffered so that one matmul handles several of them (rows K·O instead of O), which
    is several times faster for the thin matrices of small convolutions.
    """

    param_names = ("weight", "bias")

    def __init__(self, module: nn.modules.conv._ConvNd, x: Tensor, num_columns: int) -> None:
        super().__init__(module, x, num_columns)
        self.x = x
        self.num_columns = num_columns
        self.buffer: Tensor | None = None  # (N, groups, columns, O/groups, L)
        self.filled = 0
        self.cols: Tensor | None = None  # unfold(x) when it fits the memory bound, else built per chunk
        self.w_sq: Tensor | None = None  # (groups, O/groups, I/groups·k)
        self.b_sq = x.new_zeros(module.out_channels)

    def add_column(self, g: Tensor) -> None:
        n, groups = g.shape[0], self.module.groups
        g = g.reshape(n, groups, 1, self.module.out_channels // groups, -1)  # (N, groups, 1, O/groups, L)
        self.b_sq += g.sum(-1).reshape(n, -1).square().sum(0)
        if self.buffer is None:
            fits = _max_elements(g) // g.numel()
            if fits < 2 or self.num_columns == 1:
                self._accumulate(g)
                return
            self.buffer = g.new_empty(*g.shape[:2], min(fits, self.num_columns), *g.shape[3:])
        self.buffer[:, :, self.filled] = g[:, :, 0]
        self.filled += 1
        if self.filled == self.buffer.shape[2]:
            self._accumulate(self.buffer)
            self.filled = 0

    def _accumulate(self, g: Tensor) -> None:
        """Add sum over samples and columns of squared per-sample gradients for g (N, groups, K, O/groups, L)."""
        n, groups, k, out_per_group, length = g.shape
        g = g.reshape(n, groups, k * out_per_group, length)
        kernel = self.module.weight[0].numel()  # I/groups·k
        if self.cols is None and n * groups * kernel * length <= _max_elements(g):
            self.cols = _unfold(self.x, self.module)
        if self.w_sq is None:
            self.w_sq = g.new_zeros(groups, out_per_group, kernel)
        for rows in _row_chunks(n, groups * k * out_per_group * kernel + kernel * groups * length, _max_elements(g)):
            cols = self.cols[rows] if self.cols is not None else _unfold(self.x[rows], self.module)
            cols_t = cols.view(-1, groups, kernel, length).transpose(2, 3)  # (n, groups, L, I/groups·k)
            per_sample = torch.matmul(g[rows], cols_t)  # (n, groups, K·O/groups, I/groups·k)
            self.w_sq += per_sample.square_().view(-1, groups, k, out_per_group, kernel).sum((0, 2))

    def result(self) -> dict[str, Tensor]:
        if self.filled:
            assert self.buffer is not None
            self._accumulate(self.buffer[:, :, : self.filled])
            self.filled = 0
        if self.w_sq is None:
            self.w_sq = torch.zeros_like(self.module.weight)
        return {"weight": self.w_sq.view_as(self.module.weight), "bias": self.b_sq}


def _unfold(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """im2col (N, I·k, L) as a strided view plus one copy (much faster than F.unfold on CPU).

    k is the product of the kernel sizes and L the number of output positions; any spatial rank.
    """
    pad = conv._reversed_padding_repeated_twice  # also set for padding="same"/"valid"
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    n, c, *size = x.shape
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    out = [(s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(size, kernel, stride, dilation)]
    s_n, s_c, *s_space = x.stride()
    windows = x.as_strided(
        (n, c, *kernel, *out),
        (s_n, s_c, *(s * d for s, d in zip(s_space, dilation)), *(s * st for s, st in zip(s_space, stride))),
    )
    return windows.reshape(n, c * math.prod(kernel), math.prod(out))


class _ChannelAffineSquares(LayerSquares):
    """y = γ_c·x̂ + β_c over channel dim 1 of x (N, C, *): per-sample sums of g·x̂ and of g per channel."""

    param_names = ("weight", "bias")

    def __init__(self, module: nn.Module, x: Tensor, num_columns: int) -> None:
        super().__init__(module, x, num_columns)
        self.x_hat = self.normalized(module, x)
        self.w_sq = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        self.b_sq = torch.zeros_like(self.w_sq)

    @staticmethod
    def normalized(module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def add_column(self, g: Tensor) -> None:
        n, c = g.shape[:2]
        self.w_sq += (g * self.x_hat).reshape(n, c, -1).sum(-1).square().sum(0)
        self.b_sq += g.reshape(n, c, -1).sum(-1).square().sum(0)

    def result(self) -> dict[str, Tensor]:
        return {"weight": self.w_sq, "bias": self.b_sq}


class BatchNormSquares(_ChannelAffineSquares):
    """Eval-mode BatchNorm y = γ·x̂ + β, x̂ from the running statistics."""

    @staticmethod
    def normalized(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv_std = torch.rsqrt(module.running_var + module.eps).to(x.dtype)
        return (x - module.running_mean.to(x.dtype).view(shape)) * inv_std.view(shape)


class GroupNormSquares(_ChannelAffineSquares):
    """GroupNorm y = γ_c·x̂ + β_c, x̂ normalized per sample and group over (C/G, *spatial).

    The statistics are per sample, so x̂ depends only on the sample's own x (not on γ, β).
    """

    @staticmethod
    def normalized(module: nn.GroupNorm, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class LayerNormSquares(LayerSquares):
    """LayerNorm over the trailing ``normalized_shape`` S of x (N, *, *S): y = γ ⊙ x̂ + β, γ, β of shape S.

    Per sample, d/dγ = sum over the positions * of g ⊙ x̂ and d/dβ = sum of g. With input
    (N, H, W, C) this is the channels-last LayerNorm of ConvNeXt blocks (permute → LayerNorm → permute).
    """

    param_names = ("weight", "bias")

    def __init__(self, module: nn.LayerNorm, x: Tensor, num_columns: int) -> None:
        super().__init__(module, x, num_columns)
        shape = tuple(module.normalized_shape)
        self.x_hat = F.layer_norm(x, shape, None, None, module.eps)
        self.size = math.prod(shape)
        self.w_sq = torch.zeros(shape, dtype=x.dtype, device=x.device)
        self.b_sq = torch.zeros_like(self.w_sq)

    def add_column(self, g: Tensor) -> None:
        n = g.shape[0]
        self.w_sq += (g * self.x_hat).reshape(n, -1, self.size).sum(1).square().sum(0).view_as(self.w_sq)
        self.b_sq += g.reshape(n, -1, self.size).sum(1).square().sum(0).view_as(self.b_sq)

    def result(self) -> dict[str, Tensor]:
        return {"weight": self.w_sq, "bias": self.b_sq}


def _max_elements(like: Tensor) -> int:
    return _MAX_TEMP_BYTES // like.element_size()


def _row_chunks(n: int, elements_per_row: int, max_elements: int) -> list[slice]:
    step = max(1, max_elements // max(1, elements_per_row))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


# Exact types only: a subclass may override forward (e.g. weight standardization) and would be wrong.
HANDLERS: dict[type[nn.Module], type[LayerSquares]] = {
    nn.Linear: LinearSquares,
    nn.Conv1d: ConvSquares,
    nn.Conv2d: ConvSquares,
    nn.Conv3d: ConvSquares,
    nn.BatchNorm1d: BatchNormSquares,
    nn.BatchNorm2d: BatchNormSquares,
    nn.BatchNorm3d: BatchNormSquares,
    nn.GroupNorm: GroupNormSquares,
    nn.LayerNorm: LayerNormSquares,
}
