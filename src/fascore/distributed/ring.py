"""Ring attention over ``torch.distributed`` (gloo on CPU, nccl on CUDA).

Each of the W ranks of a group holds a shard of the sequence (``fascore.distributed.shard``).
``ring_attention`` computes, for this rank's query rows, attention over the whole (global)
sequence: K/V shards travel around the ring with ``batch_isend_irecv`` (the next shard is in
flight while the current one is computed); at step s the rank works on the shard of rank r - s,
as the local calls of ``fascore.distributed.plan`` (one per rectangle of the global mask, TND:
one per mask form, documents as sequences), and merges their partial results through their
(max, sum) statistics (``npu_ring_attention_update``'s formula). Backward sends K/V around
again with float32 dK/dV accumulators (float64 for float64 inputs) that collect every rank's
contribution and take one extra hop home; their transfer overlaps the next step's compute.
Every backward call gets this rank's *global* statistics and output, so its dq/dk/dv are exact
partial sums.

Dropout is the single-process op's mask (semantics §5, with its seed/offset and numbering):
each local call receives its block of the global keep mask as an explicit ``dropout_mask``,
in forward and in backward. A ``sink`` joins every row once, merged after the last step.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..canonical.layouts import from_bnsd, to_bnsd
from ..limits import FLT_MAX
from .comm import P2P, Group, group_of, pack, unpack
from .context import Heads, check_keywords, local_backward, local_forward, tnd_stats
from .merge import merge_partials
from .plan import Call, RingPlan, setup
from .shards import LOAD_BALANCES, layout_name, shard, unshard

__all__ = ["shard", "unshard", "ring_attention", "LOAD_BALANCES", "last_timings"]

_TAG_KV, _TAG_DKV = 11, 12
_TIMINGS: dict[str, float] = {}


def last_timings() -> dict[str, float]:
    """Seconds spent in the last ring call on this process: ``fwd_compute``, ``fwd_wait``,
    ``bwd_compute``, ``bwd_wait`` (waiting for transfers that compute did not hide), ``bwd_tail``
    (the dK/dV hop home)."""
    return dict(_TIMINGS)


def _ct(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- call inputs
def _rows(plan: RingPlan, call: Call) -> Tensor | None:
    """TND: local row index of the call's queries (None: the whole shard)."""
    if call.whole:
        return None
    return torch.cat([torch.arange(r.a0, r.a0 + r.rq, device=plan.device) for r in call.rects])


def _cols(plan: RingPlan, call: Call) -> Tensor | None:
    if call.whole:
        return None
    return torch.cat([torch.arange(r.c0, r.c0 + r.rk, device=plan.device) for r in call.rects])


def _take(plan: RingPlan, x: Tensor | None, call: Call, idx: Tensor | None, key_side: bool) -> Tensor | None:
    """The call's rows of a local tensor: a view (dense) or a gather (TND)."""
    if x is None or call.whole:
        return x
    if plan.tnd:
        return x.index_select(0, idx)
    r = call.rects[0]
    return x.narrow(plan.dim, r.c0, r.rk) if key_side else x.narrow(plan.dim, r.a0, r.rq)


def _call_kw(plan: RingPlan, call: Call, kr: Tensor | None, qr: Tensor | None) -> dict:
    kw = dict(plan.base_kw, **call.kw)
    bits = plan.dropout_mask(call)
    if bits is not None:
        kw["dropout_mask"] = bits
    if plan.pse is not None:
        kw["pse"] = plan.pse_block(call.rects[0])
    if qr is not None:
        kw.update(query_rope=qr, key_rope=kr)
    return kw


# --------------------------------------------------------------------------- forward
class _State:
    """Running (out, max, sum) of this rank's query rows, in the compute dtype."""

    def __init__(self, plan: RingPlan, n: int, ct: torch.dtype) -> None:
        self.plan, dev = plan, plan.device
        shape = (n, plan.h) if plan.tnd else (plan.batch, plan.h, n)
        self.o = torch.zeros(*shape, plan.dv, dtype=ct, device=dev)
        self.m = torch.full(shape, -FLT_MAX, dtype=ct, device=dev)
        self.l = torch.full(shape, FLT_MAX, dtype=ct, device=dev)

    def merge(self, call: Call, idx: Tensor | None, o: Tensor, m: Tensor, l: Tensor) -> None:
        p = self.plan
        if not p.tnd:
            r = call.rects[0]
            o4 = to_bnsd(o, p.layout, p.h).to(self.o.dtype)
            sl = (slice(None), slice(None), slice(r.a0, r.a0 + r.rq))
            res = merge_partials(self.o[sl], self.m[sl], self.l[sl], o4, m[..., 0].to(self.o.dtype),
                                 l[..., 0].to(self.o.dtype))
            self.o[sl], self.m[sl], self.l[sl] = res
            return
        ct = self.o.dtype
        if idx is None:
            self.o, self.m, self.l = merge_partials(self.o, self.m, self.l, o.to(ct), m[..., 0].to(ct),
                                                    l[..., 0].to(ct))
            return
        res = merge_partials(self.o[idx], self.m[idx], self.l[idx], o.to(ct), m[..., 0].to(ct), l[..., 0].to(ct))
        self.o.index_copy_(0, idx, res[0])
        self.m.index_copy_(0, idx, res[1])
        self.l.index_copy_(0, idx, res[2])


def _covered(plan: RingPlan) -> Tensor | None:
    """TND: which local query rows belong to a document (the others are zeros everywhere)."""
    if not plan.tnd:
        return None
    cov = torch.zeros(plan.lq(plan.grp.rank), dtype=torch.bool, device=plan.device)
    for p in plan.qpieces[plan.grp.rank]:
        if p.doc >= 0:
            cov[p.local:p.local + p.n] = True
    return cov


def _finish(plan: RingPlan, st: _State) -> tuple[Tensor, Tensor, Tensor]:
    """Sink merged once per row; TND rows outside every document zeroed; caller's layout."""
    cov = _covered(plan)
    if plan.sink is not None:
        ct = st.o.dtype
        sink = plan.sink.detach().to(ct)
        ms = sink.view(1, -1).expand_as(st.m) if plan.tnd else sink.view(1, -1, 1).expand_as(st.m)
        o, m, l = merge_partials(st.o, st.m, st.l, torch.zeros_like(st.o), ms, torch.ones_like(st.l))
        keep = cov.view(-1, 1) if cov is not None else torch.ones((), dtype=torch.bool, device=plan.device)
        st.o = torch.where(keep.unsqueeze(-1), o, st.o)
        st.m, st.l = torch.where(keep, m, st.m), torch.where(keep, l, st.l)
    if cov is not None:
        st.o[~cov] = 0
        st.m[~cov] = 0
        st.l[~cov] = 0
    out = st.o.to(plan.dtype) if plan.tnd else from_bnsd(st.o.to(plan.dtype), plan.layout)
    return out, st.m.float(), st.l.float()


def _forward(plan: RingPlan, q: Tensor, k: Tensor, v: Tensor, qr: Tensor | None,
             kr: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(out in the caller's layout, float32 row max, row sum: [B, h, Lq] or TND [Lq, h])."""
    grp, p2p = plan.grp, P2P(plan.grp)
    st = _State(plan, plan.lq(grp.rank), _ct(q.dtype))
    kv = pack(*(t for t in (k, v, kr) if t is not None))
    t_comp = t_wait = 0.0
    for step in range(grp.world):
        src = (grp.rank - step) % grp.world
        reqs, kv_next = [], None
        if step < grp.world - 1:
            kv_next = torch.empty(_kv_numel(plan, k, v, kr, (src - 1) % grp.world), dtype=kv.dtype, device=kv.device)
            reqs = p2p.post([(kv, _TAG_KV)], [(kv_next, _TAG_KV)])
        t0 = time.perf_counter()
        parts = unpack(kv, _kv_shapes(plan, k, v, kr, src))
        ks, vs, krs = parts[0], parts[1], (parts[2] if kr is not None else None)
        for call in plan.calls(step):
            idx = _rows(plan, call) if plan.tnd else None
            kidx = _cols(plan, call) if plan.tnd else None
            qc, qrc = _take(plan, q, call, idx, False), _take(plan, qr, call, idx, False)
            kc, vc = _take(plan, ks, call, kidx, True), _take(plan, vs, call, kidx, True)
            kw = _call_kw(plan, call, _take(plan, krs, call, kidx, True), qrc)
            o, m, l = local_forward(qc, kc, vc, plan.h, plan.layout, kw)
            st.merge(call, idx, o, m, l)
        t1 = time.perf_counter()
        P2P.wait(reqs)
        t_comp, t_wait = t_comp + t1 - t0, t_wait + time.perf_counter() - t1
        if kv_next is not None:
            kv = kv_next
    _TIMINGS.update(fwd_compute=t_comp, fwd_wait=t_wait)
    return _finish(plan, st)


def _seq_shape(t: Tensor, dim: int, n: int) -> list[int]:
    s = list(t.shape)
    s[dim] = n
    return s


def _kv_shapes(plan: RingPlan, k: Tensor, v: Tensor, kr: Tensor | None, r: int) -> list[list[int]]:
    n = plan.lk(r)
    return [_seq_shape(t, plan.dim, n) for t in (k, v, kr) if t is not None]


def _kv_numel(plan: RingPlan, k: Tensor, v: Tensor, kr: Tensor | None, r: int) -> int:
    return sum(int(torch.Size(s).numel()) for s in _kv_shapes(plan, k, v, kr, r))


# --------------------------------------------------------------------------- backward
def _stats_rows(plan: RingPlan, x: Tensor, call: Call, idx: Tensor | None) -> Tensor:
    """The call's rows of a float32 row statistic as the grad op reads it ([..., 8] copies)."""
    if plan.tnd:
        rows = x if idx is None else x[idx]
    else:
        r = call.rects[0]
        rows = x[:, :, r.a0:r.a0 + r.rq]
    return rows.unsqueeze(-1).expand(*rows.shape, 8)


def _add_rows(plan: RingPlan, acc: Tensor, g: Tensor, call: Call, idx: Tensor | None, key_side: bool) -> None:
    if plan.tnd:
        if idx is None:
            acc.add_(g)
        else:
            acc.index_add_(0, idx, g.to(acc.dtype))
        return
    r = call.rects[0]
    start, n = (r.c0, r.rk) if key_side else (r.a0, r.rq)
    acc.narrow(plan.dim, start, n).add_(g)


def _grad_calls(plan: RingPlan, step: int, saved: dict, parts: list[Tensor], grads: dict, dkv: list[Tensor]) -> None:
    """Every call of one step: dq (and dq_rope, dpse) into ``grads``, dk/dv (dk_rope) into ``dkv``."""
    q, qr, out, dout, m, l = (saved[n] for n in ("q", "qr", "out", "dout", "m", "l"))
    ks, vs = parts[0], parts[1]
    krs = parts[2] if len(parts) > 2 else None
    for call in plan.calls(step):
        idx = _rows(plan, call) if plan.tnd else None
        kidx = _cols(plan, call) if plan.tnd else None
        qrc = _take(plan, qr, call, idx, False)
        kw = _call_kw(plan, call, _take(plan, krs, call, kidx, True), qrc)
        g = local_backward(_take(plan, q, call, idx, False), _take(plan, ks, call, kidx, True),
                           _take(plan, vs, call, kidx, True), _take(plan, dout, call, idx, False), plan.h,
                           plan.layout, kw, _take(plan, out, call, idx, False), _stats_rows(plan, m, call, idx),
                           _stats_rows(plan, l, call, idx))
        _add_rows(plan, grads["dq"], g[0], call, idx, False)
        _add_rows(plan, dkv[0], g[1], call, kidx, True)
        _add_rows(plan, dkv[1], g[2], call, kidx, True)
        if qr is not None:
            _add_rows(plan, grads["dqr"], g[5], call, idx, False)
            _add_rows(plan, dkv[2], g[6], call, kidx, True)
        if plan.pse is not None and g[3] is not None:
            plan.add_dpse(grads["dpse"], call.rects[0], g[3])


def _dsink(plan: RingPlan, saved: dict) -> Tensor:
    """d loss / d sink of this rank's rows: -sum_i exp(sink - m_i) / l_i * sum(dy_i * out_i) (semantics §6)."""
    ct = _ct(plan.dtype)
    out, dout, m, l = saved["out"], saved["dout"], saved["m"].to(ct), saved["l"].to(ct)
    if plan.tnd:
        r = (dout.to(ct) * out.to(ct)).sum(-1)  # [Lq, h]
        sink = plan.sink.detach().to(ct).view(1, -1)
        live = (l > 0)
        p = torch.where(live, torch.exp(sink - m) / torch.where(live, l, torch.ones_like(l)), torch.zeros_like(l))
        return (-(p * r)).sum(0).float()
    r = (to_bnsd(dout, plan.layout, plan.h).to(ct) * to_bnsd(out, plan.layout, plan.h).to(ct)).sum(-1)
    p = torch.exp(plan.sink.detach().to(ct).view(1, -1, 1) - m) / l
    return (-(p * r)).sum((0, 2)).float()


def _backward(plan: RingPlan, saved: dict) -> dict:
    grp, p2p = plan.grp, P2P(plan.grp)
    q, k, v, kr, qr = (saved[n] for n in ("q", "k", "v", "kr", "qr"))
    ct = _ct(q.dtype)
    grads = dict(dq=torch.zeros(q.shape, dtype=ct, device=q.device))
    if qr is not None:
        grads["dqr"] = torch.zeros(qr.shape, dtype=ct, device=q.device)
    if plan.pse is not None:
        grads["dpse"] = torch.zeros(plan.pse.shape, dtype=ct, device=q.device)
    kv = pack(*(t for t in (k, v, kr) if t is not None))
    acc: Tensor | None = None  # dK/dV of the shard held at the previous step
    t_comp = t_wait = 0.0
    for step in range(grp.world):
        src = (grp.rank - step) % grp.world
        sends, recvs, dkv_in, kv_next = [], [], None, None
        if step >= 1:
            dkv_in = torch.empty(_kv_numel(plan, k, v, kr, src), dtype=ct, device=q.device)
            sends.append((acc, _TAG_DKV))
            recvs.append((dkv_in, _TAG_DKV))
        if step < grp.world - 1:
            kv_next = torch.empty(_kv_numel(plan, k, v, kr, (src - 1) % grp.world), dtype=kv.dtype, device=kv.device)
            sends.append((kv, _TAG_KV))
            recvs.append((kv_next, _TAG_KV))
        reqs = p2p.post(sends, recvs)
        t0 = time.perf_counter()
        shapes = _kv_shapes(plan, k, v, kr, src)
        local = torch.zeros(_kv_numel(plan, k, v, kr, src), dtype=ct, device=q.device)
        _grad_calls(plan, step, saved, unpack(kv, shapes), grads, unpack(local, shapes))
        t1 = time.perf_counter()
        P2P.wait(reqs)
        t_comp, t_wait = t_comp + t1 - t0, t_wait + time.perf_counter() - t1
        if dkv_in is not None:
            local.add_(dkv_in)
        acc = local
        if kv_next is not None:
            kv = kv_next
    t2 = time.perf_counter()
    if grp.world > 1:
        final = torch.empty(_kv_numel(plan, k, v, kr, grp.rank), dtype=ct, device=q.device)
        P2P.wait(p2p.post([(acc, _TAG_DKV)], [(final, _TAG_DKV)]))
        acc = final
    _TIMINGS.update(bwd_compute=t_comp, bwd_wait=t_wait, bwd_tail=time.perf_counter() - t2)
    parts = unpack(acc, _kv_shapes(plan, k, v, kr, grp.rank))
    grads.update(dk=parts[0], dv=parts[1])
    if kr is not None:
        grads["dkr"] = parts[2]
    if plan.sink is not None:
        grads["dsink"] = _dsink(plan, saved)
    return grads



# --------------------------------------------------------------------------- autograd and API
def user_stats(plan: RingPlan, m: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """Row statistics in the caller's form: [B, N, S, 8], or TND [T, N, 8] in ``softmax_layout``
    over this rank's local document lengths (``shard_seq_lens``)."""
    if not plan.tnd:
        return (m.unsqueeze(-1).expand(*m.shape, 8).contiguous(), l.unsqueeze(-1).expand(*l.shape, 8).contiguous())
    cum = plan.local_cum(plan.qpieces[plan.grp.rank])
    return tnd_stats(m, cum, plan.softmax_layout), tnd_stats(l, cum, plan.softmax_layout)


class _RingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: RingPlan, q: Tensor, k: Tensor, v: Tensor, pse: Tensor | None, sink: Tensor | None,
                qr: Tensor | None, kr: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        out, m, l = _forward(plan, q, k, v, qr, kr)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, qr, kr, out, m, l)
        smax, ssum = user_stats(plan, m, l)
        ctx.mark_non_differentiable(smax, ssum)
        return out, smax, ssum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor, _dmax: Any, _dsum: Any) -> tuple[Any, ...]:
        q, k, v, qr, kr, out, m, l = ctx.saved_tensors
        plan = ctx.plan
        saved = dict(q=q, k=k, v=v, qr=qr, kr=kr, out=out, dout=dout.contiguous(), m=m, l=l)
        g = _backward(plan, saved)
        dpse = g["dpse"].to(plan.pse.dtype) if "dpse" in g else None
        return (None, g["dq"].to(q.dtype), g["dk"].to(k.dtype), g["dv"].to(v.dtype), dpse, g.get("dsink"),
                g["dqr"].to(qr.dtype) if qr is not None else None, g["dkr"].to(kr.dtype) if kr is not None else None)


def run_ring(query: Tensor, key: Tensor, value: Tensor, head_num: Any, lay: str, kw: dict, grp: Group,
             load_balance: Any, heads: Heads | None = None, resolved: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ring_attention on checked keywords (``heads``: the query heads of a hybrid call)."""
    plan = setup(query, key, value, head_num, lay, load_balance, kw, grp, heads, resolved)
    sink = kw.get("sink") if isinstance(kw.get("sink"), Tensor) else None
    return _RingFn.apply(plan, query, key, value, plan.pse, sink, kw.get("query_rope"), kw.get("key_rope"))


def ring_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, *,
                   group: Any = None, load_balance: str = "zigzag", **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of this rank's query rows over the whole sequence of the process group (ring).

    ``query``/``key``/``value`` are this rank's shards (``shard(x, layout, rank, W, load_balance)``;
    TND: ``shard(x, "TND", rank, W, load_balance, actual_seq_len=...)``) in any layout (BSH, SBH,
    BSND, BNSD, TND; GQA/MQA). ``kwargs`` are ``npu_fusion_attention_v2``'s with their meaning on
    the *global* sequence: ``actual_seq_qlen``/``actual_seq_kvlen`` the global cumulative lengths,
    ``atten_mask`` the global mask (compressed, or full [Sq, Skv] / [B, 1|N1, Sq, Skv] /
    TND [T1, T2] or [maxSq, maxSkv]) or a list of per-step masks (entry j: this rank's queries x
    rank j's keys, in local order, sparse_mode 0/1), ``pse`` a global [B|1, N1, Sq|1, Skv] bias or
    ALiBi slopes, ``seed``/``offset`` those of the single-process op. Returns ``(attention_out,
    softmax_max, softmax_sum)`` for the local rows, the rows of single-process
    ``npu_fusion_attention_v2`` on the full sequence (statistics [B, N1, S_local, 8]; TND
    [T_local, N1, 8] in ``softmax_layout`` over ``shard_seq_lens``). Differentiable w.r.t.
    query, key, value, query_rope, key_rope, and pse / sink (their gradients on each rank are
    this rank's rows' share: the sum over the group is the full gradient).

    Not supported (``FlashAttentionError``): a compressed pse ([.., 1024, Skv], TND pse); ALiBi
    (pse_type 2/3) where a local call would not be square. Every rank of ``group`` must call it
    with the same global arguments; shard lengths may differ by rank (``"contiguous"``: any;
    ``"zigzag"``: ``shard``'s cut). Without an initialised process group it runs as a group of one.
    docs/context-parallel.md has the details.
    """
    kw = check_keywords(kwargs, "ring_attention")
    return run_ring(query, key, value, head_num, layout_name(input_layout), kw, group_of(group), load_balance)
