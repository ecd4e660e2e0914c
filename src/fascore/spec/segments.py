"""The canonical problem from validated pieces: segments in [B, N, S, D] form, output shapes.

A non-TND call is one segment of B batches; a TND call is one segment per batch with queries.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..canonical.layouts import Batch, tnd_rows, to_bnsd
from ..canonical.problem import Problem, Segment
from .dropout import Drop, dropout_for
from .masks import Masking, mask_spec
from .pse import Bias, pse_for
from .scalars import Scalars
from .tensors import Geometry
from .tnd import Varlen

__all__ = ["problem"]


def _dense_segment(g: Geometry, sc: Scalars, mk: Masking, bi: Bias, dr: Drop) -> Segment:
    q4, k4, v4 = to_bnsd(g.query, g.layout, g.n1), to_bnsd(g.key, g.layout, g.n2), to_bnsd(g.value, g.layout, g.n2)
    if g.query_rope is not None:
        q4 = torch.cat([q4, to_bnsd(g.query_rope, g.layout, g.n1)], -1)
        k4 = torch.cat([k4, to_bnsd(g.key_rope, g.layout, g.n2)], -1)
    explicit = None
    if mk.mask is not None and sc.mode in (0, 1, 5):
        explicit = mk.mask if mk.mask.dim() == 4 else mk.mask.view(1, 1, g.sq, g.skv)
    spec = mask_spec(mk, sc, g.sq, g.skv, sc.mode, explicit, tuple(mk.prefix) if mk.prefix else None)
    base = tuple(x * g.n1 * g.sq * dr.row_len(g.skv) for x in range(g.b))
    return Segment(q4, k4, v4, spec, pse_for(bi, g, sc, slice(None), g.sq, 0), slice(None),
                   dropout_for(dr, base, g.sq, g.skv))


def _tnd_explicit(mk: Masking, vl: Varlen, x: Batch) -> Tensor:
    """Batch ``x``'s part of a full TND mask: the top-left corner of [maxSq, maxSkv], or its
    rows and columns of [T1, T2]."""
    m = mk.mask
    if list(m.shape) == [vl.max_sq, vl.max_skv]:
        part = m[:x.sq, :x.skv]
    else:
        part = m[x.q0:x.q0 + x.sq, x.k0:x.k0 + x.skv]
    return part.view(1, 1, x.sq, x.skv) if part.is_contiguous() else part[None, None]


def _tnd_segments(g: Geometry, vl: Varlen, sc: Scalars, mk: Masking, bi: Bias, dr: Drop) -> list[Segment]:
    segments, base, mode, live = [], 0, sc.mode, vl.live
    band_b = (live[-1].index if mode == 7 else live[0].index) if live and mode in (7, 8) else -1
    for x in vl.batches:
        if x.sq > 0:
            q4, k4, v4 = tnd_rows(g.query, x.q0, x.sq), tnd_rows(g.key, x.k0, x.skv), tnd_rows(g.value, x.k0, x.skv)
            if g.query_rope is not None:
                q4 = torch.cat([q4, tnd_rows(g.query_rope, x.q0, x.sq)], -1)
                k4 = torch.cat([k4, tnd_rows(g.key_rope, x.k0, x.skv)], -1)
            m = mode  # modes 7 / 8: the band batch is mode 4, the others 3 / 2
            if mode in (7, 8):
                m = 4 if x.index == band_b else (3 if mode == 7 else 2)
            explicit = _tnd_explicit(mk, vl, x) if mk.mask is not None and mode in (0, 1) else None
            pfx = (mk.prefix[x.index],) if mk.prefix else None
            bsel = slice(x.index, x.index + 1)
            rows = bsel if bi.pse is not None and bi.pse.shape[0] > 1 else slice(None)
            segments.append(Segment(q4, k4, v4, mask_spec(mk, sc, x.sq, x.skv, m, explicit, pfx),
                                    pse_for(bi, g, sc, bsel, x.sq, x.index), rows,
                                    dropout_for(dr, (base,), x.sq, x.skv), x))
        base += g.n1 * x.sq * dr.row_len(x.skv)
    return segments


def problem(g: Geometry, vl: Varlen, sc: Scalars, mk: Masking, bi: Bias, dr: Drop) -> Problem:
    if g.layout == "TND":
        segments = _tnd_segments(g, vl, sc, mk, bi, dr)
        out_shape, stats_shape = (g.sq, g.n1, g.dv), (g.sq, g.n1, 8)
    else:
        segments = [_dense_segment(g, sc, mk, bi, dr)]
        out_shape = tuple(g.query.shape[:-1]) + (g.n1 * g.dv if g.layout in ("BSH", "SBH") else g.dv,)
        stats_shape = (g.b, g.n1, g.sq, 8)
    return Problem(g.layout, g.n1, g.n2, g.d, g.dr, g.dv, sc.scale, sc.keep_prob, bi.sink, g.dtype, g.device,
                   segments, out_shape, stats_shape, sc.softmax_layout, dr.numels, dr.seed, dr.offset, pse=bi.pse,
                   rope=(g.query_rope, g.key_rope) if g.query_rope is not None else None,
                   inputs=(g.query, g.key, g.value))
