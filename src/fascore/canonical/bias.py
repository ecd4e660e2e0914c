"""Position bias (semantics §3): dense, ALiBi-compressed, TND-compressed and in-kernel ALiBi.

Each bias produces any tile [Bp, N1, rows, cols] on demand (float, broadcastable to the
segment's [B, N1, ...]) and, where it has a gradient, adds a tile of dL/dbias back into a buffer
of the user's pse shape. ``pre_scale`` says whether it joins S0 before ``scale`` (pse_type 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DensePse", "CompressedPse", "AlibiPse", "Pse", "grad_rows", "alibi_slopes"]


@dataclass(frozen=True)
class DensePse:
    """pse[b, n, i, j] from a [Bp, N1, Sp, Skv] tensor, Bp in {1, B}, Sp in {1, Sq}."""

    t: Tensor
    pre_scale: bool

    def batches(self, b0: int, b1: int) -> DensePse:
        return DensePse(_rows(self.t, b0, b1), self.pre_scale)

    def tile(self, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype) -> Tensor:
        rows = slice(i0, i1) if self.t.shape[2] > 1 else slice(0, 1)
        return self.t[:, :, rows, j0:j1].to(dtype)

    def add_grad(self, grad: Tensor, i0: int, i1: int, j0: int, j1: int, g: Tensor) -> None:
        """grad (pse-shaped, float32) += g ([B, N1, rows, cols]) reduced to pse's broadcast dims."""
        if grad.shape[0] == 1 and g.shape[0] != 1:
            g = g.sum(0, keepdim=True)
        if grad.shape[2] == 1:
            grad[:, :, :, j0:j1] += g.sum(2, keepdim=True)
        else:
            grad[:, :, i0:i1, j0:j1] += g


@dataclass(frozen=True)
class CompressedPse:
    """A bias constant along diagonals, stored as rows of a [Bp, N1, 1024, W] tensor.

    ``index(i, j)`` gives the stored (row, column) for each (i, j); positions that never take part
    (j > i) map to clamped, unused entries.
    """

    t: Tensor
    pre_scale: bool
    sq: int
    tnd: bool  # False: the 1024-row form for Sq > 1024; True: TND's row-1023 form

    def batches(self, b0: int, b1: int) -> CompressedPse:
        return CompressedPse(_rows(self.t, b0, b1), self.pre_scale, self.sq, self.tnd)

    def index(self, i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, Tensor]:
        dev = self.t.device
        i = torch.arange(i0, i1, device=dev)[:, None]
        j = torch.arange(j0, j1, device=dev)[None, :]
        w = self.t.shape[3]
        if self.tnd:
            row = torch.full_like(i, 1023)
            col = (w - 1) - (i - j)
        else:
            thr = self.sq - 1024
            row = torch.where(i >= thr, i - thr, i % 1024)
            col = torch.where(i >= thr, j, j + w - 1024 + row - i)
        return row.expand(i1 - i0, j1 - j0), col.clamp(0, w - 1)

    def tile(self, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype) -> Tensor:
        row, col = self.index(i0, i1, j0, j1)
        return self.t[:, :, row, col].to(dtype)

    def add_grad(self, grad: Tensor, i0: int, i1: int, j0: int, j1: int, g: Tensor) -> None:
        if grad.shape[0] == 1 and g.shape[0] != 1:
            g = g.sum(0, keepdim=True)
        row, col = self.index(i0, i1, j0, j1)
        flat = (row * grad.shape[3] + col).flatten()
        grad.view(grad.shape[0], grad.shape[1], -1).index_add_(2, flat, g.flatten(2).to(grad.dtype))


@dataclass(frozen=True)
class AlibiPse:
    """In-kernel ALiBi: -slope[b, n] * |(j + ks) - (i + qs)| (or its square root)."""

    slopes: Tensor  # float32 [Bs, N1], Bs in {1, B}
    qs: int
    ks: int
    sqrt: bool
    pre_scale = False

    def batches(self, b0: int, b1: int) -> AlibiPse:
        return AlibiPse(_rows(self.slopes, b0, b1), self.qs, self.ks, self.sqrt)

    def tile(self, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype) -> Tensor:
        dev = self.slopes.device
        i = torch.arange(i0 + self.qs, i1 + self.qs, device=dev, dtype=dtype)[:, None]
        j = torch.arange(j0 + self.ks, j1 + self.ks, device=dev, dtype=dtype)[None, :]
        dist = (j - i).abs()
        if self.sqrt:
            dist = dist.sqrt()
        return -self.slopes.to(dtype)[:, :, None, None] * dist


Pse = DensePse | CompressedPse | AlibiPse


def _rows(t: Tensor, b0: int, b1: int) -> Tensor:
    """Batches [b0, b1) of a per-batch tensor; a batch-broadcast one (leading 1) is shared."""
    return t[b0:b1] if t.shape[0] > 1 else t


def grad_rows(grad: Tensor, b0: int, b1: int) -> Tensor:
    """The part of a pse-shaped gradient buffer that batches [b0, b1) add into."""
    return _rows(grad, b0, b1)


def alibi_slopes(n_heads: int) -> Tensor:
    """The standard ALiBi slopes 2^(-8k/n) (a convenience for callers; float32 [n_heads])."""
    p = 2 ** math.floor(math.log2(n_heads))
    base = [2 ** (-8 * (k + 1) / p) for k in range(p)]
    extra = [2 ** (-4 * (2 * k + 1) / p) for k in range(n_heads - p)]
    return torch.tensor(base + extra, dtype=torch.float32)
