"""The Triton engine: FlashAttention-2 style kernels for CUDA (and CPU under ``TRITON_INTERPRET=1``).

The engine contract is ``reference.py``'s: ``forward(seg, prob)``, ``backward(seg, prob, dy, out,
m, l, dpse, dsink)``, ``workspace_bytes(seg, prob, backward)``; plus ``not_supported_reasons(seg,
prob)`` (empty: this engine can run the segment), ``available()`` and the whole-problem hooks
``supports_all(prob)`` / ``forward_all(prob)`` / ``backward_all(prob, dy, attention_in,
softmax_max, softmax_sum)`` that run every TND batch in one launch (a segment table) and write the
caller's layout directly.

Kernels (``kernels.py``): one forward kernel, backward as row preprocessing, a dK/dV kernel and a
dQ kernel (deterministic: fixed loop orders, no atomics), and a dpse kernel that sums the bias
gradient over every position that reads each pse entry. Configurations come from
``configs.TABLE`` (no autotuning).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import _adapter as fa

try:  # triton is optional: the engine reports itself unavailable without it
    import triton

    from . import configs, kernels

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    configs = kernels = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_INT_BOUND = 1 << 30  # |j - i| < 2**21 for every valid geometry: band limits fit int32 once clamped
_MAX_HEAD = 256
_GRID_Y = 32768


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def available() -> bool:
    """triton imports and there is somewhere to run: a CUDA device of sm_80+ or the interpreter."""
    if triton is None:
        return False
    if interpreting():
        return True
    if not torch.cuda.is_available():
        return False
    return configs.arch_of(torch.cuda.get_device_capability()) is not None


def _arch(device: torch.device) -> str | None:
    if device.type == "cpu":
        return "interp" if interpreting() else None
    if device.type == "cuda":
        return configs.arch_of(torch.cuda.get_device_capability(device))
    return None


def not_supported_reasons(seg: fa.Segment, prob: fa.Problem) -> list[str]:
    """Why this engine cannot run ``seg`` (forward and backward); empty if it can."""
    if triton is None:
        return [f"triton not importable ({_IMPORT_ERROR})"]
    reasons = []
    dev = seg.q.device
    if dev.type == "cpu" and not interpreting():
        reasons.append("device cpu (set TRITON_INTERPRET=1)")
    elif dev.type == "cuda" and _arch(dev) is None:
        reasons.append(f"device {dev}: compute capability {torch.cuda.get_device_capability(dev)} < 8.0")
    elif dev.type not in ("cpu", "cuda"):
        reasons.append(f"device {dev.type}")
    if prob.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {str(prob.dtype).replace('torch.', '')}")
    elif prob.dtype == torch.bfloat16 and dev.type == "cpu":
        reasons.append("dtype bfloat16 under TRITON_INTERPRET (its bf16 tl.dot is wrong: triton#11584)")
    d, dv = seg.q.shape[-1], seg.v.shape[-1]
    if d > _MAX_HEAD or dv > _MAX_HEAD:
        reasons.append(f"head dim D={d}, Dv={dv}: more than {_MAX_HEAD}")
    dr = seg.dropout
    if dr is not None:
        if not hasattr(dr, "row"):
            reasons.append("dropout: the segment's Dropout predates semantics §5's Ascend model")
        elif dr.bits is None and (dr.row % 16 or any(x % 16 for x in dr.base)):
            reasons.append("dropout: generated-mask rows not aligned to 16 elements")
        elif len(dr.base) > 1 and any(dr.base[x] - dr.base[x - 1] != dr.base[1] - dr.base[0]
                                      for x in range(2, len(dr.base))):
            reasons.append("dropout: batch bases not evenly spaced")
        if dr.sq != seg.q.shape[2]:
            reasons.append("dropout: rows differ from the segment's")
    ex = seg.mask.explicit
    if ex is not None and ex.dtype not in (torch.bool, torch.uint8):
        reasons.append(f"explicit mask dtype {ex.dtype}")
    return reasons


# --------------------------------------------------------------------------- helpers
def _config(device: torch.device, dtype: torch.dtype, d: int, dv: int) -> "configs.Config":
    arch = _arch(device)
    cfg = configs.current_override() or (configs.lookup(arch, dtype != torch.float32, max(d, dv)) if arch else None)
    if cfg is None:
        raise RuntimeError(f"triton engine: no kernel configuration for {device}, {dtype}, D={d}, Dv={dv}")
    return cfg


def _prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None


def _grid_bh(bh: int) -> tuple[int, int]:
    return min(bh, _GRID_Y), -(-bh // _GRID_Y)


def _clamp(x: int) -> int:
    return max(-_INT_BOUND, min(_INT_BOUND, int(x)))


def _bstride(t: Tensor, dim: int) -> int:
    """Stride of ``dim``, 0 where the size is 1 (broadcast)."""
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _csr(kinds: Tensor, transpose: bool, bn: int, skv: int) -> tuple[Tensor, Tensor]:
    """Non-empty tiles of a block plan per row (per column if ``transpose``) as (ptr, blocks):
    row r's FULL tiles are blocks[ptr[2r]:ptr[2r+1]], its PARTIAL ones blocks[ptr[2r+1]:ptr[2r+2]],
    each in increasing order. Tiles cut by the end of the keys count as PARTIAL (bounds mask)."""
    k = kinds.clone()
    if skv % bn and k.shape[1]:
        last = k[:, -1]
        k[:, -1] = torch.where(last == fa.FULL, torch.full_like(last, fa.PARTIAL), last)
    k = k.t() if transpose else k
    full, part = k == fa.FULL, k == fa.PARTIAL
    counts = torch.stack([full.sum(1), part.sum(1)], 1).flatten()
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=k.device)
    ptr[1:] = counts.cumsum(0).to(torch.int32)
    r, c = (full | part).nonzero(as_tuple=True)
    key = (r * 2 + part[r, c].to(r.dtype)) * max(k.shape[1], 1) + c
    blocks = c[torch.argsort(key)].to(torch.int32)
    if blocks.numel() == 0:
        blocks = torch.zeros(1, dtype=torch.int32, device=k.device)
    return ptr, blocks


class _Args:
    """The launch arguments shared by the kernels for one segment (uniform batches)."""

    def __init__(self, seg: fa.Segment, prob: fa.Problem) -> None:
        q, k, v = seg.q, seg.k, seg.v
        self.b, self.n1, self.sq, self.d = q.shape
        self.n2, self.skv = k.shape[1], k.shape[2]
        self.dv = v.shape[-1]
        self.g = self.n1 // self.n2
        self.dev = q.device
        self.cfg = _config(self.dev, prob.dtype, self.d, self.dv)
        self.prec = _prec(prob.dtype)
        self.bd, self.bdv = configs.padded_dim(self.d), configs.padded_dim(self.dv)
        mask = seg.mask
        self.mask = mask
        self.lo, self.hi = _clamp(mask.lo), _clamp(mask.hi)
        self.pfx = (torch.tensor(mask.prefix, dtype=torch.int32, device=self.dev)
                    if mask.prefix is not None else None)
        ex = mask.explicit
        if ex is not None:
            ex = ex.view(torch.uint8) if ex.dtype == torch.bool else ex
            self.mk = ex
            self.mk_strides = (_bstride(ex, 0), _bstride(ex, 1), ex.stride(2), ex.stride(3))
        else:
            self.mk = None
            self.mk_strides = (0, 0, 0, 0)
        # pse
        pse = seg.pse
        self.pse_t = self.slope = None
        self.pse_kind, self.pre_scale = 0, False
        self.sp = (0, 0, 0, 0)
        self.ssl = (0, 0)
        self.pse_w = self.pse_thr = 0
        self.adelta = 0
        if isinstance(pse, fa.DensePse):
            t = pse.t
            self.pse_t, self.pse_kind, self.pre_scale = t, 1, bool(pse.pre_scale)
            self.sp = (_bstride(t, 0), t.stride(1), _bstride(t, 2), t.stride(3))
            self.pse_w = t.shape[3]
        elif isinstance(pse, fa.CompressedPse):
            t = pse.t
            self.pse_t, self.pse_kind, self.pre_scale = t, 3 if pse.tnd else 2, bool(pse.pre_scale)
            self.sp = (_bstride(t, 0), t.stride(1), t.stride(2), t.stride(3))
            self.pse_w = t.shape[3]
            self.pse_thr = pse.sq - 1024
        elif isinstance(pse, fa.AlibiPse):
            s = pse.slopes.to(device=self.dev, dtype=torch.float32)
            self.slope, self.pse_kind = s, 5 if pse.sqrt else 4
            self.ssl = (_bstride(s, 0), s.stride(1))
            self.adelta = int(pse.ks) - int(pse.qs)
        self.sink = prob.sink.to(self.dev, torch.float32).contiguous() if prob.sink is not None else None
        # dropout
        dr = seg.dropout
        self.drop, self.bits = 0, None
        self.dbase0 = self.dstep = self.drow = 0
        self.ctr0 = self.seed = self.thr = 0
        self.inv_keep = 1.0
        if dr is not None:
            self.drop = 1 if dr.bits is not None else 2
            self.bits = dr.bits
            self.dbase0 = int(dr.base[0])
            self.dstep = int(dr.base[1] - dr.base[0]) if len(dr.base) > 1 else 0
            self.drow = int(dr.row)
            self.ctr0 = fa.counter_base(int(dr.offset))
            self.seed = int(dr.seed) % (1 << 64)
            self.thr = int(dr.threshold)
            self.inv_keep = 1.0 / float(dr.keep_prob)
        self.scale = float(prob.scale)
        self.split = prob.dtype != torch.float32

    # ----------------------------------------------------------------- pieces of the argument lists
    def common(self) -> dict:
        return dict(
            smk_b=self.mk_strides[0], smk_n=self.mk_strides[1], smk_i=self.mk_strides[2], smk_j=self.mk_strides[3],
            sp_b=self.sp[0], sp_n=self.sp[1], sp_i=self.sp[2], sp_j=self.sp[3],
            G=self.g, SQ=self.sq, SKV=self.skv, D=self.d, DV=self.dv, LO=self.lo, HI=self.hi,
            DBASE0=self.dbase0, DSTEP=self.dstep, DROW=self.drow,
            pse_w=self.pse_w, pse_thr=self.pse_thr, ctr0=self.ctr0, seed=self.seed, thr=self.thr,
            inv_keep=self.inv_keep, scale=self.scale,
            BD=self.bd, BDV=self.bdv, PSE_KIND=self.pse_kind, PRE_SCALE=self.pre_scale,
            HAS_MASK=self.mk is not None, HAS_PFX=self.pfx is not None, DROP=self.drop, PREC=self.prec,
        )

    def plan(self, bm: int, bn: int, transpose: bool) -> tuple[Tensor | None, Tensor | None]:
        if self.mk is None:
            return None, None
        kinds = fa.plan_blocks(self.mask, bm, bn, self.dev)
        return _csr(kinds, transpose, bn, self.skv)

    @property
    def reverse(self) -> bool:
        return self.hi < self.skv - 1  # the band cuts the right side: later rows are longer


def _strides4(t: Tensor, varlen: object = None) -> tuple[int, int, int, int]:
    """Strides of a [B, N, S, D] view; a VARLEN launch indexes batches by table rows, not strides."""
    st = tuple(t.stride())
    return (0,) + st[1:] if varlen is not None else st  # type: ignore[return-value]


# --------------------------------------------------------------------------- forward
def forward(seg: fa.Segment, prob: fa.Problem) -> tuple[Tensor, Tensor, Tensor]:
    a = _Args(seg, prob)
    out = torch.empty(a.b, a.n1, a.sq, a.dv, dtype=torch.float32, device=a.dev)
    m = torch.empty(a.b, a.n1, a.sq, dtype=torch.float32, device=a.dev)
    l = torch.empty_like(m)
    if a.sq == 0 or a.b * a.n1 == 0:
        return out, m, l
    if a.skv == 0:
        return out.zero_(), *_empty_rows(m, l, a.sink)
    _launch_fwd(a, seg.q, seg.k, seg.v, out, m, l, (m.stride(0), m.stride(1), m.stride(2)), 1)
    return out, m, l


def _empty_rows(m: Tensor, l: Tensor, sink: Tensor | None) -> tuple[Tensor, Tensor]:
    if sink is None:
        return m.fill_(-fa.FLT_MAX), l.fill_(fa.FLT_MAX)
    m.copy_(sink.view(1, -1, 1).expand_as(m))
    return m, l.fill_(1.0)


def _launch_fwd(a: _Args, q: Tensor, k: Tensor, v: Tensor, out: Tensor, m: Tensor, l: Tensor,
                sm: tuple[int, int, int], copies: int, *, tab: Tensor | None = None, nb: int | None = None,
                sq_max: int | None = None, plan: tuple | None = None) -> None:
    t = a.cfg.fwd
    nb = a.b if nb is None else nb
    gy, gz = _grid_bh(nb * a.n1)
    pptr, pkb = plan if plan is not None else a.plan(t.bm, t.bn, False)
    grid = (triton.cdiv(sq_max if sq_max is not None else a.sq, t.bm), gy, gz)
    kernels.fwd_kernel[grid](
        q, k, v, out, m, l, tab, a.pfx, a.mk, pptr, pkb, a.pse_t, a.slope, a.sink, a.bits,
        *_strides4(q, tab), *_strides4(k, tab), *_strides4(v, tab), *_strides4(out, tab), *sm,
        ssl_b=a.ssl[0], ssl_n=a.ssl[1], NBH=nb * a.n1, N1=a.n1, ADELTA=a.adelta,
        BM=t.bm, BN=t.bn, HAS_SINK=a.sink is not None, VARLEN=tab is not None, COPIES=copies,
        REVERSE=a.reverse, SPLIT_P=a.split, num_warps=t.warps, num_stages=t.stages, **a.common())


# --------------------------------------------------------------------------- backward
def backward(seg: fa.Segment, prob: fa.Problem, dy: Tensor, out: Tensor, m: Tensor, l: Tensor,
             dpse: Tensor | None, dsink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    a = _Args(seg, prob)
    dq = torch.zeros(a.b, a.n1, a.sq, a.d, dtype=torch.float32, device=a.dev)
    dk = torch.zeros(a.b, a.n2, a.skv, a.d, dtype=torch.float32, device=a.dev)
    dvv = torch.zeros(a.b, a.n2, a.skv, a.dv, dtype=torch.float32, device=a.dev)
    if a.sq == 0 or a.skv == 0 or a.b * a.n1 == 0:
        return dq, dk, dvv
    dy = dy if dy.dtype == prob.dtype else dy.to(prob.dtype)
    rm, ri, rr = _launch_pre(a, dy, out, m, l)
    if dsink is not None and a.sink is not None:
        _add_dsink(dsink, a.sink, m, l, rr.view(a.n1, a.b, a.sq).permute(1, 0, 2))
    _launch_bwd(a, seg.q, seg.k, seg.v, dy, dq, dk, dvv, rm, ri, rr, a.b * a.sq, a.sq)
    if dpse is not None and a.pse_kind in (1, 2, 3):
        _launch_dpse(a, seg.q, seg.k, seg.v, dy, dpse, rm, ri, rr)
    return dq, dk, dvv


def _add_dsink(dsink: Tensor, sink: Tensor, m: Tensor, l: Tensor, r: Tensor) -> None:
    """dsink += -sum_{b, i} P_sink * R (a fixed-order torch reduction)."""
    p_sink = torch.exp(sink.view(1, -1, 1) - m.float()) / l.float()
    dsink += (-(p_sink * r)).sum((0, 2)).to(dsink.dtype)


def _launch_pre(a: _Args, dy: Tensor, out: Tensor, m: Tensor, l: Tensor, *, tab: Tensor | None = None,
                nb: int | None = None, rows: int | None = None, sq_max: int | None = None,
                sm: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    nb = a.b if nb is None else nb
    rows = a.b * a.sq if rows is None else rows
    rm = torch.empty(a.n1, rows, dtype=torch.float32, device=a.dev)
    ri, rr = torch.empty_like(rm), torch.empty_like(rm)
    t = a.cfg.pre
    gy, gz = _grid_bh(nb * a.n1)
    sm = sm if sm is not None else (m.stride(0), m.stride(1), m.stride(2))
    kernels.bwd_pre_kernel[(triton.cdiv(sq_max or a.sq, t.bm), gy, gz)](
        dy, out, m, l, rm, ri, rr, tab, *_strides4(dy, tab), *_strides4(out, tab), *sm,
        NBH=nb * a.n1, N1=a.n1, SQ=a.sq, DV=a.dv, r_n=rows, r_b=0 if tab is not None else a.sq,
        HAS_SINK=a.sink is not None, VARLEN=tab is not None, BM=t.bm, BDV=a.bdv,
        num_warps=t.warps, num_stages=t.stages)
    return rm, ri, rr


def _launch_bwd(a: _Args, q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dq: Tensor, dk: Tensor, dvv: Tensor,
                rm: Tensor, ri: Tensor, rr: Tensor, r_n: int, r_b: int, *, tab: Tensor | None = None,
                nb: int | None = None, sq_max: int | None = None, skv_max: int | None = None,
                plans: tuple | None = None) -> None:
    nb = a.b if nb is None else nb
    com = a.common()
    tk, tq = a.cfg.kv, a.cfg.q
    tab_kv, tab_q = tab if isinstance(tab, tuple) else (tab, tab)
    kv_plan = plans[0] if plans is not None else a.plan(tk.bm, tk.bn, True)
    q_plan = plans[1] if plans is not None else a.plan(tq.bm, tq.bn, False)
    gy, gz = _grid_bh(nb * a.n2)
    kernels.bwd_kv_kernel[(triton.cdiv(skv_max or a.skv, tk.bn), gy, gz)](
        q, k, v, dy, dk, dvv, rm, ri, rr, tab_kv, a.pfx, a.mk, kv_plan[0], kv_plan[1], a.pse_t, a.slope, a.bits,
        *_strides4(q, tab_kv), *_strides4(k, tab_kv), *_strides4(v, tab_kv), *_strides4(dy, tab_kv),
        *_strides4(dk, tab_kv), *_strides4(dvv, tab_kv),
        r_n=r_n, r_b=r_b, ssl_b=a.ssl[0], ssl_n=a.ssl[1], NBH=nb * a.n2, N1=a.n1, N2=a.n2, ADELTA=a.adelta,
        plan_nq=0, BM=tk.bm, BN=tk.bn, VARLEN=tab_kv is not None, num_warps=tk.warps, num_stages=tk.stages, **com)
    gy, gz = _grid_bh(nb * a.n1)
    kernels.bwd_q_kernel[(triton.cdiv(sq_max or a.sq, tq.bm), gy, gz)](
        q, k, v, dy, dq, rm, ri, rr, tab_q, a.pfx, a.mk, q_plan[0], q_plan[1], a.pse_t, a.slope, a.bits,
        *_strides4(q, tab_q), *_strides4(k, tab_q), *_strides4(v, tab_q), *_strides4(dy, tab_q), *_strides4(dq, tab_q),
        r_n=r_n, r_b=r_b, ssl_b=a.ssl[0], ssl_n=a.ssl[1], NBH=nb * a.n1, N1=a.n1, ADELTA=a.adelta,
        BM=tq.bm, BN=tq.bn, VARLEN=tab_q is not None, REVERSE=a.reverse, num_warps=tq.warps,
        num_stages=tq.stages, **com)


def _launch_dpse(a: _Args, q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dpse: Tensor, rm: Tensor, ri: Tensor,
                 rr: Tensor, r_n: int | None = None, r_b: int | None = None) -> None:
    """dpse (pse-shaped float32 buffer, added into) for a uniform segment."""
    t = a.cfg.pse
    bm = bn = t.bm
    kind = a.pse_kind
    if kind == 1:
        mode = 1 if a.pse_t.shape[2] == 1 and a.sq > 1 else 0
    else:
        mode = 2 if kind == 2 else 3
    if mode == 0:
        nr, nc, chain = triton.cdiv(a.sq, bm), triton.cdiv(a.skv, bn), 1
    elif mode == 1:
        nr, nc, chain = 1, triton.cdiv(a.skv, bn), triton.cdiv(a.sq, bm)
    elif mode == 2:
        nr, nc, chain = 1024 // bm, triton.cdiv(a.pse_w, bn), triton.cdiv(a.pse_thr, 1024) + 1
    else:
        nr, nc, chain = 1, triton.cdiv(a.pse_w, bn), triton.cdiv(a.sq, bm)
    batch_sum = dpse.shape[0] == 1 and a.b > 1
    npb = 1 if dpse.shape[0] == 1 else a.b
    com = a.common()
    com.pop("G")
    kernels.bwd_pse_kernel[(nr, nc, npb * a.n1)](
        q, k, v, dy, dpse, rm, ri, rr, a.pfx, a.mk, a.pse_t, a.bits,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dy),
        dpse.stride(0) if dpse.shape[0] > 1 else 0, dpse.stride(1), dpse.stride(2), dpse.stride(3),
        a.b * a.sq if r_n is None else r_n, a.sq if r_b is None else r_b, NB=a.b, N1=a.n1, G=a.g, n_chain=chain, BM=bm, BN=bn, MODE=mode, BATCH_SUM=batch_sum,
        BJ=bm + bn if mode == 3 else bn, DC=t.dim_chunk(a.bd), DCV=t.dim_chunk(a.bdv), num_warps=t.warps, num_stages=t.stages, **com)


def workspace_bytes(seg: fa.Segment, prob: fa.Problem, backward: bool) -> int:
    """Scratch bytes: float32 outputs and statistics (forward); float32 gradients and three float32
    row vectors per query row (backward); the block plans of an explicit mask."""
    b, n1, sq, d = seg.q.shape
    n2, skv, dv = seg.k.shape[1], seg.k.shape[2], seg.v.shape[-1]
    rows = b * n1 * sq
    plan = 0
    if seg.mask.explicit is not None:
        plan = 3 * 4 * (-(-sq // 16)) * (-(-skv // 16))
    if not backward:
        return rows * (dv + 2) * 4 + plan
    return (rows * d + b * n2 * skv * (d + dv) + 3 * rows) * 4 + plan


# --------------------------------------------------------------------------- whole-problem hooks
def supports_all(prob: fa.Problem) -> bool:
    """Can ``forward_all`` / ``backward_all`` run ``prob`` (every segment supported)?"""
    if triton is None or not prob.segments:
        return False
    return all(not not_supported_reasons(s, prob) for s in prob.segments)


def _elem_offset(t: Tensor | None, base: Tensor | None) -> int:
    if t is None or base is None:
        return 0
    if (t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
            or t.stride()[-2:] != base.stride()[-2:]):
        raise ValueError("segment tensors are not views of one tensor")
    return t.storage_offset() - base.storage_offset()


class _Table:
    """The segment table of a TND problem: one int64 row of ``kernels.NF`` fields per batch."""

    def __init__(self, prob: fa.Problem, a: _Args) -> None:
        segs = prob.segments
        self.segs, self.nb = segs, len(segs)
        self.sq_max = max(s.q.shape[2] for s in segs)
        self.skv_max = max(s.k.shape[2] for s in segs)
        s0 = segs[0]
        mk0 = s0.mask.explicit
        pse0 = s0.pse.t if isinstance(s0.pse, (fa.DensePse, fa.CompressedPse)) else None
        sl0 = s0.pse.slopes if isinstance(s0.pse, fa.AlibiPse) else None
        rows = []
        for s in segs:
            bt = s.batch
            mk = s.mask.explicit
            pse_off = (_elem_offset(s.pse.t, pse0) if pse0 is not None
                       else _elem_offset(s.pse.slopes, sl0) if sl0 is not None else 0)
            dr = s.dropout
            alibi = int(s.pse.ks) - int(s.pse.qs) if isinstance(s.pse, fa.AlibiPse) else 0
            rows.append([bt.q0, bt.k0, bt.sq, bt.skv, _clamp(s.mask.lo), _clamp(s.mask.hi),
                         s.mask.prefix[0] if s.mask.prefix else 0, _elem_offset(mk, mk0), 0, alibi,
                         int(dr.base[0]) if dr is not None else 0, int(dr.row) if dr is not None else 0,
                         0, 0, 0, pse_off])
        self.rows = torch.tensor(rows, dtype=torch.int64)
        self.a = a

    def tab(self, stats: tuple[int, int] | None = None, plan: tuple[int, int, bool] | None = None
            ) -> tuple[Tensor, tuple | None]:
        """The table on the device, with the statistics offsets for ``stats`` = (N1, layout TND?)
        and the concatenated block plans for tiles ``plan`` = (bm, bn, transpose)."""
        r = self.rows.clone()
        if stats is not None:
            n1, tnd_layout = stats
            if tnd_layout:
                r[:, 12] = r[:, 0] * n1 * 8
            else:
                r[:, 12] = r[:, 0] * n1 * 8
                r[:, 13] = r[:, 2] * 8
        plans = None
        if plan is not None and self.a.mk is not None:
            bm, bn, transpose = plan
            ptrs, codes, p_off, c_off = [], [], 0, 0
            for x, s in enumerate(self.segs):
                kinds = fa.plan_blocks(s.mask, bm, bn, self.a.dev)
                ptr, code = _csr(kinds, transpose, bn, s.k.shape[2])
                r[x, 14] = p_off
                ptrs.append(ptr + c_off)
                n_codes = int(ptr[-1])
                codes.append(code[:n_codes])
                p_off += ptr.numel()
                c_off += n_codes
            codes_t = torch.cat(codes) if c_off else torch.zeros(1, dtype=torch.int32, device=self.a.dev)
            plans = (torch.cat(ptrs), codes_t)
        return r.to(self.a.dev), plans


def _rope_cat(x: Tensor, r: Tensor | None) -> Tensor:
    return x if r is None else torch.cat([x, r], -1)


def forward_all(prob: fa.Problem) -> tuple[Tensor, Tensor, Tensor]:
    """(attention_out, softmax_max, softmax_sum) of the whole problem in the caller's layout and
    dtypes, every batch in one launch; the kernel writes the caller's tensors directly."""
    dev = prob.device
    query, key, value = prob.inputs
    rq, rk = prob.rope if prob.rope is not None else (None, None)
    if prob.layout != "TND":
        (seg,) = prob.segments
        a = _Args(seg, prob)
        out = torch.empty(prob.out_shape, dtype=prob.dtype, device=dev)
        smax = torch.empty(prob.stats_shape, dtype=torch.float32, device=dev)
        ssum = torch.empty_like(smax)
        o4 = fa.to_bnsd(out, prob.layout, prob.n1)
        if a.sq == 0 or a.b * a.n1 == 0:
            return out, smax, ssum
        if a.skv == 0:
            o4.zero_()
            _empty_rows(smax[..., 0], ssum[..., 0], a.sink)
            smax.copy_(smax[..., :1].expand_as(smax))
            ssum.copy_(ssum[..., :1].expand_as(ssum))
            return out, smax, ssum
        _launch_fwd(a, seg.q, seg.k, seg.v, o4, smax, ssum, (smax.stride(0), smax.stride(1), smax.stride(2)), 8)
        return out, smax, ssum
    out = torch.zeros(prob.out_shape, dtype=prob.dtype, device=dev)
    smax = torch.zeros(prob.stats_shape, dtype=torch.float32, device=dev)
    ssum = torch.zeros_like(smax)
    if not prob.segments:
        return out, smax, ssum
    a = _Args(prob.segments[0], prob)
    table = _Table(prob, a)
    t = a.cfg.fwd
    tab, plan = table.tab((prob.n1, prob.softmax_layout == "TND"), (t.bm, t.bn, False))
    q = _rope_cat(query, rq).unsqueeze(0).transpose(1, 2)  # [1, N1, T1, D]: batch stride unused
    k = _rope_cat(key, rk).unsqueeze(0).transpose(1, 2)
    v = value.unsqueeze(0).transpose(1, 2)
    o4 = out.unsqueeze(0).transpose(1, 2)
    sm = (0, 8, prob.n1 * 8) if prob.softmax_layout == "TND" else (0, 0, 8)
    a.mk_strides = (0,) + a.mk_strides[1:]
    a.sp = (1 if a.pse_t is not None else 0,) + a.sp[1:]
    a.ssl = (1 if a.slope is not None else 0, a.ssl[1])
    _launch_fwd(a, q, k, v, o4, smax, ssum, sm, 8, tab=tab, nb=table.nb, sq_max=table.sq_max,
                plan=plan if plan is not None else (None, None))
    return out, smax, ssum


def backward_all(prob: fa.Problem, dy: Tensor, attention_in: Tensor, softmax_max: Tensor, softmax_sum: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """(dq, dk, dv, dpse, dsink, dq_rope, dk_rope) of the whole problem in the caller's layout and
    dtypes (``api.run_backward``'s contract), every batch in one launch per kernel."""
    dev, d = prob.device, prob.d
    query, key, value = prob.inputs
    rq, rk = prob.rope if prob.rope is not None else (None, None)
    dpse = torch.zeros(prob.pse.shape, dtype=torch.float32, device=dev) if prob.pse is not None else None
    dsink = torch.zeros(prob.n1, dtype=torch.float32, device=dev) if prob.sink is not None else None
    rope = prob.rope is not None
    if prob.layout != "TND":
        (seg,) = prob.segments
        dy4 = fa.to_bnsd(dy, prob.layout, prob.n1)
        o4 = fa.to_bnsd(attention_in, prob.layout, prob.n1)
        dq, dk, dv = backward(seg, prob, dy4, o4, softmax_max[..., 0], softmax_sum[..., 0], dpse, dsink)
        outs = [fa.from_bnsd(dq[..., :d].to(prob.dtype), prob.layout), fa.from_bnsd(dk[..., :d].to(prob.dtype), prob.layout),
                fa.from_bnsd(dv.to(prob.dtype), prob.layout)]
        dqr = fa.from_bnsd(dq[..., d:].to(prob.dtype), prob.layout) if rope else None
        dkr = fa.from_bnsd(dk[..., d:].to(prob.dtype), prob.layout) if rope else None
    else:
        t1, t2 = query.shape[0], key.shape[0]
        dq_b = torch.zeros(t1, prob.n1, d + prob.dr, dtype=prob.dtype if not rope else torch.float32, device=dev)
        dk_b = torch.zeros(t2, prob.n2, d + prob.dr, dtype=prob.dtype if not rope else torch.float32, device=dev)
        dv_b = torch.zeros(t2, prob.n2, prob.dv, dtype=prob.dtype, device=dev)
        if prob.segments:
            _backward_tnd(prob, dy, attention_in, softmax_max, softmax_sum, dq_b, dk_b, dv_b, dpse, dsink)
        outs = [dq_b[..., :d].to(prob.dtype).contiguous(), dk_b[..., :d].to(prob.dtype).contiguous(), dv_b]
        dqr = dq_b[..., d:].to(prob.dtype).contiguous() if rope else None
        dkr = dk_b[..., d:].to(prob.dtype).contiguous() if rope else None
    dpse_out = dpse.to(prob.pse.dtype) if dpse is not None else None
    dsink_out = dsink if dsink is not None else torch.empty(0, dtype=torch.float32, device=dev)
    return outs[0], outs[1], outs[2], dpse_out, dsink_out, dqr, dkr


def _backward_tnd(prob: fa.Problem, dy: Tensor, attention_in: Tensor, smax: Tensor, ssum: Tensor,
                  dq_b: Tensor, dk_b: Tensor, dv_b: Tensor, dpse: Tensor | None, dsink: Tensor | None) -> None:
    query, key, value = prob.inputs
    rq, rk = prob.rope if prob.rope is not None else (None, None)
    a = _Args(prob.segments[0], prob)
    table = _Table(prob, a)
    t1 = query.shape[0]
    tab, _ = table.tab((prob.n1, prob.softmax_layout == "TND"))
    sm = (0, 8, prob.n1 * 8) if prob.softmax_layout == "TND" else (0, 0, 8)
    dy = dy if dy.dtype == prob.dtype else dy.to(prob.dtype)
    dy4 = dy.unsqueeze(0).transpose(1, 2)
    o4 = attention_in.unsqueeze(0).transpose(1, 2)
    rm = torch.zeros(prob.n1, t1, dtype=torch.float32, device=a.dev)
    ri, rr = torch.zeros_like(rm), torch.zeros_like(rm)
    t = a.cfg.pre
    gy, gz = _grid_bh(table.nb * a.n1)
    kernels.bwd_pre_kernel[(triton.cdiv(table.sq_max, t.bm), gy, gz)](
        dy4, o4, smax, ssum, rm, ri, rr, tab, *_strides4(dy4, tab), *_strides4(o4, tab), *sm,
        NBH=table.nb * a.n1, N1=a.n1, SQ=0, DV=a.dv, r_n=t1, r_b=0, HAS_SINK=a.sink is not None, VARLEN=True,
        BM=t.bm, BDV=a.bdv, num_warps=t.warps, num_stages=t.stages)
    if dsink is not None and a.sink is not None:
        p_sink = torch.exp(a.sink.view(-1, 1) - rm) * ri
        dsink += (-(p_sink * rr)).sum(1)
    q = _rope_cat(query, rq).unsqueeze(0).transpose(1, 2)
    k = _rope_cat(key, rk).unsqueeze(0).transpose(1, 2)
    v = value.unsqueeze(0).transpose(1, 2)
    tk, tq = a.cfg.kv, a.cfg.q
    stats = (prob.n1, prob.softmax_layout == "TND")
    tab_kv, kv_plan = table.tab(stats, (tk.bm, tk.bn, True))
    tab_q, q_plan = table.tab(stats, (tq.bm, tq.bn, False))
    a.mk_strides = (0,) + a.mk_strides[1:]
    a.sp = (1 if a.pse_t is not None else 0,) + a.sp[1:]
    a.ssl = (1 if a.slope is not None else 0, a.ssl[1])
    dq4 = dq_b.unsqueeze(0).transpose(1, 2)
    dk4 = dk_b.unsqueeze(0).transpose(1, 2)
    dv4 = dv_b.unsqueeze(0).transpose(1, 2)
    _launch_bwd(a, q, k, v, dy4, dq4, dk4, dv4, rm, ri, rr, t1, 0, nb=table.nb, sq_max=table.sq_max,
                skv_max=table.skv_max, tab=(tab_kv, tab_q),
                plans=(kv_plan or (None, None), q_plan or (None, None)))
    if dpse is not None:
        for seg in prob.segments:
            sa = _Args(seg, prob)
            if sa.pse_kind not in (1, 2, 3):
                continue
            bt = seg.batch
            _launch_dpse(sa, seg.q, seg.k, seg.v, fa.tnd_rows(dy, bt.q0, bt.sq), dpse[seg.pse_rows],
                         rm[:, bt.q0:], ri[:, bt.q0:], rr[:, bt.q0:], r_n=t1, r_b=0)
