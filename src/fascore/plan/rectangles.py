"""Rectangles: the non-EMPTY tiles of a plan merged into few large (i0, i1, j0, j1, how) pieces.

A fused kernel (PyTorch's CPU flash backward) runs once per rectangle: ``how`` is "full" (no
mask), "causal" (exactly top-left causal inside the rectangle) or "masked" (an additive mask).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..canonical.masks import MaskSpec
from .blocks import EMPTY, FULL, plan_blocks

__all__ = ["rectangles"]


def _causal_aligned(mask: MaskSpec, i0: int, i1: int, j0: int, j1: int) -> bool:
    """The tile's mask is exactly top-left causal (j - j0 <= i - i0)."""
    return (mask.explicit is None and (mask.prefix is None or j0 >= max(mask.prefix))
            and mask.hi == j0 - i0 and mask.lo <= j0 - (i1 - 1))


def rectangles(mask: MaskSpec, bq: int, bk: int) -> Iterator[tuple[int, int, int, int, str]]:
    """Cover the non-EMPTY tiles with rectangles (i0, i1, j0, j1, how), how in full/causal/masked.

    Adjacent FULL tiles of a block row merge into one rectangle, and block rows with the same
    FULL run merge vertically; PARTIAL tiles stay single ("causal" when top-left causal).
    """
    if mask.explicit is None and (mask.prefix is None or max(mask.prefix) <= 0) and mask.lo <= -(mask.sq - 1):
        yield from _upper_band_rectangles(mask)
        return
    kinds = plan_blocks(mask, bq, bk, torch.device("cpu")).tolist()
    pending: tuple[int, int, int, int] | None = None  # a FULL rectangle that may still grow down
    for qb, row in enumerate(kinds):
        i0, i1 = qb * bq, min((qb + 1) * bq, mask.sq)
        runs, singles, kb = [], [], 0
        while kb < len(row):
            if row[kb] == FULL:
                start = kb
                while kb < len(row) and row[kb] == FULL:
                    kb += 1
                runs.append((start * bk, min(kb * bk, mask.skv)))
                continue
            if row[kb] != EMPTY:
                j0, j1 = kb * bk, min((kb + 1) * bk, mask.skv)
                singles.append((i0, i1, j0, j1, "causal" if _causal_aligned(mask, i0, i1, j0, j1) else "masked"))
            kb += 1
        if pending is not None and len(runs) == 1 and runs[0] == (pending[2], pending[3]):
            pending = (pending[0], i1, pending[2], pending[3])
            runs = []
        else:
            if pending is not None:
                yield (*pending, "full")
                pending = None
            if len(runs) == 1:
                pending = (i0, i1, *runs[0])
                runs = []
        for j0, j1 in runs:
            yield (i0, i1, j0, j1, "full")
        yield from singles
    if pending is not None:
        yield (*pending, "full")


def _upper_band_rectangles(mask: MaskSpec) -> Iterator[tuple[int, int, int, int, str]]:
    """j - i <= hi only (dense, causal modes 2/3): at most one full and one causal rectangle."""
    sq, skv, hi = mask.sq, mask.skv, mask.hi
    if hi >= skv - 1:
        yield (0, sq, 0, skv, "full")
    elif hi >= 0:
        if hi > 0:
            yield (0, sq, 0, hi, "full")
        yield (0, sq, hi, skv, "causal")
    elif -hi < sq:
        yield (-hi, sq, 0, skv, "causal")
