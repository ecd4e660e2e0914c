"""The dropout keep mask of one segment (semantics §5): explicit bit-packed masks or Ascend's stream.

Element (b, n, i, j) of a segment has a number; an explicit mask holds its bit, the generated
mask reads it from ``fascore.rng.philox``'s stream. Any tile can be produced on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..rng.philox import keep_threshold, stream_keep

__all__ = ["Dropout"]


@dataclass(frozen=True)
class Dropout:
    """Keep mask of one segment: element (b, n, i, j) has number ``base[b] + (n*sq + i)*row + j``.

    Exactly one source: ``bits`` (explicit mask: flat uint8, bit e % 8 of byte e // 8, 1 = keep;
    ``row`` = Skv) or the Philox stream (``seed``, ``offset``; ``row`` = Skv padded to 16).
    """

    keep_prob: float
    base: tuple[int, ...]  # number of element (b, 0, 0, 0) for each batch of the segment
    sq: int
    row: int
    bits: Tensor | None = None
    seed: int = 0
    offset: int = 0

    @property
    def threshold(self) -> int:
        return keep_threshold(self.keep_prob)

    def batches(self, b0: int, b1: int) -> Dropout:
        return Dropout(self.keep_prob, self.base[b0:b1], self.sq, self.row, self.bits, self.seed, self.offset)

    def keep(self, n1: int, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor:
        """Boolean keep tile [B, n1, i1 - i0, j1 - j0]."""
        base = torch.tensor(self.base, dtype=torch.int64, device=device)
        n = torch.arange(n1, dtype=torch.int64, device=device)
        i = torch.arange(i0, i1, dtype=torch.int64, device=device)
        first = base[:, None, None] + (n[None, :, None] * self.sq + i[None, None, :]) * self.row + j0
        if self.bits is None:
            return stream_keep(self.seed, self.offset, self.keep_prob, first, j1 - j0)
        f = first.unsqueeze(-1) + torch.arange(j1 - j0, dtype=torch.int64, device=device)
        byte = self.bits[f >> 3].to(torch.int64)
        return ((byte >> (f & 7)) & 1).bool()
