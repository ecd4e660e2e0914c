"""One entry point for the three strategies: ``context_parallel_attention``.

``strategy="ring"`` is ``ring_attention`` over ``ring_group`` (or ``group``), ``"ulysses"`` is
``ulysses_attention`` over ``ulysses_group`` (or ``group``), and ``"hybrid"`` (MindSpeed's hybrid
CP) is Ulysses inside ring groups: the all-to-all over ``ulysses_group`` gathers the ring part
of the sequence for N1/U heads, a ring over ``ring_group`` runs those heads over the whole
sequence, and the all-to-all back returns this rank's rows. Hybrid shards are two cuts:
``shard(x, layout, ring_rank, R, load_balance)`` and then ``shard(part, layout, ulysses_rank, U,
"contiguous")`` (TND: the second cut with ``actual_seq_len=shard_seq_lens(...)`` of the first).
The members of a ring group must have the same rank in their Ulysses groups (the same heads);
``hybrid_groups(U)`` builds such groups.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..errors import invalid
from .comm import exchange, group_of
from .context import Heads, check_keywords, doc_geometry, exchange_call, global_problem, slice_heads, tnd_stats
from .ring import run_ring
from .shards import layout_name, load_balance_name, rank_pieces
from .ulysses import UlyssesSplit, _stats_back, head_blocks, heads_to_seq, run_ulysses, seq_to_heads

__all__ = ["STRATEGIES", "context_parallel_attention", "hybrid_groups"]

STRATEGIES = ("ring", "ulysses", "hybrid")


def hybrid_groups(ulysses_size: int) -> tuple[Any, Any]:
    """(ulysses_group, ring_group) of this process for a hybrid over the whole world: Ulysses
    groups of ``ulysses_size`` consecutive ranks, ring groups of the ranks with the same position
    in theirs. Collective: every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise invalid("hybrid_groups: torch.distributed is not initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1 or world % ulysses_size:
        raise invalid(f"ulysses_size={ulysses_size!r}: must be a positive divisor of the world size {world}")
    mine_u = mine_r = None
    for g in range(world // ulysses_size):
        ranks = list(range(g * ulysses_size, (g + 1) * ulysses_size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            mine_u = pg
    for u in range(ulysses_size):
        ranks = list(range(u, world, ulysses_size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            mine_r = pg
    return mine_u, mine_r


def _hybrid(query: Tensor, key: Tensor, value: Tensor, head_num: Any, lay: str, kw: dict, group: Any,
            ulysses_group: Any, ring_group: Any, load_balance: Any) -> tuple[Tensor, Tensor, Tensor]:
    if ulysses_group is None or ring_group is None:
        raise invalid("strategy='hybrid' needs ulysses_group and ring_group (fascore.distributed.hybrid_groups)")
    ug, rg, whole = group_of(ulysses_group, "ulysses_group"), group_of(ring_group, "ring_group"), group_of(group)
    lb = load_balance_name(load_balance)
    if ug.world * rg.world != whole.world:
        raise invalid(f"strategy='hybrid': ulysses_group ({ug.world} ranks) x ring_group ({rg.world} ranks) must "
                      f"make up group ({whole.world} ranks)")
    kw, lq_all, lk_all = exchange_call(whole, lay, "hybrid", head_num, query, key, value, kw, None, False)
    steps = isinstance(kw.get("atten_mask"), (list, tuple))
    kw_val = {k: v for k, v in kw.items() if not steps or k not in ("atten_mask", "sparse_mode")}
    prob = global_problem(query, key, value, head_num, lay, kw_val, sum(lq_all), sum(lk_all))
    _, lq, lk = exchange_call(ug, lay, "hybrid", head_num, query, key, value, kw_val, None, True)
    qb, kb = head_blocks(prob.n1, prob.n2, ug.world, "ulysses_group")
    ranks = exchange(rg, [ug.rank], query.device)
    if any(r[0] != ug.rank for r in ranks):
        raise invalid(f"strategy='hybrid': the ranks of a ring group must hold the same heads (the same rank in "
                      f"their Ulysses groups); ring_group has Ulysses ranks {[r[0] for r in ranks]}")
    heads = Heads(qb[ug.rank][0], qb[ug.rank][1], prob.n1)
    sq, sk = UlyssesSplit(ug, lay, tuple(lq), qb, prob.n1), UlyssesSplit(ug, lay, tuple(lk), kb, prob.n2)
    rkw = slice_heads(kw, heads, prob.n2)
    for name, sp in (("query_rope", sq), ("key_rope", sk)):
        if kw.get(name) is not None:
            rkw[name] = seq_to_heads(kw[name], sp)
    if lay == "TND":
        rkw["softmax_layout"] = "TND"
    out, smax, ssum = run_ring(seq_to_heads(query, sq), seq_to_heads(key, sk), seq_to_heads(value, sk), heads.n,
                               lay, rkw, rg, lb, heads=heads, resolved=True)
    out = heads_to_seq(out, sq)
    m, l = _stats_back(smax, lay, sq), _stats_back(ssum, lay, sq)
    if lay != "TND":
        return out, m.unsqueeze(-1).expand(*m.shape, 8).contiguous(), l.unsqueeze(-1).expand(*l.shape, 8).contiguous()
    cum = _hybrid_cum(kw, lay, sum(lq_all), sum(lk_all), rg, lb, lq, ug.rank)
    layout = (kw.get("softmax_layout") or "").upper()
    return out, tnd_stats(m, cum, layout), tnd_stats(l, cum, layout)


def _hybrid_cum(kw: dict, lay: str, tq: int, tk: int, rg: Any, lb: str, lq: list, u: int) -> list[int]:
    """Local TND lengths of this rank: its contiguous slice of its ring rank's part."""
    _, qd, qtail, _, _ = doc_geometry(lay, kw, tq, tk)
    part = rank_pieces(qd, qtail, rg.rank, rg.world, lb)
    lo, hi = sum(lq[:u]), sum(lq[:u + 1])
    per = [0] * len(qd)
    for p in part:
        a, b = max(lo, p.local), min(hi, p.local + p.n)
        if a < b and p.doc >= 0:
            per[p.doc] += b - a
    return [sum(per[:i + 1]) for i in range(len(per))]


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, *,
                               strategy: str = "ring", group: Any = None, ulysses_group: Any = None,
                               ring_group: Any = None, load_balance: str = "zigzag",
                               **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Context-parallel ``npu_fusion_attention_v2`` on this rank's shard of the global sequence.

    ``strategy``: "ring" (over ``ring_group``, else ``group``; shards by ``load_balance``),
    "ulysses" (over ``ulysses_group``, else ``group``; contiguous shards) or "hybrid" (Ulysses over
    ``ulysses_group`` inside a ring over ``ring_group``; ``group``, default the world, is the
    whole context-parallel group: one seed is drawn for it). ``kwargs`` are
    npu_fusion_attention_v2's with their meaning on the global sequence (see ``ring_attention``);
    what a strategy cannot do raises ``FlashAttentionError`` naming it. Returns ``(attention_out,
    softmax_max, softmax_sum)`` of this rank's rows. docs/context-parallel.md has the table.
    """
    if strategy not in STRATEGIES:
        raise invalid(f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    kw = check_keywords(kwargs, f"context_parallel_attention(strategy={strategy!r})")
    lay = layout_name(input_layout)
    if strategy == "ring":
        if ulysses_group is not None:
            raise invalid("ulysses_group is only for strategy 'ulysses' or 'hybrid'")
        return run_ring(query, key, value, head_num, lay, kw, group_of(ring_group if ring_group is not None
                                                                        else group), load_balance)
    if strategy == "ulysses":
        if ring_group is not None:
            raise invalid("ring_group is only for strategy 'ring' or 'hybrid'")
        return run_ulysses(query, key, value, head_num, lay, kw,
                           group_of(ulysses_group if ulysses_group is not None else group))
    return _hybrid(query, key, value, head_num, lay, kw, group, ulysses_group, ring_group, load_balance)
