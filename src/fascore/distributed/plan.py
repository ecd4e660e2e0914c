"""The ring's plan: who holds which rows, the validated global problem, and each step's calls.

``setup`` runs once per call on every rank of the group: one all-gather carries every rank's
shard lengths, a hash of its arguments (ranks that disagree all raise instead of a receive
hanging) and, for dropout with seed 0, its generator draw (rank 0's is used). Everything after
it (pieces, validation, calls) is computed identically on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..canonical.bias import AlibiPse, CompressedPse, DensePse
from ..canonical.dropout import Dropout
from ..canonical.masks import MaskSpec
from ..errors import invalid
from ..limits import INT32_MAX
from . import blocks
from .blocks import Rect
from .comm import Group, exchange
from .context import (Heads, causal_mask, doc_geometry, dropout_docs, exchange_call, global_problem, keep_bits,
                      pack_bits)
from .shards import SEQ_DIM, Piece, all_pieces, doc_cum, load_balance_name

__all__ = ["Call", "RingPlan", "setup"]


@dataclass
class Call:
    rects: list[Rect]
    kw: dict  # mask, ALiBi and TND length keywords of the local op
    whole: bool = False  # a per-step mask: this rank's whole shard x the source's whole shard
    src: int = 0


@dataclass
class RingPlan:
    grp: Group
    layout: str
    lb: str
    heads: Heads
    n2: int
    dv: int
    batch: int
    device: torch.device
    dtype: torch.dtype
    qpieces: list[list[Piece]]  # per rank
    kpieces: list[list[Piece]]
    doc_geoms: list[tuple[int, int]]  # (Sq_b, Skv_b) per document (dense: one)
    specs: dict[int, MaskSpec]  # documents with queries
    alibi: dict[int, tuple[int, int]] | None  # per document (q_start_idx, kv_start_idx)
    drops: list[Dropout | None]
    base_kw: dict
    pse: Tensor | None = None  # dense pse (types 0/1), cut per call
    sink: Tensor | None = None
    rope: bool = False
    steps: list | None = None  # a per-step mask list
    step_mode: int = 1
    softmax_layout: str = ""
    by_doc: list[dict[int, list[Piece]]] = field(default_factory=list)  # query pieces per rank and document
    kby_doc: list[dict[int, list[Piece]]] = field(default_factory=list)  # key pieces

    @property
    def tnd(self) -> bool:
        return self.layout == "TND"

    @property
    def dim(self) -> int:
        return SEQ_DIM[self.layout]

    @property
    def h(self) -> int:
        return self.heads.n

    def lq(self, r: int) -> int:
        return sum(p.n for p in self.qpieces[r])

    def lk(self, r: int) -> int:
        return sum(p.n for p in self.kpieces[r])

    def local_cum(self, pieces: list[Piece]) -> list[int]:
        """Cumulative per-document row counts of a rank's pieces (its local TND lengths)."""
        return doc_cum(pieces, len(self.doc_geoms))

    # ----------------------------------------------------------------- calls of a step
    def calls(self, step: int) -> list[Call]:
        src = (self.grp.rank - step) % self.grp.world
        if self.steps is not None:
            return self._step_mask_calls(src)
        mine, theirs = self.by_doc[self.grp.rank], self.kby_doc[src]
        rects: list[Rect] = []
        for doc, spec in self.specs.items():
            rects += blocks.partition(spec, doc, mine.get(doc, []), theirs.get(doc, []), self.alibi is not None,
                                      self.device)
        if not self.tnd:
            return [Call([r], self._mask_kw(r.kind, r, [r]) | self._alibi_kw(r), src=src) for r in rects]
        return self._tnd_calls(rects, src)

    def _mask_kw(self, kind: str, r: Rect, rects: list[Rect]) -> dict:
        if kind == "full":
            return {}
        if kind == "band":
            pre, nxt = blocks.band_keywords(r)
            return dict(sparse_mode=4, atten_mask=causal_mask(self.device), pre_tokens=pre, next_tokens=nxt)
        if not self.tnd:
            m = r.mask
            if m.shape[0] == 1 and m.shape[1] == 1:
                m = m[0, 0]
            elif m.shape[0] == 1 and self.batch > 1:
                m = m.expand(self.batch, *m.shape[1:])
            return dict(sparse_mode=1, atten_mask=m.contiguous())
        full = torch.ones(sum(x.rq for x in rects), sum(x.rk for x in rects), dtype=torch.bool, device=self.device)
        a = c = 0
        for x in rects:
            if x.kind == "explicit":
                full[a:a + x.rq, c:c + x.rk] = x.mask[0, 0]
            else:
                full[a:a + x.rq, c:c + x.rk] = False
            a, c = a + x.rq, c + x.rk
        return dict(sparse_mode=1, atten_mask=full)

    def _shift(self, r: Rect) -> int:
        qs, ks = self.alibi[r.doc]
        return r.shift + ks - qs

    def _alibi_kw(self, r: Rect) -> dict:
        if self.alibi is None:
            return {}
        return dict(q_start_idx=[0], kv_start_idx=[self._shift(r)])

    def _key(self, r: Rect) -> tuple:
        shift = self._shift(r) if self.alibi is not None else 0
        if r.kind == "band":
            return ("band", *blocks.band_keywords(r), shift)
        return (r.kind, 0, 0, shift)

    def _tnd_calls(self, rects: list[Rect], src: int) -> list[Call]:
        """Rectangles with one mask form (and ALiBi offset) share a call, one TND sequence each;
        the query rows of one call never overlap."""
        groups: dict[tuple, list[list[Rect]]] = {}
        order: list[tuple[tuple, int]] = []
        for r in rects:
            key = self._key(r)
            bucket = groups.setdefault(key, [])
            for members in bucket:
                if all(r.a0 + r.rq <= o.a0 or o.a0 + o.rq <= r.a0 for o in members):
                    members.append(r)
                    break
            else:
                bucket.append([r])
                order.append((key, len(bucket) - 1))
        calls = []
        for key, i in order:
            members = groups[key][i]
            kw = self._mask_kw(key[0], members[0], members)
            cq, ck, aq, ak = [], [], 0, 0
            for x in members:
                aq, ak = aq + x.rq, ak + x.rk
                cq.append(aq)
                ck.append(ak)
            kw.update(actual_seq_qlen=cq, actual_seq_kvlen=ck, softmax_layout="TND")
            if self.alibi is not None:
                kw.update(q_start_idx=[0], kv_start_idx=[key[3]])
            calls.append(Call(members, kw, src=src))
        return calls

    def _step_mask_calls(self, src: int) -> list[Call]:
        m = self.steps[src]
        if isinstance(m, Tensor) and bool((m != 0).all()):
            return []  # every position of the block masked: not computed
        if self.lq(self.grp.rank) == 0 or self.lk(src) == 0:
            return []
        kw: dict[str, Any] = dict(sparse_mode=self.step_mode) if m is not None else {}
        if m is not None:
            kw["atten_mask"] = m
        if self.tnd:
            kw.update(actual_seq_qlen=self.local_cum(self.qpieces[self.grp.rank]),
                      actual_seq_kvlen=self.local_cum(self.kpieces[src]), softmax_layout="TND")
        rect = Rect(0, tuple(self.qpieces[self.grp.rank]), tuple(self.kpieces[src]), "explicit")
        return [Call([rect], kw, whole=True, src=src)]

    # ----------------------------------------------------------------- per-call tensors
    def dropout_mask(self, call: Call) -> Tensor | None:
        """The call's block of the global keep mask, bit-packed (semantics §5's numbering)."""
        if self.base_kw.get("keep_prob", 1.0) >= 1.0:
            return None
        if call.whole and self.tnd:
            parts = []
            mine, theirs = self.by_doc[self.grp.rank], self.kby_doc[call.src]
            for doc, drop in enumerate(self.drops):
                qps, kps = mine.get(doc, []), theirs.get(doc, [])
                if qps and kps and drop is not None:
                    parts.append(keep_bits(drop, self.h, [(p.start, p.stop) for p in qps],
                                           [(p.start, p.stop) for p in kps], self.device).reshape(-1))
            return pack_bits(torch.cat(parts)) if parts else torch.zeros(1, dtype=torch.uint8, device=self.device)
        parts = [keep_bits(self.drops[r.doc], self.h, r.rows(), r.cols(), self.device).reshape(-1)
                 for r in call.rects]
        return pack_bits(torch.cat(parts))

    def pse_block(self, r: Rect) -> Tensor | None:
        if self.pse is None:
            return None
        cols = torch.cat([torch.arange(a, b, device=self.device) for a, b in r.cols()])
        t = self.pse.index_select(3, cols)
        if t.shape[2] > 1:
            rows = torch.cat([torch.arange(a, b, device=self.device) for a, b in r.rows()])
            t = t.index_select(2, rows)
        return t

    def add_dpse(self, acc: Tensor, r: Rect, g: Tensor) -> None:
        """acc (the pse's shape) += a call's dpse, placed at the rectangle's global rows/columns."""
        row_parts = [(slice(qp.start, qp.stop), slice(a, a + qp.n)) for qp, a in zip(r.qp, _offsets(r.qp))]
        if acc.shape[2] == 1:  # a [.., 1, Skv] pse: the call's dpse is already summed over its rows
            row_parts = [(slice(None), slice(None))]
        for rows, grows in row_parts:
            for kp, b in zip(r.kp, _offsets(r.kp)):
                acc[:, :, rows, kp.start:kp.stop] += g[:, :, grows, b:b + kp.n].to(acc.dtype)


def _offsets(pieces: tuple[Piece, ...]) -> list[int]:
    out, acc = [], 0
    for p in pieces:
        out.append(acc)
        acc += p.n
    return out


# --------------------------------------------------------------------------- setup
def _check_pieces(kind: str, lens: list[int], pieces: list[list[Piece]], lb: str) -> None:
    for r, (n, ps) in enumerate(zip(lens, pieces)):
        if sum(p.n for p in ps) != n:
            w = len(lens)
            raise invalid(f"{kind} shard of rank {r} has {n} rows, but {lb} over the {sum(lens)} global rows gives "
                          f"it {sum(p.n for p in ps)} (chunks {r} and {2 * w - 1 - r} of {2 * w}, bounds "
                          f"c * n // {2 * w} per sequence); cut the shards with fascore.distributed.shard, or use "
                          "load_balance='contiguous' for arbitrary lengths")


def _step_masks(kw: dict, grp: Group, lay: str) -> tuple[dict, list | None, int]:
    """(keywords for the global validation, the per-step mask list or None, its sparse_mode)."""
    steps = kw.get("atten_mask")
    if not isinstance(steps, (list, tuple)):
        return kw, None, 1
    if len(steps) != grp.world:
        raise invalid(f"atten_mask: a list of per-step masks needs one entry per rank of the ring "
                      f"({grp.world}), got {len(steps)}")
    mode = kw.get("sparse_mode", 0)
    band = kw.get("pre_tokens", INT32_MAX) != INT32_MAX or kw.get("next_tokens", INT32_MAX) != INT32_MAX
    if mode not in (0, 1) or band:
        raise invalid(f"atten_mask as a per-step list takes sparse_mode 0 or 1 without pre_tokens/next_tokens "
                      f"(got sparse_mode={mode!r}): the masks are in the shards' local coordinates")
    for m in steps:
        if m is not None and not isinstance(m, Tensor):
            raise invalid(f"atten_mask: per-step entries must be tensors or None, got {type(m).__name__}")
    rest = {k: v for k, v in kw.items() if k not in ("atten_mask", "sparse_mode", "pre_tokens", "next_tokens")}
    return rest, list(steps), mode


def _check_step_masks(plan: RingPlan, query: Tensor, key: Tensor, value: Tensor) -> None:
    """Validate every per-step mask with the local op's rules on every rank; all ranks raise if one fails."""
    from .context import global_problem as _gp

    me = plan.grp.rank
    err = ""
    for j, m in enumerate(plan.steps):
        if m is None:
            continue
        kw = dict(atten_mask=m, sparse_mode=plan.step_mode)
        if plan.tnd:
            kw.update(actual_seq_qlen=plan.local_cum(plan.qpieces[me]) or [0],
                      actual_seq_kvlen=plan.local_cum(plan.kpieces[j]) or [0])
        try:
            if plan.lq(me) and plan.lk(j):
                _gp(query, key, value, plan.h, plan.layout, kw, plan.lq(me), plan.lk(j))
        except ValueError as e:
            err = f"atten_mask[{j}] (per-step mask for rank {j}'s keys): {e}"
            break
    flags = exchange(plan.grp, [int(bool(err))], plan.device)
    if err:
        raise invalid(err)
    bad = [r for r, f in enumerate(flags) if f[0]]
    if bad:
        raise invalid(f"atten_mask: the per-step mask list of rank {bad[0]} is invalid (that rank says why)")


def _segments(prob: Any, lay: str) -> tuple[dict, dict | None, bool]:
    """(mask rule per document, ALiBi start indices per document or None, dense pse?)."""
    specs, alibi, dense_pse = {}, {}, False
    for seg in prob.segments:
        doc = seg.batch.index if lay == "TND" else 0
        specs[doc] = seg.mask
        if isinstance(seg.pse, CompressedPse):
            raise invalid("pse in its compressed [B, N1, 1024, Skv] form (ALiBi-compressed or TND) with a split "
                          "sequence: its rows are tied to global positions the local calls cannot address; give "
                          "the full [B, N1, Sq, Skv] pse, in-kernel ALiBi (pse_type 2/3), or strategy='ulysses'")
        if isinstance(seg.pse, AlibiPse):
            alibi[doc] = (seg.pse.qs, seg.pse.ks)
        dense_pse = dense_pse or isinstance(seg.pse, DensePse)
    return specs, (alibi or None), dense_pse


def setup(query: Tensor, key: Tensor, value: Tensor, head_num: Any, lay: str, load_balance: Any, kw: dict,
          grp: Group, heads: Heads | None = None, resolved: bool = False) -> RingPlan:
    """Everything a ring call needs, after validating its global arguments on every rank."""
    lb = load_balance_name(load_balance)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise invalid(f"{name}={type(t).__name__}: must be a torch.Tensor")
        if t.dim() <= SEQ_DIM[lay]:
            raise invalid(f"{name} shape {list(t.shape)}: layout {lay} has its sequence on axis {SEQ_DIM[lay]}")
    kw_val, steps, step_mode = _step_masks(kw, grp, lay)
    kw, lq, lk = exchange_call(grp, lay, lb, head_num, query, key, value, kw, heads, resolved)
    if steps is not None:
        kw_val = {k: v for k, v in kw.items() if k not in ("atten_mask", "sparse_mode", "pre_tokens", "next_tokens")}
    else:
        kw_val = kw
    tq, tk = sum(lq), sum(lk)
    prob = global_problem(query, key, value, head_num, lay, kw_val, tq, tk)
    geoms, qd, qtail, kd, ktail = doc_geometry(lay, kw, tq, tk)
    w = grp.world
    qpieces = all_pieces(qd, qtail, w, lb, lq if lb == "contiguous" else None)
    kpieces = all_pieces(kd, ktail, w, lb, lk if lb == "contiguous" else None)
    _check_pieces("query", lq, qpieces, lb)
    _check_pieces("key/value", lk, kpieces, lb)
    specs, alibi, dense_pse = _segments(prob, lay)
    if alibi is not None:
        _check_alibi_pieces(qpieces, kpieces)
    heads = heads or Heads(0, prob.n1, prob.n1)
    batch = prob.segments[0].q.shape[0] if prob.segments else 1
    seg0 = prob.segments[0] if prob.segments else None
    bits = seg0.dropout.bits if seg0 is not None and seg0.dropout is not None else None
    base = dict(scale=kw.get("scale", 1.0), keep_prob=kw.get("keep_prob", 1.0),
                inner_precise=kw.get("inner_precise", 0))
    if alibi is not None or dense_pse:
        base.update(pse_type=kw.get("pse_type", 1))
    if alibi is not None:
        base["pse"] = kw["pse"]
    plan = RingPlan(grp, lay, lb, heads, prob.n2, prob.dv, batch, query.device, query.dtype, qpieces, kpieces, geoms,
                    specs, alibi, dropout_docs(prob, heads, geoms, batch, bits), base,
                    pse=kw.get("pse") if dense_pse else None, sink=kw.get("sink"),
                    rope=kw.get("query_rope") is not None, steps=steps, step_mode=step_mode,
                    softmax_layout=(kw.get("softmax_layout") or "").upper())
    plan.by_doc = [_by_doc(ps) for ps in qpieces]
    plan.kby_doc = [_by_doc(ps) for ps in kpieces]
    if steps is not None:
        _check_step_masks(plan, query, key, value)
    return plan


def _check_alibi_pieces(qpieces: list[list[Piece]], kpieces: list[list[Piece]]) -> None:
    """In-kernel ALiBi needs square local calls: every piece of a document must have one length."""
    sizes: dict[int, set[int]] = {}
    for ps in qpieces + kpieces:
        for p in ps:
            if p.doc >= 0:
                sizes.setdefault(p.doc, set()).add(p.n)
    for doc, s in sizes.items():
        if len(s) > 1:
            raise invalid(f"pse_type 2/3 (in-kernel ALiBi) with a split sequence: the local op needs Sq == Skv in "
                          f"every call, but the shards cut document {doc} into pieces of {sorted(s)} rows; use "
                          "lengths the chunk count divides (zigzag: 2W chunks per sequence, equal query and key "
                          "lengths) or strategy='ulysses'")


def _by_doc(pieces: list[Piece]) -> dict[int, list[Piece]]:
    out: dict[int, list[Piece]] = {}
    for p in pieces:
        if p.doc >= 0:
            out.setdefault(p.doc, []).append(p)
    return out
