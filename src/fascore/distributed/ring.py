"""Context parallelism: ring attention over ``torch.distributed`` (gloo on CPU, nccl on CUDA).

Each of the W processes of a group holds a shard of the sequence (``shard``/``unshard``).
``ring_attention`` computes, for this rank's query rows, attention over the whole (global)
sequence: the K/V shards travel around the ring with point-to-point ``batch_isend_irecv``
(the next shard is in flight while the current one is computed), every step runs
``npu_fusion_attention_v2`` on (query chunk, key chunk) pairs with the pair's part of the global
mask, and partial results are merged through their (max, sum) statistics
(``fascore.distributed.merge.merge_partials``, the core of ``ring_attention_update``). Backward sends K/V
around again together with float32 dK/dV accumulators; every pair calls
``npu_fusion_attention_grad_v2`` with this rank's *global* statistics and output, which makes
each pair's dq/dk/dv an exact partial sum.

Sharding: the global sequence is cut into C equal chunks; "zigzag" (C = 2W) gives rank r chunks
r and 2W-1-r (balances causal work), "contiguous" (C = W) gives chunk r. A rank's rows are its
chunks in increasing global order.

Dropout (keep_prob < 1): pair (query chunk a, key chunk b) of the global C x C chunk grid uses
semantics §5's generated mask with the call's seed and offset + (a*C + b) * B*N1*cq*pad16(ck) (the
pair's element count in the padded numbering, a multiple of 16, so pairs use disjoint Philox
counters), elements numbered inside the pair as in semantics §5. The masks are a deterministic
function of (seed, offset, W, load_balance), the same in forward and backward, but differ from
the single-process op's mask for the same seed (semantics §5's element numbering is global). With
seed == 0 every rank draws (seed, offset) from its emulated NPU generator
(``philox_engine_inputs(10)``, as the local op would) and rank 0's pair is broadcast.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..api import npu_fusion_attention_grad_v2, npu_fusion_attention_v2
from ..canonical.layouts import from_bnsd, to_bnsd
from ..errors import invalid
from ..limits import FLT_MAX
from ..rng.generator import default_generator
from ..rng.philox import pad16
from ..spec import build_problem
from .merge import _weights

__all__ = ["shard", "unshard", "ring_attention", "pair_dropout_offset", "LOAD_BALANCES"]

LOAD_BALANCES = ("zigzag", "contiguous")
_SEQ_DIM = {"BSH": 1, "SBH": 0, "BSND": 1, "BNSD": 2}
_INT32_MAX = 2147483647
_UNBOUNDED = 1 << 40
_TAG_KV, _TAG_DKV = 11, 12

# npu_fusion_attention_v2 keywords a ring can honour, and those it cannot split.
_PASS = ("scale", "keep_prob", "inner_precise", "seed", "offset", "pse", "pse_type", "q_start_idx",
         "kv_start_idx", "atten_mask", "sparse_mode", "pre_tokens", "next_tokens", "padding_mask",
         "gen_mask_parallel", "sync", "softmax_layout")
_CANNOT_SPLIT = {
    "query_rope": "query_rope/key_rope are not supported by ring_attention",
    "key_rope": "query_rope/key_rope are not supported by ring_attention",
    "prefix": "prefix (sparse_mode 5/6) cannot be split across a ring",
    "actual_seq_qlen": "TND (varlen) cannot be split across a ring",
    "actual_seq_kvlen": "TND (varlen) cannot be split across a ring",
    "sink": "sink is not supported by ring_attention (it would join every step's softmax)",
    "dropout_mask": "an explicit dropout_mask holds global element indices; ring_attention generates "
                    "per-step masks (give keep_prob, seed, offset)",
}


# --------------------------------------------------------------------------- sharding
def _layout(input_layout: Any, what: str = "input_layout") -> str:
    if not isinstance(input_layout, str):
        raise invalid(f"{what}={input_layout!r}: must be one of BSH, SBH, BSND, BNSD")
    lay = input_layout.upper()
    if lay == "TND":
        raise invalid(f"{what}='TND': varlen sequences cannot be split by position; use BSH, SBH, BSND or BNSD")
    if lay not in _SEQ_DIM:
        raise invalid(f"{what}={input_layout!r}: must be one of BSH, SBH, BSND, BNSD")
    return lay


def _load_balance(load_balance: Any) -> str:
    if load_balance not in LOAD_BALANCES:
        raise invalid(f"load_balance={load_balance!r}: must be 'zigzag' or 'contiguous'")
    return load_balance


def _num_chunks(world_size: int, load_balance: str) -> int:
    return 2 * world_size if load_balance == "zigzag" else world_size


def _chunks_of(rank: int, world_size: int, load_balance: str) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in the order of its rows."""
    if load_balance == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def shard(x: Tensor, input_layout: str, rank: int, world_size: int, load_balance: str = "zigzag") -> Tensor:
    """This rank's part of a full-sequence tensor ``x`` in ``input_layout`` (a new tensor).

    The sequence axis (BSH/BSND: 1, SBH: 0, BNSD: 2; statistics [B, N, S, 8]: use "BNSD") is cut
    into 2W ("zigzag": rank r gets chunks r and 2W-1-r) or W ("contiguous": chunk r) equal chunks.
    """
    lay = _layout(input_layout)
    lb = _load_balance(load_balance)
    if not isinstance(x, Tensor):
        raise invalid(f"x={type(x).__name__}: must be a torch.Tensor")
    for name, v in (("world_size", world_size), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"{name}={v!r}: must be an int")
    if world_size < 1:
        raise invalid(f"world_size={world_size}: must be >= 1")
    if not 0 <= rank < world_size:
        raise invalid(f"rank={rank}: must be in [0, world_size={world_size})")
    dim = _SEQ_DIM[lay]
    if x.dim() <= dim:
        raise invalid(f"x shape {list(x.shape)}: layout {lay} has its sequence on axis {dim}")
    s, c = x.shape[dim], _num_chunks(world_size, lb)
    if s % c:
        raise invalid(f"x sequence length {s} (axis {dim} of {lay}): must be a multiple of {c} "
                      f"({lb} over world_size={world_size})")
    size = s // c
    return torch.cat([x.narrow(dim, i * size, size) for i in _chunks_of(rank, world_size, lb)], dim)


def unshard(shards: Any, input_layout: str, load_balance: str = "zigzag") -> Tensor:
    """The full-sequence tensor from the W shards ``shards[r]`` made by ``shard(x, ..., r, W)``."""
    lay = _layout(input_layout)
    lb = _load_balance(load_balance)
    if not isinstance(shards, (list, tuple)) or not shards or not all(isinstance(t, Tensor) for t in shards):
        raise invalid("shards: must be a non-empty list of tensors, one per rank")
    w = len(shards)
    dim = _SEQ_DIM[lay]
    shape = tuple(shards[0].shape)
    if any(tuple(t.shape) != shape for t in shards) or len(shape) <= dim:
        raise invalid(f"shards: all W={w} shards must have one shape with a sequence axis {dim} "
                      f"({lay}); got {[list(t.shape) for t in shards]}")
    per = len(_chunks_of(0, w, lb))
    if shape[dim] % per:
        raise invalid(f"shards: sequence length {shape[dim]} must be a multiple of {per} for {lb}")
    size = shape[dim] // per
    pieces: list[Tensor | None] = [None] * _num_chunks(w, lb)
    for r, t in enumerate(shards):
        for k, g in enumerate(_chunks_of(r, w, lb)):
            pieces[g] = t.narrow(dim, k * size, size)
    return torch.cat(pieces, dim)  # type: ignore[arg-type]


def pair_dropout_offset(offset: int, q_chunk: int, k_chunk: int, num_chunks: int, batch: int, n1: int,
                        cq: int, ck: int) -> int:
    """Philox offset of the (global query chunk, global key chunk) pair (see module docstring)."""
    return offset + (q_chunk * num_chunks + k_chunk) * batch * n1 * cq * pad16(ck)


# --------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    layout: str
    dim: int
    n1: int
    world: int
    rank: int
    lb: str
    nch: int
    cq: int  # query rows per chunk
    ck: int  # key rows per chunk
    lo: int  # global band: (i, j) takes part iff lo <= j - i <= hi
    hi: int
    mask: Tensor | None  # the user's compressed mask, for partial pairs
    common: dict  # keywords every pair gets
    alibi: bool
    qs: int
    ks: int
    keep_prob: float
    seed: int
    offset: int
    batch: int
    group: Any
    nxt: int  # global ranks of the ring neighbours
    prv: int
    dv: int = 0

    def own(self) -> tuple[int, ...]:
        return _chunks_of(self.rank, self.world, self.lb)

    def chunks(self, rank: int) -> tuple[int, ...]:
        return _chunks_of(rank, self.world, self.lb)

    def pair(self, gq: int, gk: int) -> dict | None:
        """Keywords of the local op for query chunk ``gq`` x key chunk ``gk``; None if fully masked."""
        cq, ck = self.cq, self.ck
        delta = gk * ck - gq * cq  # global j - i = local j' - i' + delta
        lo, hi = self.lo - delta, self.hi - delta
        if hi < -(cq - 1) or lo > ck - 1:
            return None
        kw = dict(self.common)
        if self.alibi:
            kw["q_start_idx"] = [self.qs + gq * cq]
            kw["kv_start_idx"] = [self.ks + gk * ck]
        if self.keep_prob < 1.0:
            kw["seed"] = self.seed
            kw["offset"] = pair_dropout_offset(self.offset, gq, gk, self.nch, self.batch, self.n1, cq, ck)
        if lo > -(cq - 1) or hi < ck - 1:
            # partial: the band through sparse_mode 4 (bottom-right origin d = ck - cq)
            lo, hi = max(lo, -cq), min(hi, ck)
            d = ck - cq
            kw.update(sparse_mode=4, atten_mask=self.mask, pre_tokens=d - lo, next_tokens=hi - d)
        return kw


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{name}={v!r}: must be an int")
    if not -_INT32_MAX - 1 <= v <= _INT32_MAX:
        raise invalid(f"{name}={v}: must be in int32 range")
    return v


def _band_rule(pre: int, nxt: int, d: int, sq: int, skv: int) -> None:
    """semantics §4 band rules on the global geometry, for sparse_mode 4 (top-left pre' = pre - d, next' = next + d)."""
    p, n = pre - d, nxt + d
    bad = None
    if p < 0 and n < 0:
        bad = "both negative"
    elif p < 0 and not (n >= -p and -p < skv):
        bad = f"pre'={p} < 0 needs next' >= {-p} and |pre'| < Skv={skv}"
    elif n < 0 and not (p >= -n and -n < sq):
        bad = f"next'={n} < 0 needs pre' >= {-n} and |next'| < Sq={sq}"
    if bad:
        raise invalid(f"sparse_mode=4: pre_tokens={pre} and next_tokens={nxt} over the global sequence "
                      f"(Sq={sq}, Skv={skv}; top-left pre'={p}, next'={n}) leave the band empty: {bad}")


def _group_info(group: Any) -> tuple[int, int, Any]:
    """(rank in group, world size, group); a single process when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise invalid("group is given but torch.distributed is not initialised")
        return 0, 1, None
    g = group if group is not None else dist.group.WORLD
    w = dist.get_world_size(g)
    r = dist.get_rank(g)
    if r < 0:
        raise invalid("this process is not a member of group")
    return r, w, g


def _make_plan(query: Tensor, key: Tensor, value: Tensor, head_num: Any, input_layout: Any, group: Any,
               load_balance: Any, kwargs: dict) -> _Plan:
    for k in kwargs:
        if k in _CANNOT_SPLIT:
            if kwargs[k] is not None:
                raise invalid(f"{k}: {_CANNOT_SPLIT[k]}")
        elif k not in _PASS:
            raise invalid(f"{k}: not a keyword of ring_attention (npu_fusion_attention_v2's keywords "
                          f"that a split sequence allows: {', '.join(_PASS)})")
    lay = _layout(input_layout)
    lb = _load_balance(load_balance)
    rank, world, g = _group_info(group)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise invalid(f"{name}={type(t).__name__}: must be a torch.Tensor")
    dim = _SEQ_DIM[lay]
    if query.dim() != key.dim() or query.dim() <= dim or key.dim() <= dim:
        raise invalid(f"query {list(query.shape)} / key {list(key.shape)}: layout {lay} needs "
                      f"{3 if lay in ('BSH', 'SBH') else 4}-D tensors")
    per = len(_chunks_of(0, world, lb))
    sq_l, skv_l = query.shape[dim], key.shape[dim]
    if sq_l % per or skv_l % per:
        raise invalid(f"query/key shard lengths {sq_l}/{skv_l}: {lb} shards hold {per} chunks, "
                      f"so each must be a multiple of {per}")
    cq, ck = sq_l // per, skv_l // per
    sq_g, skv_g = sq_l * world, skv_l * world
    d_g = skv_g - sq_g

    kw = dict(kwargs)
    if kw.get("softmax_layout", "") not in ("", None):
        raise invalid(f"softmax_layout={kw['softmax_layout']!r}: only '' (non-TND layouts)")
    kw.pop("softmax_layout", None)
    kw.pop("gen_mask_parallel", None)
    kw.pop("sync", None)
    mode = kw.pop("sparse_mode", 0)
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise invalid(f"sparse_mode={mode!r}: must be an int")
    mask = kw.pop("atten_mask", None)
    pre = _int(kw.pop("pre_tokens", _INT32_MAX), "pre_tokens")
    nxt = _int(kw.pop("next_tokens", _INT32_MAX), "next_tokens")
    lo, hi = -_UNBOUNDED, _UNBOUNDED
    if mode not in (0, 2, 3, 4):
        raise invalid(f"sparse_mode={mode}: ring_attention supports 0 (no mask), 2/3 (causal) and 4 (band) over "
                      "the global sequence; modes 1, 5-8 need masks or prefixes that cannot be split")
    if mask is None:
        if mode != 0:
            warnings.warn(f"sparse_mode={mode} without atten_mask: nothing is masked "
                          "(Ascend's rule: sparse_mode, pre/next tokens need a mask)", UserWarning, stacklevel=3)
    elif mode == 0:
        raise invalid("sparse_mode=0 with an atten_mask: a full [Sq, Skv] mask cannot be split across a ring; "
                      "use sparse_mode 2/3 (causal) or 4 (band) with the compressed mask")
    elif mode == 2:
        hi = 0
    elif mode == 3:
        hi = d_g
    else:
        _band_rule(pre, nxt, d_g, sq_g, skv_g)
        lo, hi = d_g - pre, d_g + nxt

    ptype = kw.get("pse_type", 1)
    pse = kw.get("pse")
    alibi = ptype in (2, 3) and not isinstance(ptype, bool)
    if pse is not None and not alibi:
        raise invalid(f"pse with pse_type={ptype!r}: a [.., Sq, Skv] bias tensor cannot be split across a ring; "
                      "ring_attention takes pse_type 2/3 (in-kernel ALiBi over global positions)")
    if alibi and sq_g != skv_g:
        raise invalid(f"pse_type={ptype} (in-kernel ALiBi) needs Sq == Skv, got global {sq_g} and {skv_g}")
    qs = ks = 0
    if alibi:
        for name in ("q_start_idx", "kv_start_idx"):
            v = kw.pop(name, None)
            if v is not None:
                if not isinstance(v, (list, tuple)) or not v:
                    raise invalid(f"{name}={v!r}: must be a non-empty list of ints or None")
                val = _int(v[0], name)
                if name == "q_start_idx":
                    qs = val
                else:
                    ks = val
    keep_prob = kw.get("keep_prob", 1.0)
    seed = kw.pop("seed", 0)
    offset = kw.pop("offset", 0)
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"{name}={v!r}: must be an int")
    common = kw  # scale, keep_prob, inner_precise, pse, pse_type, padding_mask (+ q/kv_start_idx if not ALiBi)

    if dist.is_available() and dist.is_initialized() and world > 1:
        nxt_rank = dist.get_global_rank(g, (rank + 1) % world)
        prv_rank = dist.get_global_rank(g, (rank - 1) % world)
    else:
        nxt_rank = prv_rank = 0
    plan = _Plan(lay, dim, 0, world, rank, lb, _num_chunks(world, lb), cq, ck, lo, hi, mask, common, alibi, qs, ks,
                 float(keep_prob) if isinstance(keep_prob, (int, float)) else 1.0, seed, offset,
                 query.shape[0] if lay != "SBH" else query.shape[1], g, nxt_rank, prv_rank)

    # Validate every argument once, before any communication, with the op's own rules: the
    # diagonal pair (partial under a mask) and the last pair (largest dropout offset / start index).
    q0, k0, v0 = query.narrow(dim, 0, cq), key.narrow(dim, 0, ck), value.narrow(dim, 0, ck)
    checks = [plan.pair(gq, gk) for gq, gk in ((0, 0), (plan.nch - 1, plan.nch - 1), (plan.nch - 1, 0))]
    checks = [c for c in checks if c is not None]
    if mask is not None:  # the compressed mask, whether or not a checked pair needs it
        checks.append(dict(common, atten_mask=mask, sparse_mode=3))
    for pkw in checks or [common]:
        prob = build_problem(q0, k0, v0, head_num, lay, draw_missing_seed=False, **pkw)
    plan.n1, plan.dv = prob.n1, prob.dv
    if plan.keep_prob < 1.0:
        last = pair_dropout_offset(offset, plan.nch - 1, plan.nch - 1, plan.nch, plan.batch, plan.n1, cq, ck)
        if last + (-(-plan.batch * plan.n1 * cq * ck // 4)) >= 2**63:
            raise invalid(f"offset={offset}: the ring's per-pair Philox offsets would pass 2**63")
    return plan


# --------------------------------------------------------------------------- communication
def _p2p(plan: _Plan, ops: list[tuple[str, Tensor, int]]) -> list[Any]:
    """Post sends (to the next rank) and receives (from the previous one) as one batch."""
    if not ops:
        return []
    p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t,
                      plan.nxt if kind == "send" else plan.prv, plan.group, tag) for kind, t, tag in ops]
    return dist.batch_isend_irecv(p2p)


def _wait(reqs: list[Any]) -> None:
    for r in reqs:
        r.wait()


def _pack(*ts: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in ts])


def _unpack(buf: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    out, o = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(buf[o:o + n].view(s))
        o += n
    return out


def _check_consistent(plan: _Plan, query: Tensor, key: Tensor, value: Tensor) -> None:
    """Every rank must run the same geometry and arguments (else a receive would mismatch)."""
    if plan.world == 1:
        return
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    sig = [len(query.shape), *query.shape, *key.shape, *value.shape, plan.cq, plan.ck, plan.lo % (1 << 62),
           plan.hi % (1 << 62), int(plan.keep_prob * 2**32), plan.seed % (1 << 62), plan.offset % (1 << 62),
           tuple(_SEQ_DIM).index(plan.layout), LOAD_BALANCES.index(plan.lb),
           dtypes.index(query.dtype) if query.dtype in dtypes else -1, int(plan.alibi), plan.qs, plan.ks]
    sig = (sig + [0] * 32)[:32]
    mine = torch.tensor(sig, dtype=torch.int64, device=query.device)
    allsig = [torch.empty_like(mine) for _ in range(plan.world)]
    dist.all_gather(allsig, mine, group=plan.group)
    for r, s in enumerate(allsig):
        if not torch.equal(s, mine):
            raise invalid(f"ring_attention: rank {r} of the group called with other shapes or arguments than "
                          f"rank {plan.rank} (shapes q {list(query.shape)}, k {list(key.shape)}, "
                          f"v {list(value.shape)})")


def _resolve_seed(plan: _Plan, device: torch.device) -> None:
    if plan.keep_prob >= 1.0 or plan.seed != 0:
        return
    seed, offset = default_generator(device).philox_engine_inputs(10)
    if plan.world > 1:
        t = torch.tensor([seed - (1 << 64) if seed >= 1 << 63 else seed, offset], dtype=torch.int64, device=device)
        dist.broadcast(t, dist.get_global_rank(plan.group, 0), group=plan.group)
        seed, offset = int(t[0]) % (1 << 64), int(t[1])
    plan.seed, plan.offset = seed, offset


# --------------------------------------------------------------------------- forward / backward
def _ring_forward(plan: _Plan, query: Tensor, key: Tensor, value: Tensor, head_num: int) -> tuple[Tensor, Tensor, Tensor]:
    dim, lay = plan.dim, plan.layout
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    own = plan.own()
    state: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(own)
    shapes = [key.shape, value.shape]
    kv = _pack(key, value)
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        reqs, kv_next = [], None
        if step < plan.world - 1:
            kv_next = torch.empty_like(kv)
            reqs = _p2p(plan, [("send", kv, _TAG_KV), ("recv", kv_next, _TAG_KV)])
        k_src, v_src = _unpack(kv, shapes)
        for a, gq in enumerate(own):
            q_a = query.narrow(dim, a * plan.cq, plan.cq)
            for b, gk in enumerate(plan.chunks(src)):
                kw = plan.pair(gq, gk)
                if kw is None:
                    continue
                o, m, l = npu_fusion_attention_v2(q_a, k_src.narrow(dim, b * plan.ck, plan.ck),
                                                  v_src.narrow(dim, b * plan.ck, plan.ck), head_num, lay, **kw)[:3]
                o, m, l = to_bnsd(o, lay, plan.n1).to(ct), m[..., 0].to(ct), l[..., 0].to(ct)
                if state[a] is None:
                    state[a] = (o, m, l)
                else:
                    o0, m0, l0 = state[a]
                    mm, w0, w1, ll = _weights(m0, l0, m, l)
                    state[a] = (o0 * w0.unsqueeze(-1) + o * w1.unsqueeze(-1), mm, ll)
        _wait(reqs)
        if kv_next is not None:
            kv = kv_next
    # chunks that no pair reached are invalid rows
    outs, ms, ls = [], [], []
    for st in state:
        if st is None:
            shape = (plan.batch, plan.n1, plan.cq)
            st = (torch.zeros(*shape, plan.dv, dtype=ct, device=query.device),
                  torch.full(shape, -FLT_MAX, dtype=ct, device=query.device),
                  torch.full(shape, FLT_MAX, dtype=ct, device=query.device))
        outs.append(st[0])
        ms.append(st[1])
        ls.append(st[2])
    out = from_bnsd(torch.cat(outs, 2).to(query.dtype), lay)
    smax = torch.cat(ms, 2).float().unsqueeze(-1).expand(-1, -1, -1, 8).contiguous()
    ssum = torch.cat(ls, 2).float().unsqueeze(-1).expand(-1, -1, -1, 8).contiguous()
    return out, smax, ssum


def _ring_backward(plan: _Plan, query: Tensor, key: Tensor, value: Tensor, out: Tensor, smax: Tensor,
                   ssum: Tensor, dout: Tensor, head_num: int) -> tuple[Tensor, Tensor, Tensor]:
    dim, lay = plan.dim, plan.layout
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    own = plan.own()
    dq = torch.zeros(query.shape, dtype=ct, device=query.device)
    shapes = [key.shape, value.shape]
    kv = _pack(key, value)
    nkv = kv.numel()
    acc: Tensor | None = None  # dK/dV accumulator of the shard held in the previous step
    for step in range(plan.world):
        src = (plan.rank - step) % plan.world
        ops: list[tuple[str, Tensor, int]] = []
        dkv_in, kv_next = None, None
        if step >= 1:
            dkv_in = torch.empty(nkv, dtype=ct, device=query.device)
            ops += [("send", acc, _TAG_DKV), ("recv", dkv_in, _TAG_DKV)]
        if step < plan.world - 1:
            kv_next = torch.empty_like(kv)
            ops += [("send", kv, _TAG_KV), ("recv", kv_next, _TAG_KV)]
        reqs = _p2p(plan, ops)
        k_src, v_src = _unpack(kv, shapes)
        local = torch.zeros(nkv, dtype=ct, device=query.device)
        dk_loc, dv_loc = _unpack(local, shapes)
        for a, gq in enumerate(own):
            rows = slice(a * plan.cq, (a + 1) * plan.cq)
            q_a = query.narrow(dim, a * plan.cq, plan.cq)
            for b, gk in enumerate(plan.chunks(src)):
                kw = plan.pair(gq, gk)
                if kw is None:
                    continue
                if "scale" in kw:
                    kw["scale_value"] = kw.pop("scale")
                g = npu_fusion_attention_grad_v2(
                    q_a, k_src.narrow(dim, b * plan.ck, plan.ck), v_src.narrow(dim, b * plan.ck, plan.ck),
                    dout.narrow(dim, a * plan.cq, plan.cq), head_num, lay,
                    softmax_max=smax[:, :, rows], softmax_sum=ssum[:, :, rows],
                    attention_in=out.narrow(dim, a * plan.cq, plan.cq), **kw)
                dq.narrow(dim, a * plan.cq, plan.cq).add_(g[0])
                dk_loc.narrow(dim, b * plan.ck, plan.ck).add_(g[1])
                dv_loc.narrow(dim, b * plan.ck, plan.ck).add_(g[2])
        _wait(reqs)
        if dkv_in is not None:
            local.add_(dkv_in)
        acc = local
        if kv_next is not None:
            kv = kv_next
    if plan.world > 1:
        final = torch.empty(nkv, dtype=ct, device=query.device)
        _wait(_p2p(plan, [("send", acc, _TAG_DKV), ("recv", final, _TAG_DKV)]))
        acc = final
    dk, dv = _unpack(acc, shapes)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, head_num: int, query: Tensor, key: Tensor,
                value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, smax, ssum = _ring_forward(plan, query, key, value, head_num)
        ctx.mark_non_differentiable(smax, ssum)
        ctx.save_for_backward(query, key, value, out, smax, ssum)
        ctx.plan, ctx.head_num = plan, head_num
        return out, smax, ssum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor, _dmax: Any, _dsum: Any) -> tuple[Any, ...]:
        query, key, value, out, smax, ssum = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.plan, query, key, value, out, smax, ssum, dout.contiguous(), ctx.head_num)
        return None, None, dq, dk, dv


def ring_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, *,
                   group: Any = None, load_balance: str = "zigzag", **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of this rank's query rows over the whole sequence of the process group.

    ``query``/``key``/``value`` are this rank's shards (``shard(x, layout, rank, W, load_balance)``)
    in ``input_layout`` (BSH, SBH, BSND, BNSD; GQA allowed). Returns ``(attention_out,
    softmax_max, softmax_sum)`` for the local rows (statistics float32 [B, N1, S_local, 8]), equal
    to the rows of single-process ``npu_fusion_attention_v2`` on the full sequence; differentiable
    w.r.t. query, key and value (gradients flow to every rank's shards through the ring).

    ``kwargs`` are npu_fusion_attention_v2's that a split sequence allows: ``scale``,
    ``inner_precise``, ``keep_prob`` with ``seed``/``offset`` (per-pair Philox masks, see the
    module docstring), ``sparse_mode`` 0 without ``atten_mask`` (full), 2/3 with the compressed
    mask (causal over the global sequence), 4 with the compressed mask and ``pre_tokens``/
    ``next_tokens`` (band over the global sequence), ``pse`` slopes with ``pse_type`` 2/3 (ALiBi over
    global positions; ``q_start_idx``/``kv_start_idx`` add to them). Anything that cannot be split
    (a full atten_mask, pse tensors, prefix, sink, rope, TND, an explicit dropout_mask) raises
    ``FlashAttentionError``. Without an initialised process group it runs as a group of one.
    Every rank of ``group`` must call it with the same shapes and arguments.
    """
    plan = _make_plan(query, key, value, head_num, input_layout, group, load_balance, kwargs)
    _check_consistent(plan, query, key, value)
    _resolve_seed(plan, query.device)
    return _RingAttention.apply(plan, head_num, query, key, value)
