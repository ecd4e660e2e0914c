"""Which (i, j) take part: masks as data, separate from the kernels (SPEC §4).

Every sparse mode reduces, per segment, to one form

    takes_part(b, n, i, j) = (lo <= j - i <= hi  or  j < prefix[b])  and not explicit[b, n, i, j]

where the band and prefix are analytic (compressed masks are never expanded) and ``explicit`` is
the user's full mask, if the mode reads one. ``plan_blocks`` classifies tiles as EMPTY / FULL /
PARTIAL without building an Sq x Skv tensor for the analytic part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNBOUNDED = 1 << 40  # wider than any |j - i|
EMPTY, PARTIAL, FULL = 0, 1, 2


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


def plan_blocks(mask: MaskSpec, bq: int, bk: int, device: torch.device) -> Tensor:
    """Kind (EMPTY/PARTIAL/FULL) of every (query block, key block) tile: int8 [nq, nk].

    Band and prefix are classified analytically; an explicit mask is reduced block by block.
    A tile is FULL only if every (b, n, i, j) in it takes part, EMPTY only if none does.
    """
    nq, nk = -(-mask.sq // bq), -(-mask.skv // bk)
    if nq == 0 or nk == 0:
        return torch.empty(nq, nk, dtype=torch.int8, device=device)
    i0 = torch.arange(nq, device=device)[:, None] * bq
    i1 = torch.clamp(i0 + bq, max=mask.sq)
    j0 = torch.arange(nk, device=device)[None, :] * bk
    j1 = torch.clamp(j0 + bk, max=mask.skv)
    dmin, dmax = j0 - (i1 - 1), (j1 - 1) - i0
    band_full = (dmin >= mask.lo) & (dmax <= mask.hi)
    band_empty = (dmax < mask.lo) | (dmin > mask.hi)
    if mask.prefix is not None:
        band_full = band_full | (j1 <= min(mask.prefix))
        band_empty = band_empty & (j0 >= max(mask.prefix))
    if mask.explicit is not None:
        any_masked, all_masked = _explicit_block_summary(mask.explicit, bq, bk, nq, nk)
        band_full = band_full & ~any_masked
        band_empty = band_empty | all_masked
    kind = torch.full((nq, nk), PARTIAL, dtype=torch.int8, device=device)
    kind[band_full] = FULL
    kind[band_empty] = EMPTY
    return kind


def _explicit_block_summary(m: Tensor, bq: int, bk: int, nq: int, nk: int) -> tuple[Tensor, Tensor]:
    """(any masked, all masked) per block of an explicit mask, reduced over batch and heads."""
    sq, skv = m.shape[-2:]
    masked = (m != 0).flatten(0, 1)
    pad = torch.nn.functional.pad
    # Padding never decides a block: it counts as "not masked" for any and "masked" for all.
    anyp = pad(masked, (0, nk * bk - skv, 0, nq * bq - sq), value=False)
    allp = pad(masked, (0, nk * bk - skv, 0, nq * bq - sq), value=True)
    anyb = anyp.view(-1, nq, bq, nk, bk).any(4).any(2).any(0)
    allb = allp.view(-1, nq, bq, nk, bk).all(4).all(2).all(0)
    return anyb, allb
