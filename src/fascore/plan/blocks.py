"""The block plan: which (query block, key block) tiles of a segment are EMPTY, PARTIAL or FULL.

EMPTY tiles are skipped, FULL ones take part everywhere (no mask work), PARTIAL ones read the
mask. The band and prefix of a ``MaskSpec`` are classified analytically; an explicit mask is
reduced block by block. Nothing of size Sq x Skv is built for the analytic part.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..canonical.masks import MaskSpec

__all__ = ["EMPTY", "PARTIAL", "FULL", "plan_blocks"]

EMPTY, PARTIAL, FULL = 0, 1, 2


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
