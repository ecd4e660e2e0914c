"""One ring step as local calls: rectangles of (this rank's query pieces) x (the source rank's key
pieces) of one document, each expressible as one call of the local op.

Inside a rectangle (rows and columns in the ranks' local order) the global rule of
``MaskSpec`` must be one the local op can express:

- ``full``: every position takes part (no mask);
- ``band``: lo <= j - i <= hi in the rectangle's own coordinates (``sparse_mode=4`` with the
  compressed mask; a band becomes one when every pair of pieces the band cuts has the same offset
  between global and local coordinates, and the pairs it does not cut fall wholly inside or
  outside it);
- ``explicit``: the rule's tile (band, prefix and the user's full mask together) as a full mask
  (``sparse_mode=1``).

A step tries, in this order, the whole rectangle, its column strips (one key piece each), its row
strips and single piece pairs, and keeps the first partition with the fewest calls; rectangles in
which nothing takes part are not computed. In-kernel ALiBi (pse_type 2/3) needs square calls with
one offset, so with ALiBi a rectangle must be square and its pieces share one offset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..canonical.masks import MaskSpec
from ..errors import invalid
from ..limits import INT32_MAX
from .shards import Piece

__all__ = ["Rect", "partition", "band_keywords"]

_EMPTY, _FULL, _PARTIAL = 0, 1, 2


@dataclass(frozen=True)
class Rect:
    doc: int
    qp: tuple[Piece, ...]  # this rank's pieces (adjacent local rows)
    kp: tuple[Piece, ...]  # the source rank's pieces (adjacent local rows)
    kind: str  # "full" | "band" | "explicit"
    lo: int = 0  # band in the rectangle's coordinates
    hi: int = 0
    mask: Tensor | None = field(default=None, compare=False)  # explicit: True = masked out, [.., rq, rk]
    shift: int = 0  # global (j - i) minus local (j - i): ALiBi's kv_start_idx - q_start_idx

    @property
    def rq(self) -> int:
        return sum(p.n for p in self.qp)

    @property
    def rk(self) -> int:
        return sum(p.n for p in self.kp)

    @property
    def a0(self) -> int:
        return self.qp[0].local

    @property
    def c0(self) -> int:
        return self.kp[0].local

    def rows(self) -> list[tuple[int, int]]:
        return [(p.start, p.stop) for p in self.qp]

    def cols(self) -> list[tuple[int, int]]:
        return [(p.start, p.stop) for p in self.kp]


@dataclass(frozen=True)
class _Pair:
    qp: Piece
    kp: Piece
    qoff: int  # rows of the rectangle before qp
    koff: int

    @property
    def offset(self) -> int:
        """global (j - i) minus rectangle-local (j - i) inside this pair."""
        return (self.kp.start - self.koff) - (self.qp.start - self.qoff)

    def local_range(self) -> tuple[int, int]:
        return self.koff - (self.qoff + self.qp.n - 1), self.koff + self.kp.n - 1 - self.qoff

    def cls(self, lo: int, hi: int) -> int:
        """Class of the pair under the global band [lo, hi]."""
        dmin = self.kp.start - (self.qp.stop - 1)
        dmax = (self.kp.stop - 1) - self.qp.start
        if dmax < lo or dmin > hi:
            return _EMPTY
        return _FULL if lo <= dmin and dmax <= hi else _PARTIAL


def _pairs(qps: Sequence[Piece], kps: Sequence[Piece]) -> list[_Pair]:
    out, qoff = [], 0
    for qp in qps:
        koff = 0
        for kp in kps:
            out.append(_Pair(qp, kp, qoff, koff))
            koff += kp.n
        qoff += qp.n
    return out


def _fits(p: _Pair, cls: int, lo: int, hi: int, offset: int) -> bool:
    if cls == _PARTIAL:
        return p.offset == offset
    a, b = p.local_range()
    if cls == _FULL:
        return lo <= a and b <= hi
    return b < lo or a > hi


def _alibi_ok(live: list[_Pair], rq: int, rk: int) -> bool:
    return rq == rk and len({p.offset for p in live}) <= 1


def _band_rect(spec: MaskSpec, doc: int, qps: tuple, kps: tuple, alibi: bool) -> Rect | None | bool:
    """The rectangle under a pure band rule: a Rect, False (nothing takes part) or None (not one call)."""
    pairs = _pairs(qps, kps)
    cls = [p.cls(spec.lo, spec.hi) for p in pairs]
    live = [p for p, c in zip(pairs, cls) if c != _EMPTY]
    if not live:
        return False
    rq, rk = sum(p.n for p in qps), sum(p.n for p in kps)
    if alibi and not _alibi_ok(live, rq, rk):
        return None
    shift = live[0].offset
    if all(c == _FULL for c in cls):
        return Rect(doc, qps, kps, "full", shift=shift)
    partial = {p.offset for p, c in zip(pairs, cls) if c == _PARTIAL}
    if len(partial) > 1:
        return None
    for off in sorted(partial) if partial else sorted({p.offset for p in pairs}):
        lo, hi = spec.lo - off, spec.hi - off
        if all(_fits(p, c, lo, hi, off) for p, c in zip(pairs, cls)):
            if lo <= -(rq - 1) and hi >= rk - 1:
                return Rect(doc, qps, kps, "full", shift=shift)
            return Rect(doc, qps, kps, "band", lo=lo, hi=hi, shift=off if alibi else shift)
    return None


def _explicit_rect(spec: MaskSpec, doc: int, qps: tuple, kps: tuple, alibi: bool,
                   device: torch.device) -> Rect | None | bool:
    """The rectangle under a rule with a full mask or a prefix: its tile as an explicit mask."""
    tiles = [[spec.tile(qp.start, qp.stop, kp.start, kp.stop, device) for kp in kps] for qp in qps]
    lead = torch.broadcast_shapes(*[t.shape[:2] for row in tiles for t in row if t is not None], (1, 1))
    strips = []
    for qp, row in zip(qps, tiles):
        parts = [torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(*lead, qp.n, kp.n) if t is None
                 else (t != 0).expand(*lead, qp.n, kp.n) for kp, t in zip(kps, row)]
        strips.append(torch.cat(parts, -1))
    allowed = torch.cat(strips, -2)
    if not bool(allowed.any()):
        return False
    pairs = _pairs(qps, kps)
    if alibi:
        live = [p for p in pairs if bool(allowed[..., p.qoff:p.qoff + p.qp.n, p.koff:p.koff + p.kp.n].any())]
        if not _alibi_ok(live, allowed.shape[-2], allowed.shape[-1]):
            return None
        shift = live[0].offset
    else:
        shift = pairs[0].offset
    if bool(allowed.all()):
        return Rect(doc, qps, kps, "full", shift=shift)
    return Rect(doc, qps, kps, "explicit", mask=~allowed, shift=shift)


def _evaluate(spec: MaskSpec, doc: int, qps: tuple, kps: tuple, alibi: bool, device: torch.device):
    if spec.explicit is not None or spec.prefix is not None:
        return _explicit_rect(spec, doc, qps, kps, alibi, device)
    return _band_rect(spec, doc, qps, kps, alibi)


def partition(spec: MaskSpec, doc: int, qps: Sequence[Piece], kps: Sequence[Piece], alibi: bool,
              device: torch.device) -> list[Rect]:
    """The rectangles (fewest calls) that cover the (qps x kps) block of document ``doc``."""
    qps, kps = tuple(qps), tuple(kps)
    if not qps or not kps:
        return []
    cands = [[(qps, kps)]]
    if len(kps) > 1:
        cands.append([(qps, (kp,)) for kp in kps])
    if len(qps) > 1:
        cands.append([((qp,), kps) for qp in qps])
    if len(qps) > 1 and len(kps) > 1:
        cands.append([((qp,), (kp,)) for qp in qps for kp in kps])
    best = None
    for cand in cands:
        rects = []
        for qs, ks in cand:
            r = _evaluate(spec, doc, qs, ks, alibi, device)
            if r is None:
                break
            if r is not False:
                rects.append(r)
        else:
            if best is None or len(rects) < len(best):
                best = rects
            if len(best) <= 1:
                break
    if best is None:
        sizes = [(qp.n, kp.n) for qp in qps for kp in kps]
        raise invalid(f"pse_type 2/3 (in-kernel ALiBi) with a split sequence: the local op needs Sq == Skv in "
                      f"every call, and blocks of {sizes} query x key rows (document {doc}) are not square; "
                      "use equal chunk lengths (a sequence length divisible by the chunk count) or "
                      "strategy='ulysses'")
    return best


def band_keywords(r: Rect) -> tuple[int, int]:
    """(pre_tokens, next_tokens) of sparse_mode 4 (bottom-right origin) for a band rectangle."""
    d = r.rk - r.rq
    pre = INT32_MAX if r.lo <= -(r.rq - 1) else d - r.lo
    nxt = INT32_MAX if r.hi >= r.rk - 1 else r.hi - d
    return pre, nxt
