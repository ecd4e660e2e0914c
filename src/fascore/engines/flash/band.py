"""Narrow bands (sparse_mode 4, sliding windows): all query blocks of a head at once.

For a band lo <= j - i <= hi, query block r (rows r*bq ...) only meets keys in the window
[r*bq + off, r*bq + off + width): the same window shifted by bq for every block. With keys padded
once, the windows of all blocks are one strided view (no copy), so a head's whole band is a few
batched matmuls over [blocks, bq, width] tiles instead of many small tiles. The take-part
pattern inside a window is the same for every block (up to the padded edges), and so is in-kernel
ALiBi. Each window is one softmax tile (no online merge). Extra memory: chunks of tiles, O(S*D).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...canonical.bias import AlibiPse
from ...canonical.problem import Problem, Segment
from ..rows import finalize

__all__ = ["window", "forward", "backward", "workspace_bytes"]


def window(seg: Segment, bq: int) -> tuple[int, int] | None:
    """(off, width) of the per-block key window when the band path applies, else None."""
    mask = seg.mask
    if mask.explicit is not None or mask.prefix is not None or seg.dropout is not None:
        return None
    if seg.pse is not None and not isinstance(seg.pse, AlibiPse):
        return None
    lo, hi = max(mask.lo, -(mask.sq - 1)), min(mask.hi, mask.skv - 1)
    if hi < lo:
        return None
    off = (lo // bq) * bq
    width = -(-(bq + hi - off) // bq) * bq
    if 2 * width > mask.skv:
        return None  # not narrow: the tiled path runs bigger tiles
    return off, width


class _Band:
    """Padded operands and the window pattern of one segment."""

    def __init__(self, seg: Segment, prob: Problem, ct: torch.dtype, bq: int, off: int, width: int,
                 tile_bytes: int) -> None:
        b, n1, sq, d = seg.q.shape
        n2, skv = seg.k.shape[1], seg.k.shape[2]
        self.b, self.n1, self.n2, self.g, self.sq, self.skv = b, n1, n2, n1 // n2, sq, skv
        self.nq = -(-sq // bq)
        self.bq, self.off, self.width, self.seg, self.prob, self.ct = bq, off, width, seg, prob, ct
        dev = seg.q.device
        self.left = max(0, -off)
        right = max(0, (self.nq - 1) * bq + off + width - skv)
        self.q = F.pad(seg.q.to(ct), (0, 0, 0, self.nq * bq - sq)).contiguous()  # [B, N1, nq*bq, D]
        self.k = F.pad(seg.k.to(ct), (0, 0, self.left, right)).contiguous()  # [B, N2, Kp, D]
        self.v = F.pad(seg.v.to(ct), (0, 0, self.left, right)).contiguous()
        self.rel = off + torch.arange(width, device=dev)[None, :] - torch.arange(bq, device=dev)[:, None]
        self.pattern = (self.rel >= seg.mask.lo) & (self.rel <= seg.mask.hi)  # [bq, W]
        self.bias = None
        if seg.pse is not None:  # in-kernel ALiBi depends on j - i only: -slope * dist
            dist = (self.rel.to(ct) + (seg.pse.ks - seg.pse.qs)).abs()
            self.bias = dist.sqrt() if seg.pse.sqrt else dist
        self.step = max(1, tile_bytes // (bq * width * torch.finfo(ct).bits // 8))
        # Positions that do not take part, per chunk of blocks (shared by all heads).
        self.masked = []
        for r0 in range(0, self.nq, self.step):
            j = (torch.arange(r0, min(r0 + self.step, self.nq), device=dev) * bq + off)[:, None, None] + \
                torch.arange(width, device=dev)
            self.masked.append(~(self.pattern & (j >= 0) & (j < skv)))  # padded keys never take part

    def head(self, bi: int, n: int) -> tuple[Tensor, Tensor, Tensor, float | None]:
        """(q [nq, bq, D], k windows [nq, W, D], v windows [nq, W, Dv], slope) views of one head."""
        q = self.q[bi, n].view(self.nq, self.bq, -1)
        kh, vh = self.k[bi, n // self.g], self.v[bi, n // self.g]
        start = self.left + self.off
        kw = kh[start:].as_strided((self.nq, self.width, kh.shape[1]), (self.bq * kh.shape[1], kh.shape[1], 1))
        vw = vh[start:].as_strided((self.nq, self.width, vh.shape[1]), (self.bq * vh.shape[1], vh.shape[1], 1))
        slope = None
        if self.seg.pse is not None:
            s = self.seg.pse.slopes
            slope = float(s[bi if s.shape[0] > 1 else 0, n])
        return q, kw, vw, slope

    def logits(self, q: Tensor, kw: Tensor, r0: int, r1: int, slope: float | None) -> Tensor:
        """Scaled, biased, masked float32 logits [r1-r0, bq, W] of blocks [r0, r1)."""
        s = torch.baddbmm(torch.empty((), dtype=q.dtype, device=q.device), q[r0:r1], kw[r0:r1].transpose(1, 2),
                          beta=0, alpha=self.prob.scale)
        if slope is not None:
            s.sub_(self.bias, alpha=slope)
        return s.masked_fill_(self.masked[r0 // self.step], float("-inf"))

    def rows(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 * self.bq, min(r1 * self.bq, self.sq)


def forward(seg: Segment, prob: Problem, ct: torch.dtype, bq: int, off: int, width: int,
            tile_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    w = _Band(seg, prob, ct, bq, off, width, tile_bytes)
    dev, dv = seg.q.device, seg.v.shape[-1]
    out = torch.empty(w.b, w.n1, w.sq, dv, dtype=ct, device=dev)
    m_out = torch.empty(w.b, w.n1, w.sq, dtype=ct, device=dev)
    l_out = torch.empty_like(m_out)
    sinks = prob.sink.to(ct) if prob.sink is not None else None
    for bi in range(w.b):
        for n in range(w.n1):
            q, kw, vw, slope = w.head(bi, n)
            sink = sinks[n] if sinks is not None else None
            for r0 in range(0, w.nq, w.step):
                r1 = min(r0 + w.step, w.nq)
                s = w.logits(q, kw, r0, r1, slope)
                m = s.amax(-1)
                s.sub_(m.masked_fill(m == float("-inf"), 0.0).unsqueeze(-1)).exp_()
                l = s.sum(-1)
                acc = torch.bmm(s, vw[r0:r1])
                o, m, l = finalize(m, l, acc, sink)
                i0, i1 = w.rows(r0, r1)
                out[bi, n, i0:i1] = o.reshape(-1, dv)[:i1 - i0]
                m_out[bi, n, i0:i1] = m.reshape(-1)[:i1 - i0]
                l_out[bi, n, i0:i1] = l.reshape(-1)[:i1 - i0]
    return out, m_out, l_out


def backward(seg: Segment, prob: Problem, dy: Tensor, lse: Tensor, r: Tensor, ct: torch.dtype,
             bq: int, off: int, width: int, tile_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) with P rebuilt from ``lse``; ``r`` = rowsum(dy * out). Fixed order."""
    w = _Band(seg, prob, ct, bq, off, width, tile_bytes)
    dev, d, dv = seg.q.device, seg.q.shape[-1], seg.v.shape[-1]
    nw, rows = width // bq, w.nq * bq
    lse_p = F.pad(lse.to(ct), (0, rows - w.sq), value=float("inf"))  # padded rows: P = 0
    r_p = F.pad(r.to(ct), (0, rows - w.sq))
    dy_p = F.pad(dy.to(ct), (0, 0, 0, rows - w.sq))
    dq = torch.empty(w.b, w.n1, w.sq, d, dtype=ct, device=dev)
    nblk = w.k.shape[2] // bq + nw + 1
    dk = torch.zeros(w.b, w.n2, nblk, bq, d, dtype=ct, device=dev)
    dvv = torch.zeros(w.b, w.n2, nblk, bq, dv, dtype=ct, device=dev)
    base = (w.left + off) // bq
    for bi in range(w.b):
        for n in range(w.n1):
            q, kw, vw, slope = w.head(bi, n)
            lse_h, r_h = lse_p[bi, n].view(w.nq, bq, 1), r_p[bi, n].view(w.nq, bq, 1)
            dy_h = dy_p[bi, n].view(w.nq, bq, dv)
            dk_h, dv_h = dk[bi, n // w.g], dvv[bi, n // w.g]
            for r0 in range(0, w.nq, w.step):
                r1 = min(r0 + w.step, w.nq)
                p = w.logits(q, kw, r0, r1, slope).sub_(lse_h[r0:r1]).exp_()
                p.masked_fill_(w.masked[r0 // w.step], 0.0)  # exp(-inf - lse) is NaN for a NaN/-inf lse
                dv_win = torch.bmm(p.transpose(1, 2), dy_h[r0:r1])  # [n, W, Dv]
                ds = torch.bmm(dy_h[r0:r1], vw[r0:r1].transpose(1, 2))
                ds = ds.sub_(r_h[r0:r1]).mul_(p)
                i0, i1 = w.rows(r0, r1)
                dq[bi, n, i0:i1] = (torch.bmm(ds, kw[r0:r1]) * prob.scale).reshape(-1, d)[:i1 - i0]
                dk_win = (torch.bmm(ds.transpose(1, 2), q[r0:r1]) * prob.scale).view(r1 - r0, nw, bq, d)
                dv_win = dv_win.view(r1 - r0, nw, bq, dv)
                for c in range(nw):  # sub-block c of block r's window is key block base + r + c
                    dk_h[base + r0 + c:base + r1 + c] += dk_win[:, c]
                    dv_h[base + r0 + c:base + r1 + c] += dv_win[:, c]
    dk = dk.flatten(2, 3)[:, :, w.left:w.left + w.skv]
    dvv = dvv.flatten(2, 3)[:, :, w.left:w.left + w.skv]
    return dq, dk, dvv


def workspace_bytes(seg: Segment, prob: Problem, it: int, bq: int, off: int, width: int, tile_bytes: int,
                    backward: bool) -> int:
    """Bytes of the band path: padded float32 copies of q, k, v (dy), the per-chunk window
    pattern, a chunk of window tiles, and the results (dq, dk, dv windows for backward)."""
    b, n1, sq, d = seg.q.shape
    n2, skv, dv = seg.k.shape[1], seg.k.shape[2], seg.v.shape[-1]
    nq = -(-sq // bq)
    step = max(1, tile_bytes // (bq * width * it))
    pad_q, pad_k = nq * bq, skv + 2 * width
    copies = b * (n1 * pad_q * d + n2 * pad_k * (d + dv)) * it
    pattern = nq * bq * width  # bool, one chunk's worth per chunk of blocks
    tile = min(step, nq) * bq * width * it
    results = b * n1 * sq * (dv + 2) * it
    if backward:
        results = b * (n1 * sq * (d + dv + 2) + 2 * n2 * (pad_k + bq) * (d + dv)) * it
        return copies + pattern + 6 * tile + results
    return copies + pattern + 3 * tile + results
