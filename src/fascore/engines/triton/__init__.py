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
            reasons.append("dropout: the segment's Dropout predates SPEC 5's Ascend model")
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


def _csr(kinds: Tensor, transpose: bool) -> tuple[Tensor, Tensor]:
    """Non-empty tiles of a block plan per row (per column if ``transpose``) as (ptr, codes):
    code = block * 2 + (tile is PARTIAL), blocks in increasing order."""
    k = kinds.t() if transpose else kinds
    nz = k != fa.EMPTY
    ptr = torch.zeros(k.shape[0] + 1, dtype=torch.int32, device=k.device)
    ptr[1:] = nz.sum(1).cumsum(0).to(torch.int32)
    _, col = nz.nonzero(as_tuple=True)
    codes = (col * 2 + (k[nz] == fa.PARTIAL).to(col.dtype)).to(torch.int32)
    if codes.numel() == 0:
        codes = torch.zeros(1, dtype=torch.int32, device=k.device)
    return ptr, codes


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
        return _csr(kinds, transpose)

    @property
    def reverse(self) -> bool:
        return self.hi < self.skv - 1  # the band cuts the right side: later rows are longer


def _strides4(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


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
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out), *sm,
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
        dy, out, m, l, rm, ri, rr, tab, *_strides4(dy), *_strides4(out), *sm,
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
    kv_plan = plans[0] if plans is not None else a.plan(tk.bm, tk.bn, True)
    q_plan = plans[1] if plans is not None else a.plan(tq.bm, tq.bn, False)
    gy, gz = _grid_bh(nb * a.n2)
    kernels.bwd_kv_kernel[(triton.cdiv(skv_max or a.skv, tk.bn), gy, gz)](
        q, k, v, dy, dk, dvv, rm, ri, rr, tab, a.pfx, a.mk, kv_plan[0], kv_plan[1], a.pse_t, a.slope, a.bits,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dy), *_strides4(dk), *_strides4(dvv),
        r_n=r_n, r_b=r_b, ssl_b=a.ssl[0], ssl_n=a.ssl[1], NBH=nb * a.n2, N1=a.n1, N2=a.n2, ADELTA=a.adelta,
        plan_nq=0, BM=tk.bm, BN=tk.bn, VARLEN=tab is not None, num_warps=tk.warps, num_stages=tk.stages, **com)
    gy, gz = _grid_bh(nb * a.n1)
    kernels.bwd_q_kernel[(triton.cdiv(sq_max or a.sq, tq.bm), gy, gz)](
        q, k, v, dy, dq, rm, ri, rr, tab, a.pfx, a.mk, q_plan[0], q_plan[1], a.pse_t, a.slope, a.bits,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dy), *_strides4(dq),
        r_n=r_n, r_b=r_b, ssl_b=a.ssl[0], ssl_n=a.ssl[1], NBH=nb * a.n1, N1=a.n1, ADELTA=a.adelta,
        BM=tq.bm, BN=tq.bn, VARLEN=tab is not None, REVERSE=a.reverse, num_warps=tq.warps,
        num_stages=tq.stages, **com)


def _launch_dpse(a: _Args, q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dpse: Tensor, rm: Tensor, ri: Tensor,
                 rr: Tensor) -> None:
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
        a.b * a.sq, a.sq, NB=a.b, N1=a.n1, G=a.g, n_chain=chain, BM=bm, BN=bn, MODE=mode, BATCH_SUM=batch_sum,
        BJ=bm + bn if mode == 3 else bn, num_warps=t.warps, num_stages=t.stages, **com)


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
