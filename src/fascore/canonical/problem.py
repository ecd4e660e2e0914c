"""The canonical problem an engine runs: segments of uniform geometry in [B, N, S, D] form.

A non-TND call is one segment of B batches; a TND call is one segment per batch. Validation
(``validation.build_problem``) produces it; the API assembles the engine's per-segment results
back into the caller's layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dropout import Dropout
from .layouts import Batch
from .masks import MaskSpec
from .bias import Pse

__all__ = ["Segment", "Problem"]


@dataclass(frozen=True)
class Segment:
    q: Tensor  # [B, N1, Sq, D] (query_rope appended to D)
    k: Tensor  # [B, N2, Skv, D]
    v: Tensor  # [B, N2, Skv, Dv]
    mask: MaskSpec
    pse: Pse | None = None
    pse_rows: slice = field(default_factory=lambda: slice(None))  # batch rows of the user's pse this segment reads (TND)
    dropout: Dropout | None = None
    batch: Batch | None = None  # TND batch, None otherwise

    def batches(self, b0: int, b1: int) -> Segment:
        """Batches [b0, b1) of this segment as a segment of their own (engines chunk with it)."""
        return Segment(self.q[b0:b1], self.k[b0:b1], self.v[b0:b1], self.mask.batches(b0, b1),
                       self.pse.batches(b0, b1) if self.pse is not None else None, self.pse_rows,
                       self.dropout.batches(b0, b1) if self.dropout is not None else None, self.batch)


@dataclass
class Problem:
    layout: str
    n1: int
    n2: int
    d: int  # query/key head dim without rope
    dr: int  # rope head dim (0 without rope)
    dv: int
    scale: float
    keep_prob: float
    sink: Tensor | None
    dtype: torch.dtype
    device: torch.device
    segments: list[Segment]
    out_shape: tuple[int, ...]
    stats_shape: tuple[int, ...]
    softmax_layout: str
    numels: int
    seed: int
    offset: int
    pse: Tensor | None = None  # user's pse (types 0/1) for the gradient's shape
    rope: tuple[Tensor, Tensor] | None = None
    inputs: tuple[Tensor, Tensor, Tensor] = ()  # the caller's query, key, value

    @property
    def g(self) -> int:
        return self.n1 // self.n2
