"""Ulysses (DeepSpeed-Ulysses) context parallelism: all-to-all from sequence shards to head
shards, the local op on the full sequence for this rank's heads, all-to-all back.

Each of the U ranks of a group holds a contiguous range of the sequence (any lengths; they are
all-gathered once per call) with every head. Rank u computes query heads [u*N1/U, (u+1)*N1/U)
(N1 must be a multiple of U) over the whole sequence; key/value heads go with them: N2/U per
rank when U divides N2, and when N2 < U (U a multiple of N2) each rank receives the one kv head
its query heads read, the U/N2 ranks that share it summing their dK/dV contributions on the way
back. Every argument the local op takes works (per-head tensors are cut along their head axis);
dropout keeps the single-process op's mask (semantics §5), each rank drawing its heads' bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..api.autograd import attention_with_grad
from ..errors import invalid
from ..rng.philox import counter_base, pad16
from ..spec import build_problem
from .comm import Group, all_to_all, group_of
from .context import (Heads, check_keywords, doc_geometry, dropout_docs, exchange_call, global_problem, keep_bits,
                      pack_bits, slice_heads, tnd_stats)
from .shards import layout_name, rank_pieces

__all__ = ["ulysses_attention", "UlyssesSplit", "seq_to_heads", "heads_to_seq"]


@dataclass(frozen=True)
class UlyssesSplit:
    """Who holds what in one all-to-all: row counts per rank, head blocks per rank."""

    grp: Group
    layout: str
    lens: tuple[int, ...]  # rows of each rank's shard
    blocks: tuple[tuple[int, int], ...]  # (first head, heads) each rank computes
    n: int  # heads of the full tensor


def _to_sbnd(x: Tensor, lay: str, n: int) -> Tensor:
    """[S, B, N, D] view of a tensor in ``lay``."""
    if lay == "BSH":
        return x.unflatten(-1, (n, -1)).permute(1, 0, 2, 3)
    if lay == "SBH":
        return x.unflatten(-1, (n, -1))
    if lay == "BSND":
        return x.permute(1, 0, 2, 3)
    if lay == "BNSD":
        return x.permute(2, 0, 1, 3)
    return x.unsqueeze(1)  # TND


def _from_sbnd(y: Tensor, lay: str) -> Tensor:
    if lay == "BSH":
        return y.permute(1, 0, 2, 3).flatten(2).contiguous()
    if lay == "SBH":
        return y.flatten(2).contiguous()
    if lay == "BSND":
        return y.permute(1, 0, 2, 3).contiguous()
    if lay == "BNSD":
        return y.permute(1, 2, 0, 3).contiguous()
    return y.squeeze(1).contiguous()


def _s2h_sbnd(xs: Tensor, sp: UlyssesSplit) -> Tensor:
    """[L_me, B, N, D] -> [S, B, h_me, D]: my rows, every head -> every row, my heads (blocks may
    overlap: kv heads shared by ranks)."""
    sends = [xs[:, :, h0:h0 + hn] for h0, hn in sp.blocks]
    shapes = [(sp.lens[u], xs.shape[1], sp.blocks[sp.grp.rank][1], xs.shape[3]) for u in range(sp.grp.world)]
    return torch.cat(all_to_all(sp.grp, sends, shapes, xs.dtype, xs.device), 0)


def _h2s_sbnd(ys: Tensor, sp: UlyssesSplit) -> Tensor:
    """[S, B, h_me, D] -> [L_me, B, N, D]: every row, my heads -> my rows, every head
    (contributions of ranks sharing a head are summed)."""
    me = sp.grp.rank
    starts = [0]
    for n in sp.lens:
        starts.append(starts[-1] + n)
    sends = [ys[starts[u]:starts[u + 1]] for u in range(sp.grp.world)]
    shapes = [(sp.lens[me], ys.shape[1], sp.blocks[u][1], ys.shape[3]) for u in range(sp.grp.world)]
    recvs = all_to_all(sp.grp, sends, shapes, ys.dtype, ys.device)
    if sp.grp.world == 1:
        return recvs[0]
    out = torch.zeros(sp.lens[me], ys.shape[1], sp.n, ys.shape[3], dtype=ys.dtype, device=ys.device)
    for (h0, hn), r in zip(sp.blocks, recvs):
        out[:, :, h0:h0 + hn] += r
    return out


def _s2h(x: Tensor, sp: UlyssesSplit) -> Tensor:
    return _from_sbnd(_s2h_sbnd(_to_sbnd(x, sp.layout, sp.n), sp), sp.layout)


def _h2s(y: Tensor, sp: UlyssesSplit) -> Tensor:
    return _from_sbnd(_h2s_sbnd(_to_sbnd(y, sp.layout, sp.blocks[sp.grp.rank][1]), sp), sp.layout)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sp: UlyssesSplit) -> Tensor:
        ctx.sp = sp
        return _s2h(x, sp)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        return _h2s(g.contiguous(), ctx.sp), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: Tensor, sp: UlyssesSplit) -> Tensor:
        ctx.sp = sp
        return _h2s(y, sp)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        return _s2h(g.contiguous(), ctx.sp), None


def seq_to_heads(x: Tensor | None, sp: UlyssesSplit) -> Tensor | None:
    return None if x is None else _SeqToHeads.apply(x, sp)


def heads_to_seq(y: Tensor, sp: UlyssesSplit) -> Tensor:
    return _HeadsToSeq.apply(y, sp)


def head_blocks(n1: int, n2: int, u: int, what: str = "ulysses group") -> tuple[tuple, tuple]:
    """(query head blocks, kv head blocks) of the ``u`` ranks of a Ulysses group."""
    if n1 % u:
        raise invalid(f"head_num={n1}: Ulysses splits query heads over the {u} ranks of the {what}, "
                      f"so head_num must be a multiple of {u}")
    h, g = n1 // u, n1 // n2
    qb = tuple((r * h, h) for r in range(u))
    if n2 % u == 0:
        kb = tuple((r * (n2 // u), n2 // u) for r in range(u))
    elif u % n2 == 0:
        kb = tuple(((r * h) // g, 1) for r in range(u))
    else:
        raise invalid(f"{n2} key/value heads over the {u} ranks of the {what}: one must divide the other "
                      "(GQA with fewer kv heads than ranks shares each kv head between ranks)")
    return qb, kb


def _dropout_kw(prob: Any, kw: dict, heads: Heads, geoms: list, batch: int, lay: str) -> dict:
    """The local call's dropout: the global mask's bits of this rank's heads (semantics §5)."""
    if prob.keep_prob >= 1.0:
        return {}
    bits = kw.get("dropout_mask")
    if bits is None and lay != "TND" and batch == 1:
        # one batch: heads [n0, n0 + n) are a contiguous stretch of the global numbering
        sq, skv = geoms[0]
        return dict(seed=prob.seed, offset=16 * counter_base(prob.offset) + heads.n0 * sq * pad16(skv),
                    dropout_mask=None)
    flat = prob.segments[0].dropout.bits if prob.segments and prob.segments[0].dropout is not None else None
    drops = dropout_docs(prob, heads, geoms, batch, flat)
    parts = [keep_bits(d, heads.n, [(0, sq)], [(0, skv)], prob.device).reshape(-1)
             for d, (sq, skv) in zip(drops, geoms) if d is not None and sq and skv]
    packed = pack_bits(torch.cat(parts)) if parts else torch.zeros(1, dtype=torch.uint8, device=prob.device)
    return dict(dropout_mask=packed, seed=0, offset=0)


def _stats_back(x: Tensor, lay: str, sp: UlyssesSplit) -> Tensor:
    """The local op's [B, h, S, 8] (TND [T, h, 8] row-major) statistic -> this rank's rows, every
    head: [B, N1, L] (TND [L, N1])."""
    if lay == "TND":
        return _h2s_sbnd(x[..., 0].unsqueeze(1).unsqueeze(-1).contiguous(), sp)[:, 0, :, 0]
    ys = x[..., 0].permute(2, 0, 1).unsqueeze(-1).contiguous()
    return _h2s_sbnd(ys, sp)[..., 0].permute(1, 2, 0)


def run_ulysses(query: Tensor, key: Tensor, value: Tensor, head_num: Any, lay: str, kw: dict, grp: Group,
                resolved: bool = False, heads_of: Heads | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ulysses_attention on checked keywords."""
    if isinstance(kw.get("atten_mask"), (list, tuple)):
        raise invalid("atten_mask as a list of per-step masks with strategy 'ulysses': Ulysses has no ring steps "
                      "(every rank sees the whole sequence); give the global mask")
    kw, lq, lk = exchange_call(grp, lay, "contiguous", head_num, query, key, value, kw, None, resolved)
    tq, tk = sum(lq), sum(lk)
    prob = global_problem(query, key, value, head_num, lay, kw, tq, tk)
    qb, kb = head_blocks(prob.n1, prob.n2, grp.world)
    me = grp.rank
    heads = Heads(qb[me][0], qb[me][1], prob.n1)
    sq, sk = UlyssesSplit(grp, lay, tuple(lq), qb, prob.n1), UlyssesSplit(grp, lay, tuple(lk), kb, prob.n2)
    geoms, qd, qtail = doc_geometry(lay, kw, tq, tk)[:3]
    batch = prob.segments[0].q.shape[0] if prob.segments and lay != "TND" else 1
    lkw = slice_heads(kw, heads, prob.n2)
    lkw.update(_dropout_kw(prob, kw, heads, geoms, batch, lay))
    if lay == "TND":
        lkw["softmax_layout"] = "TND"
    lkw.update(query_rope=seq_to_heads(kw.get("query_rope"), sq), key_rope=seq_to_heads(kw.get("key_rope"), sk))
    args = dict(query=seq_to_heads(query, sq), key=seq_to_heads(key, sk), value=seq_to_heads(value, sk),
                head_num=heads.n, input_layout=lay, **lkw)
    args.pop("gen_mask_parallel", None)
    args.pop("sync", None)
    local = build_problem(**args, draw_missing_seed=False)
    out, smax, ssum = attention_with_grad(local, args)
    out = heads_to_seq(out, sq)
    m, l = _stats_back(smax, lay, sq), _stats_back(ssum, lay, sq)
    if lay != "TND":
        return out, m.unsqueeze(-1).expand(*m.shape, 8).contiguous(), l.unsqueeze(-1).expand(*l.shape, 8).contiguous()
    per = [0] * len(qd)
    for p in rank_pieces(qd, qtail, me, grp.world, "contiguous", lq):
        if p.doc >= 0:
            per[p.doc] += p.n
    cum = [sum(per[:i + 1]) for i in range(len(per))]
    layout = (kw.get("softmax_layout") or "").upper()
    return out, tnd_stats(m, cum, layout), tnd_stats(l, cum, layout)


def ulysses_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, *,
                      group: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of this rank's query rows over the whole sequence (Ulysses: all-to-all of heads).

    ``query``/``key``/``value`` are this rank's contiguous range of the sequence
    (``shard(x, layout, rank, U, "contiguous")``, or any lengths) with all heads, in any layout
    (TND: ``actual_seq_qlen``/``actual_seq_kvlen`` are the global ones). ``kwargs`` are
    ``npu_fusion_attention_v2``'s with their global meaning, all of them: every mask and sparse
    mode, pse (tensors and ALiBi), sink, rope, dropout with the single-process op's
    seed/offset/mask. Needs head_num % U == 0 and, for key/value, U | N2 or N2 | U. Returns
    ``(attention_out, softmax_max, softmax_sum)`` of the local rows (as ``ring_attention``);
    differentiable w.r.t. query, key, value, rope, pse and sink (pse / sink gradients: this
    rank's heads; the sum over the group is the full gradient).
    """
    kw = check_keywords(kwargs, "ulysses_attention")
    return run_ulysses(query, key, value, head_num, layout_name(input_layout), kw, group_of(group))
