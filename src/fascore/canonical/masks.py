"""Which (i, j) take part: masks as data, separate from the kernels (semantics §4).

Every sparse mode reduces, per segment, to one form

    takes_part(b, n, i, j) = (lo <= j - i <= hi  or  j < prefix[b])  and not explicit[b, n, i, j]

where the band and prefix are analytic (compressed masks are never expanded) and ``explicit`` is
the user's full mask, if the mode reads one. ``fascore.plan`` classifies tiles from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["UNBOUNDED", "MaskSpec"]

UNBOUNDED = 1 << 40  # wider than any |j - i|


@dataclass(frozen=True)
class MaskSpec:
    """The take-part rule of one segment with geometry [B, N1, Sq, Skv]."""

    sq: int
    skv: int
    lo: int = -UNBOUNDED
    hi: int = UNBOUNDED
    prefix: tuple[int, ...] | None = None  # per batch: j < prefix[b] also takes part
    explicit: Tensor | None = None  # bool/uint8 [Bm, Nm, Sq, Skv], nonzero = masked out

    def tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> Tensor | None:
        """Boolean take-part tile broadcastable to [B, N1, i1-i0, j1-j0]; None if all take part."""
        allowed = None
        if self.lo > -(i1 - 1 - j0) or self.hi < (j1 - 1 - i0):  # band cuts this tile
            i = torch.arange(i0, i1, device=device)[:, None]
            j = torch.arange(j0, j1, device=device)[None, :]
            diff = j - i
            allowed = ((diff >= self.lo) & (diff <= self.hi))[None, None]
            if self.prefix is not None:
                p = torch.tensor(self.prefix, device=device)[:, None, None, None]
                allowed = allowed | (j[None, None] < p)
        if self.explicit is not None:
            keep = self.explicit[:, :, i0:i1, j0:j1] == 0
            allowed = keep if allowed is None else allowed & keep
        return allowed

    def batches(self, b0: int, b1: int) -> MaskSpec:
        """The rule of batches [b0, b1) of a segment (per-batch prefix and explicit mask sliced)."""
        explicit = self.explicit
        if explicit is not None and explicit.shape[0] > 1:
            explicit = explicit[b0:b1]
        prefix = self.prefix[b0:b1] if self.prefix is not None else None
        return MaskSpec(self.sq, self.skv, self.lo, self.hi, prefix, explicit)

    def materialize(self, device: torch.device | None = None) -> Tensor:
        """Dense boolean take-part matrix broadcastable to [B, N1, Sq, Skv] (tests, reference)."""
        device = device if device is not None else (self.explicit.device if self.explicit is not None else None)
        t = self.tile(0, self.sq, 0, self.skv, device or torch.device("cpu"))
        if t is None:
            return torch.ones(1, 1, self.sq, self.skv, dtype=torch.bool, device=device)
        return t
