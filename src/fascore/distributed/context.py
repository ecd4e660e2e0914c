"""What every strategy shares: the keywords, the global problem, seeds and dropout numbering.

A context-parallel call means single-process ``npu_fusion_attention_v2`` on the *global*
sequence. Its arguments are validated once, by ``build_problem`` on zero-stride tensors of the
global shapes (no memory), so every rule and message is the local op's; the canonical problem
it returns (per document: ``MaskSpec``, pse, ``Dropout``) is what the strategies cut into local
calls. Dropout uses the single-process op's own numbering (semantics §5): every local call gets
the bits of its block of the global mask as an explicit ``dropout_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..api.run import run_backward, run_forward
from ..canonical.dropout import Dropout
from ..canonical.problem import Problem
from ..errors import invalid
from ..limits import INT32_MAX
from ..params import ENTRY_POINTS
from ..rng.philox import pad16
from ..spec import build_problem
from .comm import Group, draw_seed, exchange, signature, to_i64
from .shards import SEQ_DIM, parse_cum

__all__ = ["KEYWORDS", "check_keywords", "global_problem", "local_forward", "local_backward", "dropout_docs",
           "pack_bits", "keep_bits", "causal_mask", "Heads", "slice_heads", "with_seed", "tnd_stats", "doc_geometry",
           "exchange_call",
           "INT32_MAX"]

KEYWORDS = tuple(p.name for p in ENTRY_POINTS["npu_fusion_attention_v2"].params
                 if p.name not in ("query", "key", "value", "head_num", "input_layout"))
_HINTS = ("gen_mask_parallel", "sync")


def check_keywords(kwargs: dict, where: str) -> dict:
    """npu_fusion_attention_v2's keywords, scheduling hints dropped; anything else is an error."""
    for k in kwargs:
        if k not in KEYWORDS:
            raise invalid(f"{k}: not a keyword of {where} (it takes npu_fusion_attention_v2's keywords: "
                          f"{', '.join(KEYWORDS)})")
    return {k: v for k, v in kwargs.items() if k not in _HINTS}


@dataclass(frozen=True)
class Heads:
    """This call's query heads [n0, n0 + n) of the global N1 (Ulysses and hybrid split heads)."""

    n0: int
    n: int
    n1: int

    @property
    def all(self) -> bool:
        return self.n == self.n1


def _zeros(t: Tensor, dim: int, length: int) -> Tensor:
    shape = list(t.shape)
    shape[dim] = length
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(shape)


def global_problem(query: Tensor, key: Tensor, value: Tensor, head_num: Any, layout: str, kw: dict,
                   sq: int, skv: int) -> Problem:
    """The validated canonical problem of the global call (``sq`` / ``skv`` rows; no memory)."""
    dim = SEQ_DIM[layout]
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise invalid(f"{name}={type(t).__name__}: must be a torch.Tensor")
        if t.dim() <= dim:
            raise invalid(f"{name} shape {list(t.shape)}: layout {layout} has its sequence on axis {dim}")
    args = dict(kw)
    for name, length in (("query_rope", sq), ("key_rope", skv)):
        if isinstance(args.get(name), Tensor) and args[name].dim() > dim:
            args[name] = _zeros(args[name], dim, length)
    return build_problem(_zeros(query, dim, sq), _zeros(key, dim, skv), _zeros(value, dim, skv), head_num, layout,
                         draw_missing_seed=False, **args)


def local_forward(q: Tensor, k: Tensor, v: Tensor, n: int, layout: str, kw: dict) -> tuple[Tensor, Tensor, Tensor]:
    """The local op's (out, softmax_max, softmax_sum) for resolved arguments (never draws a seed)."""
    return run_forward(build_problem(q, k, v, n, layout, draw_missing_seed=False, **kw))


def local_backward(q: Tensor, k: Tensor, v: Tensor, dy: Tensor, n: int, layout: str, kw: dict, out: Tensor,
                   smax: Tensor, ssum: Tensor) -> tuple:
    """The grad op's (dq, dk, dv, dpse, dsink, dq_rope, dk_rope) for the same arguments."""
    prob = build_problem(q, k, v, n, layout, draw_missing_seed=False, **kw)
    with torch.no_grad():
        return run_backward(prob, dy, out, smax, ssum)


def dropout_docs(prob: Problem, heads: Heads, doc_geoms: Sequence[tuple[int, int]], batch: int,
                 bits: Tensor | None) -> list[Dropout | None]:
    """Per document, the global keep mask (semantics §5's numbering over all N1 heads) seen from
    heads [n0, n0 + n): ``Dropout.keep(n, ...)`` gives their bits of any block."""
    if prob.keep_prob >= 1.0:
        return [None] * len(doc_geoms)
    row = (lambda s: s) if bits is not None else pad16
    out, acc = [], 0
    tnd = prob.layout == "TND"
    for sq, skv in doc_geoms:
        if tnd:
            base = (acc + heads.n0 * sq * row(skv),)
            acc += heads.n1 * sq * row(skv)
        else:
            base = tuple((b * heads.n1 + heads.n0) * sq * row(skv) for b in range(batch))
        out.append(Dropout(prob.keep_prob, base, sq, row(skv), bits=bits, seed=prob.seed, offset=prob.offset))
    return out


_WEIGHTS: dict[torch.device, Tensor] = {}


def pack_bits(keep: Tensor) -> Tensor:
    """Bit-packed uint8 explicit mask (bit f % 8 of byte f // 8, 1 = keep) of a flat keep tensor."""
    flat = keep.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    w = _WEIGHTS.get(flat.device)
    if w is None:
        w = _WEIGHTS[flat.device] = (2 ** torch.arange(8, device=flat.device)).to(torch.int32)
    return (flat.view(-1, 8).to(torch.int32) * w).sum(-1).to(torch.uint8)


def keep_bits(drop: Dropout, n: int, rows: Sequence[tuple[int, int]], cols: Sequence[tuple[int, int]],
              device: torch.device) -> Tensor:
    """Keep bits [B, n, sum rows, sum cols] of a block made of row ranges x column ranges."""
    strips = [torch.cat([drop.keep(n, i0, i1, j0, j1, device) for j0, j1 in cols], -1) for i0, i1 in rows]
    return torch.cat(strips, -2)


_CAUSAL: dict[torch.device, Tensor] = {}


def causal_mask(device: torch.device) -> Tensor:
    """The compressed [2048, 2048] mask sparse modes 2/3/4 read (one per device)."""
    m = _CAUSAL.get(device)
    if m is None:
        m = _CAUSAL[device] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
    return m


def slice_heads(kw: dict, heads: Heads, n2: int) -> dict:
    """The keywords of query heads [n0, n0 + n): per-head tensors (pse, slopes, sink, a per-head
    atten_mask) cut along their head axis; everything else unchanged."""
    if heads.all:
        return dict(kw)
    out = dict(kw)
    sl = slice(heads.n0, heads.n0 + heads.n)
    pse = kw.get("pse")
    if isinstance(pse, Tensor):
        ptype = kw.get("pse_type", 1)
        if ptype in (2, 3):
            out["pse"] = pse[..., sl] if pse.dim() in (1, 2) else pse
        elif pse.dim() == 4 and pse.shape[1] == heads.n1:
            out["pse"] = pse[:, sl]
    sink = kw.get("sink")
    if isinstance(sink, Tensor) and sink.dim() == 1 and sink.shape[0] == heads.n1:
        out["sink"] = sink[sl]
    mask = kw.get("atten_mask")
    if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[1] == heads.n1 and heads.n1 > 1:
        out["atten_mask"] = mask[:, sl]
    elif isinstance(mask, (list, tuple)):
        out["atten_mask"] = [m[:, sl] if isinstance(m, Tensor) and m.dim() == 4 and m.shape[1] == heads.n1
                             and heads.n1 > 1 else m for m in mask]
    return out


def with_seed(kw: dict, seed: int, offset: int) -> dict:
    return dict(kw, seed=seed, offset=offset)


def tnd_stats(x: Tensor, cum: Sequence[int], softmax_layout: str) -> Tensor:
    """A row statistic [T, N] (float32) as the op returns it: [T, N, 8] in ``softmax_layout``
    ("TND": row-major; "": one [N, Sq_b, 8] block per batch of ``cum``, semantics §2)."""
    from .merge import _tnd_row_index

    n, h = x.shape
    if softmax_layout == "TND" or not cum:
        return x.unsqueeze(-1).expand(n, h, 8).contiguous()
    slot = (_tnd_row_index(list(cum), n, h, "", x.device) // 8).reshape(-1)
    buf = torch.empty(n * h, 8, dtype=torch.float32, device=x.device)
    buf[slot] = x.float().reshape(-1, 1).expand(-1, 8)
    return buf.view(n, h, 8)


def _needs_seed(kw: dict) -> bool:
    kp = kw.get("keep_prob", 1.0)
    return (isinstance(kp, (int, float)) and not isinstance(kp, bool) and kp < 1.0
            and kw.get("seed", 0) == 0 and kw.get("dropout_mask") is None)


def _summary(kw: dict) -> dict:
    """Arguments for the consistency hash: per-step mask lists differ by rank (only their length counts)."""
    out = dict(kw)
    if isinstance(out.get("atten_mask"), (list, tuple)):
        out["atten_mask"] = ("steps", len(out["atten_mask"]))
    return dict(sorted(out.items()))


def doc_geometry(lay: str, kw: dict, tq: int, tk: int) -> tuple[list[tuple[int, int]], list[int], int, list[int], int]:
    """(document geometries, query doc lengths, query tail, key doc lengths, key tail)."""
    if lay != "TND":
        return [(tq, tk)], [tq], 0, [tk], 0
    cq = parse_cum(kw.get("actual_seq_qlen"), "actual_seq_qlen") if kw.get("actual_seq_qlen") is not None else [tq]
    ck = parse_cum(kw.get("actual_seq_kvlen"), "actual_seq_kvlen") if kw.get("actual_seq_kvlen") is not None else [tk]
    n = min(len(cq), len(ck))
    geoms, pq, pk = [], 0, 0
    for b in range(n):
        geoms.append((cq[b] - pq, ck[b] - pk))
        pq, pk = cq[b], ck[b]
    return geoms, [g[0] for g in geoms], tq - pq, [g[1] for g in geoms], tk - pk


def exchange_call(grp: Group, lay: str, lb: str, head_num: Any, query: Tensor, key: Tensor, value: Tensor,
              kw: dict, heads: Heads | None, resolved: bool) -> tuple[dict, list[int], list[int]]:
    """The call's one all-gather: lengths, argument hash, seed draw. Returns (keywords with the
    resolved seed, query lengths, key lengths)."""
    dim = SEQ_DIM[lay]
    lq, lk = query.shape[dim], key.shape[dim]
    shapes = [list(t.shape[:dim]) + list(t.shape[dim + 1:]) for t in (query, key, value)]
    sig = signature(lay, lb, head_num, shapes, [str(t.dtype) for t in (query, key, value)], _summary(kw),
                    None if heads is None else (heads.n0, heads.n, heads.n1))
    need = _needs_seed(kw) and not resolved
    seed, offset = draw_seed(query.device) if need else (0, 0)
    vals = exchange(grp, [lq, lk, sig, to_i64(seed), offset], query.device)
    for r, v in enumerate(vals):
        if v[2] != sig:
            raise invalid(f"context parallel attention: rank {r} of the group called with other shapes or arguments "
                          f"than rank {grp.rank} (shapes q {list(query.shape)}, k {list(key.shape)}, "
                          f"v {list(value.shape)}; every rank must pass the same global arguments)")
    if need:
        kw = dict(kw, seed=vals[0][3] % (1 << 64), offset=vals[0][4])
    return kw, [v[0] for v in vals], [v[1] for v in vals]
